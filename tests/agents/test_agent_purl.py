"""The PuRL agent: DQN over discrete per-layer amounts with a reward after every layer."""
import statistics

import numpy as np
import pytest
import torch
from torch import nn

import torch_rlprune.agents.purl  # noqa: F401  (registers "purl")
from helpers import AS_PUBLISHED, ConstantAgent, ModelState, assert_budget_met, inputs, mask_sparsity, seeded, small_cnn
from torch_rlprune import rl_prune
from torch_rlprune.agents.purl import PuRLAgent
from torch_rlprune.structure.channel import count_macs_params
from torch_rlprune.env.layerwise import LayerwisePruningEnv
from torch_rlprune.structure.masks import InPlaceMask
from torch_rlprune.structure.tensors import find_prunable, trace_execution

FAST_PURL = dict(agent="purl", episodes=3, verbose=False)


# --------------------------------------------------------------------------- the budget
@pytest.mark.parametrize("budget", ["params", "macs"])
def test_budget_is_met(budget, small_cnn_model, cnn_batch):
    result = rl_prune(small_cnn_model, 0.5, data=cnn_batch, budget=budget, seed=0, **FAST_PURL)
    measured = mask_sparsity(small_cnn_model, budget, cnn_batch)
    assert_budget_met(measured, 0.5)
    assert measured == pytest.approx(result.sparsity)
    assert result.plan.agent == "purl"


def test_budget_is_met_while_learning_at_a_high_target(small_cnn_model, cnn_batch):
    # past the warm-up, so greedy (learnt) choices are clipped onto the budget too
    rl_prune(small_cnn_model, 0.9, data=cnn_batch, agent="purl", episodes=6, agent_config={"warmup": 2},
             seed=0, verbose=False)
    assert_budget_met(mask_sparsity(small_cnn_model), 0.9)


def wide_cnn():
    """Three 32-channel convs: fine enough channel steps for any plan to land within 2 points of
    the budget (small_cnn's first group has only 8 channels: plans that remove 1 of them can miss
    a 50% MACs target by 2.25 points, with every agent, random included)."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 8 * 8, 10))


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_channel_budget_is_met(target, cnn_batch):
    model = seeded(wide_cnn, 0)
    dense_macs = count_macs_params(model, cnn_batch[:2])[0]
    result = rl_prune(model, target, data=cnn_batch, structure="channel", seed=0, **FAST_PURL)
    removed = 1 - count_macs_params(model, cnn_batch[:2])[0] / dense_macs
    assert abs(removed - target) <= 0.02
    assert result.sparsity == pytest.approx(removed)


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_search_bit_for_bit(cnn_batch):
    search = dict(agent="purl", episodes=8, agent_config={"warmup": 3}, verbose=False)

    def run(seed):
        result = rl_prune(seeded(small_cnn, 0), 0.7, data=cnn_batch, seed=seed, **search)
        return result.plan.amounts, [h["reward"] for h in result.history]

    first = run(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # the caller's global RNG state must not matter
        assert run(0) == first
    assert any(run(seed) != first for seed in (1, 2, 3)), "the seed has no effect"


# --------------------------------------------------------------------------- the dense reward, step by step
def squared_output(model, x):
    def score():
        with torch.no_grad():
            return float((model(x) ** 2).mean())
    return score


class RecordingEnv(LayerwisePruningEnv):
    """Keeps every step's reward, grouped by episode."""

    def step(self, amount):
        if self.t == 0:
            self.episode_rewards = getattr(self, "episode_rewards", []) + [[]]
        obs, reward, done, info = super().step(amount)
        self.episode_rewards[-1].append(reward)
        return obs, reward, done, info


def build_env(model, x, target, cls=LayerwisePruningEnv):
    layers, _ = trace_execution(model, find_prunable(model), lambda: model(x))
    return cls(layers, [InPlaceMask(layer) for layer in layers], squared_output(model, x), target)


@pytest.fixture
def model_and_x():
    return seeded(small_cnn, 0).eval(), inputs((8, 1, 16, 16))


def test_dense_rewards_of_an_episode_add_up_to_final_minus_unpruned_score(model_and_x):
    model, x = model_and_x
    unpruned = squared_output(model, x)()
    env = build_env(model, x, 0.6)
    env.dense = True
    env.reset()
    rewards, done = [], False
    for amount in (0.5, 0.3, 0.9):
        _, reward, done, _ = env.step(amount)
        rewards.append(reward)
    assert done
    assert all(r != 0.0 for r in rewards), "a dense step returned no reward"
    assert sum(rewards) == pytest.approx(env.history[-1].score - unpruned, abs=1e-6)


