"""Call a reward function in a subprocess worker with time and memory limits.

``sandboxed_reward(target, limits, params)`` returns a reward function with the usual batched
contract; each call starts a fresh ``python`` process (``sandbox.run_python``), which imports
``target`` (``module:function`` or a ``REWARDS`` name), calls it once on the whole batch and
writes ``{"values": [...], "metrics": {...}}`` back. The parent kills the worker's process group
after ``limits.timeout_s`` and raises ``RewardTimeout``; a ``MemoryError`` past
``limits.memory_mb`` (address space) raises ``RewardError``.

Arguments and results cross the process boundary as JSON, never pickle, so prompts, completions,
row fields and ``reward_params`` must be JSON values (a field that is not is named in the
error). The worker sees the parent's ``sys.path`` and environment: this is for limits on the
user's own code, not isolation (``sandbox.run_code`` runs untrusted programs).

Trade-off of one process per call: nothing survives between calls (a module-level cache or a
model loaded at import is rebuilt every batch; a ``REWARDS`` name also pays for importing
torch, about 1 s), but a killed call leaves no half-updated state behind.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from alignlab.core.errors import RewardError
from alignlab.rewards import RewardValues
from alignlab.rewards.sandbox import Limits, run_python


class RewardTimeout(RewardError):
    """A reward call ran past its time limit (and, in a worker, was killed)."""


# The worker's own stdout carries only the result line: fd 1 is pointed at stderr before any
# user code runs, so prints (even from C extensions) cannot corrupt the JSON.
_CHILD = """
import json, os, sys
_result = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
with open("request.json", encoding="utf-8") as f:
    _req = json.load(f)
sys.path[:0] = _req["sys_path"]
from alignlab.rewards.worker import serve
_result.write(json.dumps(serve(_req)))
_result.flush()
"""


def load_target(target: str) -> Callable[..., Any]:
    """``module:function`` or a ``REWARDS`` name → the callable."""
    if ":" in target:
        from alignlab.rewards.resolve import load_user_function

        return load_user_function(target)
    from alignlab.rewards.registry import REWARDS

    return REWARDS.get(target)


def serve(request: Mapping[str, Any]) -> dict[str, Any]:
    """The worker side: call the target on the request's batch; errors come back as text."""
    try:
        fn = load_target(request["target"])
        out = fn(request["prompts"], request["completions"], **request["params"],
                 **request["fields"])
        values = [v if v is None or isinstance(v, (int, float, list)) else float(v) for v in out]
        return {"values": values, "metrics": dict(getattr(out, "metrics", {}) or {})}
    except MemoryError:
        raise  # the sandbox reports it as "memory"
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _check_json(name: str, what: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise RewardError(f"reward {name!r} runs in a sandboxed worker, which takes JSON only; "
                          f"{what} is not JSON-serialisable: {exc}") from None


def sandboxed_reward(target: str, limits: Limits, params: Mapping[str, Any] | None = None,
                     *, per_token: bool = False) -> Callable[..., list[Any]]:
    """A reward function that runs ``target`` in a limited subprocess per call (module doc)."""
    params = dict(params or {})
    _check_json(target, "reward_params", params)
    sys_path = [os.getcwd() if p == "" else p for p in sys.path]

    def reward(prompts: list[str], completions: list[str], **fields: Any) -> list[Any]:
        for key, value in fields.items():
            _check_json(target, f"row field {key!r}", value)
        request = {"target": target, "params": params, "prompts": list(prompts),
                   "completions": list(completions), "fields": fields, "sys_path": sys_path}
        res = run_python(_CHILD, limits, files={"request.json": json.dumps(request)},
                         isolated=False, env=os.environ)
        if res.status == "timeout":
            raise RewardTimeout(f"timed out after {limits.timeout_s:g} s (sandboxed worker killed)")
        if res.status == "memory":
            raise RewardError(f"ran out of memory (sandbox memory_mb={limits.memory_mb})")
        if res.status != "ok":
            tail = res.stderr.strip().splitlines()[-3:]
            raise RewardError(f"sandboxed worker failed ({res.status}, exit code "
                              f"{res.returncode}): {' | '.join(tail)}")
        answer = json.loads(res.stdout)
        if "error" in answer:
            raise RewardError(f"raised {answer['error']}")
        return RewardValues(answer["values"], answer["metrics"])

    reward.__name__ = target
    reward.per_token = per_token  # type: ignore[attr-defined]
    reward.sandboxed = True  # type: ignore[attr-defined]  (its own deadline: no watchdog)
    return reward

