"""Model and tokenizer loading: safetensors round trip, dtype, LoRA, clear errors."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from alignlab.core.config import LoraSettings
from alignlab.core.errors import ConfigError
from alignlab.models import loading
from alignlab.models.loading import load_model, load_reference_model, load_tokenizer


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).float()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return model, path


def test_round_trip_safetensors(saved_model):
    model, path = saved_model
    assert list(path.glob("*.safetensors")) and not list(path.glob("*.bin"))
    loaded = load_model(path, dtype="float32")
    assert loaded.training
    ids = torch.randint(0, 64, (2, 6))
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_dtype_and_reference_model(saved_model):
    _, path = saved_model
    assert load_model(path, dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    ref = load_reference_model(path, dtype="float32")
    assert not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    with pytest.raises(ConfigError, match="dtype"):
        load_model(path, dtype="float8")


def test_trust_remote_code_default_false_and_safetensors_only(saved_model, monkeypatch):
    _, path = saved_model
    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(name, **kwargs):
        seen.update(kwargs)
        return original(name, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(path, dtype="float32")
    assert seen["trust_remote_code"] is False
    assert seen["use_safetensors"] is True
    assert "torch_dtype" not in seen and seen["dtype"] == torch.float32


def test_missing_path_is_a_clear_config_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ConfigError, match="not a local directory") as info:
        load_model(missing)
    assert str(missing) in str(info.value)
    assert "nothing is downloaded" in str(info.value)


def test_directory_without_safetensors_is_a_config_error(tmp_path, saved_model):
    _, path = saved_model
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ConfigError, match="could not load"):
        load_model(tmp_path)


def test_lora_only_adapters_trainable(saved_model):
    _, path = saved_model
    model = load_model(path, dtype="float32", lora=LoraSettings(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ValidationError, match="r"):
        LoraSettings(r=0)


def test_tokenizer_pad_falls_back_to_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, "a": 2, "b": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == "<eos>" and tok.pad_token_id == 0
    assert tok("a b")["input_ids"] == [2, 3]


def test_hub_id_without_network_is_config_error(monkeypatch):
    def offline(name, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ConfigError, match="some-org/some-model"):
        loading.load_model("some-org/some-model")


# ---- broken model directories are one-line errors (issue 15) -------------------------------

def _copy(path, dst):
    import shutil

    shutil.copytree(path, dst)
    return dst


def test_directory_without_config_json_names_the_directory(tmp_path, saved_model):
    _, path = saved_model
    bad = _copy(path, tmp_path / "m")
    (bad / "config.json").unlink()
    with pytest.raises(ConfigError, match="has no config.json") as info:
        load_model(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    (bad / "adapter_config.json").write_text("{}")  # an adapter config without its base
    with pytest.raises(ConfigError, match="base_model_name_or_path"):
        load_model(bad)


def test_directory_without_tokenizer_is_a_config_error(tmp_path, saved_model):
    _, path = saved_model  # a model saved without its tokenizer
    with pytest.raises(ConfigError, match="has no tokenizer"):
        load_tokenizer(path)
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(ConfigError, match="could not load"):
        load_tokenizer(tmp_path)  # config only: no vocabulary to build it from


@pytest.mark.parametrize("keep", [lambda n: n // 2, lambda n: n - 1, lambda n: 20, lambda n: 0],
                         ids=["half", "last-byte", "in-header", "empty"])
def test_truncated_safetensors_is_a_config_error(tmp_path, saved_model, keep):
    _, path = saved_model
    bad = _copy(path, tmp_path / "m")
    file = bad / "model.safetensors"
    with open(file, "r+b") as f:
        f.truncate(keep(file.stat().st_size))
    with pytest.raises(ConfigError, match="safetensors") as info:
        load_model(bad)
    assert str(file) in str(info.value)


def test_safetensors_with_a_garbage_header_is_a_config_error(tmp_path, saved_model):
    _, path = saved_model
    bad = _copy(path, tmp_path / "m")
    file = bad / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:16] = b"\xff\xfe{{{{{{"
    file.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        load_model(bad)


def test_memoized_fingerprint_sees_a_rewrite_that_keeps_size_and_mtime(tmp_path):
    import os

    from alignlab.models.fingerprint import directory_fingerprint, memoized_fingerprint

    (tmp_path / "sub").mkdir()
    weights = tmp_path / "sub" / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    (tmp_path / "notes.md").write_text("ignored")
    first = memoized_fingerprint(tmp_path, recursive=True)
    assert first == directory_fingerprint(tmp_path, recursive=True)
    assert directory_fingerprint(tmp_path) != first  # not recursive: the member is not seen
    (tmp_path / "notes.md").write_text("still ignored")
    assert memoized_fingerprint(tmp_path, recursive=True) == first
    st = weights.stat()
    weights.write_bytes(b"b" * 64)  # same size
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    assert memoized_fingerprint(tmp_path, recursive=True) != first
    assert memoized_fingerprint(tmp_path / "missing") is None
