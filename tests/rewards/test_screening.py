"""Multi-fidelity scoring (rewards/screening.py): plans kept out get estimates below the plan to beat,
every result is a full score, and a search whose plans are all promoted is the full search."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import seeded, small_cnn
from torch_rlprune import rl_prune
from torch_rlprune.rewards import screening
from torch_rlprune.rewards.calibration import build_calibration
from torch_rlprune.rewards.scores import FidelityReward
from torch_rlprune.rewards.screening import Screening, promising


@pytest.fixture
def calibration(fmnist_train_split):
    _, (x, y) = fmnist_train_split
    return x, y   # 512 images: a search part of 384, screened on 64 by default


def _search(model, data, agent, episodes, **kwargs):
    kwargs.setdefault("seed", 2)
    return rl_prune(model, 0.85, data=data, agent=agent, episodes=episodes, verbose=False, calibration_samples=512,
                    **kwargs)


def _trace(result):
    return [(h["reward"], h["amounts"], h["evaluations"]) for h in result.history]


def test_the_paired_bound_keeps_out_only_plans_clearly_worse():
    assert promising(torch.zeros(64))                                # as good on every sample
    clearly_worse = torch.cat([-torch.ones(10), torch.zeros(54)])    # 10 of 64 lost, none won
    assert not promising(clearly_worse)
    close = torch.cat([-torch.ones(3), torch.ones(2), torch.zeros(59)])  # one net loss in 64: noise
    assert promising(close)
    assert promising(torch.cat([torch.ones(5), torch.zeros(59)]))


def test_a_plan_clearly_worse_than_the_plan_to_beat_gets_an_estimate_below_it_and_no_full_score():
    model = seeded(small_cnn, 0).eval()
    data = torch.randn(200, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    calibration = build_calibration(model, data)
    baseline = FidelityReward(calibration)
    baseline.prepare(model)
    screen = Screening(model, "fidelity", calibration, 48, seed=0, recalibrate=False, baseline=1.0)
    assert [len(x) for x in screen.slices.inputs] == [48, 76]   # the second: half of the 152 others
    unpruned = screen.score((0,), None, lambda: 1.0, lambda key: None)
    assert unpruned == (1.0, True) and torch.equal(screen.reads[(0,)].gains, torch.ones(124, dtype=torch.float64))
    assert screen.score((0,), None, lambda: 0.25, lambda key: None, shaping=True) == (1.0, False)

    def never():
        raise AssertionError("a plan kept out must not be scored in full")

    with torch.no_grad():
        model[0].weight.mul_(-1.0)   # flips the first layer: most decisions change
    value, full = screen.score((1,), ((0,), 0.9), never, lambda key: None)
    agreement = float(screen.reward.gains_of_outputs(screen.reward.outputs(model, [0])).mean())
    assert not full and agreement < 0.8
    assert value == pytest.approx(0.9 + agreement - 1.0) and value < 0.9
    assert (1,) not in screen.reads   # never a plan to beat
    assert screen.stats.as_dict() == {"samples": 48, "second_samples": 76, "z": screening.PROMOTION_Z,
                                      "screened": 3, "second_reads": 0, "promoted": 1, "kept_out": 1,
                                      "shaping_estimates": 1}


def _screen(model, samples=48, recalibrate=False):
    data = torch.randn(200, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return Screening(model, "fidelity", build_calibration(model, data), samples, seed=0, recalibrate=recalibrate,
                     baseline=1.0)


@pytest.mark.parametrize("tests,kept_out", [(("closeness", "gains"), True), (("closeness",), True),
                                             (("gains",), False)])
def test_the_promotion_test_sees_a_plan_that_agrees_everywhere_but_drifts(tests, kept_out, monkeypatch):
    """Halving the classifier keeps every decision (agreement 1 on every sample, as the unpruned
    model) but flattens every softmax: only the smooth statistic can tell it is worse."""
    monkeypatch.setattr(screening, "PROMOTION_TESTS", tests)
    model = seeded(small_cnn, 0).eval()
    screen = _screen(model)
    screen.score((0,), None, lambda: 1.0, lambda key: None)
    with torch.no_grad():
        model[-1].weight.mul_(0.5)
        model[-1].bias.mul_(0.5)
    value, full = screen.score((1,), ((0,), 1.0), lambda: 1.0, lambda key: None)
    assert float(screen.reward.sample_gains(model).mean()) == 1.0
    assert full is not kept_out and value == 1.0   # an estimate never above the plan to beat


@pytest.mark.parametrize("tests,kept_out", [(("closeness", "gains"), True), (("closeness",), False)])
def test_a_plan_closer_in_softmax_but_clearly_worse_in_decisions_is_kept_out(tests, kept_out, monkeypatch):
    from torch_rlprune.rewards.screening import SliceRead

    monkeypatch.setattr(screening, "PROMOTION_TESTS", tests)
    screen = _screen(seeded(small_cnn, 0).eval())
    n = len(screen.slices.inputs[0])
    screen.reads[(1,)] = SliceRead(torch.ones(n, dtype=torch.float64), torch.full((n,), -2.0, dtype=torch.float64))
    lost = torch.cat([torch.zeros(10), torch.ones(n - 10)]).double()   # 10 decisions lost, none won
    monkeypatch.setattr(screen, "_read", lambda outputs: SliceRead(lost, torch.full((n,), -1.0, dtype=torch.float64)))
    value, full = screen.score((2,), ((1,), 0.9), lambda: 0.95, lambda key: None)
    assert full is not kept_out
    assert value == (pytest.approx(0.9 - 10 / n) if kept_out else 0.95)


def test_a_plan_kept_out_is_never_estimated_above_the_plan_to_beat(monkeypatch):
    """The statistic that keeps a plan out need not be the score: a plan that agrees more often on the
    slice than the plan to beat, kept out anyway, is estimated at the plan to beat's score, not above."""
    model = seeded(small_cnn, 0).eval()
    screen = _screen(model)
    original = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.mul_(-1.0)
    screen.score((1,), None, lambda: 0.4, lambda key: None)     # the damaged plan, measured
    with torch.no_grad():
        model[0].weight.copy_(original)
    monkeypatch.setattr(screening, "promising", lambda differences: False)
    value, full = screen.score((0,), ((1,), 0.4), lambda: 1.0, lambda key: None)
    assert not full and value == 0.4


