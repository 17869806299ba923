"""The typed config of the policy-gradient family: the ``rl`` section (rewards, KL, clipping,
aggregation) and the critic/KL-controller/NLPO fields PPO and NLPO add to it."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, create_model, field_validator, model_validator

from alignlab.core.config import (
    ModelSection,
    OnlineTrainSection,
    RolloutSection,
    Section,
    TrainSection,
    WorldSection,
)


class RewardSandboxSection(Section):
    timeout_s: float | None = Field(None, gt=0)
    """Wall-clock seconds per call before the worker is killed; default ``rl.reward_timeout_s``,
    else 60."""
    memory_mb: int | None = Field(4096, gt=0)
    """Address-space (virtual memory) limit of the worker in MiB (null: none)."""


class RolloutCorrectionSection(Section):
    """Importance weights from the sampler's to the trainer's log-probs (``losses/rollout_correction.py``)."""

    mode: Literal["tis", "mis", "truncated", "masked"] = "tis"
    """``tis``/``truncated``: w = clip(ρ, low, high); ``mis``/``masked``: w = ρ inside
    [low, high], else 0 (the token, or with ``level: sequence`` the whole completion, dropped)."""
    level: Literal["token", "sequence"] = "token"
    """One ρ per token, or per completion (the product of its tokens' ratios)."""
    low: float | None = Field(None, gt=0)
    """Lower bound of ρ (None: none)."""
    high: float | None = Field(2.0, gt=0)
    """Upper bound of ρ, the cap C (None: none)."""


class RLSection(Section):
    reward: str | dict[str, float] = "gold"
    """``gold``, a registered reward, ``module:function``, or ``{name: weight, ...}``."""
    reward_params: dict[str, dict[str, Any]] = {}
    on_reward_error: Literal["stop", "skip"] = "stop"
    """A reward that raises, times out or returns NaN/inf/None: stop the run (naming the reward
    and the first offending sample) or skip those samples (counted as ``reward_skipped``)."""
    reward_timeout_s: float | None = Field(None, gt=0)
    """Seconds one reward component may take per batch (null: no limit); an overrun is handled
    by ``on_reward_error``. In-process calls are abandoned, not killed (``reward_role.py``)."""
    reward_sandbox: dict[str, RewardSandboxSection] = {}
    """Reward components (names from ``rl.reward``) to call in a subprocess worker, killed after
    ``timeout_s`` and memory-capped; arguments and results cross as JSON (``rewards/worker.py``)."""
    kl_coef: float = Field(0.0, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] | None = None
    """Defaults to the algorithm's (k3 for grpo, k1 otherwise)."""
    kl_in: Literal["loss", "reward"] | None = None
    epochs: int = Field(1, gt=0)
    minibatch_size: int | None = Field(None, gt=0)
    """Completions per optimizer step; default: the whole rollout batch (one step per epoch)."""
    clip_eps_low: float = Field(0.2, gt=0)
    clip_eps_high: float | None = Field(None, gt=0)
    policy_loss: Literal["ppo_clip", "gspo", "cispo", "sapo"] | None = None
    """The registered policy loss; None: ``gspo`` when ``importance`` is ``sequence``, else
    ``ppo_clip`` (``clip_eps_*`` apply to these two only)."""
    policy_loss_kwargs: dict[str, float] = {}
    """Hyper-parameters of the policy loss (e.g. SAPO's ``tau_pos``, CISPO's ``clip_eps_high``)."""
    rollout_correction: RolloutCorrectionSection | None = None
    """Weight the policy gradient by TIS/MIS weights exp(old − rollout) against the sampler's
    log-probs; the mismatch is logged as ``rollout_is/*``. Defaults to TIS (cap 2) when
    ``max_staleness`` > 0; set it to null there to train on stale samples uncorrected."""
    max_staleness: int = Field(0, ge=0)
    """Asynchronous RL: sample the rollout of iteration k+s in a background thread while
    iteration k trains, from the weights s updates old (``engine/async_rollout.py``); 0 is
    synchronous, on-policy RL. Logged as ``staleness``."""
    importance: Literal["token", "sequence"] = "token"
    """``sequence``: GSPO's sequence-level ratio (grpo)."""
    loss_aggregation: Literal["grpo", "dr_grpo", "dapo", "bnpo", "token_mean",
                              "seq_mean_token_mean", "seq_mean_token_sum_norm"] | None = None
    scale_rewards: Literal["group", "batch", "none"] = "group"
    dynamic_sampling: bool = False
    """Drop groups whose rewards have zero variance (DAPO); they carry no gradient."""
    entropy: bool = False
    """Log the policy's entropy (one extra softmax per token)."""
    prefix_sharing: bool = True
    """Compute the policy's and the reference's log-probs with every distinct prompt once and
    no padding work where the model allows it (an SDPA decoder; ``models.logprobs.fast_path``);
    the values equal the plain path up to float rounding."""

    @model_validator(mode="before")
    @classmethod
    def _correct_stale_rollouts(cls, data: Any) -> Any:
        # Stale samples are off-policy: correct them unless the config says otherwise.
        if (isinstance(data, dict) and data.get("max_staleness", 0)
                and "rollout_correction" not in data):
            data = {**data, "rollout_correction": {}}
        return data


class OnlineRLConfig(Section):
    SHARDABLE: ClassVar[bool] = True  # train.sharding: fsdp, not nlpo (engine/sharding.py)
    model: ModelSection = ModelSection()
    world: WorldSection = WorldSection()
    train: OnlineTrainSection = OnlineTrainSection()
    rollout: RolloutSection = RolloutSection()
    rl: RLSection = RLSection()

    @field_validator("train", mode="before")
    @classmethod
    def _from_train_section(cls, value: Any) -> Any:
        # A plain TrainSection from Python code: keep what it set, RL defaults for the rest.
        if isinstance(value, TrainSection) and not isinstance(value, OnlineTrainSection):
            return value.model_dump(exclude_unset=True)
        return value

    @model_validator(mode="after")
    def _check(self) -> "OnlineRLConfig":
        if isinstance(self.rl.reward, dict) and not self.rl.reward:
            raise ValueError("rl.reward: give at least one reward name")
        if self.rl.max_staleness and self.rollout.vllm.enable_sleep_mode:
            raise ValueError("rollout.vllm.enable_sleep_mode: vLLM cannot sleep while the "
                             "trainer updates when rl.max_staleness > 0 (it samples then); "
                             "turn one of them off")
        if self.train.grad_accum != 1:
            raise ValueError("train.grad_accum is not used by online RL: rl.minibatch_size sets "
                             "the completions per optimizer step, train.batch_size the "
                             "micro-batch; leave grad_accum at 1")
        return self


def config_for(name: str, rl_cls: type[RLSection] = RLSection) -> type[OnlineRLConfig]:
    """The config class of one algorithm: the same sections (``rl`` may add fields), and
    ``runs/<name>`` as output_dir."""
    train_cls = create_model(f"{name.capitalize()}TrainSection", __base__=OnlineTrainSection,
                             output_dir=(str, f"runs/{name}"))
    return create_model(f"{name.capitalize()}Config", __base__=OnlineRLConfig,
                        train=(train_cls, train_cls()), rl=(rl_cls, rl_cls()))


class PPORLSection(RLSection):
    """``RLSection`` plus the critic, GAE and the KL controller."""

    gamma: float = Field(1.0, ge=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    """Divide the token rewards by their batch std before GAE (the mean is kept)."""
    value_clip_eps: float | None = Field(0.2, gt=0)
    """ε_v of the clipped value loss; null: unclipped MSE."""
    vf_coef: float = Field(0.5, gt=0)
    """Weight of the value loss (with the separate critic and Adam it acts through clipping)."""
    critic_lr: float | None = Field(None, gt=0)
    """Defaults to ``train.lr``: the separate critic's optimizer, or the shared value head's
    parameter group (a head alone learns slowly at the policy's lr: raise it, e.g. 20×)."""
    critic: Literal["separate", "shared"] = "separate"
    """``separate``: a copy of the policy's backbone with a scalar head and its own optimizer;
    ``shared``: a value head on the policy's own hidden states, trained with the policy on
    L_clip + vf_coef·L_V (``shared_critic.py``)."""
    kl_controller: Literal["fixed", "adaptive"] = "fixed"
    """``adaptive``: β starts at ``kl_coef`` and tracks ``kl_target`` (KL in the reward only)."""
    kl_target: float = Field(6.0, gt=0)
    """Target mean sequence KL (nats) of the adaptive controller."""
    kl_horizon: float = Field(10_000, gt=0)
    """Samples over which the adaptive controller closes the gap."""

    @model_validator(mode="after")
    def _check_controller(self) -> "PPORLSection":
        if self.kl_controller == "adaptive" and self.kl_in == "loss":
            raise ValueError("rl.kl_controller: 'adaptive' adjusts the KL penalty in the reward; "
                             "set rl.kl_in: reward (or rl.kl_controller: fixed)")
        return self


class NLPORLSection(PPORLSection):
    """``PPORLSection`` plus NLPO's masking policy."""

    nlpo_top_p: float = Field(0.9, gt=0, le=1)
    """p of the top-p action mask M_t (1 keeps every token: NLPO becomes PPO)."""
    nlpo_update_every: int = Field(5, gt=0)
    """Iterations between refreshes of the masking policy with the policy's weights (μ)."""


RL_SECTIONS: dict[str, type[RLSection]] = {"ppo": PPORLSection, "nlpo": NLPORLSection}