def test_purl_runs_dense_rewards_with_the_phases_it_sets(model_and_x):
    model, x = model_and_x
    unpruned = squared_output(model, x)()
    env = build_env(model, x, 0.5, cls=RecordingEnv)
    agent = PuRLAgent({"warmup": 3}, seed=0)
    agent.search(env, 7)
    assert env.dense
    assert [h.phase for h in env.history] == ["warmup"] * 3 + ["explore"] * 4
    assert len(env.episode_rewards) == 7
    for record, rewards in zip(env.history, env.episode_rewards):
        assert len(rewards) == env.num_steps
        # sparse rewards would add up to the final score itself (unpruned is far from 0 here)
        assert sum(rewards) == pytest.approx(record.score - unpruned, abs=1e-6)
        # at 50% the Linear head can absorb the whole budget: the first two layers are never
        # clipped, so they take amounts from the discrete set
        grid = np.linspace(0, agent.config.max_action, agent.config.num_actions)
        for amount, n in zip(record.amounts[:-1], env.n[:-1]):
            assert np.abs(grid - amount).min() <= 0.5 / n + 1e-9, (amount, record.amounts)
    assert abs(unpruned) > 1e-3


# --------------------------------------------------------------------------- bad configuration
@pytest.mark.parametrize("config, fragments", [
    ({"epsilon": 0.1}, ["epsilon", "epsilon_min", "target_update"]),
    ({"num_actions": 1}, ["num_actions"]),
    ({"max_action": 1.5}, ["max_action"]),
], ids=["unknown key", "one action", "amount above 1"])
def test_bad_agent_config_is_a_value_error_before_the_model_changes(config, fragments, small_cnn_model, cnn_batch):
    state = ModelState.of(small_cnn_model)
    with pytest.raises(ValueError) as info:
        rl_prune(small_cnn_model, 0.5, data=cnn_batch, agent_config=config, **FAST_PURL)
    for fragment in fragments:
        assert info.match(fragment), str(info.value)
    state.assert_unchanged(small_cnn_model)


# --------------------------------------------------------------------------- PuRL learns
LEARNING_TARGET = 0.8
LEARNING_EPISODES = 40      # the default warm-up (10 episodes at epsilon 1), then 30 learning
LEARNING_MARGIN = 0.1
# Measured with this fixture (3 layers, hard top-1 fidelity on 512 calibration images), 40 episodes,
# default config, seeds 0-5:
#   warm-up mean (first 10)   0.648 0.538 0.640 0.655 0.532 0.583
#   last-10 mean              0.792 0.790 0.800 0.813 0.823 0.791  -> gain +0.14..+0.29
#   best plan                 0.824 0.846 0.846 0.846 0.846 0.824
# What does not learn, on the same fixture:
#   - one amount for every layer, over PuRL's grid 0, 0.1, ..., 0.9: at most 0.770 (0.5); 0.48 at 0
#     (the Linear head then takes 98%), 0.08 at 0.9;
#   - PuRL with lr=0 (its untrained network's greedy policy), seeds 0-5: last-10 mean 0.07-0.76;
#   - the random agent, 40 episodes, seeds 0-5: last-10 mean 0.475-0.639; its gain over its own
#     first 10 reaches +0.22 (so the gain alone does not show learning) and its best plan
#     0.81-0.85 is as good as PuRL's (so the best plan alone shows nothing either).
# Hence: the last 10 episodes must beat the warm-up by the margin AND every constant policy.


@pytest.fixture(scope="module")
def constant_policy_scores(_trained_fmnist_cnn, fmnist_train_split):
    import copy

    _, (x_cal, y_cal) = fmnist_train_split
    return {action: rl_prune(copy.deepcopy(_trained_fmnist_cnn), LEARNING_TARGET, data=(x_cal, y_cal),
                             agent=ConstantAgent({"action": action}), verbose=False, **AS_PUBLISHED).plan.score
            for action in np.linspace(0.0, PuRLAgent.Config().max_action, PuRLAgent.Config().num_actions)}


def learning_check(history):
    """(learned, early): mean score of the last 10 episodes and of the first 10 (PuRL's warm-up)."""
    rewards = [h["reward"] for h in history]
    return statistics.mean(rewards[-10:]), statistics.mean(rewards[:10])


def search(agent, model, split, seed):
    _, (x_cal, y_cal) = split
    return rl_prune(model, LEARNING_TARGET, data=(x_cal, y_cal), reward="fidelity", agent=agent,
                    episodes=LEARNING_EPISODES, seed=seed, verbose=False, **AS_PUBLISHED)


@pytest.mark.parametrize("seed", [0, 1])
def test_purl_learns_plans_better_than_its_random_warmup(seed, trained_fmnist_cnn, fmnist_train_split,
                                                         constant_policy_scores):
    result = search("purl", trained_fmnist_cnn, fmnist_train_split, seed)
    assert [h["phase"] for h in result.history] == ["warmup"] * 10 + ["explore"] * (LEARNING_EPISODES - 10)
    learned, early = learning_check(result.history)
    assert learned > early + LEARNING_MARGIN, (learned, early)
    assert learned > max(constant_policy_scores.values()), (learned, constant_policy_scores)
    assert result.plan.score > early + 1.5 * LEARNING_MARGIN, (result.plan.score, early)
    assert_budget_met(mask_sparsity(trained_fmnist_cnn), LEARNING_TARGET)


def test_the_learning_check_rejects_random_search(trained_fmnist_cnn, fmnist_train_split, constant_policy_scores):
    result = search("random", trained_fmnist_cnn, fmnist_train_split, seed=0)
    learned, early = learning_check(result.history)
    assert not (learned > early + LEARNING_MARGIN and learned > max(constant_policy_scores.values())), \
        (learned, early)
