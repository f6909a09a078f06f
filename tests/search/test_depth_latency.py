"""budget=Latency(...) with agent="n2n": residual blocks removed whole under a measured latency budget.

Timings are the deterministic stand-ins of test_measured_latency.py (seconds from MACs plus an
overhead the table cannot see), blocks timed alone as their layers plus the same overhead: the
contract is tested, not the machine."""
import copy
import warnings

import numpy as np
import pytest
import torch

import torch_rlprune.env.depth_latency as depth_latency
import torch_rlprune.env.depth_space as depth_space
from helpers import (OVERHEAD, ModelState, fake_fraction, fake_table, fake_timing, inputs,  # noqa: F401 - fixtures
                     latency_resnet, private_cache_one_thread)
from torch_rlprune import Latency, apply_plan, compact, rl_prune
from torch_rlprune.structure.channel import ChannelStructure
from torch_rlprune.structure.channel.latency import LatencyTable
from torch_rlprune.structure.channel.measured import CalibratedLatency, MeasuredCalibration
from torch_rlprune.structure.depth import find_removable_blocks
from torch_rlprune.env.depth_latency import DepthLatency

NARROW = 0.2   # at most 20% of any group: widths alone cannot remove 45% of the (stand-in) latency
SEARCH = dict(structure="channel", agent="n2n", episodes=6, verbose=False, seed=0, max_amount=NARROW)


def fake_block_timing(monkeypatch):
    """A block alone takes its layers' (stand-in) seconds plus the overhead share."""
    def time_blocks(table, blocks, threads, repeats=5):
        return {b.name: (1 + OVERHEAD) * sum(lay.calls * lay.dense_seconds for lay in table.layers
                                             if lay.name.startswith(b.name + "."))
                for b in blocks}

    monkeypatch.setattr(depth_latency, "time_blocks", time_blocks)
    monkeypatch.setattr(depth_space, "time_blocks", time_blocks)   # where the depth space looks it up


def depth_latency_of(model, x, monkeypatch):
    fake_table(monkeypatch)
    fake_block_timing(monkeypatch)
    structure = ChannelStructure(model, x[:2], round_to=8)
    table = LatencyTable(structure, x[:2], batch=1)
    blocks = find_removable_blocks(model, x[:2])
    latency = DepthLatency(CalibratedLatency(table, MeasuredCalibration()), blocks,
                           depth_latency.time_blocks(table, blocks, 1))
    return latency, table, blocks, structure


