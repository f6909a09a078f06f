"""LayerwisePruningEnv (the pruning MDP) and InPlaceMask (the search's in-place masks)."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from helpers import CallOrderNet, bits_equal, inputs, macs_per_weight, seeded, small_cnn
from torch_rlprune.env.layerwise import STATE_FEATURES, LayerwisePruningEnv
from torch_rlprune.structure.masks import InPlaceMask
from torch_rlprune.structure.tensors import find_prunable, trace_execution


class ScoreCounter:
    """score_fn for the env: counts calls and scores by the model's mean output."""

    def __init__(self, model, x):
        self.model, self.x, self.calls = model, x, 0

    def __call__(self):
        self.calls += 1
        with torch.no_grad():
            return float(self.model(self.x).mean())


def build_env(model, x, target=0.6, budget="params", max_amount=0.98):
    layers = find_prunable(model)
    layers, _ = trace_execution(model, layers, lambda: model(x))
    masks = [InPlaceMask(layer) for layer in layers]
    score = ScoreCounter(model, x)
    return LayerwisePruningEnv(layers, masks, score, target, budget, max_amount), score


def run_episode(env, policy):
    """Play one episode; ``policy(step, low, high)`` returns the amount asked for."""
    env.reset()
    done, step = False, 0
    while not done:
        low, high = env.action_bounds()
        _, _, done, _ = env.step(policy(step, low, high))
        step += 1
    return env.history[-1]


POLICIES = {
    "always 0": lambda t, lo, hi: 0.0,
    "always 1": lambda t, lo, hi: 1.0,
    "alternating": lambda t, lo, hi: float(t % 2),
    "alternating from 1": lambda t, lo, hi: float((t + 1) % 2),
    "out of range": lambda t, lo, hi: (-5.0, 7.0)[t % 2],
    "NaN": lambda t, lo, hi: float("nan"),
    "lower bound": lambda t, lo, hi: lo,
    "upper bound": lambda t, lo, hi: hi,
    "scattered": lambda t, lo, hi: (0.1 + 0.618034 * t) % 1.0,
}


@pytest.fixture
def model():
    return seeded(small_cnn, 0).eval()


@pytest.fixture
def x():
    return inputs((8, 1, 16, 16))


def zeros_per_layer(env):
    return [int((getattr(layer.module, layer.param_name) == 0).sum()) for layer in env.layers]


def removed_fraction(env, model, x):
    """Budget fraction removed, counted from the live weights (Gaussian weights have no natural zeros)."""
    cost = macs_per_weight(model, x) if env.budget == "macs" else None
    removed = total = 0
    for layer, zeros in zip(env.layers, zeros_per_layer(env)):
        c = 1 if cost is None else cost[layer.module]
        removed += zeros * c
        total += layer.numel * c
    return removed / total


# --------------------------------------------------------------------------- observations
def test_observation_has_twelve_bounded_features_at_every_step(model, x):
    env, _ = build_env(model, x)
    assert env.observation_dim == len(STATE_FEATURES) == 12
    state, done = env.reset(), False
    while not done:
        assert state.shape == (12,) and state.dtype == np.float32
        assert np.isfinite(state).all() and (state >= 0).all() and (state <= 1).all(), state
        state, _, done, _ = env.step(0.7)


def test_observation_tracks_progress_through_the_episode(model, x):
    env, _ = build_env(model, x)
    index, reduced, rest, previous = (STATE_FEATURES.index(f) for f in ("index", "reduced", "rest",
                                                                         "previous_amount"))
    first = env.reset()
    assert first[index] == 0 and first[reduced] == 0 and first[previous] == 0
    second, _, _, info = env.step(0.5)
    assert second[index] > first[index] and second[reduced] > 0 and second[rest] < first[rest]
    assert second[previous] == pytest.approx(info["amount"])


