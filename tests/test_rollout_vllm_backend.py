"""The vLLM rollout backend's glue (``rollout/vllm_backend.py``) on CPU, against a stand-in
``vllm`` module injected into ``sys.modules`` (vLLM itself needs a CUDA GPU; the sampler's
log-probs against the trainer's are ``benchmarks/vllm_smoke.py``'s check on one).

The stand-in ``LLM`` loads the policy's directory with transformers (random weights under
``load_format="dummy"``, as vLLM's are until the first sync), takes weights through
``apply_model(fn)`` → ``fn(model).load_weights(...)``, and samples with alignlab's own engine,
returning vLLM's output shapes: ``RequestOutput.outputs[i].token_ids``, ``finish_reason``,
``stop_reason`` and ``logprobs[t][token].logprob``."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignlab.core.config import LoraSettings, RolloutSection, VLLMSection
from alignlab.core.errors import ConfigError
from alignlab.models.loading import apply_lora, load_model, load_tokenizer
from alignlab.models.logprobs import token_logprobs
from alignlab.rollout.engine import SamplingParams, rollout
from alignlab.rollout.role import RolloutRole, make_backend
from alignlab.rollout.vllm_backend import VLLMBackend, hf_name, policy_weights

from tests.conftest import random_llama

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*is_gradient_checkpointing:FutureWarning",  # peft reads it when wrapping a model
    "ignore:Model has `tie_word_embeddings=True`:UserWarning")  # lm_head in modules_to_save


class FakeSamplingParams:
    def __init__(self, **kwargs) -> None:
        self.__dict__.update(kwargs)


class FakeLoRARequest:
    def __init__(self, lora_name, lora_int_id, lora_path) -> None:
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


class FakeLLM:
    """``vllm.LLM`` as alignlab uses it (see the module docstring)."""

    instances: list[FakeLLM] = []

    def __init__(self, model: str, **kwargs) -> None:
        self.kwargs = {"model": model, **kwargs}
        self.hf = AutoModelForCausalLM.from_pretrained(model).eval()
        if kwargs.get("load_format") == "dummy":
            with torch.no_grad():
                for p in self.hf.parameters():
                    p.normal_(0.0, 0.02)
        self.loads: list[dict[str, torch.Tensor]] = []
        self.calls: list[tuple] = []
        self.events: list[str] = []
        FakeLLM.instances.append(self)

    def apply_model(self, func):
        return [func(self)]

    def load_weights(self, weights) -> None:
        params = dict(self.hf.named_parameters())
        loaded = {}
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)
                loaded[name] = tensor.detach().clone()
        self.loads.append(loaded)
        self.events.append("load")

    def reset_prefix_cache(self) -> None:
        self.events.append("reset")

    def sleep(self, level: int = 1) -> None:
        self.events.append(f"sleep{level}")

    def wake_up(self, tags=None) -> None:
        self.events.append("wake")

    def generate(self, prompts, sampling_params, *, use_tqdm=True, lora_request=None):
        self.calls.append((prompts, sampling_params, lora_request))
        self.events.append("generate")
        outputs = []
        for prompt, sp in zip(prompts, sampling_params):
            rb = rollout(self.hf, [prompt["prompt_token_ids"]],
                         SamplingParams(temperature=sp.temperature, top_p=sp.top_p, n=sp.n,
                                        max_new_tokens=sp.max_tokens, seed=sp.seed),
                         eos_token_id=list(sp.stop_token_ids), pad_token_id=0, warn_length=False)
            completions = []
            for i, ids in enumerate(rb.completion_ids):
                stopped = ids[-1] in sp.stop_token_ids
                completions.append(SimpleNamespace(
                    index=i, token_ids=tuple(ids), finish_reason="stop" if stopped else "length",
                    stop_reason=ids[-1] if stopped else None,
                    logprobs=[{t: SimpleNamespace(logprob=float(rb.logprobs[i, k]), rank=1)}
                              for k, t in enumerate(ids)]))
            outputs.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"],
                                           outputs=completions))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    FakeLLM.instances = []
    module = types.ModuleType("vllm")
    module.__spec__ = SimpleNamespace(name="vllm")  # found by importlib.util.find_spec
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest
    for name, mod in (("vllm", module), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    return FakeLLM.instances


@pytest.fixture
def policy_dir(tmp_path):
    model = random_llama(vocab_size=64, hidden=32, layers=2, seed=3)
    model.config.eos_token_id = 2
    model.save_pretrained(tmp_path / "policy")
    return tmp_path / "policy"


def _policy(path):
    return AutoModelForCausalLM.from_pretrained(str(path)).train()


# ---------------------------------------------------------------------------- errors


def test_without_vllm_or_cuda_the_backend_is_a_config_error_naming_the_field(
        monkeypatch, policy_dir, fake_vllm):
    policy = _policy(policy_dir)
    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    with pytest.raises(ConfigError, match=r"field 'rollout.backend': 'vllm' samples on a CUDA "
                                          r"GPU.*use rollout.backend: builtin"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        make_backend(RolloutSection(backend="vllm"), policy, tok)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"field 'rollout.backend': 'vllm' needs the vllm "
                                          r"package.*pip install 'alignlab\[vllm\]'.*builtin"):
        make_backend(RolloutSection(backend="vllm"), policy, tok)
    assert fake_vllm == []  # no engine was built


def test_vllm_takes_no_logits_processor_and_no_stop_strings(fake_vllm, policy_dir):
    policy, tok = _policy(policy_dir), SimpleNamespace(eos_token_id=2, pad_token_id=0)
    with pytest.raises(ConfigError, match="rollout.backend.*NLPO"):
        make_backend(RolloutSection(backend="vllm"), policy, tok, logits_processor=lambda: None)
    backend = make_backend(RolloutSection(backend="vllm"), policy, tok)
    backend.sync_weights(policy)
    with pytest.raises(ConfigError, match="stop strings"):
        backend.generate([[5, 6]], SamplingParams(stop=("end",)))


# ---------------------------------------------------------------------------- the engine


def test_the_engine_is_built_from_the_policy_directory_with_dummy_weights(fake_vllm, policy_dir):
    import os

    section = VLLMSection(gpu_memory_utilization=0.45, enforce_eager=True, max_model_len=96,
                          engine_kwargs={"max_num_seqs": 7})
    VLLMBackend(_policy(policy_dir), section, eos_token_id=2, train_precision="bf16")
    kwargs = fake_vllm[0].kwargs
    assert kwargs == dict(
        model=str(policy_dir), skip_tokenizer_init=True, load_format="dummy", dtype="bfloat16",
        gpu_memory_utilization=0.45, tensor_parallel_size=1, enforce_eager=True,
        max_model_len=96, enable_prefix_caching=True, enable_sleep_mode=False,
        logprobs_mode="processed_logprobs", seed=0, max_num_seqs=7)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # in-process: no pickled weights
    VLLMBackend(_policy(policy_dir), VLLMSection(), eos_token_id=2, train_precision="fp32")
    assert fake_vllm[1].kwargs["dtype"] == "float32"  # dtype: train follows the trainer
    VLLMBackend(_policy(policy_dir), VLLMSection(dtype="float16"), eos_token_id=2)
    assert fake_vllm[2].kwargs["dtype"] == "float16"


def test_sync_loads_every_weight_under_its_checkpoint_name_and_resets_the_prefix_cache(
        fake_vllm, policy_dir):
    policy = _policy(policy_dir)
    backend = VLLMBackend(policy, VLLMSection(), eos_token_id=2)
    with pytest.raises(RuntimeError, match="before sync_weights"):
        backend.generate([[5, 6]], SamplingParams())
    backend.sync_weights(policy)
    llm = fake_vllm[0]
    expected = dict(policy.named_parameters())
    assert llm.loads[0].keys() == expected.keys()
    assert all(torch.equal(llm.loads[0][k], v) for k, v in expected.items())
    assert llm.events == ["load", "reset"]
    with torch.no_grad():  # an update, then a sync: vLLM holds the new weights
        policy.model.embed_tokens.weight.add_(0.5)
    backend.sync_weights(policy)
    assert torch.equal(llm.hf.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    assert llm.events == ["load", "reset", "load", "reset"] and backend.syncs == 2


def test_sampling_params_and_one_seed_per_prompt(fake_vllm, policy_dir):
    policy = _policy(policy_dir)
    backend = VLLMBackend(policy, VLLMSection(), eos_token_id=2)
    backend.sync_weights(policy)
    params = SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05, max_new_tokens=5, n=3,
                            seed=11, stop_token_ids=(9,))
    backend.generate([[5, 6], [7], [8, 8, 8]], params)
    prompts, sps, lora = fake_vllm[0].calls[0]
    assert prompts == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7]},
                       {"prompt_token_ids": [8, 8, 8]}]
    assert lora is None
    for sp in sps:
        assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.max_tokens) == (
            3, 0.7, 0.9, -1, 0.05, 5)
        assert (sp.logprobs, sp.detokenize, sp.stop_token_ids) == (0, False, [2, 9])
    seeds = [sp.seed for sp in sps]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**31 for s in seeds)
    backend.generate([[5, 6], [7], [8, 8, 8]], params)  # the same call seed: the same seeds
    assert [sp.seed for sp in fake_vllm[0].calls[1][1]] == seeds
    backend.generate([[5, 6]], SamplingParams(top_k=4, seed=12))
    sp = fake_vllm[0].calls[2][1][0]
    assert sp.top_k == 4 and sp.seed != seeds[0]


def _out(ids, reason, stop=None, lps=None):
    lps = [-0.1 * (k + 1) for k in range(len(ids))] if lps is None else lps
    return SimpleNamespace(token_ids=ids, finish_reason=reason, stop_reason=stop,
                           logprobs=None if lps == "none" else
                           [{t: SimpleNamespace(logprob=lp)} for t, lp in zip(ids, lps)])


def test_outputs_become_ids_with_their_ending_token_reasons_and_log_probs(fake_vllm, policy_dir):
    policy = _policy(policy_dir)
    backend = VLLMBackend(policy, VLLMSection(), eos_token_id=2)
    backend.sync_weights(policy)
    scripted = [SimpleNamespace(outputs=[_out((5, 2), "stop", 2),  # ended by eos
                                         _out((5, 6, 2), "length"),  # eos as the last allowed
                                         _out((7, 9), "stop", 9),  # a stop id
                                         _out((7, 7, 7), "length")])]
    backend.llm.generate = lambda *a, **k: scripted
    gen = backend.generate([[4]], SamplingParams(n=4, stop_token_ids=(9,)))
    assert gen.completion_ids == [[5, 2], [5, 6, 2], [7, 9], [7, 7, 7]]
    assert gen.finish_reasons == ["eos", "eos", "stop", "length"]
    assert gen.logprobs[2] == pytest.approx([-0.1, -0.2])
    assert gen.logprobs[3] == pytest.approx([-0.1, -0.2, -0.3])
    for bad, match in [([_out((5,), "stop", 2)], "without the stop id 2"),
                       ([_out((5, 2), "stop", 2, lps="none")], "no log-prob"),
                       ([_out((5, 2), "stop", 2, lps=[-0.1])], "no log-prob"),
                       ([], "returned 0 completions")]:
        backend.llm.generate = lambda *a, b=bad, **k: [SimpleNamespace(outputs=b)]
        with pytest.raises(RuntimeError, match=match):
            backend.generate([[4]], SamplingParams(n=len(bad) or 1))


def test_the_role_on_vllm_trains_on_the_sampled_ids_with_the_samplers_log_probs(
        fake_vllm, tiny_world):
    policy = load_model(str(tiny_world.base_dir))
    tok = load_tokenizer(str(tiny_world.base_dir))
    role = RolloutRole(policy, tok, max_new_tokens=8, temperature=0.8,
                       backend=make_backend(RolloutSection(backend="vllm"), policy, tok))
    role.sync_weights()
    r = role.generate(["the food was", "the staff"], 3, seed=4)
    assert r.prompt_index == [0, 0, 0, 1, 1, 1] and len(r.completion_ids) == 6
    batch = role.to_batch(r)
    recomputed = token_logprobs(policy.eval(), batch, temperature=0.8)
    mask = batch["loss_mask"].bool()
    # the sampler (the stand-in: synced weights, alignlab's engine) and the trainer agree
    assert (recomputed - batch["rollout_logprobs"])[mask].abs().max() < 1e-4
    for i, (ids, why) in enumerate(zip(r.completion_ids, r.finish_reasons)):
        assert tok.eos_token_id not in ids  # the eos is appended back by to_batch only
        assert int(mask[i].sum()) == len(ids) + (why == "eos")
        assert r.completions[i] == tok.decode(ids, skip_special_tokens=True)
        assert len(r.logprobs[i]) == len(ids) + (why == "eos")


def test_sleep_mode_sleeps_after_sampling_and_wakes_to_sync_or_sample(fake_vllm, policy_dir):
    policy = _policy(policy_dir)
    backend = VLLMBackend(policy, VLLMSection(enable_sleep_mode=True), eos_token_id=2)
    backend.sync_weights(policy)
    backend.generate([[5]], SamplingParams(max_new_tokens=2))
    backend.generate([[5]], SamplingParams(max_new_tokens=2))  # e.g. ReMax's greedy baseline
    backend.sync_weights(policy)
    assert fake_vllm[0].events == ["load", "reset", "generate", "sleep1", "wake", "generate",
                                   "sleep1", "wake", "load", "reset"]
    assert fake_vllm[0].kwargs["enable_sleep_mode"] is True


# ---------------------------------------------------------------------------- LoRA


def _with_nonzero_b(policy):
    with torch.no_grad():  # B = 0 at init would make merged == base: give the adapters a value
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return policy


def _lora_policy(policy_dir, **lora):
    return _with_nonzero_b(apply_lora(_policy(policy_dir), LoraSettings(r=4, alpha=8, **lora)))


def test_lora_merged_sync_sends_w_plus_ba_under_plain_names_and_leaves_the_policy_alone(
        fake_vllm, policy_dir):
    policy = _lora_policy(policy_dir, target_modules=["q_proj", "v_proj"],
                          modules_to_save=["model.norm"])
    with torch.no_grad():  # the trained copy of the final norm differs from the original
        policy.base_model.model.model.norm.modules_to_save["default"].weight.add_(0.25)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    backend = VLLMBackend(policy, VLLMSection(), eos_token_id=2)
    backend.sync_weights(policy)
    merged = copy.deepcopy(policy).merge_and_unload()
    expected = dict(merged.named_parameters())
    sent = fake_vllm[0].loads[0]
    assert sent.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(sent[name], tensor, rtol=0, atol=1e-6, msg=name)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sent[q], before[f"base_model.model.{q}".replace(
        "q_proj.weight", "q_proj.base_layer.weight")])  # the adapters are in it
    after = policy.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(sent["model.norm.weight"], torch.full_like(sent["model.norm.weight"], 1.25))
    assert "enable_lora" not in fake_vllm[0].kwargs


def test_lora_adapter_sync_loads_the_base_once_then_only_adapters_each_sync(
        fake_vllm, policy_dir, tmp_path):
    policy = _lora_policy(policy_dir, target_modules=["q_proj", "v_proj"])
    backend = VLLMBackend(policy, VLLMSection(lora_sync="adapter"), eos_token_id=2,
                          work_dir=tmp_path / "adapters")
    llm = fake_vllm[0]
    assert (llm.kwargs["enable_lora"], llm.kwargs["max_loras"], llm.kwargs["max_lora_rank"]) == (
        True, 1, 4)
    for _ in range(3):
        backend.sync_weights(policy)
        backend.generate([[5]], SamplingParams(max_new_tokens=2))
    assert len(llm.loads) == 1  # the frozen base weights, once
    base = {hf_name(n): p for n, p in policy.named_parameters()
            if "lora_" not in n}
    assert llm.loads[0].keys() == base.keys()
    assert all(torch.equal(llm.loads[0][k], v) for k, v in base.items())
    requests = [call[2] for call in llm.calls]
    assert [r.lora_int_id for r in requests] == [1, 2, 3]
    assert len({r.lora_name for r in requests}) == 3
    root = tmp_path / "adapters"
    dirs = sorted(p.name for p in next(root.iterdir()).iterdir())
    assert dirs == ["sync-000002", "sync-000003"]  # older adapters are removed
    assert (next(root.iterdir()) / "sync-000003" / "adapter_config.json").exists()
    with pytest.raises(ConfigError, match="rollout.vllm.lora_sync.*modules_to_save"):
        VLLMBackend(_lora_policy(policy_dir, modules_to_save=["lm_head"]),
                    VLLMSection(lora_sync="adapter"), eos_token_id=2)


def test_hf_names_drop_peft_wrappers():
    assert hf_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight")
    assert hf_name("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"
    assert hf_name("model.norm.weight") == "model.norm.weight"
    plain = random_llama(seed=1)
    assert [n for n, _ in policy_weights(plain)] == [n for n, _ in plain.named_parameters()]


# ---------------------------------------------------------------------------- in training


def test_grpo_on_the_vllm_backend_syncs_before_every_rollout(fake_vllm, world_cache, tmp_path):
    from alignlab.algorithms.policy_gradient.config import RLSection, RolloutCorrectionSection
    from alignlab.algorithms.policy_gradient.run import train_policy_gradient

    from tests.conftest import online_config

    cfg = online_config(world_cache, tmp_path, RLSection(
        rollout_correction=RolloutCorrectionSection()), steps=3)
    cfg.rollout = RolloutSection(prompts="world:positive", prompts_per_step=4, n=4,
                                 max_new_tokens=12, backend="vllm")
    cfg.train.precision, cfg.train.device = "fp32", "cpu"  # CUDA is faked for vLLM only
    run = train_policy_gradient(cfg, "grpo")
    llm, = fake_vllm
    assert llm.events == ["load", "reset", "generate"] * 3
    # each sync sent the policy as it was before that iteration's update: the last one differs
    # from the first (the policy learned) and the sampler's log-probs match the trainer's
    first, last = llm.loads[0], llm.loads[-1]
    assert any(not torch.equal(first[k], last[k]) for k in first)
    for row in run.result.history:
        assert row["rollout_is/abs_logp_diff_mean"] < 1e-4
        assert math.isclose(row["rollout_is/weight_mean"], 1.0, abs_tol=1e-3)
    with pytest.raises(ConfigError, match="rollout.backend.*online_dpo"):
        from alignlab.algorithms.registry import ALGORITHMS

        entry = ALGORITHMS.get("online_dpo")
        entry.run(entry.config_cls(rollout={"backend": "vllm"},
                                     train={"output_dir": str(tmp_path / "odpo")}))


@pytest.fixture
def smoke(monkeypatch):
    """benchmarks/vllm_smoke.py as a module."""
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "vllm_smoke", Path(__file__).parents[1] / "benchmarks" / "vllm_smoke.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "vllm_smoke", module)  # its dataclass looks itself up
    spec.loader.exec_module(module)
    return module


def test_the_gpu_smoke_scripts_checks_pass_against_the_stand_in(fake_vllm, tiny_world, smoke):
    # benchmarks/vllm_smoke.py's own logic, run on CPU: synced weights agree, a moved policy
    # not synced does not, and a sync restores agreement (the stand-in samples what it holds)
    tok = load_tokenizer(str(tiny_world.base_dir))
    for lora in (None, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])):
        policy = load_model(str(tiny_world.base_dir))
        if lora is not None:
            policy = _with_nonzero_b(apply_lora(policy, lora))
        result = smoke.sync_case(policy, tok, VLLMSection(), precision="fp32", dtype="float32",
                                 prompts=["the food was", "the staff"])
        assert result["ok"], result
        assert result["synced"]["mean_abs_diff"] < 1e-5
        assert result["stale_without_sync"]["mean_abs_diff"] > 1e-3


def test_the_gpu_smoke_script_says_it_needs_a_gpu(monkeypatch, capsys, smoke):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert smoke.main([]) == 2
    assert "needs a CUDA GPU and vLLM: no CUDA GPU is visible" in capsys.readouterr().out
