"""PPO's separate critic: value alignment with log-probs, learning fixed returns, state round trip."""

from __future__ import annotations

import copy

import torch

from alignlab.algorithms.policy_gradient.critic import ValueObjective, new_critic
from alignlab.core.config import TrainSection
from alignlab.data.collate import pad_collate
from alignlab.engine.learner import Learner, rows_of
from alignlab.engine.scoring import score_units
from alignlab.models.logprobs import state_values

from conftest import random_examples, random_llama


def test_critic_values_align_with_logprobs_and_learn_fixed_returns():
    torch.manual_seed(0)
    batch = pad_collate(random_examples(8), 0)
    mask = batch["loss_mask"]
    critic = Learner(new_critic(random_llama()), ValueObjective(clip_eps=None),
                     TrainSection(lr=3e-3, lr_scheduler="constant", max_steps=50, device="cpu"),
                     epochs=4, minibatch_size=4)

    def values_of(learner):
        return score_units(learner.model, rows_of(batch), state_values, device="cpu",
                           micro_batch_size=3)

    values = values_of(critic)
    assert values.shape == mask.shape and (values[mask == 0] == 0).all()
    assert (values == 0).all()  # a zero head: no noise in the first advantages
    # V at a completion token is read at the previous position (the state the action is taken in)
    raw = critic.model(batch)
    first = mask.argmax(-1)
    rows = torch.arange(len(first))
    torch.testing.assert_close(state_values(critic.model, batch)[rows, first],
                               raw[rows, first - 1])
    # Returns the critic can learn: a function of the token before the action (its state).
    returns = torch.zeros(mask.shape)
    returns[:, 1:] = (batch["input_ids"][:, :-1] % 3).float() + 1.0
    returns = returns * mask
    exp = {**batch, "returns": returns, "old_values": values}
    history = [critic.update(rows_of(exp)) for _ in range(6)]
    losses = [h["value_loss"] for h in history]
    explained = [h["value_explained_variance"] for h in history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert explained[-1] > explained[0] + 0.2, explained
    assert history[0]["optimizer_steps"] == 4 * 2  # epochs × minibatches
    restored = Learner(new_critic(random_llama(seed=3)), ValueObjective(), TrainSection(device="cpu"))
    restored.model.load_state_dict(critic.model.state_dict())
    restored.load_state_dict(copy.deepcopy(critic.state_dict()))
    torch.testing.assert_close(values_of(restored), values_of(critic))
