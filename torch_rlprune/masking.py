"""Masks applied to live tensors in place, cheaply, and always undoable.

The search never copies the model: each prunable tensor gets an :class:`InPlaceMask`
that zeroes its ``k`` least important entries directly in the tensor the forward pass
reads (the weight itself, or the existing ``weight_mask`` buffer when the tensor is
already pruned through ``torch.nn.utils.prune``). Moving from ``k`` to ``k'`` touches
only the ``|k - k'|`` entries in between, so an episode that changes a few layers
costs almost nothing beyond its forward pass.
"""
from __future__ import annotations

from typing import Optional

import torch

from .structure import PrunableTensor

__all__ = ["InPlaceMask"]


class InPlaceMask:
    """Prune-the-k-smallest applied in place to one :class:`PrunableTensor`.

    Args:
        layer: the tensor to mask.
        importance_scores: optional scores (same shape) ranking entries; defaults to
            the unmasked weight. Entries an existing mask already removed rank first,
            so they stay removed and count toward ``k`` (existing masks are respected).
    """

    def __init__(self, layer: PrunableTensor, importance_scores: Optional[torch.Tensor] = None):
        self.layer = layer
        existing = layer.existing_mask
        # With an existing prune hook, the forward recomputes weight = weight_orig * weight_mask,
        # so the mask buffer is what must change; otherwise the weight itself.
        self.written = existing if existing is not None else getattr(layer.module, layer.param_name)
        self.saved = self.written.detach().clone()
        scores = layer.original if importance_scores is None else importance_scores
        if scores.shape != self.written.shape:
            raise ValueError(f"importance_scores for {layer.name!r} have shape {tuple(scores.shape)}, "
                             f"expected {tuple(self.written.shape)}")
        scores = scores.detach().abs().float().reshape(-1)
        if existing is not None:
            scores = scores.masked_fill(existing.reshape(-1) == 0, -1.0)
        self.order = torch.argsort(scores, stable=True).to(self.written.device)
        self.numel = self.written.numel()
        self.k_min = 0 if existing is None else int((existing == 0).sum())
        self.applied = self.k_min

    # index_fill_/index_copy_ rather than ``flat[idx] = ...``: the generic index_put path was
    # 3x slower on 600k scattered entries of a 2.4M tensor (4.6 vs 1.6 ms zeroing, 20 vs 6.4 ms
    # restoring), which made writing an episode's masks ~15% of a 256-image forward pass.
    def _zero(self, idx: torch.Tensor) -> None:
        if self.written.is_contiguous():
            self.written.data.view(-1).index_fill_(0, idx, 0)
        else:
            self.written.data[torch.unravel_index(idx, self.written.shape)] = 0

    def _put_back(self, idx: torch.Tensor) -> None:
        values = self.saved.reshape(-1).index_select(0, idx)
        if self.written.is_contiguous():
            self.written.data.view(-1).index_copy_(0, idx, values)
        else:
            self.written.data[torch.unravel_index(idx, self.written.shape)] = values

    @torch.no_grad()
    def set_k(self, k: int) -> None:
        """Make exactly the ``k`` least important entries zero (``k >= k_min``)."""
        k = int(k)
        if not self.k_min <= k <= self.numel:
            raise ValueError(f"k={k} outside [{self.k_min}, {self.numel}] for {self.layer.name!r}")
        if k > self.applied:
            self._zero(self.order[self.applied:k])
        elif k < self.applied:
            self._put_back(self.order[k:self.applied])
        self.applied = k

    @torch.no_grad()
    def restore(self) -> None:
        """Put back exactly the values the tensor had when this object was made."""
        self.written.data.copy_(self.saved)
        self.applied = self.k_min