# --------------------------------------------------------------------------- the budget
@pytest.mark.parametrize("budget", ["params", "macs"])
@pytest.mark.parametrize("target", [0.1, 0.5, 0.93])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_any_policy_ends_on_the_target(model, x, budget, target, policy):
    env, _ = build_env(model, x, target, budget)
    for _ in range(2):
        record = run_episode(env, POLICIES[policy])
        measured = removed_fraction(env, model, x)
        assert abs(measured - target) <= 0.005, f"{policy}: removed {measured:.5f}"
        assert measured == pytest.approx(record.sparsity)
        if budget == "params":  # nothing but rounding to whole weights may separate them
            assert abs(sum(zeros_per_layer(env)) - target * env.total_cost) <= 0.5


def test_action_bounds_are_fractions_that_narrow_to_what_stays_feasible(model, x):
    env, _ = build_env(model, x, target=0.9)
    env.reset()
    widths = []
    for _ in range(env.num_steps):
        low, high = env.action_bounds()
        assert 0.0 <= low <= high <= 1.0
        widths.append(high - low)
        env.step(high)
    assert widths[-1] <= 1 / env.layers[-1].numel, "the last layer's amount is forced"


def test_no_layer_loses_more_than_max_amount(model, x):
    env, _ = build_env(model, x, target=0.5, max_amount=0.6)
    run_episode(env, POLICIES["always 1"])
    for layer, zeros in zip(env.layers, zeros_per_layer(env)):
        assert zeros <= 0.6 * layer.numel


def test_step_after_the_last_layer_is_an_error(model, x):
    env, _ = build_env(model, x)
    run_episode(env, POLICIES["scattered"])
    with pytest.raises(RuntimeError):
        env.step(0.5)


# --------------------------------------------------------------------------- episodes
def test_each_scored_episode_masks_exactly_its_own_plan(model, x):
    env, _ = build_env(model, x, target=0.5)
    seen = []
    for policy in ("always 1", "always 0", "alternating", "scattered"):  # four different plans
        record = run_episode(env, POLICIES[policy])
        zeros = zeros_per_layer(env)
        expected = [round(amount * layer.numel) for layer, amount in zip(env.layers, record.amounts)]
        assert zeros == expected, f"{policy}: masks of an earlier episode leaked into this one"
        seen.append(zeros)
    assert len({tuple(z) for z in seen}) == 4


def test_identical_plans_are_scored_once(model, x):
    env, score = build_env(model, x)
    rewards = [run_episode(env, POLICIES["always 0"]).reward for _ in range(3)]
    assert env.evaluations == 1 == score.calls
    assert len(env.history) == 3 and len(set(rewards)) == 1
    run_episode(env, POLICIES["always 1"])
    assert env.evaluations == 2 == score.calls


def test_restore_puts_every_weight_back_bit_for_bit(model, x):
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = -0.0  # a signed zero must survive too
        model[2].weight[0, 0, 0, 0] = 0.0
    originals = [p.detach().clone() for p in model.parameters()]
    env, _ = build_env(model, x, target=0.8)
    for policy in ("always 1", "scattered", "always 0"):
        run_episode(env, POLICIES[policy])
    env.restore()
    assert all(bits_equal(p, o) for p, o in zip(model.parameters(), originals))


def test_best_plan_is_the_highest_reward_seen(model, x):
    env, _ = build_env(model, x)
    for policy in ("always 0", "always 1", "scattered", "alternating"):
        run_episode(env, POLICIES[policy])
    best = max(env.history, key=lambda r: r.reward)
    assert env.best_reward == best.reward
    assert list(env.best_amounts().values()) == pytest.approx(best.amounts)


def test_layers_come_in_the_order_they_run_not_the_order_they_were_registered():
    net = seeded(CallOrderNet, 0)
    env, _ = build_env(net, inputs((4, 3, 10)))
    assert [layer.module_name for layer in env.layers] == ["a", "b"]


# --------------------------------------------------------------------------- InPlaceMask
def smallest_k_mask(weight, k, order_of=None):
    """Independent reference: zero the k smallest |weight| entries (Gaussian: no ties)."""
    scores = (weight if order_of is None else order_of).detach().abs().flatten()
    mask = torch.ones(weight.numel())
    mask[torch.topk(scores, k, largest=False).indices] = 0
    return mask.view_as(weight)


