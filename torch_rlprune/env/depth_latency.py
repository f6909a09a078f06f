"""Latency with residual blocks removed: why depth matters when the budget is time.

On a CPU at batch 1 a small mobile network is dominated by the fixed cost of every op call, not
by its arithmetic: measured after :func:`~torch_rlprune.compact` (timm, 64x64 inputs, 2 threads,
torch eager), removing 80% of *every* channel group cuts mobilenetv3_small_100's latency by 11%
and regnetx_002's by 20%, while removing their six / nine residual blocks whole cuts it by 52% /
62%. A latency budget that only shrinks widths refuses those targets; one that can also remove
blocks (the N2N agent's action) reaches them. This module gives the depth search the arithmetic
it needs, as :class:`~torch_rlprune.structure.channel.latency.LatencyTable` does for widths:

* every removable block is timed alone on the input it receives in the model (at the budget's
  batch, cached beside the table as plain JSON); what its layers do not account for is the
  block's *rest* (activations, norms, squeeze-excite, the add, and the per-call overhead);
* ``latency(removed, counts)`` = the table's prediction for ``counts`` minus, for every removed
  block, its layers at the widths ``counts`` leave and its rest (scaled with the table's rest);
* the fraction removed goes through the same measured calibration as the width-only budget
  (:class:`~torch_rlprune.structure.channel.measured.CalibratedLatency`), which the measured closing step
  fits to whole compacted candidates, blocks removed and all.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from ..structure.channel._util import restore_training, run_model, training_flags
from ..structure.channel.latency import alive_entry_sizes, device_of, median_seconds
from ..structure.channel.measured import scaled_plan
from ..structure.depth import RemovableBlock, is_inside
from ..threads import intra_op_threads

__all__ = ["DepthLatency", "time_blocks"]


def _block_inputs(model, blocks: Sequence[RemovableBlock], example) -> Dict[str, torch.Tensor]:
    """The tensor each block receives in one forward of ``model`` on ``example``."""
    seen: Dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args):
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()
        return hook

    handles = [b.module.register_forward_pre_hook(hook_for(b.name)) for b in blocks]
    flags = training_flags(model)
    try:
        model.eval()
        with torch.inference_mode():
            run_model(model, example)
    finally:
        restore_training(flags)
        for handle in handles:
            handle.remove()
    return seen


def _read_block_cache(path: Path, key: str) -> Dict[str, float]:
    """Earlier block timings (plain JSON, never executed; anything but positive finite seconds is ignored)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("seconds"), dict):
        return {}
    return {k: float(v) for k, v in data["seconds"].items() if isinstance(k, str) and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v) and v > 0}


def time_blocks(table, blocks: Sequence[RemovableBlock], threads: int, repeats: int = 5) -> Dict[str, float]:
    """Seconds of one call of every block alone, on the input it gets in the model at the table's
    batch, with ``threads`` intra-op threads (cached beside the table's own timings)."""
    model = table.structure.model
    key = json.dumps([table.cache_path.name, [[b.name, list(b.shape)] for b in blocks], threads])
    path = table.cache_path.with_name(f"blocks-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")
    seconds = _read_block_cache(path, key)
    missing = [b for b in blocks if b.name not in seconds]
    if missing:
        inputs = _block_inputs(model, missing, table.example)
        flags = training_flags(model)
        try:
            model.eval()
            with intra_op_threads(threads):
                for b in missing:
                    x = inputs[b.name]
                    seconds[b.name] = median_seconds(lambda: b.module(x), device_of(model), repeats, 2)
        finally:
            restore_training(flags)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"key": key, "seconds": seconds}, indent=1), encoding="utf-8")
        except OSError:
            pass  # a read-only cache only costs the timing again
    return {b.name: seconds[b.name] for b in blocks}


