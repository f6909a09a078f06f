"""Several targets in one call (CACP's conditional search, or one search per target), and AMC's
accuracy-guaranteed mode (target=None, max_drop=...)."""
import pytest
import torch

from helpers import ModelState, assert_budget_met, mask_sparsity, seeded, small_cnn
from torch_rlprune import compact, rl_prune
from torch_rlprune.rewards.scores import make_reward
from torch_rlprune.rewards.calibration import build_calibration

TARGETS = [0.5, 0.7, 0.9]
FAST_CACP = dict(agent="cacp", episodes=18, agent_config={"warmup": 6}, verbose=False)


@pytest.mark.parametrize("target", TARGETS)
def test_a_plan_from_a_multi_target_search_applies_to_the_model_or_a_copy(target, cnn_batch):
    model = seeded(small_cnn, 0)
    result = rl_prune(model, TARGETS, data=cnn_batch, seed=0, selection=0.0, **FAST_CACP)  # scored on all of it
    other = seeded(small_cnn, 0)
    assert_budget_met(result.apply(other, target=target), target)
    assert_budget_met(mask_sparsity(other), target)
    assert_budget_met(result.apply(target=target), target)
    assert_budget_met(mask_sparsity(model), target)
    scorer = make_reward("fidelity", build_calibration(seeded(small_cnn, 0), cnn_batch, None, 512, seed=0))
    scorer.prepare(seeded(small_cnn, 0))
    assert scorer(model) == pytest.approx(result[target].score, abs=1e-9), "the applied plan is not the scored one"


def test_unknown_target_of_a_multi_target_result_names_the_known_ones(cnn_batch):
    result = rl_prune(seeded(small_cnn, 0), TARGETS, data=cnn_batch, seed=0, **FAST_CACP)
    with pytest.raises(KeyError, match="0.5"):
        result.apply(target=0.6)
    with pytest.raises(ValueError, match="target="):
        result.apply()


def test_other_agents_run_one_search_per_target(cnn_batch):
    result = rl_prune(seeded(small_cnn, 0), [0.5, 0.8], data=cnn_batch, seed=0, agent="random", episodes=4,
                      verbose=False)
    assert len(result.history) == 8
    assert [h["target"] for h in result.history] == [0.5] * 4 + [0.8] * 4
    for target in (0.5, 0.8):
        assert_budget_met(result[target].plan.sparsity, target)


def test_multi_target_apply_reports_the_macs_fraction_for_an_unstructured_macs_budget(cnn_batch):
    """Regression: apply() read back the params fraction for budget="macs" (layers not traced)."""
    from helpers import macs_per_weight

    model = seeded(small_cnn, 0)
    result = rl_prune(model, [0.3, 0.6], data=cnn_batch, budget="macs", agent="random", episodes=3, seed=0,
                      verbose=False)
    for target in (0.3, 0.6):
        other = seeded(small_cnn, 0)
        achieved = result.apply(other, target=target)
        cost = macs_per_weight(other, cnn_batch[:2])   # independent: hooks, not the library's trace
        masked = [(m, m.weight_mask) for m in other.modules() if hasattr(m, "weight_mask")]
        removed = sum(float((mask == 0).sum()) * cost[m] for m, mask in masked)
        total = sum(mask.numel() * cost[m] for m, mask in masked)
        assert_budget_met(removed / total, target)
        assert achieved == pytest.approx(removed / total, abs=1e-9)


BAD_TARGETS = {
    "empty list": (dict(target=[]), ValueError, ["empty"]),
    "repeated target": (dict(target=[0.5, 0.5]), ValueError, ["repeated"]),
    "target out of range in a list": (dict(target=[0.5, 1.5]), ValueError, ["target", "(0, 1)"]),
    "None without max_drop": (dict(target=None), ValueError, ["max_drop"]),
    "max_drop with a target": (dict(target=0.5, max_drop=0.01), ValueError, ["max_drop", "target=None"]),
    "max_drop out of range": (dict(target=None, max_drop=1.5), ValueError, ["max_drop"]),
    "guarantee with an agent that cannot": (dict(target=None, max_drop=0.01, agent="cacp"), ValueError,
                                            ["cacp", "amc"]),
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
def test_bad_targets_are_rejected_before_the_model_changes(case, cnn_batch):
    overrides, error, fragments = BAD_TARGETS[case]
    model = seeded(small_cnn, 0)
    state = ModelState.of(model)
    kwargs = dict(data=cnn_batch, agent="random", episodes=2, verbose=False)
    kwargs.update(overrides)
    with pytest.raises(error) as info:
        rl_prune(model, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (case, str(info.value))
    state.assert_unchanged(model)


# --------------------------------------------------------------------------- accuracy-guaranteed
def test_accuracy_guaranteed_search_returns_the_smallest_plan_within_max_drop(trained_fmnist_cnn,
                                                                              fmnist_train_split):
    _, (x_cal, y_cal) = fmnist_train_split
    result = rl_prune(trained_fmnist_cnn, None, max_drop=0.02, data=(x_cal, y_cal), reward="accuracy",
                      agent="amc", episodes=60, agent_config={"warmup": 20}, seed=0, verbose=False)
    plan = result.plan
    assert plan.metadata["mode"] == "accuracy-guaranteed" and plan.metadata["max_drop"] == 0.02
    assert plan.score >= result.baseline_score - 0.02
    feasible = [h for h in result.history if h["score"] >= result.baseline_score - 0.02]
    assert feasible, "no episode stayed within max_drop"
    assert result.sparsity == pytest.approx(max(h["sparsity"] for h in feasible), abs=1e-6)
    assert result.sparsity > 0.3, "a trained CNN keeps its accuracy well past 30% sparsity"
    assert mask_sparsity(trained_fmnist_cnn) == pytest.approx(result.sparsity, abs=1e-6)
    assert "accuracy-guaranteed" in result.summary()


def test_accuracy_guaranteed_search_that_finds_nothing_leaves_the_model_dense(cnn_batch):
    model = seeded(small_cnn, 0)
    result = rl_prune(model, None, max_drop=0.0, data=cnn_batch, agent="random", episodes=3, seed=0, verbose=False,
                      max_amount=0.98)
    assert result.plan.score >= result.baseline_score
    if result.sparsity == 0:
        assert mask_sparsity(model) == 0


@pytest.mark.parametrize("budget", ["macs", "params"])
def test_accuracy_guaranteed_search_on_channels(budget):
    import timm

    from helpers import inputs
    from torch_rlprune.structure.channel import count_macs_params

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10).eval()
    x = inputs((8, 1, 32, 32))
    dense = count_macs_params(model, x[:2])
    result = rl_prune(model, None, max_drop=0.5, data=x, structure="channel", budget=budget, agent="random",
                      episodes=6, seed=0, verbose=False)
    which = 0 if budget == "macs" else 1
    assert result.plan.score >= result.baseline_score - 0.5
    assert result.sparsity == pytest.approx(1 - count_macs_params(model, x[:2])[which] / dense[which], abs=1e-6)
    feasible = [h["sparsity"] for h in result.history if h["score"] >= result.baseline_score - 0.5]
    assert result.plan.sparsity == pytest.approx(max(feasible + [0.0]), abs=1e-6)
    info = compact(model, x[:2])
    assert info["macs_after"] <= dense[0]
