"""The budget registry (structure/costs.py): a new budget is one ``register_budget`` call, and every
part that reads budgets (the options, the spaces, the environment, plans, results) takes it from there."""
import pytest

from torch_rlprune import BudgetMeasure, PruningPlan, apply_plan, register_budget, rl_prune
from torch_rlprune.env.spaces import SPACES
from torch_rlprune.options import check_budget
from torch_rlprune.structure import costs
from torch_rlprune.structure.channel.counting import count_macs_params

from helpers import inputs, macs_per_weight, mask_sparsity, pruned_modules, seeded, small_cnn, weight_masks

PER_PARAM = 16   # the made-up budget: a weight's MACs plus a fixed storage price


@pytest.fixture
def weighted_budget(monkeypatch):
    """Registers "weighted" (MACs + 16 per parameter) for one test; the registry is restored after."""
    monkeypatch.setattr(costs, "BUDGET_MEASURES", dict(costs.BUDGET_MEASURES))
    return register_budget(BudgetMeasure(
        "weighted", "MACs plus a storage price per weight",
        per_weight=lambda layer: layer.macs_per_weight + PER_PARAM,
        of_counts=lambda macs, params: macs + PER_PARAM * params, traced=True))


def weighted_fraction_from_masks(model, example) -> float:
    """The made-up budget removed, counted from the weight_mask buffers alone."""
    macs = macs_per_weight(model, example)
    modules = list(pruned_modules(model).values())
    removed = sum(int((m.weight_mask == 0).sum()) * (macs[m] + PER_PARAM) for m in modules)
    return removed / sum(m.weight.numel() * (macs[m] + PER_PARAM) for m in modules)


def test_a_registered_budget_is_taken_by_every_structure_that_can_count_it(weighted_budget):
    assert "weighted" in SPACES["unstructured"].budgets and "weighted" in SPACES["channel"].budgets
    check_budget("weighted", "unstructured")
    check_budget("weighted", "channel")


def test_a_budget_without_a_per_weight_cost_is_refused_for_unstructured_pruning(monkeypatch):
    monkeypatch.setattr(costs, "BUDGET_MEASURES", dict(costs.BUDGET_MEASURES))
    register_budget(BudgetMeasure("activations", "activation memory", of_counts=lambda macs, params: macs))
    assert "activations" not in SPACES["unstructured"].budgets
    with pytest.raises(ValueError, match=r"budget must be one of \('params', 'macs'\).*needs structure='channel'"):
        check_budget("activations", "unstructured")


def test_a_measured_budget_no_space_can_time_is_refused_by_both(monkeypatch):
    monkeypatch.setattr(costs, "BUDGET_MEASURES", dict(costs.BUDGET_MEASURES))
    register_budget(BudgetMeasure("energy", "joules, measured", measured=True))
    for structure in SPACES:
        assert "energy" not in SPACES[structure].budgets
        with pytest.raises(ValueError, match="budget must be one of"):
            check_budget("energy", structure)


@pytest.mark.parametrize("measure, message", [
    ("params", "takes a BudgetMeasure"),
    (BudgetMeasure("two words", "x", per_weight=lambda layer: 1), "must be an identifier"),
    (BudgetMeasure("nothing", "x"), "counts nothing"),
])
def test_register_budget_refuses_what_it_cannot_use(monkeypatch, measure, message):
    monkeypatch.setattr(costs, "BUDGET_MEASURES", dict(costs.BUDGET_MEASURES))
    with pytest.raises((TypeError, ValueError), match=message):
        register_budget(measure)
    assert set(costs.BUDGET_MEASURES) == {"params", "macs", "latency"}


def test_unstructured_search_lands_on_a_registered_budget(weighted_budget, tmp_path):
    x = inputs((32, 1, 16, 16))
    model = seeded(small_cnn)
    result = rl_prune(model, 0.5, data=x, budget="weighted", agent="random", episodes=3, seed=0, verbose=False)
    counted = weighted_fraction_from_masks(model, x[:2])
    assert result.plan.budget == "weighted"
    assert abs(counted - 0.5) <= 0.005 and abs(result.sparsity - counted) < 1e-6
    # neither the params nor the MACs budget under another name
    assert abs(mask_sparsity(model) - 0.5) > 0.01 and abs(mask_sparsity(model, "macs", x[:2]) - 0.5) > 0.01
    result.plan.save(tmp_path / "plan.json")
    other = seeded(small_cnn)
    apply_plan(other, PruningPlan.load(tmp_path / "plan.json"))
    assert {k: v.tolist() for k, v in weight_masks(other).items()} == \
        {k: v.tolist() for k, v in weight_masks(model).items()}


def test_channel_search_lands_on_a_registered_budget(weighted_budget):
    x = inputs((32, 1, 16, 16))
    model = seeded(small_cnn)
    dense = count_macs_params(model, x[:2])
    result = rl_prune(model, 0.3, data=x, structure="channel", budget="weighted", agent="prior", verbose=False)
    after = count_macs_params(model, x[:2], count_zeros=True)
    counted = 1 - (after[0] + PER_PARAM * after[1]) / (dense[0] + PER_PARAM * dense[1])
    assert abs(counted - 0.3) <= SPACES["channel"].defaults.tolerance
    assert abs(result.sparsity - counted) < 1e-6


def test_pruned_fraction_names_a_budget_weights_do_not_carry():
    with pytest.raises(ValueError, match="not counted per weight"):
        costs.pruned_fraction([], "latency")
    with pytest.raises(ValueError, match=r"budget must be one of \('params', 'macs', 'latency'\), got 'bytes'"):
        costs.budget_measure("bytes")