class DepthLatency:
    """The calibrated latency budget of a depth-and-width plan (see the module docstring).

    Args:
        latency: the search's :class:`~torch_rlprune.structure.channel.measured.CalibratedLatency` (its
            table, and its calibration, which the measured steps replace as they go).
        blocks: the removable blocks, in the order of the plan's block flags.
        block_seconds: each block alone, from :func:`time_blocks`.
    """

    def __init__(self, latency, blocks: Sequence[RemovableBlock], block_seconds: Dict[str, float]):
        self.latency = latency
        table = self.table = latency.table
        self.blocks = list(blocks)
        self.total = float(table.dense_latency)
        self.group_costs = latency.group_latencies()  # per group, what it controls (a state feature)
        self._layers: List[List[int]] = [[j for j, lay in enumerate(table.layers) if is_inside(lay.name, b.name)]
                                         for b in self.blocks]
        rests = np.array([max(0.0, block_seconds[b.name] - sum(table.layers[j].calls * table.layers[j].dense_seconds
                                                              for j in layers))
                          for b, layers in zip(self.blocks, self._layers)], dtype=np.float64)
        # the blocks' rests are part of the model's rest: never more than it holds
        room = max(table.rest_seconds, 0.0)
        self.block_rest = rests * min(1.0, room / rests.sum()) if rests.sum() > 0 else rests
        # a block nested in another removed block goes with it (counted once)
        self._outer = [[o for o, other in enumerate(self.blocks) if o != i and is_inside(b.name, other.name)]
                       for i, b in enumerate(self.blocks)]

    def predicted(self, removed, counts) -> float:
        """The table's seconds for ``counts`` with the flagged blocks gone (before calibration)."""
        table = self.table
        c = table._resolve(counts)
        seconds = table._latency(c)
        removed = np.asarray(removed, dtype=bool)
        if not removed.any():
            return seconds
        alive = alive_entry_sizes(table.structure, c).tolist()
        rest_scale = table.rest_at(c) / table.rest_seconds if table.rest_seconds > 0 else 1.0
        for i in np.nonzero(removed)[0]:
            if any(removed[o] for o in self._outer[i]):
                continue
            layers = sum(table.layers[j].calls * table.layers[j].at(alive[table.layers[j].entries[0]],
                                                                     alive[table.layers[j].entries[1]])
                         for j in self._layers[i])
            seconds -= layers + self.block_rest[i] * rest_scale
        return max(seconds, 0.01 * self.total)

    def predicted_fraction(self, removed, counts) -> float:
        return 1.0 - self.predicted(removed, counts) / self.total

    def fraction_removed(self, removed, counts) -> float:
        return self.latency.calibration(self.predicted_fraction(removed, counts))

    def remaining(self, removed, counts) -> float:
        """Calibrated seconds left: what the depth environment budgets."""
        return self.total * (1.0 - self.fraction_removed(removed, counts))


class DepthPlans:
    """The depth search's twin of :class:`~torch_rlprune.structure.channel.measured.WidthPlans`: a plan is
    ``[1 per removed block..., units removed per group...]``; a rescaling keeps its blocks and
    scales its widths; the plan to calibrate on is the budget's closest (blocks removed where the
    target needs them, uniform widths)."""

    def __init__(self, space, env):
        self.space, self.env, self.cost = space, env, space.budget_cost

    def _parts(self, k):
        removed, counts = self.env.split(k)
        counts = np.where(self.space.cost_model.inactive_groups(removed), 0, counts)
        return removed, self.cost.table._resolve(counts)

    def raw(self, k) -> float:
        return self.cost.predicted_fraction(*self._parts(k))

    def predicted(self, k) -> float:
        return self.cost.fraction_removed(*self._parts(k))

    def describe(self, k) -> dict:
        """What a measured round records beside its numbers: the blocks the plan removes."""
        return {"removed_blocks": self.space.removed_names(self.env.split(k)[0])}

    def measure(self, k, reading: int = 0) -> float:
        removed, counts = self._parts(k)
        return self.space.timer.fraction_removed(self.space.structure.plan(counts), self.space.removed_names(removed),
                                                 reading=reading)

    def rescaled(self, k, target: float) -> np.ndarray:
        """Widths scaled onto ``target``; when no width reaches it with these blocks (a block is
        several points of latency), the nearest block set that can: blocks put back (or removed)
        one at a time, the one that moves the budget least first."""
        removed, counts = self._parts(k)
        goal = target * self.cost.total
        for _ in range(len(removed)):
            budget = self.env.episode_budget(removed)
            low, high = budget.removed(budget.k_min), budget.removed(budget.k_max)
            if low <= goal <= high:
                break
            candidates = np.nonzero(removed if low > goal else ~removed)[0]
            if not len(candidates):
                break
            now = self.cost.remaining(removed, budget.k_min)
            moved = [self._toggled(removed, i) for i in candidates]
            removed = min(moved, key=lambda r: abs(self.cost.remaining(r, budget.k_min) - now))
        counts = np.where(self.space.cost_model.inactive_groups(removed), 0, counts)
        budget = self.env.episode_budget(removed)
        return self.env.join(removed, scaled_plan(budget, counts, goal))

    @staticmethod
    def _toggled(removed: np.ndarray, i: int) -> np.ndarray:
        out = removed.copy()
        out[i] = not out[i]
        return out

    def calibration_plan(self, target: float) -> np.ndarray:
        kept = self.env.target
        self.env.set_target(target)
        try:
            return self.env.closest_plan()
        finally:
            self.env.set_target(kept)