def test_with_no_block_removed_the_prediction_is_the_tables(resnet, monkeypatch):
    x = inputs((4, 1, 32, 32))
    latency, table, blocks, structure = depth_latency_of(resnet, x, monkeypatch)
    rng = np.random.default_rng(0)
    none = np.zeros(len(blocks), dtype=bool)
    for _ in range(5):
        counts = np.array([rng.integers(0, g.num_units // 2 + 1) for g in structure.groups])
        assert latency.predicted(none, counts) == pytest.approx(table.latency(counts), rel=1e-12)


def test_removing_a_block_saves_its_layers_and_its_share_of_the_rest(resnet, monkeypatch):
    x = inputs((4, 1, 32, 32))
    latency, table, blocks, structure = depth_latency_of(resnet, x, monkeypatch)
    zero = np.zeros(len(structure.groups), dtype=np.int64)
    none = np.zeros(len(blocks), dtype=bool)
    assert len(blocks) >= 4
    saved = []
    for i, b in enumerate(blocks):
        one = none.copy()
        one[i] = True
        layers = sum(lay.calls * lay.dense_seconds for lay in table.layers if lay.name.startswith(b.name + "."))
        saved.append(table.dense_latency - latency.predicted(one, zero))
        assert saved[-1] == pytest.approx(layers + latency.block_rest[i], rel=1e-9)
        assert latency.block_rest[i] == pytest.approx(OVERHEAD * layers, rel=1e-9)
    everything = np.ones(len(blocks), dtype=bool)
    assert table.dense_latency - latency.predicted(everything, zero) == pytest.approx(sum(saved), rel=1e-9)
    # narrower widths make a removed block save less: it holds narrower layers
    narrow = np.array([g.num_units // 2 for g in structure.groups])
    assert latency.predicted(none, narrow) - latency.predicted(everything, narrow) < sum(saved)


def test_n2n_meets_a_latency_target_that_widths_alone_cannot_reach(resnet, monkeypatch):
    calls = fake_timing(monkeypatch)
    fake_block_timing(monkeypatch)
    twin, x = copy.deepcopy(resnet), inputs((8, 1, 32, 32))
    state = ModelState.of(resnet)
    with pytest.raises(ValueError, match="agent='n2n' also removes whole residual blocks"):
        rl_prune(resnet, 0.45, data=x, budget=Latency(blocks=1), **{**SEARCH, "agent": "random"})
    state.assert_unchanged(resnet)

    result = rl_prune(resnet, 0.45, data=x, budget=Latency(blocks=1), **SEARCH)
    record = result.plan.metadata["latency"]["measured"]
    removed = result.plan.metadata["removed_blocks"]
    assert removed, "45% of the latency needs blocks removed"
    assert record["met"] and abs(result.sparsity - 0.45) <= 0.02
    assert result.sparsity == record["measured_fraction"] == record["rounds"][record["chosen"]]["measured"]
    assert len(record["search_calibration"]) == 2 and len(calls) >= 3
    # the reported fraction is the plan's own: applied to a fresh copy, compacted, measured the same way
    dense = copy.deepcopy(twin)
    apply_plan(twin, result.plan)
    compacted = copy.deepcopy(twin)
    assert sorted(compact(compacted, x[:1])["removed_blocks"]) == sorted(removed)
    assert fake_fraction(x[:1], dense, compacted) == pytest.approx(result.sparsity, abs=1e-9)
    with torch.inference_mode():  # and the compacted model computes what the masked one does
        assert torch.allclose(compacted(x), twin(x), atol=1e-5)


def test_a_failed_measurement_of_a_depth_plan_leaves_the_model_untouched(resnet, monkeypatch):
    fake_timing(monkeypatch, fail_after=2)
    fake_block_timing(monkeypatch)
    state = ModelState.of(resnet)
    with pytest.raises(RuntimeError, match="timer broke"):
        rl_prune(resnet, 0.45, data=inputs((8, 1, 32, 32)), budget=Latency(blocks=1), **SEARCH)
    state.assert_unchanged(resnet)


def test_blocks_are_timed_once_and_then_read_from_the_cache(resnet):
    x = inputs((4, 1, 32, 32))
    structure = ChannelStructure(resnet, x[:2], round_to=8)
    table = LatencyTable(structure, x[:2], batch=1, repeats=1)
    blocks = find_removable_blocks(resnet, x[:2])
    first = depth_latency.time_blocks(table, blocks, 1, repeats=1)
    assert set(first) == {b.name for b in blocks} and all(s > 0 for s in first.values())
    again = depth_latency.time_blocks(table, blocks, 1, repeats=1)
    assert again == first


def test_when_the_blocks_alone_overshoot_the_measured_target_a_block_is_put_back(resnet, monkeypatch):
    # from the search's plan on, every model measures 20 points faster than predicted: its blocks
    # alone then remove more than the target, and no width can undo that
    fake_timing(monkeypatch, shift_after=2, shift=-0.2)
    fake_block_timing(monkeypatch)
    x = inputs((8, 1, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # blocks are coarse: whether the last round lands is not the point here
        result = rl_prune(resnet, 0.45, data=x, budget=Latency(blocks=1, rounds=4), **SEARCH)
    rounds = result.plan.metadata["latency"]["measured"]["rounds"]
    assert len(rounds) >= 2 and rounds[0]["measured"] > 0.45 + 0.1
    # widths are rescaled first; once the measurements show they cannot close the gap, a block goes back
    fewer = [r for r in rounds[1:] if len(r["removed_blocks"]) < len(rounds[0]["removed_blocks"])]
    assert fewer and set(fewer[0]["removed_blocks"]) < set(rounds[0]["removed_blocks"])
    assert fewer[0]["measured"] < rounds[0]["measured"]
    chosen = rounds[result.plan.metadata["latency"]["measured"]["chosen"]]
    assert result.plan.metadata["removed_blocks"] == chosen["removed_blocks"]


def test_a_target_the_fewest_blocks_first_rule_misses_is_still_reached_by_another_block_set(resnet, monkeypatch):
    from torch_rlprune.env.depth_width import DepthWidthEnv

    # every block removed, whatever the target: the closest plan must find a block set that fits
    monkeypatch.setattr(DepthWidthEnv, "keep_first_removal", lambda self: np.ones(self.num_blocks, dtype=bool))
    result = rl_prune(resnet, 0.5, data=inputs((8, 1, 32, 32)), structure="channel", agent="n2n", episodes=2,
                      verbose=False, seed=0, max_amount=NARROW, budget="macs")
    assert abs(result.sparsity - 0.5) <= 0.02
    assert 0 < len(result.plan.metadata["removed_blocks"]) < len(result.plan.metadata["removable_blocks"])