def test_a_one_batch_slice_is_read_with_its_own_statistics_and_leaves_the_running_ones(fmnist_train_split):
    """One forward with batch statistics: the outputs of re-estimating BatchNorm on the slice and
    evaluating it (up to the unbiased variance's n/(n-1)), and no running statistic moves."""
    from helpers import fmnist_cnn
    from torch_rlprune.rewards.recalibration import BatchNormRecalibration

    model = seeded(fmnist_cnn, 0).eval()
    screen = Screening(model, "fidelity", build_calibration(model, fmnist_train_split[1][0]), 64, seed=0,
                       recalibrate=True, baseline=1.0)
    first = screen.slices.inputs[0]
    assert len(first) == 64
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    read = screen._outputs([0])
    assert all(torch.equal(m.running_mean, a) and torch.equal(m.running_var, b) for m, (a, b) in zip(norms, before))
    assert all(not m.training and m.track_running_stats for m in norms)
    BatchNormRecalibration(model, [first])()
    evaluated = screen.reward.outputs(model, [0])
    assert torch.allclose(read[0], evaluated[0], atol=1e-3)
    assert not torch.allclose(read[0], screen.reward.outputs(seeded(fmnist_cnn, 0).eval(), [0])[0], atol=1e-1)


@pytest.mark.parametrize("agent,target", [("amc", 0.85), ("cacp", [0.7, 0.85])])
def test_with_every_plan_promoted_the_screened_search_is_the_full_search(agent, target, trained_fmnist_cnn,
                                                                         calibration, monkeypatch):
    config = {"warmup": 3}
    full = rl_prune(copy.deepcopy(trained_fmnist_cnn), target, data=calibration, agent=agent, episodes=8,
                    agent_config=config, seed=2, verbose=False, calibration_samples=512, screen=0)
    monkeypatch.setattr(screening, "promising", lambda differences: True)
    promoted = rl_prune(copy.deepcopy(trained_fmnist_cnn), target, data=calibration, agent=agent, episodes=8,
                        agent_config=config, seed=2, verbose=False, calibration_samples=512)
    assert _trace(promoted) == _trace(full) and len({h["reward"] for h in full.history}) > 1
    plans = [(full[t].plan, promoted[t].plan) for t in target] if isinstance(target, list) else \
        [(full.plan, promoted.plan)]
    for want, got in plans:
        assert got.amounts == want.amounts and got.score == want.score
        assert "screening" not in want.metadata
        stats = got.metadata["screening"]
        assert stats["promoted"] == stats["screened"] > 0 and stats["kept_out"] == 0


