"""Scalar heads on a causal-LM backbone: value models (PPO) and reward models (Bradley-Terry).

``CausalLMWithScalarHead`` maps every token's final hidden state to ``num_heads`` scalars
(``num_heads > 1`` for an ensemble of heads sharing one backbone). A reward is read at each
sequence's last token (``sequence_values``); a value model uses every token (``forward``).

On disk: the standard ``XForSequenceClassification`` checkpoint (``score`` weights,
``num_labels`` = number of heads, ``pad_token_id`` set), loadable with
``AutoModelForSequenceClassification`` as TRL's reward models are. Loading also accepts any such
checkpoint with ``num_labels=1`` and alignlab's older layout (backbone + ``scalar_head.*``); all
share this interface and work on packed batches.

LoRA (:meth:`CausalLMWithScalarHead.add_lora`): adapters on the body, the head trained whole
(what peft's ``modules_to_save`` does for a classifier's ``score``). Saved as the merged model in
the usual layout plus ``adapter/`` (peft's adapter layout of the body, the head's
``scalar_head.*`` files), which :meth:`CausalLMWithScalarHead.from_pretrained` also reads.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignlab.core.config import LoraSettings
from alignlab.core.errors import ConfigError
from alignlab.models.adapters import (
    ADAPTER_DIR,
    apply_lora,
    has_adapters,
    is_quantized,
    merged,
    quantization_kwargs,
    quiet_peft,
    save_adapters,
)
from alignlab.models.backbone import find_decoder
from alignlab.models.loading import (
    ADAPTER_CONFIG,
    freeze,
    from_pretrained_checked,
    model_load_kwargs,
)
from alignlab.models.logprobs import hidden_states, sequence_values

HEAD_WEIGHTS = "scalar_head.safetensors"
HEAD_CONFIG = "scalar_head.json"
_FORMAT = "alignlab.scalar_head"


def _hidden_size(backbone: nn.Module) -> int:
    config = backbone.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.hidden_size)


def _as_backbone(model: nn.Module) -> nn.Module:
    """The transformer body: a causal LM (or PEFT model) gives its decoder; a body is kept."""
    decoder = find_decoder(model)
    if decoder is not None:
        return decoder
    from peft import PeftModel

    if isinstance(model, PeftModel):  # a body with adapters: they stay in its layers
        return model.get_base_model()
    if hasattr(model, "config"):
        return model  # already a base model such as LlamaModel (get_decoder returns itself)
    raise ConfigError(f"cannot find the transformer body of {type(model).__name__}")


class CausalLMWithScalarHead(nn.Module):
    """``v_t = w^T h_t + b`` on the backbone's last hidden state (float32 head), per token."""

    def __init__(self, backbone: nn.Module, num_heads: int = 1, *, bias: bool = True,
                 head: nn.Linear | None = None) -> None:
        super().__init__()
        self.backbone = _as_backbone(backbone)
        hidden = _hidden_size(self.backbone)
        if head is None:
            if num_heads < 1:
                raise ConfigError(f"num_heads must be >= 1, got {num_heads}")
            head = nn.Linear(hidden, num_heads, bias=bias)
            # Small outputs at init so early values/rewards do not swamp the policy loss.
            nn.init.normal_(head.weight, std=1.0 / math.sqrt(hidden + 1))
            if head.bias is not None:
                nn.init.zeros_(head.bias)
        if head.in_features != hidden:
            raise ConfigError(f"head expects {head.in_features} features, backbone has {hidden}")
        head_device = next(self.backbone.parameters()).device
        self.head = head.to(device=head_device, dtype=torch.float32)

    @property
    def num_heads(self) -> int:
        return self.head.out_features

    @property
    def config(self) -> Any:
        return self.backbone.config

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """Per-token values: ``[B,T]`` (``[B,T,K]`` when ``num_heads = K > 1``), float32."""
        values = self.head(hidden_states(self.backbone, batch).float())
        return values.squeeze(-1) if self.num_heads == 1 else values

    def add_lora(self, lora: LoraSettings) -> "CausalLMWithScalarHead":
        """Train LoRA adapters on the body instead of all its weights (frozen); the head keeps
        training whole, as peft's ``modules_to_save`` trains a classifier's ``score``."""
        adapted = apply_lora(self.backbone, lora, task_type="FEATURE_EXTRACTION")
        self.backbone = _as_backbone(adapted)
        return self

    def sequence_values(self, batch: dict[str, Any]) -> Tensor:
        """The value (reward) at each sequence's last token: ``[S]`` (``[S,K]``); sequences that
        share a prompt (a pair's chosen and rejected) compute it once where prefix sharing
        applies (:func:`alignlab.models.logprobs.sequence_values`)."""
        return sequence_values(self, batch)

    def save_pretrained(self, directory: str | os.PathLike, *, pad_token_id: int | None = None,
                        state_dict: dict[str, Tensor] | None = None) -> None:
        """The standard ``XForSequenceClassification`` layout (what TRL's RewardTrainer writes):
        the body under the class's prefix, ``score.weight`` (float32) with ``num_labels`` =
        ``num_heads``, ``pad_token_id`` in config.json, so ``AutoModelForSequenceClassification``
        loads it with nothing missing. HF's ``score`` has no bias: a head's bias is kept in
        config.json (``alignlab_score_bias``), which alignlab's loader re-applies exactly and HF
        ignores (its scores are then ``r − b``, a shift per head that leaves every comparison
        unchanged; zero for heads trained without a bias). Architectures without a
        sequence-classification class keep the older layout (backbone + ``scalar_head.*``).
        With LoRA the body is saved merged, and the adapters with the head in ``adapter/``
        (a QLoRA body is merged into its base reloaded unquantized on the CPU). ``state_dict``:
        this module's full weights to write instead of its own (a model sharded by FSDP2 holds
        only its shards; ``engine.sharding.full_state_dict`` gathers them)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        full = state_dict if state_dict is not None else {
            k: v.detach() for k, v in self.state_dict().items()}
        body = {k.removeprefix("backbone."): v for k, v in full.items() if k.startswith("backbone.")}
        head = {k.removeprefix("head."): v for k, v in full.items() if k.startswith("head.")}
        if has_adapters(self.backbone):
            save_adapters(self.backbone, out / ADAPTER_DIR)
            self._save_head(out / ADAPTER_DIR)
            plain = (type(self).from_pretrained(out / ADAPTER_DIR) if is_quantized(self.backbone)
                     else type(self)(merged(self.backbone, device="cpu"), head=self.head))
            plain.save_pretrained(out, pad_token_id=pad_token_id)
            return
        name = _classifier_class_name(self.config)
        if name is None:
            self.backbone.save_pretrained(out, state_dict=body)
            self._save_head(out, head)
            return
        import transformers

        cls = getattr(transformers, name)
        config = copy.deepcopy(self.backbone.config)
        config.architectures, config.num_labels = [name], self.num_heads
        config.alignlab_reward_heads = self.num_heads
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
        elif getattr(config, "pad_token_id", None) is None:
            eos = getattr(config, "eos_token_id", None)
            config.pad_token_id = eos[0] if isinstance(eos, list) else eos
        if "bias" in head:
            config.alignlab_score_bias = [float(b) for b in head["bias"].cpu().tolist()]
        with torch.device("meta"):  # only the wrapper is built; body and score are ours
            classifier = cls(config)
        setattr(classifier, cls.base_model_prefix, self.backbone)
        score = nn.Linear(self.head.in_features, self.num_heads, bias=False)
        score.weight = nn.Parameter(head["weight"].to("cpu", torch.float32).clone())
        classifier.score = score
        prefix = cls.base_model_prefix
        classifier.save_pretrained(out, state_dict={
            **{f"{prefix}.{k}": v for k, v in body.items()}, "score.weight": score.weight})

    def _save_head(self, out: Path, head: dict[str, Tensor] | None = None) -> None:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        head = {k: v.detach() for k, v in self.head.state_dict().items()} if head is None else head
        tensors = {k: v.contiguous().cpu() for k, v in head.items()}
        save_file(tensors, str(out / HEAD_WEIGHTS))
        meta = {"format": _FORMAT, "version": 1, "num_heads": self.num_heads,
                "hidden_size": self.head.in_features, "bias": self.head.bias is not None}
        (out / HEAD_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
                        device: str | torch.device = "cpu", trust_remote_code: bool = False,
                        attn_implementation: str | None = None) -> "CausalLMWithScalarHead":
        """Restore what ``save_pretrained`` wrote, in either layout: a sequence-classification
        checkpoint (any ``AutoModelForSequenceClassification`` reward model with
        ``num_labels=1``, or alignlab's with one label per head), the older backbone +
        ``scalar_head.*`` directory, or a LoRA run's ``adapter/`` (merged into the base its
        ``adapter_config.json`` names). No pickle anywhere."""
        root = Path(directory).expanduser()
        if (root / ADAPTER_CONFIG).is_file() and not (root / "config.json").is_file():
            model = cls._from_adapter(root, dtype, trust_remote_code, attn_implementation)
        elif (root / HEAD_CONFIG).is_file() or (root / HEAD_WEIGHTS).is_file():
            model = cls._from_scalar_head_layout(root, dtype, trust_remote_code, attn_implementation)
        else:
            model = cls._from_classifier(directory, dtype, trust_remote_code, attn_implementation)
        model.to(device)
        model.train()
        return model

    @classmethod
    def _from_scalar_head_layout(cls, root: Path, dtype: str | torch.dtype, trust_remote_code: bool,
                                 attn_implementation: str | None) -> "CausalLMWithScalarHead":
        from transformers import AutoModel

        head = _load_head(root)
        backbone = from_pretrained_checked(
            AutoModel, root, **model_load_kwargs(dtype, trust_remote_code, attn_implementation))
        return cls(backbone, head=head)

    @classmethod
    def _from_adapter(cls, root: Path, dtype: str | torch.dtype, trust_remote_code: bool,
                      attn_implementation: str | None) -> "CausalLMWithScalarHead":
        from peft import PeftModel
        from transformers import AutoModel

        head = _load_head(root)
        try:
            base = json.loads((root / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{root / ADAPTER_CONFIG}: not a PEFT adapter config with a "
                              "'base_model_name_or_path'") from None
        backbone = from_pretrained_checked(
            AutoModel, base, **model_load_kwargs(dtype, trust_remote_code, attn_implementation))
        with quiet_peft():
            backbone = PeftModel.from_pretrained(backbone, str(root)).merge_and_unload()
        return cls(backbone, head=head)

    @classmethod
    def _from_classifier(cls, name_or_path: str | os.PathLike, dtype: str | torch.dtype,
                         trust_remote_code: bool, attn_implementation: str | None
                         ) -> "CausalLMWithScalarHead":
        from transformers import AutoConfig, AutoModelForSequenceClassification

        config = from_pretrained_checked(AutoConfig, name_or_path,
                                         trust_remote_code=bool(trust_remote_code))
        architectures = list(getattr(config, "architectures", None) or [])
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ConfigError(f"'{name_or_path}' is not a reward model: no {HEAD_CONFIG} and its "
                              f"architectures {architectures} are not *ForSequenceClassification")
        heads = int(getattr(config, "alignlab_reward_heads", 1))
        if config.num_labels != heads:
            raise ConfigError(f"reward model '{name_or_path}' has num_labels={config.num_labels}; "
                              "a scalar reward needs num_labels=1")
        classifier = from_pretrained_checked(
            AutoModelForSequenceClassification, name_or_path,
            **model_load_kwargs(dtype, trust_remote_code, attn_implementation))
        score = getattr(classifier, "score", None)
        if type(score) is not nn.Linear:
            raise ConfigError(f"reward model '{name_or_path}' ({type(classifier).__name__}) has "
                              "no linear 'score' head on its hidden states")
        bias = getattr(config, "alignlab_score_bias", None)
        head = score
        if bias is not None or score.weight.dtype != torch.float32:
            # The head computes in float32: read the stored weight, not a down-cast copy.
            weight = _stored_tensor(Path(name_or_path).expanduser(), "score.weight")
            head = nn.Linear(score.in_features, score.out_features,
                             bias=bias is not None or score.bias is not None)
            with torch.no_grad():
                head.weight.copy_(weight if weight is not None else score.weight.float())
                if bias is not None:
                    head.bias.copy_(torch.tensor(bias, dtype=torch.float32))
                elif score.bias is not None:
                    head.bias.copy_(score.bias.float())
        body = getattr(classifier, classifier.base_model_prefix)
        return cls(body, head=head)

    @classmethod
    def from_causal_lm(cls, name_or_path: str | os.PathLike, *, num_heads: int = 1,
                       bias: bool = True, dtype: str | torch.dtype = "auto",
                       device: str | torch.device = "cpu", trust_remote_code: bool = False,
                       attn_implementation: str | None = None,
                       lora: LoraSettings | None = None) -> "CausalLMWithScalarHead":
        """A fresh head on the body of a causal-LM checkpoint (its output embedding is not
        loaded): the usual start of a reward or value model; ``lora``: adapters on the body
        (``lora.quantize``: the body loaded quantized onto the GPU, QLoRA)."""
        from transformers import AutoModel

        kwargs = model_load_kwargs(dtype, trust_remote_code, attn_implementation)
        quantized = quantization_kwargs(lora, kwargs["dtype"])
        backbone = from_pretrained_checked(AutoModel, name_or_path, **kwargs, **quantized)
        if not quantized:
            backbone.to(device)
        if lora is not None:
            backbone = apply_lora(backbone, lora, task_type="FEATURE_EXTRACTION")
        model = cls(backbone, num_heads, bias=bias)
        model.train()
        return model


def load_reward_model(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
                      device: str | torch.device = "cpu", trust_remote_code: bool = False,
                      attn_implementation: str | None = None,
                      trainable: bool = False) -> CausalLMWithScalarHead:
    """A reward model behind the scalar-head interface, whichever kind is on disk: an
    ``AutoModelForSequenceClassification`` checkpoint (``num_labels=1``, or alignlab's with one
    label per ensemble head; its ``score`` layer becomes the head) or alignlab's older
    backbone + ``scalar_head.*`` directory. Frozen unless ``trainable``.
    """
    model = CausalLMWithScalarHead.from_pretrained(
        name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation)
    return freeze(model) if not trainable else model


def _load_head(root: Path) -> nn.Linear:
    """The head ``_save_head`` wrote into ``root`` (``scalar_head.json`` + ``.safetensors``)."""
    from safetensors.torch import load_file

    if not (root / HEAD_CONFIG).is_file() or not (root / HEAD_WEIGHTS).is_file():
        raise ConfigError(f"'{root}' is not a scalar-head checkpoint: {HEAD_CONFIG} and "
                          f"{HEAD_WEIGHTS} are required")
    meta = json.loads((root / HEAD_CONFIG).read_text())
    if meta.get("format") != _FORMAT:
        raise ConfigError(f"{root / HEAD_CONFIG}: unknown format {meta.get('format')!r}")
    head = nn.Linear(int(meta["hidden_size"]), int(meta["num_heads"]), bias=bool(meta["bias"]))
    head.load_state_dict(load_file(str(root / HEAD_WEIGHTS)), strict=True)
    return head


def _classifier_class_name(config: Any) -> str | None:
    """The ``XForSequenceClassification`` class transformers has for this config, if any."""
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(getattr(config, "model_type", None))
    return name if name and hasattr(transformers, name) else None


def _stored_tensor(root: Path, name: str) -> Tensor | None:
    """Tensor ``name`` as stored in a local safetensors checkpoint (single file or sharded)."""
    from safetensors import safe_open

    file = root / "model.safetensors"
    index = root / "model.safetensors.index.json"
    if not file.is_file() and index.is_file():
        shard = json.loads(index.read_text()).get("weight_map", {}).get(name)
        file = root / shard if shard else file
    if not file.is_file():
        return None
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name).float() if name in f.keys() else None


__all__ = ["CausalLMWithScalarHead", "load_reward_model", "HEAD_WEIGHTS", "HEAD_CONFIG"]
