"""The vLLM rollout backend (``rollout.backend: vllm``): a ``vllm.LLM`` colocated with the trainer.

Written to vLLM's documented offline API (Kwon et al. 2023, "Efficient Memory Management for
Large Language Model Serving with PagedAttention"):

- the engine is ``vllm.LLM(model=<the policy's directory>, load_format="dummy",
  skip_tokenizer_init=True, logprobs_mode="processed_logprobs", ...)``: its weights come from
  the trainer at the first sync (a resumed run's too), prompts and completions stay token ids;
- sampling is ``LLM.generate([{"prompt_token_ids": ids}, ...], [SamplingParams(n, temperature,
  top_p, top_k, min_p, max_tokens, seed, logprobs=0, stop_token_ids, detokenize=False)])`` with
  one seed per prompt drawn from the call's seed (vLLM gives child i of a request seed + i).
  ``logprobs=0`` returns the sampled token's log-prob alone; ``processed_logprobs`` makes it
  the log-prob after temperature (TRL's colocate setting), which is alignlab's convention when
  top-k/top-p are off; with them on vLLM reports the truncated, renormalised distribution;
- weight sync overwrites the running model in place, as TRL's colocate mode and verl do:
  ``LLM.apply_model(lambda model: model.load_weights(named_weights))`` (vLLM's model classes
  take Hugging Face checkpoint names and fuse q/k/v and gate/up themselves), then
  ``LLM.reset_prefix_cache()`` since cached prompt KV came from the old weights. With one GPU
  the engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set), so the
  tensors are not copied through a pipe.

LoRA (``model.lora``), ``rollout.vllm.lora_sync``:

- ``merged`` (default; TRL's colocate mode): each sync sends every weight, adapted layers as
  W + (alpha/r)·B·A computed by peft's own ``merge`` on a copy of one layer at a time (the
  policy is never merged in place, which in bf16 would drift its frozen weights by rounding
  with every merge/unmerge). Decoding runs at full speed on plain weights; a sync moves the
  whole model, a GPU-local copy when colocated;
- ``adapter`` (verl's choice): the base weights are sent once, then each sync writes only the
  adapters (peft's ``save_pretrained``, a few MB) and samples with a new
  ``LoRARequest(name, id, path)``, vLLM's LoRA kernels adding B·A at run time (slower decoding,
  far less to move). vLLM serves adapters on the target linear layers only: no
  ``modules_to_save``.

Absent vLLM or absent CUDA is a ``ConfigError`` naming ``rollout.backend``. The sampler's
log-probs are checked against the trainer's recomputation on a GPU by
``benchmarks/vllm_smoke.py``; the glue is tested on CPU against a stand-in ``vllm`` module.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignlab.core.config import VLLMSection
from alignlab.core.errors import ConfigError
from alignlab.rollout.backend import Generation
from alignlab.rollout.engine import SamplingParams

FIELD = "rollout.backend"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def import_vllm() -> Any:
    """The ``vllm`` module, or a ConfigError saying what to install or use instead."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"field '{FIELD}': 'vllm' needs the vllm package, which is not "
                          "installed (pip install 'alignlab[vllm]', on a machine with a CUDA "
                          "GPU); or set rollout.backend: builtin")
    if not torch.cuda.is_available():
        raise ConfigError(f"field '{FIELD}': 'vllm' samples on a CUDA GPU and none is visible; "
                          "use rollout.backend: builtin (alignlab's own engine, CPU or GPU)")
    return importlib.import_module("vllm")


# ---------------------------------------------------------------------------- the weights

