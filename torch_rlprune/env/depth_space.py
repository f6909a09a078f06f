"""The search space :func:`rl_prune` builds for agents that also remove residual blocks (N2N).

:class:`DepthChannelSpace` wraps the channel search space with the model's removable blocks
(:func:`~torch_rlprune.structure.depth.find_removable_blocks`): a plan's vector is
``[1 per removed block..., units removed per group...]`` and its JSON lists the removed blocks in
``metadata["removed_blocks"]``, which :func:`~torch_rlprune.plan.apply_plan` masks again. The
environment over it is :class:`~torch_rlprune.env.depth_width.DepthWidthEnv`.
"""
from __future__ import annotations

import warnings
from typing import Tuple

import numpy as np

from ..structure.channel import apply_channel_plan
from ..structure.costs import budget_measure
from ..structure.depth import find_removable_blocks, mask_block
from .depth_latency import DepthLatency, DepthPlans, time_blocks
from .depth_width import CountedCost, DepthCost, DepthWidthEnv, count_macs_params_removed

__all__ = ["DepthChannelSpace"]


class DepthChannelSpace:
    """The channel search space of :func:`rl_prune` plus the removable blocks of the model.

    Args:
        channel_space: the ``_ChannelSpace`` (structure, groups, descriptors) built by ``rl_prune``.
        exclude: modules that must stay (no block containing one is removed).
    """

    def __init__(self, channel_space, exclude=None):
        self.channel = channel_space
        self.model, self.example, self.budget = channel_space.model, channel_space.example, channel_space.budget
        self.structure = channel_space.structure
        self.steps = channel_space.steps
        self.masks = channel_space.masks
        self.dense = channel_space.dense
        self.blocks = find_removable_blocks(self.model, self.example, exclude=exclude)
        self.cost_model = DepthCost(self.structure, self.blocks)
        for i, b in enumerate(self.blocks):  # the arithmetic must say what removing the block saves
            one = np.zeros(len(self.blocks), dtype=bool)
            one[i] = True
            macs, params = self.cost_model.cost(one, np.zeros(len(self.structure.groups), dtype=np.int64))
            if (self.cost_model.dense[0] - macs, self.cost_model.dense[1] - params) != (b.macs, b.params):
                warnings.warn(f"rl_prune: the cost model and the block counter disagree on {b.name!r} "
                              f"({self.cost_model.dense[0] - macs} vs {b.macs} MACs); budgets may be off",
                              RuntimeWarning, stacklevel=2)
        # budget="latency": the channel space's calibrated table, with every block timed alone
        self.latency_spec, self.timer = channel_space.latency_spec, channel_space.timer
        self.latency = channel_space.latency
        if self.latency is not None:
            seconds = time_blocks(self.latency.table, self.blocks, self.latency_spec.thread_count)
            self.budget_cost = DepthLatency(self.latency, self.blocks, seconds)
        else:
            self.budget_cost = CountedCost(self.cost_model, self.budget)

    def measured_plans(self, env):
        return DepthPlans(self, env)

    def make_env(self, score_fn, target: float, max_amount: float, baseline_score: float,
                 tolerance: float, reward=None) -> DepthWidthEnv:
        return DepthWidthEnv(self, score_fn, target, self.budget, max_amount, baseline_score, tolerance, reward)

    def split(self, k) -> Tuple[np.ndarray, np.ndarray]:
        k = np.asarray(k, dtype=np.int64)
        return k[:len(self.blocks)].astype(bool), k[len(self.blocks):]

    def removed_names(self, removed) -> list:
        """Names of the blocks a plan's block part (one bool per removable block) removes."""
        return [b.name for b, r in zip(self.blocks, removed) if r]

    def plan_entries(self, k):
        removed, counts = self.split(k)
        counts = np.where(self.cost_model.inactive_groups(removed), 0, counts)
        amounts, numels, metadata = self.channel.plan_entries(counts)
        metadata = dict(metadata)
        if self.latency is not None:  # the table's prediction with the blocks gone
            metadata["latency"] = {**metadata["latency"], "planned_ms": self.budget_cost.predicted(removed, counts) * 1e3}
        metadata["removed_blocks"] = self.removed_names(removed)
        metadata["removable_blocks"] = [b.name for b in self.blocks]
        return amounts, numels, metadata

    def apply(self, plan) -> float:
        """Apply a plan for good (channel masks, then block masks) and return the fraction of the
        budget's cost removed, counted on the model with its masked blocks removed."""
        apply_channel_plan(self.model, plan.counts(), structure=self.structure)
        by_name = {b.name: b for b in self.blocks}
        for name in plan.metadata.get("removed_blocks", ()):
            mask_block(by_name[name])
        if self.latency is not None:  # calibrated on measurements, as the width-only space
            removed = np.array([b.name in plan.metadata.get("removed_blocks", ()) for b in self.blocks], dtype=bool)
            counts = self.structure.resolve_plan(plan.counts())
            return self.budget_cost.fraction_removed(removed, np.where(self.cost_model.inactive_groups(removed), 0, counts))
        left = count_macs_params_removed(self.model, self.example)
        return budget_measure(self.budget).removed_fraction(self.dense, left)
