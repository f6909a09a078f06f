"""Adaptive BatchNorm recalibration: score a pruned model with statistics that fit it.

Pruning shifts every downstream activation distribution, so BatchNorm's running statistics,
estimated on the dense model, no longer match. Re-estimating them on a few calibration
batches before each score (what a quick fine-tune would do first anyway) measures what the
plan is worth rather than how stale the statistics are.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Hashable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..structure.inputs import run_model

__all__ = ["BatchNormRecalibration", "PlanStatistics"]


class BatchNormRecalibration:
    """Re-estimates every tracking BatchNorm's running statistics on ``batches``.

    ``restore()`` puts the statistics (and momenta) back exactly as they were when this
    object was created.
    """

    def __init__(self, model: nn.Module, batches: Sequence[torch.Tensor]):
        self.model = model
        self.batches = list(batches)
        self.norms: List[nn.modules.batchnorm._BatchNorm] = [
            m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
                      for m in self.norms]

    def __bool__(self) -> bool:
        return bool(self.norms and self.batches)

    @torch.no_grad()
    def __call__(self) -> None:
        for m in self.norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches, not an EMA
            m.train()
        try:
            for x in self.batches:
                run_model(self.model, x)
        finally:
            for m, (_, _, _, momentum) in zip(self.norms, self.saved):
                m.momentum = momentum
                m.eval()

    @contextlib.contextmanager
    def own_statistics(self) -> Iterator[None]:
        """Inside the block every BatchNorm normalises each batch with that batch's statistics and
        leaves its running ones alone: one forward gives what re-estimating on the batch and
        evaluating it would (up to the n/(n-1) of an unbiased variance)."""
        for m in self.norms:
            m.track_running_stats = False
            m.train()
        try:
            yield
        finally:
            for m in self.norms:
                m.track_running_stats = True
                m.eval()

    @contextlib.contextmanager
    def as_created(self) -> Iterator[None]:
        """Inside the block the statistics start as they were when this object was created (the
        unpruned model's); on exit they are put back as they were before the block."""
        current = self.statistics()
        self.restore()
        try:
            yield
        finally:
            self.load(current)

    def statistics(self) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """A copy of every BatchNorm's running statistics (mean, variance, count), as :meth:`load` takes."""
        return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in self.norms]

    @torch.no_grad()
    def load(self, statistics: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        for m, (mean, var, count) in zip(self.norms, statistics):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)

    @torch.no_grad()
    def restore(self) -> None:
        for m, (mean, var, count, momentum) in zip(self.norms, self.saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
            m.momentum = momentum


class PlanStatistics:
    """Each plan's re-estimated statistics, kept from the score that estimated them.

    A search re-estimates BatchNorm before every full score; the held-out choice then scores its
    candidates again, on other data but with statistics from the same batches, so re-estimating
    them there repeats a forward per candidate for the same numbers. ``refresh(key)`` loads the
    statistics kept for plan ``key`` (the plan whose masks are applied) or re-estimates and keeps
    them; ``key=None`` (a plan nobody named) always re-estimates. At most ``max_bytes`` are kept,
    the least recently used dropped first: a dropped plan is re-estimated, never scored otherwise.
    """

    def __init__(self, recalibrate: BatchNormRecalibration, max_bytes: int):
        self.recalibrate = recalibrate
        self.max_bytes = int(max_bytes)
        self.kept: "OrderedDict[Hashable, list]" = OrderedDict()
        self.bytes_per_plan = sum(2 * m.running_mean.numel() * m.running_mean.element_size() + 8
                                  for m in recalibrate.norms)
        self.reused = 0
        self.estimated = 0

    def as_dict(self) -> dict:
        """What the search's metadata reports: estimates made, estimates reused, and the bound."""
        return {"estimated": self.estimated, "reused": self.reused, "bytes_per_plan": self.bytes_per_plan,
                "max_bytes": self.max_bytes}

    def clear(self) -> None:
        """Drop every plan's statistics (the search is over); the counts stay for its report."""
        self.kept.clear()

    def refresh(self, key: Optional[Hashable]) -> None:
        kept = None if key is None else self.kept.get(key)
        if kept is not None:
            self.kept.move_to_end(key)
            self.recalibrate.load(kept)
            self.reused += 1
            return
        self.recalibrate()
        self.estimated += 1
        if key is None or self.bytes_per_plan > self.max_bytes:
            return
        self.kept[key] = self.recalibrate.statistics()
        while len(self.kept) * self.bytes_per_plan > self.max_bytes:
            self.kept.popitem(last=False)
