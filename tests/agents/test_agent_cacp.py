"""CACP (AMC's DDPG conditioned on the target): one search, a plan per target. First on a scripted
MDP with no model, then through rl_prune."""
import copy
import statistics

import numpy as np
import pytest
import torch

from helpers import AS_PUBLISHED, ModelState, assert_budget_met, inputs, seeded, small_cnn
from scripted_env import TargetFollowingEnv
from torch_rlprune import compact, rl_prune
from torch_rlprune.agents import get_agent_class
from torch_rlprune.agents.cacp import CACPAgent
from torch_rlprune.api import MultiTargetResult
from torch_rlprune.structure.channel import count_macs_params

TARGETS = [0.5, 0.7, 0.9]
FAST_CACP = dict(agent="cacp", episodes=18, agent_config={"warmup": 6}, verbose=False)


def greedy_amounts(agent, env, target) -> np.ndarray:
    env.set_target(target)
    states = np.eye(env.num_steps, dtype=np.float32)
    return np.array([agent.act(agent._state(env, s), explore=False) for s in states])


def test_cacp_is_registered_as_a_multi_target_agent():
    assert get_agent_class("cacp") is CACPAgent
    assert CACPAgent.multi_target and not CACPAgent.supports_guarantee


def test_cacp_plays_the_targets_in_turn_with_the_target_in_the_state():
    env = TargetFollowingEnv(best=(0, 0, 0), targets=[0.2, 0.5, 0.8])
    agent = CACPAgent({"hidden": 16}, seed=0)
    agent.search(env, 9)
    assert env.targets_seen == [0.2, 0.5, 0.8] * 3
    assert agent.memory.s.shape[1] == env.observation_dim + 1
    assert np.unique(agent.memory.s[:agent.memory.size, -1]).tolist() == pytest.approx([0.2, 0.5, 0.8])


def test_cacp_keeps_a_reward_baseline_per_target():
    """A deeper cut scores lower whatever the policy does: one shared baseline would punish it."""
    env = TargetFollowingEnv(best=(0, 0, 0), targets=[0.2, 0.8])
    agent = CACPAgent(seed=0)
    agent._state_dim(env)
    env.set_target(0.2)
    assert agent._stored_reward(env, 0.9) == 0.0, "the first reward of a target is its own baseline"
    env.set_target(0.8)
    assert agent._stored_reward(env, 0.3) == 0.0
    env.set_target(0.2)
    assert agent._stored_reward(env, 0.95) == pytest.approx(0.05), "measured against 0.2's baseline, not 0.8's"


@pytest.mark.parametrize("seed", [0, 1])
def test_cacp_learns_amounts_that_follow_the_target(seed):
    # measured, seeds 0-2, 200 episodes: greedy mean amount 0.24-0.46 at target 0.2, 0.63-0.75 at 0.8 (+0.29..+0.39)
    env = TargetFollowingEnv(best=(0, 0, 0), targets=[0.2, 0.8])
    agent = CACPAgent({"hidden": 64}, seed=seed)
    agent.search(env, 200)
    low, high = greedy_amounts(agent, env, 0.2).mean(), greedy_amounts(agent, env, 0.8).mean()
    assert high - low > 0.2, (low, high)


# --------------------------------------------------------------------------- through rl_prune
def test_cacp_runs_one_search_for_every_target_and_leaves_the_model_unpruned(cnn_batch):
    model = seeded(small_cnn, 0)
    state = ModelState.of(model)
    result = rl_prune(model, TARGETS, data=cnn_batch, seed=0, **FAST_CACP)
    assert isinstance(result, MultiTargetResult)
    assert sorted(result) == TARGETS
    assert len(result.history) == 18, "one search of `episodes` episodes, not one per target"
    for target in TARGETS:
        plan = result[target].plan
        assert plan.target == target and plan.episodes == 6 and plan.agent == "cacp"
        assert_budget_met(plan.sparsity, target)
        assert {h["target"] for h in result[target].history} == {target}
    state.assert_unchanged(model)


def test_cacp_is_seeded(cnn_batch):
    def run(seed):
        result = rl_prune(seeded(small_cnn, 0), TARGETS, data=cnn_batch, seed=seed, **FAST_CACP)
        return [result[t].plan.amounts for t in TARGETS], [h["reward"] for h in result.history]

    first = run(0)
    assert run(0) == first
    assert any(run(seed) != first for seed in (1, 2)), "the seed has no effect"


@pytest.mark.parametrize("budget", ["macs", "params"])
def test_cacp_channel_plans_meet_each_target_after_compaction(budget):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10).eval()
    x = inputs((8, 1, 32, 32))
    dense = count_macs_params(model, x[:2])
    result = rl_prune(model, [0.3, 0.5], data=x, structure="channel", budget=budget, agent="cacp", episodes=6,
                      agent_config={"warmup": 2}, seed=0, verbose=False)
    which = 0 if budget == "macs" else 1
    assert count_macs_params(model, x[:2]) == dense, "a multi-target search must leave the model unpruned"
    for target in (0.3, 0.5):
        copy_ = copy.deepcopy(model)
        achieved = result.apply(copy_, target=target)
        assert abs(achieved - target) <= 0.02
        info = compact(copy_, x[:2])
        assert abs(1 - count_macs_params(copy_, x[:2])[which] / dense[which] - target) <= 0.02
        assert info["macs_after"] < dense[0]


# --------------------------------------------------------------------------- CACP learns
# Measured with the trained_fmnist_cnn fixture, targets [0.6, 0.8], 300 episodes (150 per target),
# warm-up 50, seeds 0 / 1:
#   target 0.6: warm-up mean 0.561 / 0.580, last-10 explore mean 0.932 / 0.947, best 0.963 / 0.963
#   target 0.8: warm-up mean 0.557 / 0.535, last-10 explore mean 0.655 / 0.480, best 0.850 / 0.848
# The conditional policy learns the lower target within its share of episodes; on the higher one it
# may still collapse (seed 1), where the best plan is its warm-up's best. Both are asserted as measured.
@pytest.mark.parametrize("seed", [0, 1])
def test_cacp_learns_the_easier_target_and_keeps_the_best_plan_of_each(seed, trained_fmnist_cnn,
                                                                      fmnist_train_split):
    _, (x_cal, y_cal) = fmnist_train_split
    result = rl_prune(trained_fmnist_cnn, [0.6, 0.8], data=(x_cal, y_cal), agent="cacp", episodes=300,
                      agent_config={"warmup": 50}, seed=seed, verbose=False, **AS_PUBLISHED)
    for target in (0.6, 0.8):
        history = result[target].history
        warmup = [h["reward"] for h in history if h["phase"] == "warmup"]
        explore = [h["reward"] for h in history if h["phase"] == "explore"]
        assert len(warmup) == 25 and len(explore) == 125
        assert result[target].score >= max(warmup)
        assert result[target].score > statistics.mean(warmup) + 0.2
    easy = result[0.6].history
    warmup = statistics.mean(h["reward"] for h in easy if h["phase"] == "warmup")
    learned = statistics.mean(h["reward"] for h in easy[-10:])
    assert learned > warmup + 0.2, (learned, warmup)