@pytest.fixture
def conv():
    return seeded(nn.Conv2d, 3, 4, 6, 3)


def test_set_k_up_down_up_equals_computing_from_scratch(conv):
    original = conv.weight.detach().clone()
    mask = InPlaceMask(find_prunable(conv)[0])
    for k in (50, 10, 180, 0, 90, 90, 216):
        mask.set_k(k)
        assert torch.equal(conv.weight.detach(), original * smallest_k_mask(original, k)), f"k={k}"


def test_set_k_works_on_channels_last_weights(conv):
    conv.weight.data = conv.weight.data.to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    original = conv.weight.detach().clone()
    mask = InPlaceMask(find_prunable(conv)[0])
    for k in (120, 30, 200):
        mask.set_k(k)
        assert torch.equal(conv.weight.detach(), original * smallest_k_mask(original, k))
    mask.restore()
    assert bits_equal(conv.weight, original)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_set_k_on_a_transposed_view(conv):
    conv.weight.data = conv.weight.data.transpose(0, 1).contiguous().transpose(0, 1)
    original = conv.weight.detach().clone()
    mask = InPlaceMask(find_prunable(conv)[0])
    mask.set_k(77)
    assert torch.equal(conv.weight.detach(), original * smallest_k_mask(original, 77))


def test_importance_scores_rank_the_entries(conv):
    scores = seeded(torch.randn, 9, conv.weight.shape)
    original = conv.weight.detach().clone()
    mask = InPlaceMask(find_prunable(conv)[0], scores)
    mask.set_k(100)
    assert torch.equal(conv.weight.detach(), original * smallest_k_mask(original, 100, order_of=scores))
    with pytest.raises(ValueError, match="shape"):
        InPlaceMask(find_prunable(conv)[0], scores[:2])


def test_existing_prune_mask_is_kept_and_counted(conv):
    prune.random_unstructured(conv, "weight", amount=0.25)
    existing = conv.weight_mask.clone()
    orig = conv.weight_orig.detach().clone()
    mask = InPlaceMask(find_prunable(conv)[0])
    assert mask.k_min == int((existing == 0).sum()) == 54
    for k in (54, 120, 60, 216):
        mask.set_k(k)
        assert int((conv.weight_mask == 0).sum()) == k
        assert bool((conv.weight_mask[existing == 0] == 0).all()), "an earlier mask entry came back"
        assert torch.equal(conv.weight_orig, orig), "the search must write the mask, not weight_orig"
    with pytest.raises(ValueError):
        mask.set_k(53)
    mask.restore()
    assert torch.equal(conv.weight_mask, existing)


@pytest.mark.parametrize("ks", list(itertools.permutations([0, 40, 200])))
def test_restore_after_any_sequence_is_exact(conv, ks):
    original = conv.weight.detach().clone()
    mask = InPlaceMask(find_prunable(conv)[0])
    for k in ks:
        mask.set_k(k)
    mask.restore()
    assert bits_equal(conv.weight, original)


# --------------------------------------------------------------------------- modes agents switch on
@pytest.mark.parametrize("policy", ["always 0", "always 1", "scattered"])
def test_free_constraint_applies_the_amounts_asked_for_and_reports_the_violation(model, x, policy):
    env, _ = build_env(model, x, target=0.6)
    env.constraint = "free"
    record = run_episode(env, POLICIES[policy])
    asked = [min(max(POLICIES[policy](t, 0, 1), 0.0), 1.0) for t in range(env.num_steps)]
    k_max = env.k_max / env.n
    assert record.amounts == pytest.approx(np.minimum(asked, k_max), abs=1 / env.n.min())
    assert record.violation == pytest.approx(0.6 - record.sparsity)
    assert record.sparsity == pytest.approx(removed_fraction(env, model, x), abs=1e-9)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_projection_of_any_plan_meets_the_budget(model, x, policy):
    env, _ = build_env(model, x, target=0.6)
    env.constraint = "free"
    record = run_episode(env, POLICIES[policy])
    raw = np.array([round(a * n) for a, n in zip(record.amounts, env.n)])
    projected = env.project(raw)
    assert env.achieved(projected) == pytest.approx(0.6, abs=2e-3)
    assert (projected >= env.k_min).all() and (projected <= env.k_max).all()
    if abs(record.violation) < 1e-3:  # already on budget: projection keeps it
        assert np.abs(projected - raw).max() <= 1


