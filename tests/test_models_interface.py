"""The log-prob interface: one decision (fast_path), one switch, and no fast-path imports outside
alignlab.models."""

from __future__ import annotations

import ast
import logging
import sys
from pathlib import Path

import pytest
import torch

import alignlab.models.fast_path as fast_path_module
import alignlab.models.logprobs as logprobs
from alignlab.data.collate import join_prompt_completion, pack_collate
from alignlab.data.preference_batches import collate_groups
from alignlab.models.heads import CausalLMWithScalarHead
from alignlab.models.logprobs import (
    completion_logprobs,
    completion_token_logprobs,
    fast_path,
    fast_paths_off,
    hidden_states,
    logprobs_and_values,
    preferred_layout,
    sequence_values,
    state_values,
    token_logprobs,
)

from tests.conftest import random_llama
from tests.test_models_prefix_sharing import _examples
from tests.test_models_shared_tokens import _rl_batch

SRC = Path(__file__).resolve().parents[1] / "src" / "alignlab"
PRIVATE = "alignlab.models._fast"


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_nothing_outside_models_imports_the_fast_paths():
    offenders = [f"{path.relative_to(SRC)}: {name}"
                 for path in SRC.rglob("*.py") if SRC / "models" not in path.parents
                 for name in _imported_modules(path)
                 if name == PRIVATE or name.startswith(PRIVATE + ".")]
    assert not offenders, offenders


def _packed(examples):
    seqs = [join_prompt_completion(e["prompt_ids"], c)
            for e in examples for c in (e["chosen_ids"], e["rejected_ids"])]
    return pack_collate(seqs)


def test_fast_path_names_the_path_and_the_reason():
    model = random_llama(seed=1).float()
    examples = _examples("paired")
    shared = collate_groups(examples, 0, layout="shared")
    assert fast_path(model, shared).name == "group_pass"
    assert fast_path(model, _packed(examples)).name == "per_sequence"
    flat = fast_path(model, collate_groups(examples, 0, layout="flat"))
    assert flat.name == "plain" and "prefix sharing not asked for" in flat.reason
    assert preferred_layout(model) == ("shared", fast_path(model, shared).reason)
    model.set_attn_implementation("eager")
    assert fast_path(model, shared).name == "two_pass"
    assert fast_path(model, _packed(examples)).name == "plain"
    assert preferred_layout(model)[0] == "shared"
    assert preferred_layout(model, per_token=True)[0] == "flat"
    assert preferred_layout(model, checkpointing=True)[0] == "flat"


def _fast_calls(fn):
    """``fn()`` and the functions of alignlab/models/_fast that ran inside it."""
    entered = []

    def profile(frame, event, arg):
        if event == "call" and "alignlab/models/_fast/" in frame.f_code.co_filename.replace("\\", "/"):
            entered.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        out = fn()
    finally:
        sys.setprofile(None)
    return out, entered


def _raise(*args, **kwargs):
    raise AssertionError("a fast path ran while the switch is off")


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]
                     or [torch.zeros(0)])


def _close(a, b):
    """Equal up to float32 rounding at the tensors' scale (a hidden-state sum's gradients reach
    ~10³)."""
    if a.shape != b.shape:
        return False
    return a.numel() == 0 or float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


def test_switch_off_takes_the_plain_path_everywhere_with_equal_values_and_logs_once(
        monkeypatch, caplog):
    import alignlab.models._fast.cpu_attention as cpu_attention
    import alignlab.models._fast.packed_groups as packed_groups
    import alignlab.models._fast.shared_tokens as shared_tokens

    monkeypatch.setattr(fast_path_module, "MIN_SKIPPED_TOKENS", 0)  # share the small RL batch too
    model = random_llama(seed=1).float()
    critic = CausalLMWithScalarHead(random_llama(seed=5).float())
    head = torch.nn.Linear(model.config.hidden_size, 1)
    examples = _examples("paired")
    shared = collate_groups(examples, 0, layout="shared")
    packed = _packed(examples)
    rl = _rl_batch(seed=6)
    calls = {
        "completion_logprobs/shared": lambda: completion_logprobs(model, shared),
        "completion_logprobs/packed": lambda: completion_logprobs(model, packed),
        "completion_token_logprobs": lambda: completion_token_logprobs(model, shared),
        "token_logprobs": lambda: token_logprobs(model, rl, return_entropy=True,
                                                 prefix_sharing=True)[0],
        "logprobs_and_values": lambda: logprobs_and_values(model, head, rl)[1],
        "state_values": lambda: state_values(critic, rl),
        "sequence_values": lambda: sequence_values(critic, rl),
        "hidden_states": lambda: hidden_states(model, packed),
    }
    fast = {}
    for name, fn in calls.items():
        model.zero_grad(), critic.zero_grad(), head.zero_grad()
        out, entered = _fast_calls(fn)
        assert entered, f"{name}: the fast path did not run"
        out.sum().backward()
        fast[name] = (out.detach(), _grads(model), _grads(critic))

    for module, name in ((packed_groups, "packed_sequences_hidden"), (packed_groups, "group_layout"),
                         (shared_tokens, "as_groups"), (cpu_attention, "cpu_attention")):
        monkeypatch.setattr(module, name, _raise)
    reason = "testing the switch (FSDP)"
    with caplog.at_level(logging.WARNING, logger=fast_path_module.__name__), fast_paths_off(reason):
        assert fast_path(model, shared).name == "plain" and reason in fast_path(model, shared).reason
        assert preferred_layout(model)[0] == "flat"
        for name, fn in calls.items():
            model.zero_grad(), critic.zero_grad(), head.zero_grad()
            out, entered = _fast_calls(fn)
            assert not entered, (name, entered)
            out.sum().backward()
            lp, g_model, g_critic = fast[name]
            assert _close(out.detach(), lp) and _close(_grads(model), g_model), name
            assert _close(_grads(critic), g_critic), name
    logged = [r for r in caplog.records if reason in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert fast_path(model, shared).name == "group_pass"  # on again after the block


def test_switch_needs_a_reason():
    from alignlab.core.errors import ConfigError

    with pytest.raises(ConfigError, match="reason"):
        logprobs.set_fast_paths(False)
    assert logprobs.fast_paths_enabled()