def test_random_search_proposes_the_same_plans_and_returns_only_full_scores(trained_fmnist_cnn, calibration):
    full = _search(copy.deepcopy(trained_fmnist_cnn), calibration, "random", 24, screen=0)
    screened = _search(copy.deepcopy(trained_fmnist_cnn), calibration, "random", 24)
    assert [h["amounts"] for h in screened.history] == [h["amounts"] for h in full.history]
    stats = screened.plan.metadata["screening"]
    assert stats["kept_out"] > 0 and stats["samples"] == 64
    assert stats["screened"] == stats["promoted"] + stats["kept_out"] + stats["shaping_estimates"]
    measured = {h["reward"] for h in full.history} | set(full.plan.metadata["prior"]["candidates"].values())
    # every plan the screened search compared for its result carries the score the full search measured
    candidates = screened.plan.metadata["selection"]["candidates"]
    assert all(search_score in measured for search_score, _ in candidates)
    assert screened.plan.score in measured
    assert screened.history[-1]["evaluations"] == full.history[-1]["evaluations"]
    assert 0 < screened.scoring_seconds < screened.search_seconds


def test_a_resumed_screened_search_ends_where_the_uninterrupted_one_did(trained_fmnist_cnn, _trained_fmnist_cnn,
                                                                        calibration, tmp_path, monkeypatch):
    data = (calibration[0][:160], calibration[1][:160])
    kwargs = dict(agent="amc", episodes=12, agent_config={"warmup": 3}, seed=4, verbose=False,
                  calibration_samples=160, screen=32, selection=0.0)   # one plan kept: a plan to beat early
    calls = {"n": 0, "interrupt_at": None}
    original = FidelityReward.__call__

    def interrupting(reward, model):
        calls["n"] += 1
        if calls["n"] == calls["interrupt_at"]:
            raise KeyboardInterrupt
        return original(reward, model)

    monkeypatch.setattr(FidelityReward, "__call__", interrupting)
    reference = rl_prune(copy.deepcopy(_trained_fmnist_cnn), 0.85, data=data, checkpoint=tmp_path / "ref.pt", **kwargs)
    assert reference.plan.metadata["screening"]["kept_out"] > 0
    recorded = torch.load(tmp_path / "ref.pt", weights_only=True)
    # measurements only: the estimates are made again by the replay, never read from the file
    assert len(recorded["scores"]) < reference.history[-1]["evaluations"]

    # at the last full score, which an episode makes (the first four are the unpruned model's two and
    # the priors', before any checkpoint); how many there are depends on the trajectory, e.g. on the threads
    assert calls["n"] > 4
    calls.update(n=0, interrupt_at=calls["n"])
    path = tmp_path / "search.pt"
    with pytest.raises(KeyboardInterrupt):
        rl_prune(trained_fmnist_cnn, 0.85, data=data, checkpoint=path, checkpoint_every=1, **kwargs)
    monkeypatch.undo()
    resumed = rl_prune(trained_fmnist_cnn, 0.85, data=data, resume=path, **kwargs)
    assert _trace(resumed) == _trace(reference)
    assert resumed.plan.amounts == reference.plan.amounts and resumed.plan.score == reference.plan.score


@pytest.mark.parametrize("screen", [1, -2, True, 2.5, "64"])
def test_bad_screen_sizes_are_refused_before_anything_runs(screen, small_cnn_model, cnn_batch):
    before = copy.deepcopy(small_cnn_model.state_dict())
    with pytest.raises(ValueError, match=r"screen must be a number of samples >= 2, 0 .* or None"):
        rl_prune(small_cnn_model, 0.5, data=cnn_batch, screen=screen, verbose=False)
    assert all(torch.equal(v, before[k]) for k, v in small_cnn_model.state_dict().items())


