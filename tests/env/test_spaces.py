"""The structure registry (env/spaces.py): every per-structure fact lives on a registered SpaceKind."""
import dataclasses

import pytest
import torch
from torch import nn

from torch_rlprune import PlanError, PruningPlan, apply_plan
from torch_rlprune.env import spaces
from torch_rlprune.env.spaces import SPACES, STRUCTURES, space_kind
from torch_rlprune.options import STRUCTURE_DEFAULTS, PruneOptions


@pytest.mark.parametrize("structure", STRUCTURES)
def test_each_kind_is_consistent_with_itself(structure):
    kind = space_kind(structure)
    assert kind.name == structure and STRUCTURE_DEFAULTS[structure] is kind.defaults
    assert kind.defaults.budget in kind.budgets and kind.defaults.repair in kind.defaults.repairs
    assert set(kind.best_of) <= set(kind.priors)


def test_an_unknown_structure_is_refused_by_name():
    with pytest.raises(ValueError, match="structure must be one of"):
        space_kind("rows")


def test_apply_plan_goes_through_the_registered_kind(monkeypatch):
    calls = []
    kind = SPACES["unstructured"]
    monkeypatch.setitem(SPACES, "unstructured", dataclasses.replace(
        kind, apply_plan=lambda model, plan, scores, example: calls.append((model, plan.structure))))
    model = nn.Linear(4, 2)
    plan = PruningPlan(amounts={"weight": 0.5}, numels={"weight": 8}, target=0.5, sparsity=0.5)
    assert apply_plan(model, plan) is model
    assert calls == [(model, "unstructured")] and not hasattr(model, "weight_mask")


def test_a_plan_budget_its_structure_does_not_take_is_refused():
    data = PruningPlan(amounts={"weight": 0.5}, numels={"weight": 8}, target=0.5, sparsity=0.5).to_dict()
    data["budget"] = "latency"
    with pytest.raises(PlanError, match="comes from channel searches only"):
        PruningPlan.from_dict(data)


def test_structure_options_are_checked_by_the_kind(monkeypatch):
    seen = []
    kind = SPACES["channel"]
    monkeypatch.setitem(SPACES, "channel", dataclasses.replace(kind, check_options=lambda o, name: seen.append(o)))
    checked = PruneOptions(structure="channel", round_to=-3).checked()   # the kind's own check is replaced
    assert seen and seen[0].structure == "channel" and checked.round_to == -3
    with pytest.raises(ValueError, match="round_to"):
        PruneOptions(structure="unstructured", round_to=8).checked()


def test_the_unstructured_space_applies_tensor_amounts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    plan = PruningPlan(amounts={"0.weight": 0.25, "2.weight": 0.5}, numels={"0.weight": 64, "2.weight": 16},
                       target=0.3, sparsity=0.3)
    spaces.SPACES["unstructured"].apply_plan(model, plan, None, None)
    assert int((model[0].weight_mask == 0).sum()) == 16 and int((model[2].weight_mask == 0).sum()) == 8


@pytest.mark.parametrize("importance", ["magnitude", "activation"])
def test_the_heuristics_see_every_tensor_sorted_with_removed_entries_first(importance):
    """The sorted magnitudes the priors threshold reuse the masks' order when both rank the same
    scores: they must equal a fresh sort, an existing mask's entries first (at -inf)."""
    from torch.nn.utils import prune
    from helpers import inputs, seeded, small_cnn
    from torch_rlprune.env.spaces import UnstructuredSpace
    from torch_rlprune.structure.tensors import find_prunable

    model = seeded(small_cnn, 0).eval()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    prune.random_unstructured(first, "weight", amount=0.3)
    x = inputs((16, 1, 16, 16))

    def run():
        with torch.inference_mode():
            model(x)
    space = UnstructuredSpace(model, find_prunable(model), run, None, "params", 0.98, importance=importance,
                              batches=[x])
    for layer, ordered in zip(space.steps, space._sorted_magnitudes()):
        scores = layer.original.detach().abs().float().reshape(-1)
        if layer.existing_mask is not None:
            scores = scores.masked_fill(layer.existing_mask.reshape(-1) == 0, float("-inf"))
        assert torch.equal(torch.from_numpy(ordered), torch.sort(scores).values)
    assert any(layer.existing_mask is not None for layer in space.steps)
