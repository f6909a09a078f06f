"""Adaptive BatchNorm recalibration: score a pruned model with statistics that fit it.

Pruning shifts every downstream activation distribution, so BatchNorm's running statistics,
estimated on the dense model, no longer match. Re-estimating them on a few calibration
batches before each score (what a quick fine-tune would do first anyway) measures what the
plan is worth rather than how stale the statistics are.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Sequence

import torch
from torch import nn

from ..structure.inputs import run_model

__all__ = ["BatchNormRecalibration"]


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

    @torch.no_grad()
    def restore(self) -> None:
        for m, (mean, var, count, momentum) in zip(self.norms, self.saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
            m.momentum = momentum