def test_screening_is_off_where_it_cannot_pay(small_cnn_model, cnn_batch):
    result = rl_prune(small_cnn_model, 0.5, data=cnn_batch, agent="random", episodes=3, verbose=False)
    assert "screening" not in result.plan.metadata   # 32 samples: under four slices of 64


def _staged_reads(gains: torch.Tensor, closeness: torch.Tensor):
    """A ``Screening._read`` that reads fixed per-sample terms on the slices read so far."""
    def read(outputs):
        n = sum(len(o) for o in outputs)
        return screening.SliceRead(gains[:n], closeness[:n])
    return read


def _never():
    raise AssertionError("a plan kept out must not be scored in full")


def test_a_plan_even_with_the_best_on_the_first_slice_but_clearly_worse_on_both_is_kept_out(monkeypatch):
    screen = _screen(seeded(small_cnn, 0).eval())
    first, second = (len(x) for x in screen.slices.inputs)
    n = first + second
    screen.reads[(1,)] = screening.SliceRead(torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))
    lost = torch.cat([torch.ones(first), torch.zeros(20), torch.ones(second - 20)]).double()  # 20 lost, all on the second
    drift = torch.cat([torch.zeros(first), torch.full((20,), -1.0), torch.zeros(second - 20)]).double()
    monkeypatch.setattr(screen, "_read", _staged_reads(lost, drift))
    value, full = screen.score((2,), ((1,), 0.9), _never, lambda key: None)
    assert not full and value == pytest.approx(0.9 - 20 / n)   # the estimate reads both slices
    assert (screen.stats.second_reads, screen.stats.kept_out, screen.stats.promoted) == (1, 1, 0)


def test_a_plan_promising_on_both_slices_is_promoted_with_both_reads_kept(monkeypatch):
    screen = _screen(seeded(small_cnn, 0).eval())
    n = screen.slices.num_samples
    screen.reads[(1,)] = screening.SliceRead(torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))
    monkeypatch.setattr(screen, "_read", _staged_reads(torch.ones(n, dtype=torch.float64),
                                                       torch.zeros(n, dtype=torch.float64)))
    assert screen.score((2,), ((1,), 0.9), lambda: 0.93, lambda key: None) == (0.93, True)
    assert screen.stats.second_reads == 1 and len(screen.reads[(2,)].gains) == n   # a plan to beat from now on


@pytest.mark.parametrize("total,sizes", [(300, [64, 118]), (1000, [64, 192]), (150, [64])])
def test_the_slices_are_disjoint_seeded_samples_the_second_at_most_half_of_the_rest(total, sizes):
    from torch_rlprune.rewards.calibration import CalibrationSet
    from torch_rlprune.rewards.screening import staged_slices

    search_part = CalibrationSet(list(torch.arange(total, dtype=torch.float32)[:, None].split(128)), None, False)
    slices = staged_slices(search_part, 64, seed=3)
    assert [len(x) for x in slices.inputs] == sizes
    ids = torch.cat(slices.inputs).flatten().long()
    assert len(set(ids.tolist())) == len(ids) and 0 <= int(ids.min()) and int(ids.max()) < total
    assert all(bool((x.flatten()[1:] > x.flatten()[:-1]).all()) for x in slices.inputs)   # in their order
    assert torch.equal(staged_slices(search_part, 64, seed=3).inputs[0], slices.inputs[0])
    assert not torch.equal(staged_slices(search_part, 64, seed=4).inputs[0], slices.inputs[0])


def test_a_regression_models_first_slice_estimate_is_scaled_by_that_slice():
    """Squared errors are scaled by the spread of the outputs read: a first-slice estimate read with
    both slices' spread would be several times too close to the unpruned model."""
    from torch import nn

    from torch_rlprune.rewards.calibration import CalibrationSet

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    torch.manual_seed(0)
    data = torch.randn(400, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    screen = Screening(model, "fidelity", build_calibration(model, data), 32, seed=0, recalibrate=False, baseline=1.0)
    assert screen.teacher is None and len(screen.slices.inputs) == 2
    first = FidelityReward(CalibrationSet(screen.slices.inputs[:1], None, False))
    first.prepare(model)
    with torch.no_grad():
        model[1].weight.mul_(0.5)
    value, full = screen.score((1,), None, lambda: 0.0, lambda key: None, shaping=True)
    assert not full and value == pytest.approx(1.0 + first(model) - 1.0) and value < 0.99
