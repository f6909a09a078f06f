"""budget=Latency(...): the latency table calibrated on measured compacted candidates, and the
returned plan measured after compact and rescaled until it lands on the target.

Timings are replaced by a deterministic stand-in (seconds from the compacted model's MACs plus a
fixed overhead the table cannot see) wherever a test asserts on a value: the contract is tested,
not the machine. One test runs the real onnxruntime path and asserts nothing about its numbers."""
import copy
import importlib.util
import json
import warnings

import numpy as np
import pytest

from helpers import (ModelState, fake_fraction, fake_table, fake_timing, inputs,  # noqa: F401 - fixtures
                     latency_resnet, private_cache_one_thread)
from torch_rlprune import Latency, PruningPlan, apply_plan, compact, rl_prune
from torch_rlprune.env.budget import AdditiveBudget
from torch_rlprune.report import load_run, save_run, summarize
from torch_rlprune.structure.channel import ChannelStructure
from torch_rlprune.structure.channel.latency import LatencyTable
from torch_rlprune.structure.channel.measured import CompactedTimer, MeasuredCalibration, fit_fixed_rest, scaled_plan

FAST = dict(structure="channel", agent="random", episodes=4, verbose=False, seed=0)


# --------------------------------------------------------------------------- the spec
@pytest.mark.parametrize("kwargs, name", [(dict(batch=0), "batch"), (dict(batch=True), "batch"),
                                          (dict(threads=0), "threads"), (dict(runtime="tflite"), "runtime"),
                                          (dict(tolerance=0.0), "tolerance"), (dict(rounds=-1), "rounds"),
                                          (dict(repeats=0), "repeats"), (dict(blocks=0), "blocks"),
                                          (dict(blocks=4, max_blocks=3), "max_blocks")])
def test_a_bad_latency_spec_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Latency(**kwargs)


def test_a_latency_spec_on_unstructured_pruning_is_refused_before_the_model_changes(resnet):
    state = ModelState.of(resnet)
    with pytest.raises(ValueError, match="budget"):
        rl_prune(resnet, 0.3, budget=Latency(blocks=1), data=inputs((8, 1, 32, 32)), agent="random", episodes=2,
                 verbose=False)
    state.assert_unchanged(resnet)


# --------------------------------------------------------------------------- the calibration
def test_calibration_is_the_identity_until_measured_then_passes_through_every_point():
    calibration = MeasuredCalibration()
    assert calibration(0.37) == 0.37
    calibration.add(0.5, 0.4)
    calibration.add(0.2, 0.1)
    assert calibration(0.0) == 0.0 and calibration(0.5) == pytest.approx(0.4) and calibration(0.2) == pytest.approx(0.1)
    assert calibration(0.35) == pytest.approx(0.25)            # linear between points
    assert calibration(0.75) == pytest.approx(0.6)             # beyond: the line from the origin through the last


def test_calibration_stays_monotone_under_noisy_points():
    calibration = MeasuredCalibration([(0.3, 0.35), (0.35, 0.2), (0.5, 0.45), (0.5, 0.55)])
    grid = np.linspace(0, 0.9, 91)
    values = [calibration(p) for p in grid]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert calibration(0.5) == pytest.approx(0.5)               # two measurements of one prediction: their mean
    with pytest.raises(ValueError, match="finite"):
        calibration.add(float("nan"), 0.1)


