"""Channel groups: which tensors move together when channels are removed.

torch-pruning's dependency graph knows the coupling (residual adds, concats, depthwise
and grouped convs, flattens); :mod:`.discovery` turns each of its groups into the plain data
of this module, which the search can act on without touching torch-pruning again:

* a :class:`ChannelGroup` is a list of :class:`TensorSlice` -- "zero these positions
  along this dimension of this tensor when this *unit* is removed" -- plus an
  importance ranking of its units;
* a group torch-pruning maps inconsistently (indices out of range, indices it cannot
  map back to the root, grouped convolutions fed by several groups, the model output,
  ``nn.MultiheadAttention``) becomes an :class:`ExcludedGroup` with the reason;
* ``nn.LSTM``/``nn.GRU``/``nn.RNN`` join groups through our :class:`RecurrentPruner`: a
  group rooted at one removes hidden units (see :mod:`.recurrent`), a group feeding one
  removes its input columns;
* timm ``Attention`` blocks get a group of their own that removes *whole heads*
  (torch-pruning's own qkv grouping is not head-aware; see :func:`.attention.find_attention_blocks`).

A *unit* is what one step of removal takes out: one channel; or, for groups that
contain grouped convolutions / GroupNorm, one channel in each channel-group (the same
offset in every group, as torch-pruning requires); or the channels torch-pruning couples
along several paths (GhostNet's ``cat([x, dw(x)])``); or one attention head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["TensorSlice", "ChannelGroup", "ExcludedGroup", "Reject"]


@dataclass
class TensorSlice:
    """Positions along one dimension of one tensor that a group's units own.

    ``positions[i]`` belongs to unit ``units[i]``. The tensor is ``module.<tensor_name>``
    (``<tensor_name>_orig`` / ``_mask`` when torch.nn.utils.prune already holds it).
    """

    module_name: str
    tensor_name: str
    dim: int
    size: int
    positions: torch.Tensor = field(repr=False)
    units: torch.Tensor = field(repr=False)
    role: str = ""
    module: nn.Module = field(default=None, repr=False, compare=False)
    # filled once the group's units are ranked
    pos_by_rank: torch.Tensor = field(default=None, repr=False)
    ptr: np.ndarray = field(default=None, repr=False)   # ptr[r]: positions owned by the r first-ranked units

    @property
    def qualified_name(self) -> str:
        return f"{self.module_name}.{self.tensor_name}" if self.module_name else self.tensor_name

    def rank(self, rank_of_unit: torch.Tensor, num_units: int) -> None:
        ranks = rank_of_unit[self.units]
        order = torch.argsort(ranks, stable=True)
        self.pos_by_rank = self.positions[order].contiguous()
        counts = torch.bincount(ranks, minlength=num_units).numpy()
        self.ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


@dataclass
class ChannelGroup:
    """One action unit of the search: coupled channels that are removed together.

    Attributes:
        index: position in :attr:`ChannelStructure.groups` (execution order of the group's
            first layer).
        key: stable name, ``"<first layer>:out"`` for channel groups and
            ``"<attention module>:heads"`` for head groups; the key a channel plan uses.
        kind: ``"channels"`` or ``"heads"``.
        num_channels: channels of the root layer (output features of ``root``).
        num_units: how many units the group has.
        channels_per_unit: root channels one unit stands for (1; the channel-group count of
            grouped convs / GroupNorm; 2 for GhostNet-style ``cat([x, dw(x)])`` couplings;
            ``head_dim`` for heads), 0 if units differ in size.
        root_unit: the unit of each root-layer channel.
        exact: True when masking the group computes exactly what removing it computes. False
            where normalisation statistics would include zeroed channels and no hook fixes
            them (LayerNorm/GroupNorm with ``exact_norms=False`` or of an unsupported class,
            BatchNorm without affine) -- score the compacted model for those.
        inexact_reasons: why ``exact`` is False.
        layers: ``(module name, role)`` of every layer touched (role ``out``, ``in``, ``norm``,
            ``param``, ``qkv``, ``proj``...).
        importance: per-unit scores (higher = more important) the ranking came from.
        order: units from least to most important; removing ``n`` units removes ``order[:n]``.
        importance_note: set when the requested importance failed on this group and the
            magnitude fallback was used.
        macs, params: what the group controls: the model's MACs/params that disappear when
            all its units are removed and nothing else (filled by :class:`ChannelStructure`).
    """

    index: int
    key: str
    kind: str
    root: str
    num_channels: int
    num_units: int
    channels_per_unit: int
    slices: List[TensorSlice] = field(repr=False)
    root_unit: Optional[torch.Tensor] = field(default=None, repr=False)
    exact: bool = True
    inexact_reasons: List[str] = field(default_factory=list, repr=False)
    layers: List[Tuple[str, str]] = field(default_factory=list, repr=False)
    importance: Optional[torch.Tensor] = field(default=None, repr=False)
    order: Optional[torch.Tensor] = field(default=None, repr=False)
    importance_note: str = ""
    macs: int = 0
    params: int = 0
    first_call: int = 0
    round_to: Optional[int] = None
    # internals
    _root_module: Any = field(default=None, repr=False, compare=False)
    _root_handler: Any = field(default=None, repr=False, compare=False)
    _attention: Any = field(default=None, repr=False, compare=False)
    _aliases: Tuple[str, ...] = field(default=(), repr=False)
    _norms: List[Tuple[str, nn.Module, str]] = field(default_factory=list, repr=False)
    _cap: Optional[int] = field(default=None, repr=False)

    # ------------------------------------------------------------------ counts
    @property
    def unit_step(self) -> int:
        """Granularity (in units) of what may remain, from ``round_to``."""
        if not self.round_to or self.kind == "heads" or self.channels_per_unit <= 0:
            return 1
        step_channels = self.round_to * self.channels_per_unit // math.gcd(self.round_to, self.channels_per_unit)
        return max(1, step_channels // self.channels_per_unit)

    @property
    def max_removed(self) -> int:
        """The most units that may go: at least one unit (or one ``round_to`` step) stays, and
        every member tensor keeps at least one slice along each dimension the group owns
        entirely (a concat can otherwise empty one of its branches)."""
        if self._cap is None:
            step = self.unit_step
            keep = step if self.num_units >= step else self.num_units
            cap = self.num_units - keep
            for s in self.slices:
                if s.ptr is not None and s.ptr[-1] >= s.size:
                    cap = min(cap, int(np.searchsorted(s.ptr, s.size, side="left")) - 1)  # ptr[cap] < size
            if step > 1:  # what remains stays a multiple of the step
                cap = max(0, self.num_units - -(-(self.num_units - cap) // step) * step)
            self._cap = max(0, cap)
        return self._cap

    def effective(self, n: int) -> int:
        """``n`` as it will be applied: rounded so that what remains is a multiple of
        ``round_to`` channels (removing more, like torch-pruning), capped at :attr:`max_removed`."""
        n = int(n)
        if n < 0 or n > self.num_units:
            raise ValueError(f"group {self.key!r}: cannot remove {n} of {self.num_units} units")
        step = self.unit_step
        if n > 0 and step > 1:
            remaining = (self.num_units - n) // step * step
            n = self.num_units - max(remaining, step)
        return max(0, min(n, self.max_removed))  # max_removed keeps whole steps too

    def units_for_fraction(self, fraction: float) -> int:
        """Units removed for a fraction of the group (before rounding and capping)."""
        f = float(fraction)
        if not 0.0 <= f <= 1.0 or math.isnan(f):
            raise ValueError(f"group {self.key!r}: fraction must be in [0, 1], got {fraction!r}")
        return int(round(f * self.num_units))

    def removed_units(self, n: int) -> torch.Tensor:
        """The units removed when ``n`` are (sorted)."""
        return torch.sort(self.order[: self.effective(n)]).values

    def removed_channels(self, n: int) -> List[int]:
        """Root-layer channel indices removed when ``n`` units are (sorted)."""
        return self.channels_for_units(self.removed_units(n).tolist())

    def channels_for_units(self, units: Sequence[int]) -> List[int]:
        """Root-layer channel indices of the given units (sorted)."""
        units = torch.as_tensor([int(u) for u in units], dtype=torch.long)
        return torch.isin(self.root_unit, units).nonzero().flatten().tolist()

    def describe(self) -> dict:
        return {"index": self.index, "key": self.key, "kind": self.kind, "root": self.root,
                "num_channels": self.num_channels, "num_units": self.num_units,
                "channels_per_unit": self.channels_per_unit, "exact": self.exact,
                "inexact_reasons": list(self.inexact_reasons), "macs": self.macs, "params": self.params,
                "layers": [f"{n} ({r})" for n, r in self.layers], "importance_note": self.importance_note}


@dataclass
class ExcludedGroup:
    """A group left alone, and why."""

    key: str
    reason: str
    layers: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}"


class Reject(Exception):
    """A torch-pruning group that cannot become a :class:`ChannelGroup`; the message is the
    reason its :class:`ExcludedGroup` gives."""