def _tuner_classes() -> tuple[type, type]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return BaseTunerLayer, AuxiliaryTrainingWrapper


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds peft adapter layers."""
    if importlib.util.find_spec("peft") is None:
        return False
    tuner, _ = _tuner_classes()
    return any(isinstance(m, tuner) for m in model.modules())


def hf_name(name: str) -> str:
    """A peft-wrapped parameter's name as the plain model's checkpoint names it."""
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    parts = name.split(".")
    if "modules_to_save" in parts:  # <module>.modules_to_save.<adapter>.<param>
        i = parts.index("modules_to_save")
        parts = parts[:i] + parts[i + 2:]
    return ".".join(parts)


def policy_weights(policy: nn.Module, *, merge: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint name, tensor)`` of every weight of the policy as a plain causal LM.

    Without adapters: its parameters (tied ones once). With peft adapters: the adapted layers
    merged (``merge``; each from a merged copy of that one layer, the policy untouched) or
    their base weights (``merge=False``), a trained ``modules_to_save`` copy under the
    original's name, and no adapter tensors."""
    if not has_adapters(policy):
        for name, p in policy.named_parameters():
            yield name, p.detach()
        return
    tuner, wrapper = _tuner_classes()
    handled: list[str] = []
    for name, module in policy.named_modules():
        if any(name.startswith(h + ".") for h in handled):
            continue
        if isinstance(module, tuner):
            if merge:
                module = copy.deepcopy(module)
                module.merge()
            base = module.get_base_layer()
        elif isinstance(module, wrapper):  # modules_to_save (its copy is the trained one)
            base = (copy.deepcopy(module).unload_and_optionally_merge_module(True, False, None)
                    if merge else module.original_module)
        else:
            continue
        handled.append(name)
        for pname, p in base.named_parameters():
            yield hf_name(f"{name}.{pname}"), p.detach()
    for name, p in policy.named_parameters():
        if not any(name.startswith(h + ".") for h in handled):
            yield hf_name(name), p.detach()


def _load_weights(weights: list[tuple[str, torch.Tensor]], model: nn.Module) -> None:
    """Runs inside vLLM's worker (``LLM.apply_model``): its model's own checkpoint loader."""
    model.load_weights(weights)