@pytest.mark.parametrize("share", [0.0, 0.4, 1.0])
def test_the_fixed_share_of_the_rest_is_recovered_from_measured_plans(resnet, monkeypatch, share):
    fake_table(monkeypatch)
    x = inputs((4, 1, 32, 32))
    structure = ChannelStructure(resnet, x[:2], round_to=8)
    table = LatencyTable(structure, x[:2], batch=1)
    rng = np.random.default_rng(0)
    plans = [np.array([rng.integers(0, g.num_units // 2 + 1) for g in structure.groups]) for _ in range(3)]
    table.fixed_rest = share
    measured = [(k, table.fraction_removed(k)) for k in plans]  # what a model with that overhead measures
    table.fixed_rest = 0.5
    assert fit_fixed_rest(table, table.fraction_removed, measured) == pytest.approx(share, abs=1e-9)
    assert table.fixed_rest == pytest.approx(share, abs=1e-9)
    # a larger fixed share predicts less removed by the same plan: the overhead stays
    table.fixed_rest = 0.0
    shrinking = table.fraction_removed(plans[0])
    table.fixed_rest = 1.0
    assert table.fraction_removed(plans[0]) < shrinking
    assert table.latency(np.zeros(len(structure.groups), dtype=np.int64)) == pytest.approx(table.dense_latency)


def test_scaled_plan_keeps_the_plans_shape_and_lands_on_the_goal():
    budget = AdditiveBudget([100, 100, 100, 100], [1, 1, 1, 1], [0, 0, 0, 0], [90, 90, 90, 90])
    k = np.array([10, 20, 40, 0])
    scaled = scaled_plan(budget, k, 140)
    assert budget.removed(scaled) == 140
    assert scaled[3] == 0 and scaled[0] < scaled[1] < scaled[2]
    assert np.allclose(scaled[:3] / k[:3], 2.0, atol=0.06)


def test_a_measurement_is_the_median_of_its_blocks(resnet, monkeypatch):
    readings = iter([0.1, 0.5, 0.3])
    monkeypatch.setattr(CompactedTimer, "compacted", lambda self, plan, removed_blocks=(): self.reference)
    monkeypatch.setattr(CompactedTimer, "paired_seconds", lambda self, dense, pruned: (1.0, 1.0 - next(readings)))
    timer = CompactedTimer(resnet, inputs((1, 1, 32, 32)), Latency(blocks=3, max_blocks=3))
    assert timer.fraction_removed({"layer1.0.conv1:out": 8}) == pytest.approx(0.3)
    assert timer.fraction_removed({"layer1.0.conv1:out": 8}) == pytest.approx(0.3)  # cached: not measured again
    assert timer.measurements == 1


@pytest.mark.parametrize("readings, blocks_taken", [
    ([0.30, 0.31, 0.30], 3),                    # settled: the spec's 3 blocks
    ([0.10, 0.50, 0.30, 0.30, 0.30], 5),        # spread out: more blocks until the median's error is small
    ([0.1, 0.5, 0.3, 0.7, 0.2, 0.6, 0.4, 0.8], 6),  # never settles: stops at max_blocks
])
def test_a_noisy_measurement_takes_more_blocks_until_its_median_settles(resnet, monkeypatch, readings, blocks_taken):
    stream, taken = iter(readings), []

    def paired_seconds(self, dense, pruned):
        taken.append(1)
        return 1.0, 1.0 - next(stream)

    monkeypatch.setattr(CompactedTimer, "paired_seconds", paired_seconds)
    timer = CompactedTimer(resnet, inputs((1, 1, 32, 32)), Latency(blocks=3, max_blocks=6, tolerance=0.02))
    fraction = timer.settled_fraction(timer.reference, timer.reference)
    assert len(taken) == blocks_taken
    assert fraction == pytest.approx(float(np.median(readings[:blocks_taken])))


def test_an_onnxruntime_measurement_exports_each_model_once_not_once_per_block(resnet, monkeypatch):
    import torch_rlprune.structure.channel.measured as measured
    import torch_rlprune.structure.deploy as deploy

    exported = []
    monkeypatch.setattr(measured, "_export_for_timing", lambda model, example, path: exported.append(model))
    monkeypatch.setattr(deploy, "onnx_latency_ms", lambda paths, example, repeats, threads: [1.0, 0.7])
    monkeypatch.setattr(CompactedTimer, "compacted",
                        lambda self, plan, removed_blocks=(): copy.deepcopy(self.reference))
    spec = Latency(blocks=3, max_blocks=3)
    object.__setattr__(spec, "runtime", "onnxruntime")  # no onnxruntime is run: its timings are replaced
    timer = CompactedTimer(resnet, inputs((1, 1, 32, 32)), spec)
    assert timer.fraction_removed({"layer1.0.conv1:out": 8}) == pytest.approx(0.3)
    assert len(exported) == 2 and exported[0] is timer.reference  # 3 blocks, the two models exported once
    assert timer.fraction_removed({"layer1.0.conv1:out": 4}) == pytest.approx(0.3)
    assert len(exported) == 3 and exported[2] is not exported[1]  # a new candidate is exported, the unpruned is not
    timer.close()


# --------------------------------------------------------------------------- rl_prune
def test_the_returned_plan_is_measured_after_compact_and_rescaled_onto_the_target(resnet, monkeypatch):
    calls = fake_timing(monkeypatch, shift_after=2, shift=0.08)  # the calibration runs 2 measurements first
    twin = copy.deepcopy(resnet)
    x = inputs((8, 1, 32, 32))
    result = rl_prune(resnet, 0.3, budget=Latency(rounds=3, blocks=1), data=x, **FAST)
    record = result.plan.metadata["latency"]["measured"]
    assert len(record["rounds"]) >= 2, "the first measurement missed by 8 points: the plan must be rescaled"
    assert record["met"] and abs(result.sparsity - 0.3) <= 0.02
    assert record["chosen"] == len(record["rounds"]) - 1, "the last round met the target: it is the plan returned"
    assert result.sparsity == result.plan.sparsity == record["measured_fraction"] == record["rounds"][-1]["measured"]
    assert record["spec"]["runtime"] == "eager" and record["spec"]["threads"] == 1
    assert len(record["search_calibration"]) == 2        # the search's budget: two uniform plans measured
    assert len(result.plan.metadata["latency"]["calibration"]) == len(record["rounds"])  # then this plan's own
    assert "measured after compact on eager" in result.summary()
    # the reported fraction is the returned plan's own: compacted independently, it measures the same
    dense = copy.deepcopy(twin)
    apply_plan(twin, result.plan)
    compact(twin, x[:1])
    assert fake_fraction(x[:1], dense, twin, -0.08) == pytest.approx(result.sparsity, abs=1e-9)
    # the scores are the rescaled plan's: the held-out selection was measured on it again
    selection = result.plan.metadata["selection"]
    assert selection["search_score"] == result.plan.score
    assert record["rounds"][-1]["confirmed"] == record["rounds"][-1]["measured"]  # chosen among rounds: confirmed
    assert len(calls) == 2 + len(record["rounds"]) + 1


def test_when_a_rescaling_lands_further_off_the_closest_measured_plan_is_returned(resnet, monkeypatch):
    # two calibrations, the search's plan low, its rescaling far too high, the search's plan confirmed
    offsets = iter([0.0, 0.0, -0.06, 0.25, -0.05])
    measured_plans = []

    def paired_seconds(self, dense, pruned):
        return 1.0, 1.0 - fake_fraction(self.example, dense, pruned, next(offsets))

    original = CompactedTimer.fraction_removed

    def recording(self, plan, *args, **kwargs):
        measured_plans.append(dict(plan))
        return original(self, plan, *args, **kwargs)

    fake_table(monkeypatch)
    monkeypatch.setattr(CompactedTimer, "paired_seconds", paired_seconds)
    monkeypatch.setattr(CompactedTimer, "fraction_removed", recording)
    twin, x = copy.deepcopy(resnet), inputs((8, 1, 32, 32))
    with pytest.warns(UserWarning, match="measured after compact"):
        result = rl_prune(resnet, 0.3, budget=Latency(rounds=1, blocks=1), data=x, **FAST)
    record = result.plan.metadata["latency"]["measured"]
    assert len(record["rounds"]) == 2 and record["chosen"] == 0
    assert result.sparsity == record["rounds"][0]["confirmed"] != record["rounds"][0]["measured"]
    structure = ChannelStructure(twin, x[:2], round_to=8)  # the units each plan removes, rounded as applied
    returned, first, rescaled, confirmed = (structure.resolve_plan(p)
                                            for p in (result.plan.counts(), *measured_plans[2:]))
    assert np.array_equal(returned, first) and not np.array_equal(first, rescaled)  # the search's own plan
    assert np.array_equal(confirmed, first)


@pytest.mark.parametrize("second", [None, 0.7])
def test_a_plan_that_landed_on_a_lucky_reading_reports_its_fresh_measurements(resnet, monkeypatch, second):
    # the search's plan reads 10 points low, so it is rescaled to remove more; that plan happens to
    # read exactly the target (a lucky reading). Chosen among several readings, it is measured again;
    # the two disagree, so a third reading is taken and the median of the three reported: what the
    # plan removes, whether the second reading was right (None) or an outlier of its own (0.7)
    calls = []

    def paired_seconds(self, dense, pruned):
        calls.append(1)
        truth = fake_fraction(self.example, dense, pruned)
        reading = {3: truth - 0.1, 4: 0.3, 5: second}.get(len(calls)) or truth
        return 1.0, 1.0 - reading

    fake_table(monkeypatch)
    monkeypatch.setattr(CompactedTimer, "paired_seconds", paired_seconds)
    with pytest.warns(UserWarning, match="measured after compact"):
        result = rl_prune(resnet, 0.3, budget=Latency(rounds=3, blocks=1), data=inputs((8, 1, 32, 32)), **FAST)
    record = result.plan.metadata["latency"]["measured"]
    chosen = record["rounds"][record["chosen"]]
    assert len(record["rounds"]) == 2 and record["chosen"] == 1 and chosen["measured"] == pytest.approx(0.3)
    assert len(chosen["rereadings"]) == 2 and len(calls) == 6
    assert chosen["confirmed"] > 0.3 + 0.02, "the rescaled plan removes more than the target"
    # the third reading is the plan's own (what it removes): the median, whichever of the others is off
    assert chosen["confirmed"] != 0.7 and chosen["confirmed"] == pytest.approx(chosen["rereadings"][-1])
    assert result.sparsity == record["measured_fraction"] == chosen["confirmed"] and not record["met"]


def test_a_plan_measured_slower_than_the_dense_model_keeps_that_reading_and_its_plan_and_run_file_load(
        resnet, monkeypatch, tmp_path):
    # on loaded cores a compacted plan can read slower than the dense model: 1 - pruned / dense < 0.
    # That is the measurement: reported as read (never clamped), and what carries it loads back
    calls = []

    def paired_seconds(self, dense, pruned):
        calls.append(1)  # the first two calibrate the table; every plan after reads 5% slower than dense
        return 1.0, 1.0 - (fake_fraction(self.example, dense, pruned) if len(calls) <= 2 else -0.05)

    fake_table(monkeypatch)
    monkeypatch.setattr(CompactedTimer, "paired_seconds", paired_seconds)
    with pytest.warns(UserWarning, match="measured after compact"):
        result = rl_prune(resnet, 0.3, budget=Latency(rounds=1, blocks=1), data=inputs((8, 1, 32, 32)), **FAST)
    assert result.sparsity == result.plan.sparsity == pytest.approx(-0.05)
    assert PruningPlan.from_dict(json.loads(json.dumps(result.plan.to_dict()))).sparsity == result.plan.sparsity
    save_run(tmp_path, [summarize(result)])
    assert load_run(tmp_path)["records"][0]["sparsity"] == result.sparsity


def test_a_runtime_pruning_cannot_speed_up_enough_is_refused_before_the_search(resnet, monkeypatch):
    fake_table(monkeypatch)
    monkeypatch.setattr(CompactedTimer, "paired_seconds", lambda self, dense, pruned: (1.0, 0.97))
    state = ModelState.of(resnet)
    with pytest.raises(ValueError, match="cannot be reached"):
        rl_prune(resnet, 0.3, budget=Latency(blocks=1), data=inputs((8, 1, 32, 32)), **FAST)
    state.assert_unchanged(resnet)


def test_a_target_still_missed_after_every_round_warns_with_the_measurements(resnet, monkeypatch):
    fake_timing(monkeypatch, shift_after=2, shift=0.25, drift=True)  # the rescaled plans cannot catch up
    with pytest.warns(UserWarning, match="measured after compact"):
        result = rl_prune(resnet, 0.3, budget=Latency(rounds=1, blocks=1), data=inputs((8, 1, 32, 32)), **FAST)
    record = result.plan.metadata["latency"]["measured"]
    assert not record["met"] and len(record["rounds"]) == 2
    assert result.sparsity == record["measured_fraction"]
    assert "target missed" in result.summary()


def test_a_measurement_that_fails_after_the_search_leaves_the_model_untouched(resnet, monkeypatch):
    fake_timing(monkeypatch, fail_after=2)
    state = ModelState.of(resnet)
    with pytest.raises(RuntimeError, match="timer broke"):
        rl_prune(resnet, 0.3, budget=Latency(blocks=1), data=inputs((8, 1, 32, 32)), **FAST)
    state.assert_unchanged(resnet)


def test_measurements_are_cached_so_a_seeded_rerun_measures_nothing_and_returns_the_same_plan(resnet, monkeypatch):
    calls = fake_timing(monkeypatch)
    x = inputs((8, 1, 32, 32))
    twin = copy.deepcopy(resnet)
    first = rl_prune(resnet, 0.3, budget=Latency(blocks=1), data=x, **FAST)
    measured = len(calls)
    second = rl_prune(twin, 0.3, budget=Latency(blocks=1), data=x, **FAST)
    assert measured >= 3 and len(calls) == measured
    assert second.plan.metadata["latency"]["measured"]["measurements"] == 0
    assert second.plan.counts() == first.plan.counts() and second.sparsity == first.sparsity
    # the summary says where the readings came from: the second run timed nothing
    assert f"{first.plan.metadata['latency']['measured']['measurements']} timed now" in first.summary()
    assert "latency cache" not in first.summary()
    assert "every reading from the latency cache of an earlier run, none timed now" in second.summary()


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs the deploy extra")
def test_latency_measured_in_onnxruntime(resnet):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missed target on this shared machine only warns
        result = rl_prune(resnet, 0.3, budget=Latency(runtime="onnxruntime", repeats=3, rounds=1),
                          data=inputs((8, 1, 32, 32)), **FAST)
    record = result.plan.metadata["latency"]["measured"]
    assert record["spec"]["runtime"] == "onnxruntime" and record["measurements"] >= 3
    assert np.isfinite(result.sparsity) and result.sparsity == record["measured_fraction"]
    assert "measured after compact on onnxruntime" in result.summary()


def test_latency_tables_and_measurements_show_progress_only_when_verbose(resnet, monkeypatch, capsys):
    fake_timing(monkeypatch)
    x = inputs((8, 1, 32, 32))
    rl_prune(copy.deepcopy(resnet), 0.3, budget=Latency(blocks=1), data=x, **dict(FAST, verbose=True))
    shown = capsys.readouterr().err
    assert "latency table" in shown and "latency: measuring calibration plans" in shown
    assert "latency: measuring the plan after compact" in shown
    rl_prune(resnet, 0.3, budget=Latency(blocks=1), data=x, **FAST)
    assert "latency" not in capsys.readouterr().err
