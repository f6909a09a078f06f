"""Channel groups: which tensors move together when channels are removed.

torch-pruning's dependency graph knows the coupling (residual adds, concats, depthwise
and grouped convs, flattens); this module turns each of its groups into plain data the
search can act on without touching torch-pruning again:

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
  (torch-pruning's own qkv grouping is not head-aware; see :func:`find_attention_blocks`).

A *unit* is what one step of removal takes out: one channel; or, for groups that
contain grouped convolutions / GroupNorm, one channel in each channel-group (the same
offset in every group, as torch-pruning requires); or the channels torch-pruning couples
along several paths (GhostNet's ``cat([x, dw(x)])``); or one attention head.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from torch import nn

import torch_pruning as tp
from torch_pruning import ops as tp_ops

from ..structure import is_row_layer, is_transposed_linear
from ._util import ChannelTimeoutError, Deadline, batch_size, run_model, time_limit
from .alive import attention_call_macs
from .graph import RNN_TYPES, Dependency, Group, build_graph, group_item, hybrid_indices, update_index_mapping
from .norms import norm_kind
from .recurrent import (hidden_unit_tensors, input_column_tensors, samples, time_steps,
                        unsupported_reason)

__all__ = ["TensorSlice", "ChannelGroup", "ExcludedGroup", "GroupDiscovery", "discover_groups",
           "find_attention_blocks", "countable_attention", "classifier_names", "LayerTrace"]

OPT = tp_ops.OPTYPE
_PASSIVE = {OPT.CONCAT, OPT.SPLIT, OPT.ELEMENTWISE, OPT.RESHAPE, OPT.UNBIND, OPT.EXPAND, OPT.SLICE}


# --------------------------------------------------------------------------- data
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


# --------------------------------------------------------------------------- metadata
def classifier_names(model: nn.Module) -> List[str]:
    """Module names of the classifier, from timm's ``get_classifier()`` when the model has it."""
    getter = getattr(model, "get_classifier", None)
    if not callable(getter):
        return []
    try:
        head = getter()
    except Exception:  # a model whose get_classifier() needs arguments or fails
        return []
    heads = head if isinstance(head, (tuple, list)) else [head]
    ids = {id(h) for h in heads if isinstance(h, nn.Module)}
    return [n for n, m in model.named_modules() if id(m) in ids and not isinstance(m, nn.Identity)]


def countable_attention(model: nn.Module) -> Dict[str, nn.Module]:
    """timm ``Attention`` blocks (default forward) whose score/value matmuls the MAC counts include."""
    try:
        from timm.layers import Attention as TimmAttention
    except Exception:
        return {}
    return {n: m for n, m in model.named_modules()
            if isinstance(m, TimmAttention) and type(m).forward is TimmAttention.forward
            and isinstance(getattr(m, "qkv", None), nn.Linear)}


def find_attention_blocks(model: nn.Module, excluded: Callable[[str], bool]) -> Dict[str, nn.Module]:
    """timm attention blocks whose heads we prune ourselves, by qualified name.

    Only ``timm.layers.Attention`` with its own forward (ViT, DeiT, BEiT-style layouts:
    ``qkv`` -> ``reshape(B, N, 3, heads, head_dim)`` -> SDPA -> ``proj``) qualifies: for
    that layout removing whole heads keeps ``head_dim`` and therefore the softmax scale
    (fused SDPA and ``attn.scale`` agree), and a masked head is exactly a removed head
    (zero q and k give uniform attention over a zero v). Other attention layouts are
    left to torch-pruning's grouping and to validation.
    """
    try:
        from timm.layers import Attention as TimmAttention
    except Exception:  # timm missing or too old
        return {}
    found = {}
    for name, m in model.named_modules():
        if type(m).forward is not TimmAttention.forward or not isinstance(m, TimmAttention):
            continue
        if excluded(name) or excluded(f"{name}.qkv"):
            continue
        qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
            continue
        heads, hd = int(m.num_heads), int(m.head_dim)
        if qkv.out_features != 3 * heads * hd or proj.in_features != heads * hd or heads < 2:
            continue
        found[name] = m
    return found


# --------------------------------------------------------------------------- discovery
@dataclass
class LayerTrace:
    """What one Conv/Linear (or attention block) does in one forward pass."""

    name: str
    module: nn.Module = field(repr=False)
    calls: int = 0
    positions: int = 0       # summed over calls, per sample: output positions (input positions for
    #                          transposed convs), tokens (Linear), time steps (recurrent)
    rows: int = 0            # Linear: rows of its input summed over calls, for the whole batch
    attention: bool = False  # a timm attention block (tokens_sq counts its score/value matmuls)
    tokens_sq: int = 0       # attention blocks: sum over calls of N^2
    first_call: int = -1
    fixed_macs: int = 0      # nn.MultiheadAttention: all its MACs (its channels are never grouped)
    packed: bool = False     # a recurrent layer fed a PackedSequence


@dataclass
class GroupDiscovery:
    """Everything :func:`discover_groups` found."""

    DG: Any
    groups: List[ChannelGroup]
    excluded: List[ExcludedGroup]
    traces: Dict[str, LayerTrace]
    attention: Dict[str, nn.Module]
    seconds: Dict[str, float]


