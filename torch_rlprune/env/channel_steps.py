"""Channel groups as steps of the shared pruning MDP.

The environment walks steps, holds a mask object per step and asks a budget what a plan
removes. For channel pruning a step is a torch-pruning dependency group of a
:class:`~torch_rlprune.structure.channel.ChannelStructure`; this module adapts groups to those three
roles, so the MDP and the agents stay the same for every structure.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
from torch import nn

from ..structure.costs import budget_measure
from ..structure.tensors import PRUNABLE_TYPES, RECURRENT_TYPES, PrunableTensor, describe_tensor, trace_execution
from .budget import Budget

__all__ = ["GroupMask", "ChannelBudget", "LatencyBudget", "group_descriptors"]


class GroupMask:
    """The in-place mask of one channel group, with :class:`InPlaceMask`'s interface
    (units instead of weights): ``numel`` units, ``k_min``, ``set_k``, ``restore``."""

    def __init__(self, structure, index: int):
        self.structure = structure
        self.index = index
        self.numel = structure.groups[index].num_units
        self.k_min = 0

    def set_k(self, k: int) -> None:
        self.structure.set_removed(self.index, int(k))

    def restore(self) -> None:
        self.structure.restore()


class ChannelBudget(Budget):
    """A counted budget (MACs, params, or any function of the two, :mod:`~torch_rlprune.structure.costs`) removed by a vector of per-group unit counts.

    Not additive: a conv's MACs scale with its alive inputs *times* its alive outputs,
    which two different groups decide. The structure's arithmetic cost model answers
    ``removed`` without a forward pass; the base class derives clipping and repair from it.
    """

    def __init__(self, structure, budget: str, max_amount: float):
        self.structure = structure
        self.budget, self.measure = budget, budget_measure(budget)
        groups = structure.groups
        self.k_min, self.k_max = _count_range(groups, max_amount)
        self.total = self.measure.cost_of_counts(structure.cost(np.zeros(len(groups), dtype=np.int64)))
        self.step_cost = np.array([self.measure.cost_of_counts((g.macs, g.params)) for g in groups])

    def removed(self, k: np.ndarray) -> float:
        return self.total - self.measure.cost_of_counts(self.structure.cost(np.asarray(k, dtype=np.int64)))


class LatencyBudget(Budget):
    """Predicted wall time removed by a vector of per-group unit counts: AMC's latency-aware
    mode, with a :class:`~torch_rlprune.structure.channel.latency.LatencyTable` as the cost model.

    ``removed(k)`` is the table's dense prediction minus its prediction for ``k``. It is
    monotone in ``k`` although measured timings are noisy, because the table makes every
    layer's timings monotone in both of its widths before interpolating; the base class's
    clipping and repair rely on that. ``step_cost[i]`` is the latency group ``i`` controls.
    """

    def __init__(self, structure, table, max_amount: float):
        self.structure, self.table = structure, table
        self.k_min, self.k_max = _count_range(structure.groups, max_amount)
        self.total = float(table.dense_latency)
        self.step_cost = table.group_latencies()

    def removed(self, k: np.ndarray) -> float:
        return self.total - self.table.latency(np.asarray(k, dtype=np.int64))


def _count_range(groups, max_amount: float):
    """Units each group may lose: none up to ``max_amount`` of it, rounded as the group
    rounds and never all of it."""
    k_min = np.zeros(len(groups), dtype=np.int64)
    k_max = np.array([min(g.max_removed, g.effective(int(max_amount * g.num_units))) for g in groups], dtype=np.int64)
    return k_min, k_max


def _representative(model: nn.Module, root: str) -> tuple:
    """The layer (and tensor) that stands for a group in the state embedding."""
    module = model.get_submodule(root) if root else model
    if isinstance(module, PRUNABLE_TYPES):
        return root, module, "weight"
    if isinstance(module, RECURRENT_TYPES):  # hidden units: the last layer's recurrent matrix
        return root, module, f"weight_hh_l{module.num_layers - 1}"
    for name, sub in module.named_modules():
        if isinstance(sub, PRUNABLE_TYPES):
            return f"{root}.{name}" if root else name, sub, "weight"
    return None, module, "weight"


def group_descriptors(model: nn.Module, structure) -> List[PrunableTensor]:
    """One :class:`PrunableTensor` per group (its root layer), for AMC's state features."""
    out = []
    for g in structure.groups:
        name, module, tensor = _representative(model, g.root)
        if name is not None:
            d = describe_tensor(name, module, tensor)
        else:  # a group rooted in a non-Conv/Linear tensor (an embedding, a token): describe by units
            d = PrunableTensor(g.root, "weight", module, "linear", g.num_units, g.num_units, 1, 1, 1,
                               int(g.params) or g.num_units)
        out.append(d)
    return out


def trace_descriptors(model, descriptors: Sequence[PrunableTensor], run_forward) -> None:
    """Fill feature-map sizes of the descriptors from one forward (modules may repeat)."""
    unique = {}
    for d in descriptors:
        unique.setdefault(id(d.module), d)
    trace_execution(model, list(unique.values()), run_forward)
    for d in descriptors:
        src = unique[id(d.module)]
        d.in_positions, d.out_positions = src.in_positions, src.out_positions
        d.calls, d.positions_per_forward = src.calls, src.positions_per_forward