def test_free_search_keeps_only_plans_on_budget_as_results(model, x):
    env, score = build_env(model, x, target=0.6)
    env.constraint = "free"
    for policy in ("always 0", "always 1", "scattered"):
        run_episode(env, POLICIES[policy])
    env.finalize()
    assert env.best_k is not None
    assert env.achieved(env.best_k) == pytest.approx(0.6, abs=2e-3)
    env.apply(env.best_k)
    assert env.best_score == pytest.approx(score(), abs=1e-9)


def test_a_free_plan_near_the_budget_costs_one_scoring_its_projection_a_candidate_result(model, x):
    env, score = build_env(model, x, target=0.6)
    env.constraint = "free"
    near = run_episode(env, lambda t, lo, hi: 0.61)  # 1 point over the budget: within the slack
    raw = np.array([round(a * n) for a, n in zip(near.amounts, env.n)])
    projected = env.project(raw)
    assert 0 < abs(near.violation) <= env.feasibility_slack and not np.array_equal(projected, raw)
    assert score.calls == env.evaluations == near.evaluations == 1  # the raw plan itself is never scored
    assert np.array_equal(env.best_k, projected) and near.score == near.reward == env.best_score
    env.apply(projected)
    assert near.score == pytest.approx(score(), abs=1e-9)
    far = run_episode(env, POLICIES["always 0"])  # off the budget: its own score shapes the reward, no result
    assert far.evaluations == 2 and np.array_equal(env.best_k, projected)


def test_dense_rewards_add_up_to_the_final_score_minus_the_unpruned_one(model, x):
    env, score = build_env(model, x, target=0.6)
    unpruned = score()
    env.dense = True
    env.reset()
    rewards, done, t = [], False, 0
    while not done:
        _, reward, done, info = env.step(POLICIES["scattered"](t, 0, 1))
        rewards.append(reward)
        t += 1
    assert len(rewards) == env.num_steps
    assert sum(rewards) == pytest.approx(env.history[-1].score - unpruned, abs=1e-6)
    assert any(abs(r) > 1e-9 for r in rewards[:-1]), "intermediate steps got no signal"


def test_targets_switched_between_episodes_keep_their_own_best_plans(model, x):
    env, _ = build_env(model, x, target=0.5)
    for target in (0.5, 0.8, 0.5, 0.8):
        env.set_target(target)
        record = run_episode(env, POLICIES["scattered"])
        assert record.target == target and record.sparsity == pytest.approx(target, abs=2e-3)
    assert set(env.best_by_target) == {0.5, 0.8}
    for target, best in env.best_by_target.items():
        assert env.achieved(best.k) == pytest.approx(target, abs=2e-3)
        assert best.reward == max(h.reward for h in env.history if h.target == target)


def test_set_target_in_the_middle_of_an_episode_is_an_error(model, x):
    env, _ = build_env(model, x, target=0.5)
    env.reset()
    env.step(0.5)
    with pytest.raises(RuntimeError, match="between episodes"):
        env.set_target(0.7)


def test_accuracy_guaranteed_mode_keeps_the_largest_plan_above_the_floor(model, x):
    env, score = build_env(model, x)
    unpruned = score()
    env = LayerwisePruningEnv(env.layers, env.masks, env.score_fn, 0.0, "params", 0.98, score_floor=unpruned - 0.05)
    assert env.constraint == "free"
    for policy in POLICIES:
        run_episode(env, POLICIES[policy])
    env.finalize()
    above = [h for h in env.history if h.score >= unpruned - 0.05]
    if above:
        assert env.achieved(env.best_k) == pytest.approx(max(h.sparsity for h in above), abs=1e-9)
    assert env.best_score >= unpruned - 0.05
    for h in env.history:
        remaining = env.total_cost * (1 - h.sparsity)
        assert h.reward == pytest.approx(-(1 - h.score) * np.log(remaining), rel=1e-6)


