"""torch-pruning's dependency group of one layer's channels, enumerated by a worklist that also
returns which root channels reach each index (the couplings torch-pruning's merge hides)."""
from __future__ import annotations

from typing import Any, Dict, Sequence, Set, Tuple

import torch_pruning as tp
from torch import nn
from torch_pruning import ops as tp_ops

from .graph import Dependency, Group, group_item, hybrid_indices, update_index_mapping
from .groups import Reject

__all__ = ["enumerate_group", "MIN_TRACKED_INDICES", "MAX_TRACKED_PER_CHANNEL"]


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
                raise Reject(unmappable[id(new_dep.target)])
            entry = reached.setdefault((id(new_dep.target), new_dep.handler), [new_dep, {}, set()])
            known = entry[1]
            fresh = [h for h in dict.fromkeys(new_idx) if h not in known]
            if not fresh:
                continue
            known.update(dict.fromkeys(fresh))
            positions = entry[2]
            positions.update(h.idx for h in fresh)
            if len(positions) > widest:
                raise Reject(f"torch-pruning maps the channels onto {len(positions)} positions of "
                              f"'{new_dep.target.name}', more than the widest tensor of the model has ({widest}): "
                              f"a reshape it reads as a flatten, not a channel coupling")
            tracked += len(fresh)
            if tracked > limit:
                raise Reject(f"torch-pruning maps the channels onto more than {limit} positions "
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