def model_path(policy: nn.Module) -> str:
    """The directory or Hub name the policy was loaded from (vLLM reads its config there)."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    path = getattr(getattr(base, "config", None), "name_or_path", "") or ""
    if not path:
        raise ConfigError(f"field '{FIELD}': 'vllm' builds its engine from the policy's "
                          "config directory, and this model was not loaded from one")
    return path


# ---------------------------------------------------------------------------- the backend

class VLLMBackend:
    """``RolloutBackend`` on a colocated ``vllm.LLM`` (see the module docstring)."""

    name = "vllm"

    def __init__(self, policy: nn.Module, section: VLLMSection, *,
                 eos_token_id: int | list[int] | None, train_precision: str = "fp32",
                 work_dir: str | Path | None = None) -> None:
        self._vllm = import_vllm()
        self.section = section
        self.eos_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        self.adapter_sync = section.lora_sync == "adapter" and has_adapters(policy)
        if self.adapter_sync and getattr(_lora_config(policy), "modules_to_save", None):
            raise ConfigError("field 'rollout.vllm.lora_sync': 'adapter' serves LoRA on the "
                              "target layers only; model.lora.modules_to_save needs 'merged'")
        if section.tensor_parallel_size == 1:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        dtype = DTYPES.get(train_precision, "bfloat16") if section.dtype == "train" else section.dtype
        kwargs: dict[str, Any] = dict(
            model=model_path(policy), skip_tokenizer_init=True, load_format="dummy", dtype=dtype,
            gpu_memory_utilization=section.gpu_memory_utilization,
            tensor_parallel_size=section.tensor_parallel_size,
            enforce_eager=section.enforce_eager, max_model_len=section.max_model_len,
            enable_prefix_caching=section.enable_prefix_caching,
            enable_sleep_mode=section.enable_sleep_mode,
            logprobs_mode="processed_logprobs", seed=0)
        if self.adapter_sync:
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=_lora_config(policy).r)
        kwargs.update(section.engine_kwargs)
        self.llm = self._vllm.LLM(**kwargs)
        self.synced, self.asleep, self.base_loaded = False, False, False
        self.syncs = 0
        self.lora_request: Any = None
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self._adapter_root: Path | None = None

    # -- sampling

    def _params(self, params: SamplingParams, seed: int) -> Any:
        return self._vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, min_p=params.min_p,
            max_tokens=params.max_new_tokens, seed=seed, logprobs=0,
            stop_token_ids=sorted(self.eos_ids | set(params.stop_token_ids)), detokenize=False)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        if params.stop:
            raise ConfigError(f"field '{FIELD}': the vLLM backend samples token ids without "
                              "detokenizing; stop strings are not supported (use stop ids)")
        if not self.synced:
            raise RuntimeError("VLLMBackend.generate before sync_weights: its weights are "
                               "vLLM's dummy initialisation until the policy's are loaded")
        self._wake()
        seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),),
                              generator=torch.Generator().manual_seed(params.seed)).tolist()
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids],
                                    [self._params(params, s) for s in seeds], use_tqdm=False,
                                    lora_request=self.lora_request)
        gen = Generation([], [], [])
        stops = set(params.stop_token_ids)
        for request in outputs:
            if len(request.outputs) != params.n:
                raise RuntimeError(f"vLLM returned {len(request.outputs)} completions of a "
                                   f"prompt, {params.n} were asked for")
            for out in request.outputs:
                ids, lps = _ids_and_logprobs(out)
                gen.completion_ids.append(ids)
                gen.logprobs.append(lps)
                last = ids[-1] if ids else None
                gen.finish_reasons.append("eos" if last in self.eos_ids else
                                          "stop" if last in stops else "length")
        if self.section.enable_sleep_mode:
            self.llm.sleep(level=1)  # weights kept in CPU memory: a later generate needs no sync
            self.asleep = True
        return gen

    # -- weights

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    @torch.no_grad()
    def sync_weights(self, policy: nn.Module) -> None:
        self._wake()
        if self.adapter_sync:
            if not self.base_loaded:
                self._load(list(policy_weights(policy, merge=False)))
                self.base_loaded = True
            self._save_adapter(policy)
        else:
            self._load(list(policy_weights(policy)))
        self.llm.reset_prefix_cache()
        self.synced = True
        self.syncs += 1

    def _load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.llm.apply_model(functools.partial(_load_weights, weights))

    def _save_adapter(self, policy: nn.Module) -> None:
        """Write the adapters for this sync and sample with them (a new id: vLLM caches by id)."""
        if self._adapter_root is None:
            root = self.work_dir or Path(tempfile.gettempdir())
            root.mkdir(parents=True, exist_ok=True)
            self._adapter_root = Path(tempfile.mkdtemp(prefix="vllm-adapters-", dir=root))
        lora_id = self.syncs + 1
        path = self._adapter_root / f"sync-{lora_id:06d}"
        policy.save_pretrained(str(path))
        previous = self._adapter_root / f"sync-{lora_id - 2:06d}"
        if previous.exists():  # the one before is still vLLM's cached copy's source; older go
            shutil.rmtree(previous, ignore_errors=True)
        lora_request = importlib.import_module("vllm.lora.request").LoRARequest
        self.lora_request = lora_request(f"alignlab-policy-{lora_id}", lora_id, str(path))


def _lora_config(policy: nn.Module) -> Any:
    configs = getattr(policy, "peft_config", {}) or {}
    return configs.get("default") or next(iter(configs.values()), None)


def _ids_and_logprobs(out: Any) -> tuple[list[int], list[float]]:
    """A ``CompletionOutput``'s token ids and each one's sampled log-prob (``logprobs=0``: a
    position's entry holds the sampled token, whatever its rank)."""
    ids = [int(t) for t in out.token_ids]
    stop = getattr(out, "stop_reason", None)
    if out.finish_reason == "stop" and isinstance(stop, int) and (not ids or ids[-1] != stop):
        raise RuntimeError(f"vLLM returned a completion without the stop id {stop} that ended "
                           "it; the trainer needs that token and its log-prob")
    if out.logprobs is None or len(out.logprobs) != len(ids):
        raise RuntimeError("vLLM returned no log-prob for some sampled tokens (logprobs=0 asks "
                           "for one per token)")
    return ids, [float(out.logprobs[t][tok].logprob) for t, tok in enumerate(ids)]


__all__ = ["VLLMBackend", "import_vllm", "policy_weights", "hf_name", "model_path"]
