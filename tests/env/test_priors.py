"""Heuristic allocations (LAMP, global magnitude, uniform) as prune methods, priors and plans."""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from helpers import ModelState, fmnist_cnn, inputs, randomize_norms, seeded, small_cnn, weight_masks
from torch_rlprune import rl_prune
from torch_rlprune.env.budget import AdditiveBudget
from torch_rlprune.env.priors import (global_magnitude_unstructured, lamp_scores, lamp_unstructured,
                                          sorted_lamp_scores, threshold_allocation, uniform_allocation,
                                          uniform_unstructured)

PRIOR_ONLY = dict(agent="prior", verbose=False, selection=0.0, bn_recalibration=0, protect_first_last=False)


def brute_lamp(w: torch.Tensor) -> torch.Tensor:
    """LAMP's definition, entry by entry: w_u^2 / sum of w_v^2 over |w_v| >= |w_u| (ties: later positions)."""
    flat = w.detach().abs().double().reshape(-1)
    order = torch.argsort(flat, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(flat))
    out = torch.empty_like(flat)
    for u in range(len(flat)):
        at_least = flat[order[rank[u]:]]
        out[u] = flat[u] ** 2 / (at_least ** 2).sum()
    return out.reshape(w.shape)


def pairs(model):
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# --------------------------------------------------------------------------- scores and functional twins
def test_lamp_scores_follow_the_definition():
    w = inputs((5, 7), seed=3)
    torch.testing.assert_close(lamp_scores(w).double(), brute_lamp(w), rtol=1e-6, atol=1e-7)
    assert float(lamp_scores(w).max()) == pytest.approx(1.0), "the largest weight of a layer scores 1"
    scores = sorted_lamp_scores(np.array([-np.inf, 0.5, 1.0, 2.0]))
    assert scores[0] == -np.inf and scores[1:] == pytest.approx([0.25 / 5.25, 1 / 5, 1.0])


def test_lamp_unstructured_removes_the_globally_smallest_lamp_scores():
    model = seeded(small_cnn, 0)
    expected = torch.cat([brute_lamp(m.weight).reshape(-1) for m, _ in pairs(model)])
    total = expected.numel()
    lamp_unstructured(pairs(model), amount=0.6)
    masks = torch.cat([m.weight_mask.reshape(-1) for m, _ in pairs(model)])
    assert int((masks == 0).sum()) == round(0.6 * total)
    assert float(expected[masks == 0].max()) <= float(expected[masks == 1].min())
    assert all(prune.is_pruned(m) for m, _ in pairs(model))


def test_lamp_keeps_layers_global_magnitude_empties():
    """A layer of tiny weights: global magnitude removes all of it, LAMP keeps its largest entries."""
    model = seeded(lambda: nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)))   # unseeded, it failed 1 run in 4
    with torch.no_grad():
        model[1].weight.mul_(1e-6)   # below every weight of the first layer
    lamp, global_ = copy.deepcopy(model), copy.deepcopy(model)
    lamp_unstructured(pairs(lamp), amount=0.2)
    global_magnitude_unstructured(pairs(global_), amount=0.2)
    assert int(global_[1].weight_mask.sum()) == 0
    assert int(lamp[1].weight_mask.sum()) > 0


def test_global_magnitude_twin_is_torchs_global_unstructured():
    a, b = seeded(small_cnn, 0), seeded(small_cnn, 0)
    global_magnitude_unstructured(pairs(a), amount=0.7)
    prune.global_unstructured(pairs(b), prune.L1Unstructured, amount=0.7)
    for (ma, _), (mb, _) in zip(pairs(a), pairs(b)):
        assert torch.equal(ma.weight_mask, mb.weight_mask)


def test_uniform_twin_prunes_every_tensor_alike():
    model = seeded(small_cnn, 0)
    uniform_unstructured(pairs(model), amount=0.5)
    for m, _ in pairs(model):
        assert int((m.weight_mask == 0).sum()) == round(0.5 * m.weight.numel())
    with pytest.raises(ValueError, match="fraction"):
        uniform_unstructured(pairs(seeded(small_cnn, 0)), amount=3)