def _trace_layers(model, example_inputs, attention: Dict[str, nn.Module]) -> Dict[str, LayerTrace]:
    traces: Dict[str, LayerTrace] = {}
    handles = []
    counter = [0]
    recurrent_batches: List[int] = []
    conv_linear = (nn.modules.conv._ConvNd, nn.Linear)

    def make_hook(tr: LayerTrace, is_attention: bool):
        def hook(module, inputs, output):
            if tr.first_call < 0:
                tr.first_call = counter[0]
                counter[0] += 1
            tr.calls += 1
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            out = output if isinstance(output, torch.Tensor) else None
            if is_attention:
                if x is not None and x.dim() >= 3:
                    tr.tokens_sq += int(math.prod(x.shape[1:-1])) ** 2
                return
            if isinstance(module, nn.Embedding):  # a lookup: order only, no MACs
                return
            if isinstance(module, RNN_TYPES):  # every matrix runs once per time step
                tr.packed |= isinstance(inputs[0] if inputs else None, nn.utils.rnn.PackedSequence)
                tr.positions += time_steps(module, inputs[0] if inputs else None)
                recurrent_batches.append(samples(module, inputs[0] if inputs else None))
                return
            if is_row_layer(module):  # per-sample tokens: rows / batch, whatever the layout
                ref = out if out is not None else x
                tr.rows += int(math.prod(ref.shape[:-1])) if ref is not None and ref.dim() > 1 else 1
            elif getattr(module, "transposed", False):
                tr.positions += int(math.prod(x.shape[2:])) if x is not None and x.dim() > 2 else 1
            else:
                tr.positions += int(math.prod(out.shape[2:])) if out is not None and out.dim() > 2 else 1
        return hook

    def multihead_hook(tr: LayerTrace):
        def hook(module, args, kwargs, output):
            if tr.first_call < 0:
                tr.first_call = counter[0]
                counter[0] += 1
            tr.calls += 1
            call = attention_call_macs(module, args, kwargs)
            if call is not None:
                recurrent_batches.append(call[0])
                tr.fixed_macs += call[1]
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            traces[name] = tr = LayerTrace(name, m)
            handles.append(m.register_forward_hook(multihead_hook(tr), with_kwargs=True))
        elif isinstance(m, conv_linear + RNN_TYPES + (nn.Embedding,)) or name in attention or \
                is_transposed_linear(m):
            tr = LayerTrace(name, m, attention=name in attention)
            traces[name] = tr
            handles.append(m.register_forward_hook(make_hook(tr, name in attention)))
    try:
        with torch.no_grad():
            run_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    n = batch_size(example_inputs, recurrent_batches)
    for tr in traces.values():
        if is_row_layer(tr.module) and tr.calls:
            tr.positions = max(tr.calls, tr.rows // n)
        tr.fixed_macs //= max(n, 1)
    return traces


def _tensor_size(module: nn.Module, tensor_name: str) -> Optional[torch.Size]:
    t = getattr(module, tensor_name + "_orig", None)
    if t is None:
        t = getattr(module, tensor_name, None)
    return t.shape if isinstance(t, torch.Tensor) else None


class _Reject(Exception):
    pass


def _param_owner(model: nn.Module, qualified: str) -> Tuple[str, nn.Module, str]:
    owner_name, _, attr = qualified.rpartition(".")
    if attr.endswith("_orig"):
        attr = attr[: -len("_orig")]
    owner = model.get_submodule(owner_name) if owner_name else model
    return owner_name, owner, attr


def _member_tensors(DG, node, is_out: bool, model, names, exact_norms: bool = True, norms: Optional[list] = None
                    ) -> Tuple[List[Tuple[str, nn.Module, str, int, str]], List[str], Optional[Tuple[str, int]]]:
    """The ``(module name, module, tensor name, dim, role)`` a group item acts on.

    Also returns inexactness notes and, for grouped layers, ``(kind, groups)``; norms whose
    statistics :class:`MaskedNormStatistics` will fix are appended to ``norms``.
    """
    m, t = node.module, node.type
    name = names.get(id(m), "?")
    notes: List[str] = []
    grouped = None
    if t in (OPT.CONV, OPT.DEPTHWISE_CONV):
        transposed = bool(getattr(m, "transposed", False))
        if t == OPT.DEPTHWISE_CONV:
            if m.in_channels != m.out_channels:
                raise _Reject(f"depthwise conv '{name}' with channel multiplier "
                              f"({m.in_channels} -> {m.out_channels}) is not pruned consistently by torch-pruning")
            out = [(name, m, "weight", 1 if transposed else 0, "out")]
            if m.bias is not None or _tensor_size(m, "bias") is not None:
                out.append((name, m, "bias", 0, "out"))
            return out, notes, None
        if transposed and m.groups > 1:
            raise _Reject(f"grouped transposed conv '{name}' is not supported")
        if m.groups > 1:
            grouped = ("conv", m.groups)
        if is_out:
            out = [(name, m, "weight", 1 if transposed else 0, "out")]
            if _tensor_size(m, "bias") is not None:
                out.append((name, m, "bias", 0, "out"))
            return out, notes, grouped
        return [(name, m, "weight", 0 if transposed else 1, "in")], notes, grouped
    if t == OPT.LINEAR:
        if is_out:
            out = [(name, m, "weight", 0, "out")]
            if _tensor_size(m, "bias") is not None:
                out.append((name, m, "bias", 0, "out"))
            return out, notes, None
        return [(name, m, "weight", 1, "in")], notes, None
    if t == OPT.BN:
        if _tensor_size(m, "weight") is None:
            notes.append(f"BatchNorm '{name}' has no affine parameters: a zeroed channel becomes -mean/std")
            return [], notes, None
        return [(name, m, "weight", 0, "norm"), (name, m, "bias", 0, "norm")], notes, None
    if t == OPT.LN:
        shape = tuple(m.normalized_shape)
        if len(shape) != 1:
            raise _Reject(f"LayerNorm '{name}' normalises over {len(shape)} dims; only 1-D LayerNorm is pruned")
        kind = norm_kind(m)
        if exact_norms and kind is not None and _tensor_size(m, "weight") is not None:
            if norms is not None:
                norms.append((name, m, kind))
        else:
            notes.append(f"LayerNorm '{name}': statistics include zeroed channels")
        out = []
        if _tensor_size(m, "weight") is not None:
            out.append((name, m, "weight", 0, "norm"))
        if _tensor_size(m, "bias") is not None:
            out.append((name, m, "bias", 0, "norm"))
        return out, notes, None
    if t == OPT.GN:
        if m.num_groups < m.num_channels:
            grouped = ("groupnorm", m.num_groups)
            if exact_norms and norm_kind(m) is not None and m.affine:
                if norms is not None:
                    norms.append((name, m, "group"))
            else:
                notes.append(f"GroupNorm '{name}': group statistics include zeroed channels")
        out = []
        if m.affine:
            out = [(name, m, "weight", 0, "norm"), (name, m, "bias", 0, "norm")]
        return out, notes, grouped
    if t == OPT.IN:
        if getattr(m, "affine", False):
            return [(name, m, "weight", 0, "norm"), (name, m, "bias", 0, "norm")], notes, None
        return [], notes, None
    if t == OPT.PRELU:
        if m.num_parameters > 1:
            return [(name, m, "weight", 0, "param")], notes, None
        return [], notes, None
    if t == OPT.EMBED:
        return [(name, m, "weight", 1, "param")], notes, None
    if t == OPT.PARAMETER:
        qualified = DG._param_to_name.get(m)
        if qualified is None:
            raise _Reject("a parameter torch-pruning found has no name in the model")
        owner_name, owner, attr = _param_owner(model, qualified)
        dim = node.pruning_dim % m.dim()
        return [(owner_name, owner, attr, dim, "param")], notes, None
    if t == OPT.OUTPUT:
        raise _Reject("changes the model's output (the group reaches the output unchanged)")
    if isinstance(m, RNN_TYPES):
        why = unsupported_reason(m)
        if why:
            raise _Reject(f"touches {type(m).__name__} '{name}': {why}")
        if is_out:  # hidden units: built by _build_group, which knows the root mapping
            return [], notes, None
        return [(name, m, tname, 1, "in") for tname in input_column_tensors(m)], notes, None
    if t == OPT.CUSTOMIZED:
        raise _Reject(f"touches unsupported layer '{name}' ({type(m).__name__}, customised pruner)")
    if t == OPT.MHA:
        raise _Reject(f"touches nn.MultiheadAttention '{name}' (not supported by channel groups)")
    raise _Reject(f"touches unsupported layer '{name}' ({type(m).__name__}, {t.name})")


def _widest_dimension(DG) -> int:
    """The largest dimension of any parameter of the model: no channel index can exceed it
    (a Linear after a flatten has the flattened width as its ``in_features``)."""
    widest = getattr(DG, "_rlprune_widest", None)
    if widest is None:
        widest = max((max(p.shape) for p in DG.model.parameters() if p.dim() > 0), default=1)
        DG._rlprune_widest = widest
    return widest


MIN_TRACKED_INDICES = 50_000
MAX_TRACKED_PER_CHANNEL = 1000
"""(index, root index) pairs one group may reach, per root channel (and at least
``MIN_TRACKED_INDICES``). A
channel coupling touches each tensor once per channel (measured: ViT-Tiny's residual stream
180 per channel, DenseNet-121's transitions 73-102), a flatten into a Linear once per position
(VGG: 49); millions come from torch-pruning reading a reshape
that keeps the channels (``flatten(2)`` in EfficientViT/MaxViT attention) as one that
spreads each channel over every spatial position."""


def enumerate_group(DG, module: nn.Module, pruning_fn, idxs: Sequence[int]):
    """torch-pruning 1.6's ``DependencyGraph.get_pruning_group``, also returning what it merges away.

    Same dependencies, same index mappings, same merged :class:`tp.dependency.Group` (usable by
    any importance), but a worklist that propagates only the ``(index, root index)`` pairs a
    layer has not received yet. Every torch-pruning index mapping acts on each pair on its own
    (shift, filter, expand, divide), so propagating the new pairs alone reaches the same closure;
    torch-pruning re-walks a layer whenever the same pairs arrive in a different order or mixed
    with pairs it has seen, which explodes on graphs with many concats and slices (RexNet,
    EfficientViT, HaloNet: millions of re-walks, minutes per group). The second result maps
    ``(target node, handler)`` to ``{index: set of root indices}``: torch-pruning's merge keeps
    the first root index of an index reached along several paths, which hides couplings such
    as GhostNet's ``cat([x1, dw(x1)])``, where removing channel ``j`` of ``x1`` also removes
    channel ``j`` of the depthwise half.
    """
    if module not in DG.module2node:
        raise ValueError(f"module {module} is not in the dependency graph")
    if isinstance(module, tp_ops.TORCH_CONV) and module.groups == module.out_channels and module.out_channels > 1:
        pruning_fn = tp.pruner.function.prune_depthwise_conv_out_channels
    hidx = list(dict.fromkeys(hybrid_indices(idxs)))
    unmappable = update_index_mapping(DG)
    root_node = DG.module2node[module]
    root_dep = Dependency(pruning_fn, pruning_fn, source=root_node, target=root_node)
    # (target node, handler) -> [first dependency that reached it, pairs received, in arrival order]
    reached: Dict[Tuple[int, Any], list] = {(id(root_node), pruning_fn): [root_dep, dict.fromkeys(hidx),
                                                                         {h.idx for h in hidx}]}
    stack = [(root_dep, hidx)]
    tracked, limit = len(hidx), max(MIN_TRACKED_INDICES, MAX_TRACKED_PER_CHANNEL * len(hidx))
    widest = _widest_dimension(DG)
    while stack:
        dep, cur = stack.pop(-1)
        node, fn = dep.target, dep.handler
        for new_dep in node.dependencies:
            if not new_dep.is_triggered_by(fn):
                continue
            new_idx = cur
            for mapping in new_dep.index_mapping:
                if mapping is not None:
                    new_idx = mapping(new_idx)
            if len(new_idx) == 0:
                continue
            if id(new_dep.target) in unmappable:
                raise _Reject(unmappable[id(new_dep.target)])
            entry = reached.setdefault((id(new_dep.target), new_dep.handler), [new_dep, {}, set()])
            known = entry[1]
            fresh = [h for h in dict.fromkeys(new_idx) if h not in known]
            if not fresh:
                continue
            known.update(dict.fromkeys(fresh))
            positions = entry[2]
            positions.update(h.idx for h in fresh)
            if len(positions) > widest:
                raise _Reject(f"torch-pruning maps the channels onto {len(positions)} positions of "
                              f"'{new_dep.target.name}', more than the widest tensor of the model has ({widest}): "
                              f"a reshape it reads as a flatten, not a channel coupling")
            tracked += len(fresh)
            if tracked > limit:
                raise _Reject(f"torch-pruning maps the channels onto more than {limit} positions "
                              f"(reaching '{new_dep.target.name}' through a reshape it reads as a flatten): "
                              f"not a channel coupling")
            stack.append((new_dep, fresh))
    roots_of: Dict[Tuple[int, Any], Dict[int, Set[Any]]] = {}
    merged = Group()
    for key, (dep, pairs, _) in reached.items():
        if isinstance(dep.target.module, nn.Parameter) and any(dep.target.module is p for p in DG.ignored_params):
            continue
        table = roots_of.setdefault(key, {})
        first_root: Dict[int, Any] = {}  # torch-pruning's merge: an index keeps the first root that reached it
        for h in pairs:
            table.setdefault(h.idx, set()).add(h.root_idx)
            first_root.setdefault(h.idx, h.root_idx)
        item = group_item(dep, list(first_root), list(first_root.values()))
        merged.add_dep(dep, None)
        merged[len(merged) - 1] = item
    merged._DG = DG
    return merged, roots_of


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


def _build_group(DG, tp_group, roots_of, model, names, root_name: str, excluded_out: Callable[[str], bool],
                 exact_norms: bool = True, output_nodes: Set[int] = frozenset()) -> dict:
    """Turn one torch-pruning group (all channels of its root) into slices, or raise _Reject.

    Units are the classes of root channels torch-pruning couples: channels ``r`` and
    ``r + k * C / channel_groups`` (grouped convs, GroupNorm), and channels whose removal
    reaches the same position of some tensor (see :func:`enumerate_group`).
    """
    root_item = tp_group[0]
    C = len(root_item.idxs)
    members = []      # (module name, module, tensor, dim, role, idxs, roots per idx, grouped)
    layers: List[Tuple[str, str]] = []
    inexact: List[str] = []
    out_layers: List[str] = []
    ch_groups = 1
    grouped_members = []
    uf = _UnionFind(C)
    joined: Set[Tuple[int, ...]] = set()
    norms: list = []
    recurrent_out: List[Tuple[str, nn.Module]] = []
    for item in tp_group:  # exclusions first, so that the reason names them
        m = item.dep.target.module
        if (isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and DG.is_out_channel_pruning_fn(item.dep.handler)
                and excluded_out(names.get(id(m), "\0"))):
            raise _Reject(f"contains excluded layer '{names[id(m)]}' (its output channels are kept)")
    for item in tp_group:
        dep, idxs = item.dep, list(item.idxs)
        node = dep.target
        if not idxs:
            continue
        is_out = DG.is_out_channel_pruning_fn(dep.handler)
        if id(node) in output_nodes and (is_out or node.type in _PASSIVE):
            raise _Reject(f"changes the model's output ('{names.get(id(node.module), node.name)}' produces it)")
        if node.type in _PASSIVE:
            continue
        tensors, notes, grouped = _member_tensors(DG, node, is_out, model, names, exact_norms, norms)
        mname = names.get(id(node.module), None)
        if is_out and isinstance(node.module, RNN_TYPES):
            recurrent_out.append((mname, node.module))
            if excluded_out(mname or "\0"):
                raise _Reject(f"contains excluded layer '{mname}' (its hidden units are kept)")
            out_layers.append(mname)
        if node.type in (OPT.CONV, OPT.DEPTHWISE_CONV, OPT.LINEAR) and is_out and mname is not None:
            out_layers.append(mname)
            if excluded_out(mname):
                raise _Reject(f"contains excluded layer '{mname}' (its output channels are kept)")
        table = roots_of.get((id(node), dep.handler), {})
        roots = []
        for i in idxs:
            rs = table.get(i)
            if not rs or any(r is None for r in rs):
                raise _Reject(f"torch-pruning cannot map the indices of '{mname or node.name}' back to the root layer")
            bad = [r for r in rs if not 0 <= r < C]
            if bad:
                raise _Reject(f"torch-pruning maps '{mname or node.name}' to root channel {bad[0]} "
                              f"outside the root's {C} channels")
            if len(rs) == 1:
                roots.append(next(iter(rs)))
                continue
            rs = tuple(sorted(rs))
            if rs not in joined:  # the same root set reaches many tensors
                joined.add(rs)
                for r in rs[1:]:
                    uf.union(rs[0], r)
            roots.append(rs[0])
        inexact.extend(notes)
        if grouped is not None:
            ch_groups = max(ch_groups, grouped[1])
            grouped_members.append((mname, grouped, len(idxs)))
        for (tname_mod, tmod, tname, dim, role) in tensors:
            members.append((tname_mod, tmod, tname, dim, role, idxs, roots, grouped))
        if mname is not None:
            role = "out" if is_out and node.type in (OPT.CONV, OPT.LINEAR) else (
                ("hidden" if is_out else "in") if isinstance(node.module, RNN_TYPES) else
                "in" if node.type in (OPT.CONV, OPT.LINEAR) else
                ("norm" if node.type in (OPT.BN, OPT.LN, OPT.GN, OPT.IN) else "param"))
            if node.type == OPT.DEPTHWISE_CONV:
                role = "depthwise"
            layers.append((mname, role))
        elif node.type == OPT.PARAMETER and tensors:
            layers.append((tensors[0][0] + "." + tensors[0][2] if tensors[0][0] else tensors[0][2], "param"))
    if C % ch_groups:
        raise _Reject(f"{C} channels cannot be split into {ch_groups} equal channel groups")
    per_group = C // ch_groups
    for mname, (kind, g), n_idx in grouped_members:
        if ch_groups % g:
            raise _Reject(f"'{mname}' has {g} groups, incompatible with {ch_groups} channel groups in this group")
    for r in range(per_group):
        for k in range(1, ch_groups):
            uf.union(r, r + k * per_group)
    for _, rnn in recurrent_out:  # a hidden unit is one output feature per direction
        if rnn is not root_item.dep.target.module:
            raise _Reject(f"reaches the hidden units of '{names.get(id(rnn), '?')}' from another layer")
        H = rnn.hidden_size
        for r in range(H):
            for d in range(1, C // H):
                uf.union(r, r + d * H)
    classes: Dict[int, int] = {}
    root_unit = torch.empty(C, dtype=torch.long)
    for r in range(C):
        root_unit[r] = classes.setdefault(uf.find(r), len(classes))
    num_units = len(classes)
    if num_units < 2:
        raise _Reject("torch-pruning couples all its channels into one unit (nothing can be removed)")
    slices: Dict[Tuple[int, str, int], dict] = {}
    for (mod_name, mod, tname, dim, role, idxs, ridx, grouped) in members:
        shape = _tensor_size(mod, tname)
        if shape is None:
            continue
        size = shape[dim]
        idx_t = torch.tensor(idxs, dtype=torch.long)
        units = root_unit[torch.tensor(ridx, dtype=torch.long)]
        if grouped is not None and grouped[0] == "conv":
            g = grouped[1]
            full = mod.in_channels if role == "in" else mod.out_channels
            if len(idxs) != full:
                raise _Reject(f"grouped conv '{mod_name}' ({g} groups) shares its "
                              f"{'input' if role == 'in' else 'output'} channels with other groups (concat)")
            if int(idx_t.max()) >= full or int(idx_t.min()) < 0:
                raise _Reject(f"torch-pruning index {int(idx_t.max())} out of range for '{mod_name}' ({full} channels)")
            per = full // g
            conv_group = idx_t // per
            local = idx_t % per
            if role == "in":
                # every conv group must lose the same local columns: weight[:, local]
                table = {}
                for l, u in zip(local.tolist(), units.tolist()):
                    if table.setdefault(l, u) != u:
                        raise _Reject(f"grouped conv '{mod_name}': channel groups would lose different columns")
                loc = sorted(table)
                idx_t = torch.tensor(loc, dtype=torch.long)
                units = torch.tensor([table[l] for l in loc], dtype=torch.long)
            else:
                counts = torch.zeros(num_units, g, dtype=torch.long)
                counts.index_put_((units, conv_group), torch.ones_like(units), accumulate=True)
                if not bool((counts == counts[:, :1]).all()):
                    raise _Reject(f"grouped conv '{mod_name}': units would remove unequal rows per conv group")
        elif grouped is not None and grouped[0] == "groupnorm":
            g = grouped[1]
            if len(idxs) != mod.num_channels:
                raise _Reject(f"GroupNorm '{mod_name}' shares its channels with other groups (concat)")
            counts = torch.zeros(num_units, g, dtype=torch.long)
            counts.index_put_((units, idx_t // (mod.num_channels // g)), torch.ones_like(units), accumulate=True)
            if not bool((counts == counts[:, :1]).all()):
                raise _Reject(f"GroupNorm '{mod_name}': units would remove unequal channels per norm group")
        if int(idx_t.min()) < 0 or int(idx_t.max()) >= size:
            raise _Reject(f"torch-pruning index {int(idx_t.max())} is out of range for "
                          f"'{mod_name}.{tname}' (dim {dim} has {size})")
        key = (id(mod), tname, dim)
        entry = slices.setdefault(key, {"module_name": mod_name, "module": mod, "tensor_name": tname,
                                        "dim": dim, "size": size, "role": role, "map": {}})
        table = entry["map"]
        for p, u in zip(idx_t.tolist(), units.tolist()):
            if table.setdefault(p, u) != u:
                raise _Reject(f"'{mod_name}.{tname}' position {p} would belong to two units")
    for mod_name, rnn in recurrent_out:  # root channel h (< hidden_size) stands for hidden unit h
        for tname, dim, positions, hidden in hidden_unit_tensors(rnn):
            key = (id(rnn), tname, dim)
            entry = slices.setdefault(key, {"module_name": mod_name, "module": rnn, "tensor_name": tname,
                                            "dim": dim, "size": _tensor_size(rnn, tname)[dim], "role": "hidden",
                                            "map": {}})
            for p, u in zip(positions.tolist(), root_unit[hidden].tolist()):
                if entry["map"].setdefault(p, u) != u:
                    raise _Reject(f"'{mod_name}.{tname}' position {p} would belong to two units")
    out = []
    for entry in slices.values():
        pos = sorted(entry["map"])
        out.append(TensorSlice(entry["module_name"], entry["tensor_name"], entry["dim"], entry["size"],
                               torch.tensor(pos, dtype=torch.long),
                               torch.tensor([entry["map"][p] for p in pos], dtype=torch.long),
                               entry["role"], entry["module"]))
    if not out:
        raise _Reject("has no tensors to mask")
    return {"slices": out, "inexact": inexact, "layers": layers, "out_layers": out_layers,
            "num_channels": C, "ch_groups": ch_groups, "num_units": num_units, "root_unit": root_unit,
            "norms": norms}


# --------------------------------------------------------------------------- importance
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


# --------------------------------------------------------------------------- heads
def _head_spec(name: str, attn: nn.Module, exact_norms: bool = True) -> dict:
    H, hd = int(attn.num_heads), int(attn.head_dim)
    A = H * hd
    heads = torch.arange(H).repeat_interleave(hd)
    chans = torch.arange(A)
    slices = []
    qkv, proj = attn.qkv, attn.proj
    qname, pname = f"{name}.qkv", f"{name}.proj"
    qkv_pos = torch.cat([chans + t * A for t in range(3)])
    qkv_units = heads.repeat(3)
    slices.append(TensorSlice(qname, "weight", 0, 3 * A, qkv_pos, qkv_units, "qkv", qkv))
    if _tensor_size(qkv, "bias") is not None:
        slices.append(TensorSlice(qname, "bias", 0, 3 * A, qkv_pos.clone(), qkv_units.clone(), "qkv", qkv))
    layers = [(qname, "qkv"), (pname, "proj")]
    inexact = []
    norms: list = []
    gate = getattr(attn, "gate", None)
    if isinstance(gate, nn.Linear):
        slices.append(TensorSlice(f"{name}.gate", "weight", 0, A, chans.clone(), heads.clone(), "gate", gate))
        if _tensor_size(gate, "bias") is not None:
            slices.append(TensorSlice(f"{name}.gate", "bias", 0, A, chans.clone(), heads.clone(), "gate", gate))
        layers.append((f"{name}.gate", "gate"))
    norm = getattr(attn, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (A,):
            raise _Reject(f"attention '{name}' has a {type(norm).__name__} over its heads that cannot be pruned")
        if exact_norms and norm_kind(norm) == "last" and norm.weight is not None:
            norms.append((f"{name}.norm", norm, "last"))
        else:
            inexact.append(f"LayerNorm '{name}.norm' over the heads: statistics include zeroed heads")
        for tname in ("weight", "bias"):
            if _tensor_size(norm, tname) is not None:
                slices.append(TensorSlice(f"{name}.norm", tname, 0, A, chans.clone(), heads.clone(), "norm", norm))
        layers.append((f"{name}.norm", "norm"))
    slices.append(TensorSlice(pname, "weight", 1, A, chans.clone(), heads.clone(), "proj", proj))
    return {"slices": slices, "inexact": inexact, "layers": layers, "num_channels": A, "num_units": H,
            "head_dim": hd, "root_unit": heads.clone(), "norms": norms}


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
            note = f"{type(importance).__name__} failed on heads ({type(e).__name__}: {str(e)[:100]}); used L2 magnitude"
    return _magnitude_importance(spec["slices"], H), note


# --------------------------------------------------------------------------- main entry
def _prefix_matcher(names: Set[str]) -> Callable[[str], bool]:
    def excluded(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") or e == "" for e in names)
    return excluded


def discover_groups(model: nn.Module, example_inputs, *, importance=None, exclude_out: Sequence[str] = (),
                    heads: bool = True, timeout: Optional[float] = 60.0, group_timeout: Optional[float] = 20.0,
                    rank: bool = True, round_to: Optional[int] = None, exact_norms: bool = True) -> GroupDiscovery:
    """Trace ``model``, build torch-pruning's dependency graph and turn its groups into
    :class:`ChannelGroup` s (see the module docstring). ``exclude_out`` names modules whose
    output channels must stay (the classifier, user exclusions)."""
    names = {id(m): n for n, m in model.named_modules()}
    excluded_out = _prefix_matcher(set(exclude_out))
    deadline = Deadline(timeout)
    seconds: Dict[str, float] = {}
    model_name = type(model).__name__
    attention = find_attention_blocks(model, excluded_out) if heads else {}

    t0 = time.perf_counter()
    traces = _trace_layers(model, example_inputs, countable_attention(model))
    seconds["trace"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    DG, output_fns = build_graph(model, example_inputs, deadline.left())
    seconds["graph"] = time.perf_counter() - t0
    # nodes that produce a model output: a group may not change their channels
    output_nodes = {id(n) for n in DG.module2node.values() if n.grad_fn in output_fns}

    # ---- enumerate groups ourselves (torch-pruning's get_all_groups, with time limits and reasons)
    t0 = time.perf_counter()
    excluded: List[ExcludedGroup] = []
    # every timm attention block's qkv output is ours: head groups, or left alone with a reason
    # (torch-pruning's qkv grouping does not respect the head layout and breaks the reshape)
    head_qkv = {id(a.qkv) for a in countable_attention(model).values()}
    for name, a in countable_attention(model).items():
        if name in attention or excluded_out(f"{name}.qkv"):
            continue
        why = ("heads=False" if not heads else
               f"{type(a).__name__} layout not prunable by whole heads (num_heads={a.num_heads})")
        excluded.append(ExcludedGroup(f"{name}:heads", f"attention heads left alone: {why}", [f"{name}.qkv"]))
    roots = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding) + RNN_TYPES
    visited: Set[int] = set()
    specs: List[dict] = []
    stuck_at: Optional[str] = None
    for m in list(DG.module2node.keys()):
        if not isinstance(m, roots) or id(m) in visited or id(m) in head_qkv:
            continue
        pruner = DG.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        name = names.get(id(m), type(m).__name__)
        C = pruner.get_out_channels(m)
        left = deadline.left(group_timeout)
        if left is not None and left <= 0:
            # The overall budget is spent: keep the groups found so far, leave the rest out
            # (with the reason), and fail only if nothing at all could be grouped in time.
            stuck_at = stuck_at or name
            visited.add(id(m))
            excluded.append(ExcludedGroup(f"{name}:out", f"grouping time budget of {timeout:.3g} s was spent "
                                                         f"before this layer", [name]))
            continue
        try:
            with time_limit(left, f"torch-pruning grouping of '{name}' in {model_name}"):
                g, roots_of = enumerate_group(DG, m, pruner.prune_out_channels, list(range(C)))
        except _Reject as r:
            visited.add(id(m))
            excluded.append(ExcludedGroup(f"{name}:out", str(r), [name]))
            continue
        except ChannelTimeoutError:
            visited.add(id(m))
            overall = deadline.left() is not None and deadline.left() <= 0
            if overall:
                stuck_at = stuck_at or name
            excluded.append(ExcludedGroup(f"{name}:out", f"torch-pruning group enumeration did not finish "
                                                         f"within {left:.3g} s"
                                                         + (" (the overall time budget)" if overall else ""),
                                          [name]))
            continue
        except Exception as e:
            visited.add(id(m))
            excluded.append(ExcludedGroup(f"{name}:out", f"torch-pruning grouping failed: "
                                                         f"{type(e).__name__}: {str(e)[:160]}", [name]))
            continue
        outs = []
        for item in g:
            if DG.is_out_channel_pruning_fn(item.dep.handler) and isinstance(item.dep.target.module, nn.Module):
                visited.add(id(item.dep.target.module))
                if isinstance(item.dep.target.module, roots):
                    outs.append(item.dep.target.module)
        if any(id(o) in head_qkv for o in outs):
            continue  # a qkv projection's output: handled by the head group
        try:
            spec = _build_group(DG, g, roots_of, model, names, name, excluded_out, exact_norms, output_nodes)
        except _Reject as r:
            key_name = _first_executed([names.get(id(o), "?") for o in outs] or [name], traces)
            excluded.append(ExcludedGroup(f"{key_name}:out", str(r), sorted({names.get(id(o), "?") for o in outs})))
            continue
        # torch-pruning's importances skip recurrent tensors: rank hidden units by their own magnitude
        spec["tp_group"] = None if isinstance(m, RNN_TYPES) else g
        spec["root_module"] = m
        spec["root_handler"] = pruner.prune_out_channels
        spec["root_name"] = name
        specs.append(spec)
    seconds["groups"] = time.perf_counter() - t0
    if stuck_at is not None and not specs:
        raise ChannelTimeoutError(f"{model_name}: grouping did not finish within {timeout:.3g} s "
                                  f"(stuck at layer '{stuck_at}')")

    # ---- one group per prunable attention block (whole heads)
    for name, attn in attention.items():
        try:
            spec = _head_spec(name, attn, exact_norms)
        except _Reject as r:
            excluded.append(ExcludedGroup(f"{name}:heads", str(r), [name]))
            continue
        spec.update(kind="heads", attention=attn, root_name=f"{name}.qkv", attn_name=name)
        specs.append(spec)

    # ---- no two groups may own the same position of a tensor
    owner: Dict[Tuple[int, str, int], Tuple[Set[int], str]] = {}
    kept_specs = []
    for spec in specs:
        key = _spec_key(spec, traces)
        clash = None
        for s in spec["slices"]:
            k = (id(s.module), s.tensor_name, s.dim)
            if k in owner and owner[k][0] & set(s.positions.tolist()):
                clash = (s.qualified_name, owner[k][1])
                break
        if clash:
            excluded.append(ExcludedGroup(key, f"shares channels of '{clash[0]}' with group {clash[1]!r}",
                                          [n for n, _ in spec["layers"]]))
            continue
        for s in spec["slices"]:
            k = (id(s.module), s.tensor_name, s.dim)
            owner.setdefault(k, (set(), key))[0].update(s.positions.tolist())
        spec["key"] = key
        kept_specs.append(spec)

    # ---- rank units, build groups in execution order
    t0 = time.perf_counter()
    kept_specs.sort(key=lambda s: (_spec_first_call(s, traces), s["key"]))
    groups: List[ChannelGroup] = []
    for i, spec in enumerate(kept_specs):
        kind = spec.get("kind", "channels")
        U = spec["num_units"]
        sizes = torch.bincount(spec["root_unit"], minlength=U)
        cpu_ = int(sizes[0]) if bool((sizes == sizes[0]).all()) else 0
        grp = ChannelGroup(index=i, key=spec["key"], kind=kind, root=spec["root_name"],
                           num_channels=spec["num_channels"], num_units=U, channels_per_unit=cpu_,
                           slices=spec["slices"], root_unit=spec["root_unit"], exact=not spec["inexact"],
                           inexact_reasons=list(dict.fromkeys(spec["inexact"])), layers=spec["layers"],
                           first_call=_spec_first_call(spec, traces), round_to=round_to,
                           _root_module=spec.get("root_module"), _root_handler=spec.get("root_handler"),
                           _attention=spec.get("attention"), _norms=list(spec.get("norms", ())),
                           _aliases=tuple(spec.get("out_layers", ())) + ((spec["attn_name"],) if kind == "heads" else ()))
        if rank:
            if kind == "heads":
                scores, note = _head_importance(importance, DG, spec["attention"], spec, group_timeout)
            else:
                scores, note = _unit_importance(importance, spec.get("tp_group"), spec, group_timeout)
            grp.importance, grp.importance_note = scores, note
            grp.order = torch.argsort(scores, stable=True)
        else:
            grp.importance = torch.zeros(U)
            grp.order = torch.arange(U)
        rank_of_unit = torch.empty(U, dtype=torch.long)
        rank_of_unit[grp.order] = torch.arange(U)
        for s in grp.slices:
            s.rank(rank_of_unit, U)
        groups.append(grp)
    seconds["importance"] = time.perf_counter() - t0
    excluded += _never_grouped(DG, traces, visited | head_qkv, set(attention))
    return GroupDiscovery(DG, groups, excluded, traces, attention, seconds)


def _never_grouped(DG, traces: Dict[str, LayerTrace], visited: Set[int], attention: Set[str]) -> List[ExcludedGroup]:
    """Layers that ran but that no group starts from or reaches, each with why: otherwise a
    refusal would name only the groups that exist (a packed LSTM's model says just 'fc:out')."""
    out = []
    for name, tr in traces.items():
        m = tr.module
        if tr.calls == 0 or id(m) in visited or name in attention or isinstance(m, (nn.Embedding, nn.MultiheadAttention)):
            continue
        if is_transposed_linear(m):
            why = "is a transformers Conv1D (a Linear stored (in, out)), which torch-pruning cannot prune"
        elif m not in DG.module2node:
            why = ("is fed a PackedSequence (pack_padded_sequence), which torch-pruning's graph cannot follow; "
                   "feed it padded tensors, or use structure='unstructured'") if tr.packed else \
                "is not in torch-pruning's dependency graph (no traced op links its output to the model's)"
        elif DG.get_pruner_of_module(m) is None:
            why = f"torch-pruning has no pruner for {type(m).__name__}"
        else:
            continue
        out.append(ExcludedGroup(f"{name}:out", f"'{name}' {why}", [name]))
    return out


def _first_executed(layer_names: Sequence[str], traces: Dict[str, LayerTrace]) -> str:
    def order(n):
        tr = traces.get(n)
        return (tr.first_call if tr is not None and tr.first_call >= 0 else 1 << 30, n)
    return min(layer_names, key=order)


def _spec_key(spec: dict, traces) -> str:
    if spec.get("kind") == "heads":
        return f"{spec['attn_name']}:heads"
    outs = spec.get("out_layers") or [spec["root_name"]]
    return f"{_first_executed(outs, traces)}:out"


def _spec_first_call(spec: dict, traces) -> int:
    if spec.get("kind") == "heads":
        tr = traces.get(spec["attn_name"])
    else:
        tr = traces.get(_first_executed(spec.get("out_layers") or [spec["root_name"]], traces))
    return tr.first_call if tr is not None and tr.first_call >= 0 else 1 << 30
