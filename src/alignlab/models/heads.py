"""Scalar heads on a causal-LM backbone: value models (PPO) and reward models (Bradley-Terry).

``CausalLMWithScalarHead`` maps every token's final hidden state to ``num_heads`` scalars
(``num_heads > 1`` for an ensemble of heads sharing one backbone). A reward is read at each
sequence's last token (``sequence_values``); a value model uses every token (``forward``).

On disk: the backbone as ``save_pretrained`` writes it (config.json + safetensors, loadable with
``AutoModel``), ``scalar_head.safetensors`` and ``scalar_head.json``. ``load_reward_model`` also
accepts an ``AutoModelForSequenceClassification`` checkpoint with ``num_labels=1``; its ``score``
layer becomes the head, so both kinds share this interface and work on packed batches.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignlab.core.errors import ConfigError
from alignlab.models.loading import model_load_kwargs, freeze, from_pretrained_checked
from alignlab.models.backbone import find_decoder
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

    def sequence_values(self, batch: dict[str, Any]) -> Tensor:
        """The value (reward) at each sequence's last token: ``[S]`` (``[S,K]``); sequences that
        share a prompt (a pair's chosen and rejected) compute it once where prefix sharing
        applies (:func:`alignlab.models.logprobs.sequence_values`)."""
        return sequence_values(self, batch)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Backbone via ``save_pretrained`` (safetensors) + the head in ``scalar_head.*``."""
        from safetensors.torch import save_file

        if any(hasattr(m, "lora_A") for m in self.backbone.modules()):
            raise ConfigError("the backbone holds LoRA layers: merge them (merge_and_unload) "
                              "before saving a scalar-head model")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        save_file(tensors, str(out / HEAD_WEIGHTS))
        meta = {"format": _FORMAT, "version": 1, "num_heads": self.num_heads,
                "hidden_size": self.head.in_features, "bias": self.head.bias is not None}
        (out / HEAD_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
                        device: str | torch.device = "cpu", trust_remote_code: bool = False,
                        attn_implementation: str | None = None) -> "CausalLMWithScalarHead":
        """Restore a directory written by ``save_pretrained`` (no pickle anywhere)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        root = Path(directory)
        if not (root / HEAD_CONFIG).is_file() or not (root / HEAD_WEIGHTS).is_file():
            raise ConfigError(f"'{root}' is not a scalar-head checkpoint: {HEAD_CONFIG} and "
                              f"{HEAD_WEIGHTS} are required")
        meta = json.loads((root / HEAD_CONFIG).read_text())
        if meta.get("format") != _FORMAT:
            raise ConfigError(f"{root / HEAD_CONFIG}: unknown format {meta.get('format')!r}")
        backbone = from_pretrained_checked(
            AutoModel, root, **model_load_kwargs(dtype, trust_remote_code, attn_implementation))
        backbone.to(device)
        head = nn.Linear(int(meta["hidden_size"]), int(meta["num_heads"]),
                         bias=bool(meta["bias"]))
        head.load_state_dict(load_file(str(root / HEAD_WEIGHTS)), strict=True)
        model = cls(backbone, head=head)
        model.train()
        return model

    @classmethod
    def from_causal_lm(cls, name_or_path: str | os.PathLike, *, num_heads: int = 1,
                       bias: bool = True, dtype: str | torch.dtype = "auto",
                       device: str | torch.device = "cpu", trust_remote_code: bool = False,
                       attn_implementation: str | None = None) -> "CausalLMWithScalarHead":
        """A fresh head on the body of a causal-LM checkpoint (its output embedding is not
        loaded): the usual start of a reward or value model."""
        from transformers import AutoModel

        backbone = from_pretrained_checked(
            AutoModel, name_or_path,
            **model_load_kwargs(dtype, trust_remote_code, attn_implementation))
        backbone.to(device)
        model = cls(backbone, num_heads, bias=bias)
        model.train()
        return model


def load_reward_model(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
                      device: str | torch.device = "cpu", trust_remote_code: bool = False,
                      attn_implementation: str | None = None,
                      trainable: bool = False) -> CausalLMWithScalarHead:
    """A reward model behind the scalar-head interface, whichever kind is on disk:
    an alignlab scalar-head directory, or an ``AutoModelForSequenceClassification`` checkpoint
    with ``num_labels=1`` (its ``score`` layer becomes the head). Frozen unless ``trainable``.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    root = Path(name_or_path).expanduser()
    if (root / HEAD_CONFIG).is_file():
        model = CausalLMWithScalarHead.from_pretrained(
            root, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation)
    else:
        config = from_pretrained_checked(AutoConfig, name_or_path,
                                         trust_remote_code=bool(trust_remote_code))
        architectures = list(getattr(config, "architectures", None) or [])
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ConfigError(f"'{name_or_path}' is not a reward model: no {HEAD_CONFIG} and its "
                              f"architectures {architectures} are not *ForSequenceClassification")
        if config.num_labels != 1:
            raise ConfigError(f"reward model '{name_or_path}' has num_labels={config.num_labels}; "
                              "a scalar reward needs num_labels=1")
        classifier = from_pretrained_checked(
            AutoModelForSequenceClassification, name_or_path,
            **model_load_kwargs(dtype, trust_remote_code, attn_implementation))
        score = getattr(classifier, "score", None)
        if type(score) is not nn.Linear:
            raise ConfigError(f"reward model '{name_or_path}' ({type(classifier).__name__}) has "
                              "no linear 'score' head on its hidden states")
        body = getattr(classifier, classifier.base_model_prefix)
        model = CausalLMWithScalarHead(body, head=score).to(device)
        model.train()
    return freeze(model) if not trainable else model


__all__ = ["CausalLMWithScalarHead", "load_reward_model", "HEAD_WEIGHTS", "HEAD_CONFIG"]