class ScriptedScreening:
    """Keeps out every plan it may and remembers what it was asked. The contract it plays: a plan
    kept out is estimated below the plan to beat; a shaping plan is always an estimate."""

    def __init__(self, below: float = 1.0):
        self.asked = []
        self.below = below

    def score(self, key, plan_to_beat, full_score, apply_plan, shaping=False):
        self.asked.append((key, plan_to_beat, shaping))
        if shaping:
            return 5.0, False        # above anything measured: it must never become a result
        if plan_to_beat is None:
            return float(full_score()), True
        return plan_to_beat[1] - self.below, False


# just below the best: above the runner-up, yet an estimate is never a candidate for the held-out choice
@pytest.mark.parametrize("below", [1.0, 1e-6])
def test_with_screening_only_measured_plans_become_results(model, x, below):
    env, score = build_env(model, x, target=0.6)
    env.screening, env.keep_top = ScriptedScreening(below), 2
    for name in ("alternating", "alternating from 1", "scattered", "always 0", "always 1"):
        run_episode(env, POLICIES[name])
    measured = [key for key, bar, _ in env.screening.asked if bar is None]
    assert len(measured) == 2 and len(env.screening.asked) == len(set(env.screening.asked)) > 2
    top = env.top_by_target[0.6]
    assert {tuple(int(v) for v in p.k) for p in top} == set(measured) and not set(measured) & env.estimated_keys
    # once the runners-up are kept, a new plan has to beat the best: the first of them
    assert env.plan_to_beat() == (tuple(int(v) for v in top[0].k), top[0].reward) and top[0].reward > top[-1].reward
    assert env.best_reward == max(h.reward for h in env.history[:2])
    # the later plans were asked against the best, and got an estimate below it
    assert all(bar == env.plan_to_beat() for _, bar, _ in env.screening.asked[2:])
    assert all(h.reward < top[0].reward for h in env.history[2:])
    assert env.scoring_seconds > 0 and score.calls == 2


def test_a_plan_chosen_after_the_search_is_scored_in_full_never_screened_out(model, x):
    """A result chosen after the search (e.g. rescaled onto a measured latency) gets a measured score,
    even where screening would keep it out against the search's best."""
    env, score = build_env(model, x, target=0.6)
    env.screening, env.keep_top = ScriptedScreening(), 1
    run_episode(env, POLICIES["always 0"])
    run_episode(env, POLICIES["always 1"])            # kept out against the first: an estimate
    estimated = next(iter(env.estimated_keys))
    assert env.evaluate(np.array(estimated)) < env.best_reward     # as a search asks: still an estimate
    calls = score.calls
    measured = env.evaluate(np.array(estimated), full=True)
    assert env.screening.asked[-1] == (estimated, None, False) and score.calls == calls + 1
    assert estimated not in env.estimated_keys and env.evaluate(np.array(estimated)) == measured


def test_dense_shaping_scores_are_estimates_and_a_result_is_scored_again(model, x):
    env, score = build_env(model, x, target=0.6)
    env.screening, env.dense = ScriptedScreening(), True
    env.reset()
    done = False
    while not done:
        _, _, done, _ = env.step(0.6)
    asked = env.screening.asked
    # the unpruned plan and every partial one shape the rewards; the episode's plan may be a result
    assert [shaping for _, _, shaping in asked] == [True] * env.num_steps + [False]
    final = tuple(int(v) for v in env.best_k)
    assert asked[-1] == (final, None, False) and final not in env.estimated_keys
    assert score.calls == 1 and env.best_score != 5.0
    partial = asked[env.num_steps - 1][0]
    assert partial in env.estimated_keys
    env.evaluate(np.array(partial))   # asked for as a possible result: screened again, not read from the cache
    assert env.screening.asked[-1] == (partial, (final, env.best_reward), False)
    assert env.evaluations == env.num_steps + 2
