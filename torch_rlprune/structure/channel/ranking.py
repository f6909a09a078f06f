"""Per-unit importance of a group (the requested torch-pruning importance, or the group L2 magnitude
when it fails) and the ranking of units and tensor positions it gives."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ._util import time_limit
from .enumeration import enumerate_group
from .groups import ChannelGroup, TensorSlice

__all__ = ["rank_units"]


def _magnitude_importance(slices: Sequence[TensorSlice], num_units: int) -> torch.Tensor:
    """Group L2 magnitude (torch-pruning's default, mean over members) from the slices."""
    total = torch.zeros(num_units, dtype=torch.float64)
    members = 0
    for s in slices:
        t = _live_values(s.module, s.tensor_name)
        if t is None:
            continue
        t = t.detach().double().cpu()
        other = [d for d in range(t.dim()) if d != s.dim]
        per_pos = t.pow(2).sum(dim=other) if other else t.pow(2)
        total.index_add_(0, s.units, per_pos[s.positions])
        members += 1
    total /= max(members, 1)
    mean = total.mean()
    return (total / mean if mean > 0 else total).float()


def _live_values(module: nn.Module, tensor_name: str) -> Optional[torch.Tensor]:
    """The values the forward uses (``orig * mask`` when pruned through torch)."""
    orig = getattr(module, tensor_name + "_orig", None)
    if orig is not None:
        return orig * getattr(module, tensor_name + "_mask")
    t = getattr(module, tensor_name, None)
    return t if isinstance(t, torch.Tensor) else None


def _unit_importance(importance, tp_group, spec: dict, seconds: Optional[float] = None) -> Tuple[torch.Tensor, str]:
    C, U = spec["num_channels"], spec["num_units"]
    note = ""
    if importance is not None and tp_group is not None:
        try:
            with time_limit(seconds, f"importance of group {spec.get('key', '?')!r}"):
                imp = importance(tp_group)
            if imp is None:
                raise ValueError("the importance returned None (no parameterised layer it scores)")
            imp = torch.as_tensor(imp).detach().float().flatten().cpu()
            if imp.numel() != C:
                raise ValueError(f"the importance returned {imp.numel()} scores for {C} channels")
            if not bool(torch.isfinite(imp).all()):
                raise ValueError("the importance returned non-finite scores")
            ru = spec["root_unit"]
            total = torch.zeros(U).index_add_(0, ru, imp)
            return total / torch.bincount(ru, minlength=U).clamp(min=1), note
        except Exception as e:  # torch-pruning importance bugs (IndexError & co.)
            note = f"{type(importance).__name__} failed ({type(e).__name__}: {str(e)[:120]}); used group L2 magnitude"
    return _magnitude_importance(spec["slices"], U), note


def _head_importance(importance, DG, attn: nn.Module, spec: dict, group_timeout) -> Tuple[torch.Tensor, str]:
    H, hd = spec["num_units"], spec["head_dim"]
    note = ""
    if importance is not None and DG is not None and attn.qkv in DG.module2node:
        try:
            pruner = DG.get_pruner_of_module(attn.qkv)
            with time_limit(group_timeout, f"importance of the heads of '{spec['attn_name']}'"):
                g, _ = enumerate_group(DG, attn.qkv, pruner.prune_out_channels, list(range(3 * H * hd)))
                imp = importance(g)
            if imp is None:
                raise ValueError("the importance returned None")
            imp = torch.as_tensor(imp).detach().float().flatten().cpu()
            if imp.numel() != 3 * H * hd or not bool(torch.isfinite(imp).all()):
                raise ValueError(f"the importance returned {imp.numel()} scores for {3 * H * hd} qkv channels")
            return imp.view(3, H, hd).mean(dim=(0, 2)), note
        except Exception as e:
            note = (f"{type(importance).__name__} failed on heads ({type(e).__name__}: {str(e)[:100]}); "
                    "used L2 magnitude")
    return _magnitude_importance(spec["slices"], H), note


def rank_units(group: ChannelGroup, spec: dict, importance, DG, group_timeout: Optional[float],
               rank: bool = True) -> None:
    """Score ``group``'s units, order them from least to most important and rank every slice's
    positions by that order (``rank=False``: every score 0, units in index order)."""
    U = group.num_units
    if rank:
        if group.kind == "heads":
            scores, note = _head_importance(importance, DG, spec["attention"], spec, group_timeout)
        else:
            scores, note = _unit_importance(importance, spec.get("tp_group"), spec, group_timeout)
        group.importance, group.importance_note = scores, note
        group.order = torch.argsort(scores, stable=True)
    else:
        group.importance = torch.zeros(U)
        group.order = torch.arange(U)
    rank_of_unit = torch.empty(U, dtype=torch.long)
    rank_of_unit[group.order] = torch.arange(U)
    for s in group.slices:
        s.rank(rank_of_unit, U)
