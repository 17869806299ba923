"""Every online-RL algorithm raises the gold reward on the world's verifiable ``arithmetic`` task.

The tiny base model almost never answers an addition right (gold ≈ 0.01), so the exact-match
reward is too sparse for RL to learn from. As in practice, RL starts instead from a model briefly
SFT'd on the task's correct demonstrations (``arith_sft``: 500 steps, ~6 s on one core), whose
sampled accuracy is non-trivial (≈ 0.3). The reward stays the exact verifier: ``arithmetic_exact``,
the task's only gold criterion (weight 1), with no shaping. RL draws its prompts from a fixed pool
of 64 of the task's train prompts (so each is revisited ~20 times in 80 iterations) and the gain is
measured on that pool, sampling at temperature 1 before and after.

By default only ``grpo`` and ``ppo`` run (≈ 45 s on one core together); the other algorithms
are marked ``slow`` (``nlpo`` ≈ 35 s alone).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from alignlab.algorithms.policy_gradient.config import (
    NLPORLSection,
    OnlineRLConfig,
    PPORLSection,
    RLSection,
)
from alignlab.algorithms.policy_gradient.run import train_policy_gradient
from alignlab.algorithms.sft import SFTConfig, run_sft
from alignlab.core.config import (
    DataSection,
    EvalSection,
    ModelSection,
    RolloutSection,
    TrainSection,
    WorldSection,
)
from alignlab.eval.evaluate import evaluate
from alignlab.models.loading import load_model, load_tokenizer

POOL = 64
EVAL = EvalSection(task="arithmetic", n_prompts=POOL, samples_per_prompt=4, seed=11, max_new_tokens=4)


@pytest.fixture(scope="session")
def arith_sft(tiny_world, world_cache, tmp_path_factory):
    """The tiny base SFT'd on correct ``arithmetic`` demonstrations, and the RL prompt pool."""
    root = tmp_path_factory.mktemp("arith-sft")
    run_sft(SFTConfig(
        model=ModelSection(name_or_path="world:base"),
        data=DataSection(source="world:arithmetic", limit=2048),
        train=TrainSection(output_dir=str(root / "sft"), max_steps=500, batch_size=16, lr=3e-3,
                           warmup_steps=5, log_every=50, progress=False, tensorboard=False),
        world=WorldSection(preset="tiny", cache_dir=world_cache)))
    task = tiny_world.task("arithmetic")
    pool = task.train_prompts[:POOL]
    prompts = root / "pool.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in pool))
    # The task with its eval prompts replaced by the RL pool: what RL is asked to get right.
    pool_task = dataclasses.replace(task, eval_prompts=pool)
    model_dir = str(root / "sft" / "final")
    before = evaluate(load_model(model_dir), load_tokenizer(model_dir), pool_task, EVAL)
    return model_dir, str(prompts), pool_task, before["metrics"]["gold_mean"]


def _cfg(arith_sft, world_cache, tmp_path, algorithm) -> OnlineRLConfig:
    model_dir, prompts, _, _ = arith_sft
    if algorithm in ("ppo", "nlpo"):
        # NLPO's defaults (top-p 0.9 mask, refreshed every 5 iterations) fell to 0.15: a correct
        # answer outside the mask's nucleus can never be sampled, so it is never reinforced.
        extra = {"nlpo_top_p": 0.99, "nlpo_update_every": 1} if algorithm == "nlpo" else {}
        rl = (NLPORLSection if algorithm == "nlpo" else PPORLSection)(
            reward="arithmetic_exact", epochs=2, minibatch_size=32, **extra)
    else:
        rl = RLSection(reward="arithmetic_exact")
    return OnlineRLConfig(
        model=ModelSection(name_or_path=model_dir),
        world=WorldSection(preset="tiny", cache_dir=world_cache),
        train=TrainSection(output_dir=str(tmp_path), max_steps=80, lr=5e-4, batch_size=64,
                           log_every=1, progress=False, tensorboard=False,
                           lr_scheduler="constant"),
        rollout=RolloutSection(prompts=prompts, prompts_per_step=16, n=8, max_new_tokens=4),
        rl=rl)


# Seed 0, 80 iterations of 16 pool prompts x 8 samples, lr 5e-4 (ppo/nlpo: 2 epochs x
# minibatches of 32), from the SFT start whose sampled accuracy on the pool is 0.30. Measured
# accuracy after (64 x 4 samples): grpo 0.58, rloo 0.54, remax 0.43, reinforce_pp 0.52, ppo 0.62,
# nlpo 0.73. On an AVX512 CPU (fp32 too) the SFT start sampled 0.22 and GRPO reached 0.375: the
# runs diverge with the kernels' rounding, hence GRPO's bound of 0.1.
# (Held-out eval prompts barely move: 0.20 → 0.20-0.24 for the critic-free four; 80 iterations
# on 64 prompts teach those answers rather than addition.)
@pytest.mark.parametrize("algorithm,margin", [
    ("grpo", 0.1),
    pytest.param("rloo", 0.15, marks=pytest.mark.slow),
    pytest.param("remax", 0.08, marks=pytest.mark.slow),
    pytest.param("reinforce_pp", 0.15, marks=pytest.mark.slow),
    ("ppo", 0.2),
    pytest.param("nlpo", 0.25, marks=pytest.mark.slow),
])
def test_algorithm_raises_gold_accuracy_on_arithmetic(arith_sft, world_cache, tmp_path,
                                                      algorithm, margin):
    _, _, pool_task, before = arith_sft
    assert 0.1 < before < 0.45, before  # a non-trivial start: RL has successes to reinforce
    run = train_policy_gradient(_cfg(arith_sft, world_cache, tmp_path, algorithm), algorithm)
    after = evaluate(run.model, run.tokenizer, pool_task, EVAL)["metrics"]["gold_mean"]
    assert after > before + margin, (algorithm, before, after)
