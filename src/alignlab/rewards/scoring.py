"""The reward role of the online-RL controller: resolve reward names, score completions.

``RewardRole.score`` computes ``r = Σ_k w_k r_k`` over its components, batched, and applies
the run's failure policy (``rl.on_reward_error``): a component that raises, times out or
returns NaN/inf/None stops the run with the offending sample, or the sample is skipped and
counted.

Time limits come two ways, because an in-process call cannot be killed safely:

- ``rl.reward_timeout_s``: the call runs in a watchdog thread and is reported once it overruns.
  Python cannot stop a thread, so the overrunning call is abandoned (it may keep using CPU);
  if it is still running when that component is called again, the run stops whatever the
  policy (rather than piling up threads), naming ``rl.reward_sandbox`` as the fix. Cheap: no
  process start, arguments are not copied, module state (a loaded model) persists.
- ``rl.reward_sandbox: {name: {timeout_s, memory_mb}}``: the component runs in a fresh
  subprocess per call (``rewards/worker.py``), killed at the deadline, its memory capped.
  Costs a process start (plus imports) per batch; arguments must be JSON.

A timeout fails the whole batch of that component: finding the one row that hangs would cost a
timeout per row.

Per-token rewards (``fn.per_token = True``, see ``rewards/registry.py``) get ``completion_ids``
and return one float per completion token; ``RewardScores.token_rewards`` holds their weighted
sum per row and ``scores`` includes its total.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from alignlab.core.errors import ConfigError, RewardError
from alignlab.core.notices import warn_once
from alignlab.rewards.sandbox import Limits
from alignlab.rewards.worker import RewardTimeout, sandboxed_reward

RawReward = Callable[..., Sequence[float]]


def _unwrap(fn: Any) -> Any:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def is_per_token(fn: Any) -> bool:
    """Whether a reward (possibly with bound params) declares ``per_token = True``."""
    return bool(getattr(_unwrap(fn), "per_token", False))


def resolve_reward(name: str, task: Any = None, params: Mapping[str, Any] | None = None,
                   *, field: str = "rl.reward", sandbox: Limits | None = None) -> RawReward:
    """``gold`` (the world task's gold reward), ``module:function``, ``path/to/file.py:function``
    (``rewards/resolve.py``), or a ``REWARDS`` name.

    With ``sandbox`` limits the function is still resolved here (so a bad name fails now), but
    every call runs in a subprocess worker under those limits (``rewards/worker.py``).
    """
    if name == "gold":
        if sandbox is not None:
            raise ConfigError("rl.reward_sandbox: 'gold' scores with the world task in this "
                              "process and cannot run in a worker; remove it from reward_sandbox")
        if task is None:
            raise ConfigError(f"{field}: 'gold' needs prompts from a world task "
                              "(rollout.prompts: world:<task>)")
        return lambda prompts, completions, **_: task.gold(prompts, completions)
    if ":" in name:
        from alignlab.rewards.resolve import canonical_target, load_user_function

        fn, name = load_user_function(name, field), canonical_target(name)
    else:
        from alignlab.rewards.registry import REWARDS

        try:
            fn = REWARDS.get(name)
        except Exception as exc:
            raise ConfigError(f"{field}: {exc}") from None
        check_params(name, fn, params or {})
    if sandbox is not None:
        return sandboxed_reward(name, sandbox, params, per_token=is_per_token(fn))
    return functools.partial(fn, **params) if params else fn


def check_params(name: str, fn: Any, params: Mapping[str, Any]) -> None:
    """Reject a registered reward's unknown parameters (its keyword-only arguments are the
    allowed ones; a misspelt one would vanish into ``**fields``) and, through its optional
    ``check_params``, bad values — now, not as a failing sample at the first batch."""
    field = f"rl.reward_params.{name}"
    allowed = [p.name for p in inspect.signature(fn).parameters.values()
               if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"{field}: unknown parameter(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(allowed) or 'none'}")
    check = getattr(fn, "check_params", None)
    if check is not None:
        try:
            check(**params)
        except ConfigError as exc:
            raise ConfigError(f"{field}: {exc}") from None


@dataclass
class RewardScores:
    scores: list[float]
    """The weighted sum (a per-token component counts with the sum of its token rewards); NaN
    where a component failed and the row was skipped."""
    valid: list[bool]
    skipped: int = 0
    components: dict[str, list[float]] = field(default_factory=dict)
    """Each component's unweighted score per row (per-token components: the row's sum)."""
    token_rewards: list[list[float]] | None = None
    """Σ_k w_k r_{k,t} over the per-token components, one float per completion token; None
    when no component is per-token. Already included in ``scores``."""
    metrics: dict[str, float] = field(default_factory=dict)
    """``reward/<name>/<key>``: what components reported (``RewardValues.metrics``), and
    ``reward/<name>/timeout`` = 1 when that component timed out on this batch."""


class _StillRunning(RewardError):
    """An abandoned timed-out call has not finished: not a sample problem, the run stops."""


class RewardRole:
    """Scores completions with ``r = Σ_k w_k r_k``, batched; failures stop or skip (counted)."""

    def __init__(self, components: Mapping[str, tuple[float, RawReward]],
                 on_error: str = "stop", timeout_s: float | None = None) -> None:
        if on_error not in ("stop", "skip"):
            raise ConfigError(f"rl.on_reward_error: got {on_error!r}; allowed values: stop, skip")
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ConfigError(f"rl.reward_timeout_s: got {timeout_s!r}; allowed values: a "
                              "number of seconds > 0, or null for no limit")
        self.components, self.on_error, self.timeout_s = dict(components), on_error, timeout_s
        self.total_skipped = 0
        self._abandoned: dict[str, threading.Thread] = {}

    def score(self, prompts: list[str], completions: list[str],
              fields: Mapping[str, list[Any]] | None = None,
              completion_ids: list[list[int]] | None = None) -> RewardScores:
        """Score a batch; ``completion_ids`` are required when a component is per-token."""
        fields = dict(fields or {})
        n = len(completions)
        total, valid, parts, metrics = [0.0] * n, [True] * n, {}, {}
        token_total = None
        for name, (weight, fn) in self.components.items():
            per_token = is_per_token(fn)
            kwargs = fields
            if per_token:
                if completion_ids is None:
                    raise RewardError(f"reward {name!r} is per-token (per_token = True) but the "
                                      "caller gave no completion_ids")
                kwargs = {**fields, "completion_ids": [list(ids) for ids in completion_ids]}
            values, bad, why, extra = self._call(name, fn, prompts, completions, kwargs)
            if bad:
                i = bad[0]
                msg = (f"reward {name!r} {why} (rows {bad[:5]} of {n}); first offending sample:\n"
                       f"  prompt: {prompts[i]!r}\n  completion: {completions[i]!r}")
                if self.on_error == "stop":
                    raise RewardError(msg + "\nSet rl.on_reward_error: skip to drop such samples.")
                warn_once(f"reward-skip:{name}", f"skipping {len(bad)} sample(s): {msg}")
                for i in bad:
                    valid[i] = False
            metrics.update({f"reward/{name}/{k}": float(v) for k, v in extra.items()})
            if per_token:
                token_total = token_total or [[0.0] * len(row) for row in values]
                token_total = [[a + weight * b for a, b in zip(acc, row)]
                               for acc, row in zip(token_total, values)]
                values = [math.fsum(row) for row in values]
            parts[name] = values
            total = [t + weight * v for t, v in zip(total, values)]
        skipped = n - sum(valid)
        self.total_skipped += skipped
        scores = [t if ok else math.nan for t, ok in zip(total, valid)]
        return RewardScores(scores, valid, skipped, parts, token_total, metrics)

    def _invoke(self, name: str, fn: RawReward, prompts: list[str], completions: list[str],
                kwargs: dict[str, Any]) -> Any:
        """``fn(...)``, under the watchdog when a timeout is set and ``fn`` is in-process."""
        if self.timeout_s is None or getattr(_unwrap(fn), "sandboxed", False):
            return fn(prompts, completions, **kwargs)
        previous = self._abandoned.get(name)
        if previous is not None and previous.is_alive():
            raise _StillRunning(
                f"reward {name!r} is still running a call that overran rl.reward_timeout_s="
                f"{self.timeout_s:g}; an in-process call cannot be killed. Run it in a subprocess "
                f"worker that is killed at the deadline: rl.reward_sandbox: {{{name!r}: {{}}}}")
        box: dict[str, Any] = {}

        def call() -> None:
            try:
                box["out"] = fn(prompts, completions, **kwargs)
            except BaseException as exc:  # handed to the caller's thread
                box["exc"] = exc

        thread = threading.Thread(target=call, name=f"reward-{name}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            self._abandoned[name] = thread
            raise RewardTimeout(f"timed out after {self.timeout_s:g} s (rl.reward_timeout_s; "
                                "the in-process call could not be killed and was abandoned)")
        if "exc" in box:
            raise box["exc"]
        return box["out"]

    def _call(self, name: str, fn: RawReward, prompts: list[str], completions: list[str],
              fields: dict[str, list[Any]]) -> tuple[list[Any], list[int], str, dict[str, float]]:
        """(values with 0 at bad rows, bad rows, what went wrong, metrics it reported)."""
        n = len(completions)
        lengths = [len(ids) for ids in fields["completion_ids"]] if is_per_token(fn) else None
        zero = [[0.0] * k for k in lengths] if lengths is not None else [0.0] * n
        try:
            raw = self._invoke(name, fn, prompts, completions, fields)
        except ConfigError as exc:  # a wrong setting, not a bad sample: skipping cannot help
            raise ConfigError(f"reward {name!r}: {exc}") from None
        except _StillRunning:
            raise
        except RewardTimeout as exc:
            return zero, list(range(n)), str(exc), {"timeout": 1.0}
        except Exception as exc:
            why = str(exc) if isinstance(exc, RewardError) else f"raised {type(exc).__name__}: {exc}"
            # Find the rows that make it raise by scoring them one at a time.
            bad = []
            for i in range(n):
                try:
                    self._invoke(name, fn, prompts[i:i + 1], completions[i:i + 1],
                                 {k: v[i:i + 1] for k, v in fields.items()})
                except (ConfigError, _StillRunning):
                    raise
                except Exception:
                    bad.append(i)
            good = [i for i in range(n) if i not in set(bad)]
            values, metrics = zero, {}
            if bad and good:  # score the rest in one batched call, as the function expects
                sub, sub_bad, sub_why, metrics = self._call(
                    name, fn, [prompts[i] for i in good], [completions[i] for i in good],
                    {k: [v[i] for i in good] for k, v in fields.items()})
                if sub_bad:
                    return values, list(range(n)), why, metrics
                for i, v in zip(good, sub):
                    values[i] = v
            return values, bad or list(range(n)), why, metrics
        metrics = dict(getattr(raw, "metrics", {}) or {})
        raw = list(raw)
        if len(raw) != n:
            return zero, list(range(n)), f"returned {len(raw)} values for {n} completions", metrics
        values, bad, why = _check_values(raw, lengths)
        return values, bad, why, metrics


def _finite(v: Any) -> float:
    """``float(v)``, NaN for anything that is not a finite number."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _check_values(raw: list[Any], lengths: list[int] | None) -> tuple[list[Any], list[int], str]:
    """Validate one finite float per row, or (``lengths``) one list of ``lengths[i]`` floats."""
    if lengths is None:
        values = [_finite(v) for v in raw]
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        why = f"returned None/NaN/inf or non-numbers {[raw[i] for i in bad[:5]]}"
        if any(isinstance(raw[i], (list, tuple)) for i in bad):
            why += " (a reward returning per-token lists must set per_token = True)"
        return [0.0 if i in set(bad) else v for i, v in enumerate(values)], bad, why
    values, bad, problems = [], [], []
    for i, v in enumerate(raw):
        row = v.tolist() if hasattr(v, "tolist") else v
        if not isinstance(row, (list, tuple)) or len(row) != lengths[i]:
            got = f"{len(row)} token rewards" if isinstance(row, (list, tuple)) else repr(row)
            problems.append(f"row {i}: {got} for a completion of {lengths[i]} tokens")
        else:
            row = [_finite(x) for x in row]
            if all(math.isfinite(x) for x in row):
                values.append(row)
                continue
            problems.append(f"row {i}: None/NaN/inf token rewards")
        values.append([0.0] * lengths[i])
        bad.append(i)
    return values, bad, f"returned bad per-token rewards ({'; '.join(problems[:3])})"


