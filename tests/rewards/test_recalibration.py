"""bn_recalibration: BatchNorm statistics re-estimated for each scored plan, and for the result."""
import pytest
import torch
from torch import nn

from torch_rlprune import rl_prune
from torch_rlprune.rewards.recalibration import BatchNormRecalibration, PlanStatistics

from helpers import ModelState, RaisingReward, inputs, seeded


def small_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 10))


def running_stats(model):
    return [(m.running_mean.clone(), m.running_var.clone()) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_recalibration_reestimates_and_restores_exactly():
    model = seeded(small_cnn, 0).eval()
    x = inputs((64, 1, 16, 16))
    before = running_stats(model)
    recalibrate = BatchNormRecalibration(model, [x[:32], x[32:]])
    recalibrate()
    after = running_stats(model)
    assert all(not torch.equal(a[0], b[0]) for a, b in zip(after, before))
    assert not any(m.training for m in model.modules())
    # the cumulative estimate over both batches is the batch statistics of the first layer's input
    first_bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        pre = model[0](x)
    assert torch.allclose(first_bn.running_mean, pre.mean((0, 2, 3)), atol=1e-5)
    recalibrate.restore()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(running_stats(model), before))


@pytest.mark.parametrize("structure", ["unstructured", "channel"])
def test_result_carries_the_statistics_of_its_plan(structure):
    model = seeded(small_cnn, 0).eval()
    x = inputs((256, 1, 16, 16))
    before = running_stats(model)
    rl_prune(model, 0.5, data=x, structure=structure, agent="random", episodes=3, verbose=False,
             bn_recalibration=1, calibration_samples=256, selection=0.0)  # the first batch is x[:128]
    after = running_stats(model)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(after, before))
    BatchNormRecalibration(model, [x[:128]])()  # re-estimating on the same batch changes nothing
    assert all(torch.allclose(a[0], b[0], atol=1e-6) for a, b in zip(running_stats(model), after))


@pytest.mark.parametrize("structure, default", [("channel", 4), ("unstructured", 4)])
def test_recalibration_default_depends_on_the_structure(structure, default):
    model = seeded(small_cnn, 0).eval()
    x = inputs((64, 1, 16, 16))
    before = running_stats(model)
    result = rl_prune(model, 0.5, data=x, structure=structure, agent="random", episodes=3, verbose=False)
    assert result.plan.metadata["bn_recalibration"] == default
    changed = any(not torch.equal(a[0], b[0]) for a, b in zip(running_stats(model), before))
    assert changed is bool(default)


def test_without_recalibration_statistics_are_untouched():
    model = seeded(small_cnn, 0).eval()
    x = inputs((64, 1, 16, 16))
    before = running_stats(model)
    rl_prune(model, 0.5, data=x, agent="random", episodes=3, verbose=False, bn_recalibration=0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(running_stats(model), before))


def test_the_held_out_part_is_scored_with_statistics_of_the_search_part():
    """Selection re-estimates BatchNorm on the search part's batches only, then scores the held-out part."""
    from torch_rlprune.rewards.calibration import build_calibration
    from torch_rlprune.search.selection import split_calibration

    model = seeded(small_cnn, 0).eval()
    x = inputs((256, 1, 16, 16))
    rl_prune(model, 0.5, data=x, agent="random", episodes=3, verbose=False, calibration_samples=256, seed=3)
    search, held = split_calibration(build_calibration(model, x, None, 256, seed=3), 0.25, seed=3)
    after = running_stats(model)
    BatchNormRecalibration(model, search.inputs[:4])()   # the default: up to 4 batches of the search part
    assert all(torch.allclose(a[0], b[0], atol=1e-6) for a, b in zip(running_stats(model), after))
    BatchNormRecalibration(model, held.inputs[:1])()
    assert not all(torch.allclose(a[0], b[0], atol=1e-6) for a, b in zip(running_stats(model), after))


