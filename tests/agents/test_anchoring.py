"""Agents act around a prior: the anchored action space, the prior scored first, warm-up scaled."""
import numpy as np
import pytest
import torch

from helpers import ConstantAgent, inputs, seeded, small_cnn
from torch_rlprune import rl_prune
from torch_rlprune.env.spaces import UnstructuredSpace
from torch_rlprune.env.layerwise import LayerwisePruningEnv, anchored_action, anchored_amount
from torch_rlprune.structure.tensors import find_prunable


def make_env(model, x, target=0.7):
    def run():
        with torch.inference_mode():
            model(x)
    space = UnstructuredSpace(model, find_prunable(model), run, None, "params", 0.98)
    return LayerwisePruningEnv(space.steps, space.masks, lambda: 0.0, target, "params", 0.98), space


@pytest.mark.parametrize("prior", [0.001, 0.3, 0.5, 0.9, 0.98])
def test_anchored_amounts_are_monotone_and_centred(prior):
    actions = np.linspace(0, 1, 41)
    amounts = [anchored_amount(a, prior) for a in actions]
    assert np.all(np.diff(amounts) > 0)
    assert anchored_amount(0.5, prior) == pytest.approx(prior, rel=1e-6)
    for a in (0.0, 0.25, 0.8, 1.0):
        assert anchored_action(anchored_amount(a, prior), prior) == pytest.approx(a, abs=1e-9)


def test_action_one_half_everywhere_replays_the_prior():
    model, x = seeded(small_cnn, 0), inputs((8, 1, 16, 16))
    env, space = make_env(model, x)
    prior = space.prior_plan("lamp", env.cost, env.goal)
    env.set_prior(prior, "lamp")
    env.reset()
    done = False
    while not done:
        _, _, done, info = env.step(0.5)
        assert info["action"] == pytest.approx(0.5, abs=0.01)
    assert np.array_equal(env.k, prior)
    assert env.achieved() == pytest.approx(0.7, abs=0.005)


def test_anchored_bounds_ask_for_amounts_inside_the_budgets_range():
    model, x = seeded(small_cnn, 0), inputs((8, 1, 16, 16))
    env, space = make_env(model, x, target=0.6)
    env.set_prior(space.prior_plan("global", env.cost, env.goal))
    rng = np.random.default_rng(0)
    for _ in range(20):
        env.reset()
        done = False
        while not done:
            lo_k, hi_k = env._k_bounds(env.t)
            lo, hi = env.action_bounds()
            assert 0.0 <= lo <= hi <= 1.0
            for a in (lo, hi):
                k = round(env.amount_for(a) * env.n[env.t])
                assert lo_k - 1 <= min(max(k, lo_k), hi_k) <= hi_k + 1
            _, _, done, _ = env.step(float(rng.uniform(lo, hi)))
        assert abs(env.achieved() - 0.6) <= 0.005


def test_observation_carries_the_prior_amount_once_anchored():
    from torch_rlprune.env.layerwise import ANCHORED_STATE_FEATURES, STATE_FEATURES

    model, x = seeded(small_cnn, 0), inputs((8, 1, 16, 16))
    env, space = make_env(model, x)
    assert env.observation_dim == len(env.reset()) == len(STATE_FEATURES), "AMC's own 12 without a prior"
    prior = space.prior_plan("lamp", env.cost, env.goal)
    env.set_prior(prior)
    observation = env.reset()
    assert env.observation_dim == len(observation) == len(ANCHORED_STATE_FEATURES)
    assert observation[-1] == pytest.approx(prior[0] / env.n[0])


@pytest.mark.parametrize("agent", ["amc", "purl", "crl", "cacp", "random"])
def test_every_agent_starts_from_the_prior_and_never_returns_worse(agent):
    x = inputs((48, 1, 16, 16))
    result = rl_prune(seeded(small_cnn, 0), 0.85, data=x, agent=agent, episodes=8, verbose=False,
                      selection=0.0, protect_first_last=False, seed=1)
    prior = result.plan.metadata["prior"]
    assert result.plan.score >= prior["score"]
    assert result.history[0]["evaluations"] > len(prior["candidates"]), "the priors were scored before episode 0"


def test_a_constant_policy_of_one_half_returns_the_prior():
    x = inputs((48, 1, 16, 16))
    a = rl_prune(seeded(small_cnn, 0), 0.8, data=x, agent=ConstantAgent({"action": 0.5, "episodes": 3}),
                 verbose=False, selection=0.0, protect_first_last=False, prior="lamp")
    b = rl_prune(seeded(small_cnn, 0), 0.8, data=x, agent="prior", verbose=False, selection=0.0,
                 protect_first_last=False, prior="lamp")
    assert a.plan.amounts == b.plan.amounts


def test_without_a_prior_actions_are_amounts():
    x = inputs((48, 1, 16, 16))
    a = rl_prune(seeded(small_cnn, 0), 0.5, data=x, agent=ConstantAgent({"action": 0.5}), verbose=False,
                 selection=0.0, protect_first_last=False, prior="none")
    assert "prior" not in a.plan.metadata
    assert list(a.plan.amounts.values())[0] == pytest.approx(0.5, abs=0.01)


# --------------------------------------------------------------------------- the search pays on held-out data
# Measured on this fixture (test accuracy of 2000 test images, AMC default config at 60 episodes vs the
# prior alone, seeds 0-2): 80% 79.2/78.8/79.5 vs 77.4/77.0/77.5; 90% 67.4/67.6/68.1 vs 66.3/65.5/66.4;
# 95% 61.4/60.9/62.8 vs 61.5/61.3/62.1 (no gain there: the 3-layer net has little to allocate).
@pytest.mark.parametrize("seed", [0, 1])
def test_default_search_beats_its_prior_on_held_out_data(seed, trained_fmnist_cnn, fmnist_train_split,
                                                          fmnist_test_tensors):
    import copy

    from torch_rlprune.demo.training import evaluate_accuracy

    _, calibration = fmnist_train_split
    heuristic = copy.deepcopy(trained_fmnist_cnn)
    prior = rl_prune(heuristic, 0.9, data=calibration, agent="prior", seed=seed, verbose=False)
    searched = rl_prune(trained_fmnist_cnn, 0.9, data=calibration, episodes=60, seed=seed, verbose=False)
    assert searched.plan.metadata["prior"] == prior.plan.metadata["prior"]
    held_out = searched.plan.metadata["selection"]["selection_score"]
    assert held_out >= prior.plan.metadata["selection"]["selection_score"], "the prior is among the candidates"
    assert evaluate_accuracy(trained_fmnist_cnn, *fmnist_test_tensors) >= \
        evaluate_accuracy(heuristic, *fmnist_test_tensors)