def token_reward_tensor(token_rewards: list[list[float]], loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards as ``[B,T]``: row i's list on the first ``len`` positions of its
    ``loss_mask`` (the completion tokens; the eos the batch appends after them gets 0)."""
    out = torch.zeros(loss_mask.shape, dtype=torch.float32)
    for i, row in enumerate(token_rewards):
        cols = loss_mask[i].nonzero().flatten()
        if len(cols) < len(row):
            raise RewardError(f"row {i}: {len(row)} token rewards but only {len(cols)} "
                              "completion tokens in the batch")
        out[i, cols[:len(row)]] = torch.tensor(row, dtype=torch.float32)
    return out


def build_reward_role(spec: str | Mapping[str, float], task: Any = None, *,
                      params: Mapping[str, Mapping[str, Any]] | None = None,
                      sandbox: Mapping[str, Limits] | None = None, on_error: str = "stop",
                      timeout_s: float | None = None, field: str = "rl.reward") -> RewardRole:
    """A ``RewardRole`` from a reward spec (one name or ``{name: weight}``), each component's
    params and sandbox limits (keys must be components of ``spec``)."""
    weights = dict(spec) if isinstance(spec, Mapping) else {spec: 1.0}
    params, sandbox = dict(params or {}), dict(sandbox or {})
    option = field.rsplit(".", 1)[0]
    for name, given in (("reward_params", params), ("reward_sandbox", sandbox)):
        unknown = sorted(set(given) - set(weights))
        if unknown:
            raise ConfigError(f"{option}.{name}: {unknown} are not rewards in {field}")
    return RewardRole({name: (w, resolve_reward(name, task, params.get(name), field=field,
                                                sandbox=sandbox.get(name)))
                       for name, w in weights.items()}, on_error, timeout_s)