def test_a_multi_target_plan_is_applied_with_the_statistics_it_was_scored_with():
    model = seeded(small_cnn, 0).eval()
    x = inputs((256, 1, 16, 16))
    before = running_stats(model)
    multi = rl_prune(model, [0.4, 0.7], data=x, agent="random", episodes=4, verbose=False,
                     calibration_samples=256, selection=0.0, bn_recalibration=1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(running_stats(model), before))  # left unpruned
    host = seeded(small_cnn, 0).eval()
    multi.apply(host, target=0.7)
    applied = running_stats(host)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(applied, before))
    BatchNormRecalibration(host, [x[:128]])()  # the search's first calibration batch: nothing moves
    assert all(torch.allclose(a[0], b[0], atol=1e-6) for a, b in zip(running_stats(host), applied))
    from torch_rlprune.rewards.scores import make_reward
    from torch_rlprune.rewards.calibration import build_calibration
    scorer = make_reward("fidelity", build_calibration(model, x, None, 256, seed=0))
    scorer.prepare(model)
    assert scorer(host) == pytest.approx(multi[0.7].plan.score, abs=1e-9)  # the model that was scored


def test_kept_statistics_equal_a_fresh_estimate_and_stay_within_their_bound():
    model = seeded(small_cnn, 0).eval()
    x = inputs((64, 1, 16, 16))
    recalibrate = BatchNormRecalibration(model, [x[:32], x[32:]])
    conv = model[3]
    plans = {name: torch.rand_like(conv.weight).gt(fraction).float()
             for name, fraction in (("a", 0.3), ("b", 0.6), ("c", 0.8))}
    original = conv.weight.detach().clone()

    def mask(name):
        with torch.no_grad():
            conv.weight.copy_(original * plans[name])

    fresh = {}
    for name in plans:
        mask(name)
        recalibrate()
        fresh[name] = running_stats(model)
    kept = PlanStatistics(recalibrate, max_bytes=2 * PlanStatistics(recalibrate, 0).bytes_per_plan)
    for name in ("a", "b", "a"):          # "a" last used: "b" is the oldest when "c" arrives
        mask(name)
        kept.refresh(name)
    assert (kept.estimated, kept.reused) == (2, 1)
    assert all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(running_stats(model), fresh["a"]))
    mask("c")
    kept.refresh("c")
    assert list(kept.kept) == ["a", "c"]
    mask("b")
    kept.refresh(None)                    # a plan nobody named is estimated, never kept
    kept.refresh("b")                     # dropped by the bound: estimated again
    assert (kept.estimated, kept.reused, list(kept.kept)) == (5, 1, ["c", "b"])
    assert all(torch.equal(u[0], v[0]) for u, v in zip(running_stats(model), fresh["b"]))


def test_held_out_choice_reuses_each_plans_statistics_with_the_same_results(monkeypatch):
    """The held-out choice loads the statistics its candidates' full scores estimated instead of
    estimating them again: the same choice, scores and model as when every score re-estimates."""
    import torch_rlprune.search.engine as engine

    x = inputs((384, 1, 16, 16))
    runs, default = {}, engine.STATISTICS_BYTES
    for bound in (default, 0):
        monkeypatch.setattr(engine, "STATISTICS_BYTES", bound)
        model = seeded(small_cnn, 0).eval()
        result = rl_prune(model, 0.8, data=x, agent="random", episodes=8, verbose=False,
                          calibration_samples=384, seed=1)
        runs[bound] = (result.plan.metadata, model.state_dict())
    (kept, kept_state), (fresh, fresh_state) = runs[default], runs[0]
    assert kept["bn_statistics"]["reused"] >= len(kept["selection"]["candidates"]) - 1
    assert fresh["bn_statistics"]["reused"] == 0
    assert kept["selection"] == fresh["selection"]
    assert list(kept_state) == list(fresh_state)
    assert all(torch.equal(kept_state[name], fresh_state[name]) for name in kept_state)


def test_failed_search_with_recalibration_leaves_the_model_untouched():
    model = seeded(small_cnn, 0).train()
    x = inputs((64, 1, 16, 16))
    state = ModelState.of(model)
    with pytest.raises(RuntimeError, match="boom"):
        rl_prune(model, 0.5, data=x, reward=RaisingReward(x, 3, RuntimeError("boom")), agent="random",
                 episodes=4, verbose=False, bn_recalibration=1)
    state.assert_unchanged(model)


def test_bad_recalibration_argument_is_rejected():
    with pytest.raises(ValueError, match="bn_recalibration"):
        rl_prune(seeded(small_cnn, 0), 0.5, data=inputs((8, 1, 16, 16)), bn_recalibration=-1, verbose=False)