@pytest.mark.parametrize("bad", [1.5, -0.1, "0.5", True])
def test_twins_refuse_bad_amounts_before_touching_weights(bad):
    model = seeded(small_cnn, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError)):
        lamp_unstructured(pairs(model), amount=bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lamp_on_top_of_existing_masks_counts_the_alive_entries():
    model = seeded(small_cnn, 0)
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    dead_before = int((model[0].weight_mask == 0).sum())
    alive = sum(m.weight.numel() for m, _ in pairs(model)) - dead_before
    lamp_unstructured(pairs(model), amount=0.5)
    dead = sum(int((m.weight_mask == 0).sum()) for m, _ in pairs(model))
    assert dead == dead_before + round(0.5 * alive)
    assert bool((model[0].weight_mask[model[0].weight_orig.abs() < 1e-12] == 0).all())


TWINS = [uniform_unstructured, global_magnitude_unstructured, lamp_unstructured]
# (the pair that goes wrong, the error, what it must name); fmnist_cnn: [1] is a BatchNorm, [-1] the Linear
BAD_PAIRS = {
    "misspelt name": (lambda m: (m[-1], "wieght"), ValueError, r"parameters .*'wieght'.*\['weight', 'bias'\]"),
    "a buffer": (lambda m: (m[1], "running_mean"), ValueError, r"parameters .*'running_mean'"),
    "not a module": (lambda m: ("fc", "weight"), TypeError, r"parameters .*'weight'.*str"),
}


@pytest.mark.parametrize("twin", TWINS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", list(BAD_PAIRS))
def test_twins_check_every_pair_before_pruning_any(twin, bad):
    """The bad pair comes last: uniform prunes pair by pair, and torch's global pruning registers the
    masks pair by pair after computing them, so the pairs before a buffer were left pruned."""
    model = randomize_norms(seeded(fmnist_cnn, 0))
    prune.l1_unstructured(model[0], "weight", amount=0.3)   # a pruned tensor counts as its own name
    make_pair, error, match = BAD_PAIRS[bad]
    state = ModelState.of(model)
    with pytest.raises(error, match=match):
        twin(pairs(model) + [make_pair(model)], amount=0.5)
    state.assert_unchanged(model)


@pytest.mark.parametrize("twin", [global_magnitude_unstructured, lamp_unstructured], ids=lambda f: f.__name__)
@pytest.mark.parametrize("scores,match", [
    (lambda m: {(m[0], "weight"): torch.rand(4)}, r"importance_scores .*'weight'.*\(16, 1, 3, 3\).*\(4,\)"),
    (lambda m: {(m[0], "weight"): [0.5] * 144}, r"importance_scores .*'weight'.*list"),
    (lambda m: [torch.rand(16, 1, 3, 3)], r"importance_scores must be a dict"),
], ids=["wrong shape", "not a tensor", "not a dict"])
def test_twins_refuse_importance_scores_that_do_not_fit_before_pruning(twin, scores, match):
    """torch's own errors here named neither the argument nor the tensor (an IndexError on the sizes
    of flattened masks, an AttributeError of a list)."""
    model = seeded(fmnist_cnn, 0)
    state = ModelState.of(model)
    with pytest.raises((ValueError, TypeError), match=match):
        twin(pairs(model), amount=0.5, importance_scores=scores(model))
    state.assert_unchanged(model)


# --------------------------------------------------------------------------- allocations on a budget
def test_threshold_allocation_is_one_global_threshold_on_the_goal():
    rng = np.random.default_rng(0)
    scores = [np.sort(rng.random(n)) for n in (50, 200, 30)]
    n = np.array([50, 200, 30])
    budget = AdditiveBudget(n, [1, 1, 1], [0, 0, 0], n - 1)
    k = threshold_allocation(scores, budget, goal=140)
    assert k.sum() == 140
    removed = np.concatenate([s[:kk] for s, kk in zip(scores, k)])
    kept = np.concatenate([s[kk:] for s, kk in zip(scores, k)])
    assert removed.max() <= kept.min()


def test_threshold_allocation_weighs_units_by_their_cost():
    """With MACs, the threshold stops when the goal's cost is removed, not its count."""
    scores = [np.linspace(0, 1, 100), np.linspace(0, 1, 100)]
    budget = AdditiveBudget([100, 100], [1, 9], [0, 0], [99, 99])
    k = threshold_allocation(scores, budget, goal=0.5 * budget.total)
    assert abs(budget.removed(k) - 0.5 * budget.total) <= 9
    assert abs(int(k[0]) - int(k[1])) <= 1, "one threshold: both steps cut at the same score"


def test_uniform_allocation_takes_the_same_share_of_every_step():
    n = np.array([100, 300, 40])
    budget = AdditiveBudget(n, [1, 1, 1], [0, 0, 0], n)
    k = uniform_allocation(n, budget, goal=0.5 * n.sum())
    assert k.sum() == 220
    assert np.allclose(k / n, 0.5, atol=0.02)


def test_allocations_respect_existing_masks_and_caps():
    scores = [np.array([-np.inf, -np.inf, 0.1, 0.2, 0.3]), np.array([0.05, 0.5, 0.6, 0.7, 0.8])]
    budget = AdditiveBudget([5, 5], [1, 1], [2, 0], [4, 1])
    k = threshold_allocation(scores, budget, goal=5)
    assert k[0] >= 2 and k[1] <= 1 and k.sum() == 5


# --------------------------------------------------------------------------- the prior as rl_prune's plan
@pytest.mark.parametrize("method,twin", [("lamp", lamp_unstructured), ("global", global_magnitude_unstructured)])
def test_prior_agent_returns_the_heuristics_masks(method, twin):
    x = inputs((32, 1, 16, 16))
    model, reference = seeded(small_cnn, 0), seeded(small_cnn, 0)
    result = rl_prune(model, 0.75, data=x, prior=method, **PRIOR_ONLY)
    twin(pairs(reference), amount=0.75)
    ours, theirs = weight_masks(model), weight_masks(reference)
    assert ours.keys() == theirs.keys()
    different = sum(int((ours[k] != theirs[k]).sum()) for k in ours)
    assert different <= 2, "the prior's plan is the heuristic's (up to a tie at the threshold)"
    assert result.plan.metadata["prior"]["method"] == method
    assert result.history == [], "agent='prior' plays no episode"


def test_best_prior_is_the_better_scored_candidate():
    x = inputs((32, 1, 16, 16))
    result = rl_prune(seeded(small_cnn, 0), 0.9, data=x, prior="best", **PRIOR_ONLY)
    prior = result.plan.metadata["prior"]
    assert set(prior["candidates"]) == {"lamp", "global"}
    assert prior["score"] == max(prior["candidates"].values())
    assert prior["candidates"][prior["method"]] == prior["score"] == result.plan.score


def wide_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def test_channel_priors_uniform_and_global():
    model = randomize_norms(seeded(wide_cnn, 0))
    x = inputs((32, 1, 12, 12))
    from torch_rlprune.structure.channel import ChannelStructure

    uniform = rl_prune(copy.deepcopy(model), 0.5, data=x, structure="channel", prior="uniform", **PRIOR_ONLY)
    fractions = list(uniform.plan.amounts.values())
    assert len(fractions) == 3
    assert max(fractions) - min(fractions) <= 2 / 32 + 1e-9, "one share for every group (up to the repair)"
    result = rl_prune(copy.deepcopy(model), 0.5, data=x, structure="channel", prior="global", **PRIOR_ONLY)
    structure = ChannelStructure(copy.deepcopy(model), x[:2])
    removed, kept = [], []
    for g in structure.groups:
        n = round(result.plan.amounts[g.key] * g.num_units)
        removed += g.importance[g.order[:n]].tolist()
        kept += g.importance[g.order[n:]].tolist()
    assert max(removed) <= min(kept) + 1e-6, "one threshold over every group's unit importance"


@pytest.mark.parametrize("kwargs,match", [
    (dict(prior="lamp", structure="channel"), "prior must be one of"),
    (dict(prior="erk"), "prior must be one of"),
    (dict(prior=None), "prior must be one of"),
    (dict(selection=1.0), "selection must be"),
    (dict(selection=-0.1), "selection must be"),
    (dict(select_top=0), "select_top must be"),
    (dict(agent="prior", prior="none"), "returns the prior's plan"),
    (dict(protect_first_last="yes"), "protect_first_last"),
])
def test_bad_quality_options_are_refused_before_any_change(kwargs, match):
    model = seeded(small_cnn, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match):
        rl_prune(model, 0.5, data=inputs((8, 1, 16, 16)), verbose=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(prune.is_pruned(m) for m in model.modules())
