"""Depth and width in one search space: residual blocks removed whole, channels of what is left.

Agents that declare ``needs_depth = True`` (N2N) get this space from :func:`rl_prune` instead of
the per-step :class:`~torch_rlprune.env.layerwise.LayerwisePruningEnv`: their episodes are not one action
per layer but two stages (which blocks go, then how wide every remaining group stays), so the
environment here exposes the pieces and the agent drives them:

* :class:`DepthCost` -- MACs/params of the model for any (removed blocks, per-group channel
  counts), by arithmetic: :class:`~torch_rlprune.structure.channel.ChannelStructure`'s cost model with
  every term (Conv/Linear MACs, attention matmuls, parameter tensors) tagged with the removable
  blocks it lies in. A removed block's terms vanish, the terms outside keep the channel counts
  of their groups, which is what :func:`~torch_rlprune.structure.channel.count_macs_params` counts on the
  model with the removed blocks replaced by identities (checked at construction).
* :class:`DepthWidthEnv` -- the budget (AMC-style feasibility for both stages: a block may be
  removed only if the budget is not overshot, kept only if the rest can still reach it; channel
  counts clipped per group by :meth:`Budget.bounds` and repaired at the end), scoring with a
  cache keyed by the plan, the best plan, the episode history and the callbacks
  :func:`rl_prune` uses for its progress bar; the same result interface as the layerwise env
  (``best_by_target``, ``achieved``, ``finalize``, ``restore``...).
* :class:`~torch_rlprune.env.depth_space.DepthChannelSpace` (its own module) -- wraps the channel
  search space of :func:`rl_prune` with the removable blocks; a plan's vector is
  ``[1 per removed block..., units removed per group...]``.

Masks compose: a removed block is masked through the prune API (:func:`~torch_rlprune.structure.depth.mask_block`,
exactly the identity), the channel groups through the structure's in-place masks during the
search and :func:`~torch_rlprune.structure.channel.apply_channel_plan` at the end; a tensor in both gets a
``PruningContainer``. Groups lying entirely inside a removed block are not pruned (they are gone
with the block). :func:`~torch_rlprune.compact` removes the masked blocks first
(:func:`~torch_rlprune.structure.depth.remove_masked_blocks`), then the masked channels of the rest.

Counting: ``count_macs_params`` on the *masked* model counts a masked block's first layers
(only its last layers are zero), so it over-counts what the plan costs; the plan's sparsity is
what the model costs once the blocks are removed, as :func:`count_macs_params_removed` (and
``count_macs_params`` after :func:`compact`) count it, exactly.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..rewards.repair import refit_kept
from ..structure.channel.counting import count_macs_params
from ..structure.costs import budget_measure
from ..structure.depth import DEPTH_MASK_TAG, RemovableBlock, RemovedBlock, is_inside, mask_block, unmask_block
from .budget import Budget
from .layerwise import PRIOR_SPREAD, BestPlan, BestPlanResults, EpisodeRecord, anchored_amount

__all__ = ["DepthCost", "DepthWidthEnv", "count_macs_params_removed", "masked_block_names"]


def masked_block_names(model: nn.Module) -> List[str]:
    """Qualified names of the blocks whose every branch :func:`mask_block` masks (outermost only)."""
    names = []
    for name, module in model.named_modules():
        record = getattr(module, DEPTH_MASK_TAG, None)
        if name and record is not None and len(record.masked) == len(record.branches) \
                and not any(is_inside(name, n) for n in names):
            names.append(name)
    return names


@torch.no_grad()
def count_macs_params_removed(model: nn.Module, example_inputs, count_zeros: bool = False) -> Tuple[int, int]:
    """``count_macs_params`` of ``model`` as it will be once its masked blocks are removed.

    The masked blocks are swapped for :class:`~torch_rlprune.structure.depth.RemovedBlock` during the count
    and put back (same objects); the model's output is the same either way, only the count differs:
    a masked block still runs (and costs) the layers before its zeroed end.
    """
    swapped = []
    try:
        for name in masked_block_names(model):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            swapped.append((parent, child, getattr(parent, child)))
            setattr(parent, child, RemovedBlock(name))
        return count_macs_params(model, example_inputs, count_zeros)
    finally:
        for parent, child, module in reversed(swapped):
            setattr(parent, child, module)


# --------------------------------------------------------------------------- cost
class DepthCost:
    """Arithmetic MACs/params of a model with blocks removed and channels pruned.

    Mirrors ``ChannelStructure._build_cost_model`` term by term (the same loops in the same
    order, asserted) and tags each term with the blocks containing it: a term is dropped when
    one of them is removed. ``cost(no blocks, counts) == structure.cost(counts)`` exactly.
    """

    def __init__(self, structure, blocks: Sequence[RemovableBlock]):
        self.structure = s = structure
        self.blocks = list(blocks)
        nb = len(self.blocks)

        def member(name: str) -> np.ndarray:
            return np.array([is_inside(name, b.name) for b in self.blocks], dtype=np.float64).reshape(nb)

        # the structure names the module of every MAC term: a term goes with its block
        mac_in = [member(name) for name in s._mac_modules]
        att_in = [member(name) for name in s._att_modules]
        att_const = [value for _, value in s._att_const_terms]
        att_const_in = [member(name) for name, _ in s._att_const_terms]
        keys = s._entry_keys
        par_in, fixed, fixed_in = [], [], []
        seen = set()
        for mname, m in s.model.named_modules():
            for pname, p in m._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                ename = pname[:-len("_orig")] if pname.endswith("_orig") else pname
                if any((id(m), ename, d) in keys for d in range(p.dim())):
                    par_in.append(member(mname))
                else:
                    fixed.append(p.numel())
                    fixed_in.append(member(mname))
        if (len(mac_in), len(att_in), len(par_in)) != (len(s._mac_coef), len(s._att_coef), len(s._par_const)) \
                or sum(att_const) != s._att_const or sum(fixed) != s._par_fixed:
            raise RuntimeError("internal error: DepthCost does not match ChannelStructure's cost model")

        def matrix(rows):
            return np.array(rows, dtype=np.float64).reshape(len(rows), nb)

        self._mac_in, self._att_in, self._par_in = matrix(mac_in), matrix(att_in), matrix(par_in)
        self._att_const = np.array(att_const, dtype=np.int64)
        self._att_const_in = matrix(att_const_in)
        self._fixed = np.array(fixed, dtype=np.int64)
        self._fixed_in = matrix(fixed_in)
        # groups whose every tensor lies inside a block: gone with it
        self.group_in = np.array([[all(is_inside(sl.module_name, b.name) for sl in g.slices) for b in self.blocks]
                                  for g in s.groups], dtype=bool).reshape(len(s.groups), nb)
        self.dense = self.cost(np.zeros(nb, dtype=bool), np.zeros(len(s.groups), dtype=np.int64))
        if self.dense != s._cost(np.zeros(len(s.groups), dtype=np.int64)):
            raise RuntimeError("internal error: DepthCost's dense cost differs from ChannelStructure's")

    def effective(self, counts) -> np.ndarray:
        return np.array([g.effective(int(n)) for g, n in zip(self.structure.groups, counts)], dtype=np.int64)

    def cost(self, removed: np.ndarray, counts: np.ndarray) -> Tuple[int, int]:
        """``(MACs per sample, params)`` with the blocks flagged in ``removed`` gone and
        ``counts`` units removed per group (rounded/capped as the structure applies them)."""
        s = self.structure
        c = self.effective(counts)
        r = np.asarray(removed, dtype=np.float64)
        alive = s._sizes.copy()
        if len(s._sl_entry):
            np.subtract.at(alive, s._sl_entry, s._ptr[np.arange(len(s._sl_entry)), c[s._sl_group]])

        def keep(m):
            return (m @ r) == 0 if m.shape[1] else np.ones(m.shape[0], dtype=bool)

        macs = 0
        if len(s._mac_coef):
            macs += int((s._mac_coef * alive[s._mac_e[:, 0]] * alive[s._mac_e[:, 1]] * keep(self._mac_in)).sum())
        if len(s._att_coef):
            macs += int((s._att_coef * (s._units[s._att_group] - c[s._att_group]) * keep(self._att_in)).sum())
        if len(self._att_const):
            macs += int((self._att_const * keep(self._att_const_in)).sum())
        params = int((self._fixed * keep(self._fixed_in)).sum()) if len(self._fixed) else 0
        if len(s._par_const):
            params += int((s._par_const * np.prod(alive[s._par_e], axis=1) * keep(self._par_in)).sum())
        return macs, params

    def inactive_groups(self, removed: np.ndarray) -> np.ndarray:
        """Groups entirely inside a removed block."""
        if not self.blocks:
            return np.zeros(len(self.structure.groups), dtype=bool)
        return (self.group_in & np.asarray(removed, dtype=bool)[None, :]).any(axis=1)


class CountedCost:
    """The budget's measure of a depth-and-width plan when it is counted (MACs, parameters, ...): arithmetic
    (:class:`DepthCost`). :class:`~torch_rlprune.env.depth_latency.DepthLatency` is its latency twin;
    both give ``total``, ``remaining(removed, counts)`` and ``group_costs`` (a state feature)."""

    def __init__(self, cost_model: DepthCost, budget: str):
        self.cost_model, self.budget, self.measure = cost_model, budget, budget_measure(budget)
        self.total = self.measure.cost_of_counts(cost_model.dense)
        self.group_costs = np.array([self.measure.cost_of_counts((g.macs, g.params))
                                     for g in cost_model.structure.groups], dtype=np.float64)

    def remaining(self, removed, counts) -> float:
        return self.measure.cost_of_counts(self.cost_model.cost(removed, counts))


class _EpisodeBudget(Budget):
    """The channel budget with a fixed set of removed blocks: groups inside them stay at 0."""

    def __init__(self, cost: DepthCost, budget_cost, removed: np.ndarray, k_max: np.ndarray):
        self.budget_cost, self.removed_blocks = budget_cost, np.asarray(removed, dtype=bool)
        self.k_min = np.zeros(len(k_max), dtype=np.int64)
        self.k_max = np.where(cost.inactive_groups(removed), 0, k_max).astype(np.int64)
        self.total = float(budget_cost.total)
        self.step_cost = budget_cost.group_costs

    def removed(self, k: np.ndarray) -> float:
        return self.total - self.budget_cost.remaining(self.removed_blocks, k)


# --------------------------------------------------------------------------- environment
class DepthWidthEnv(BestPlanResults):
    """Blocks and channel groups, budgeted and scored; driven by a depth agent (see the module docstring).

    A plan ``k`` is ``np.concatenate([removed (0/1 per block), units removed per group])``.

    Args:
        space: the :class:`DepthChannelSpace`.
        score_fn: scores the model as currently masked.
        target: fraction of the budget's cost to remove.
        budget: ``"macs"``, ``"params"`` or ``"latency"`` (measured as ``space.budget_cost`` says).
        max_amount: the largest fraction of a group removable.
        baseline_score: the unpruned model's score (``score_0`` of rewards relative to it).
        tolerance: a plan is a result only if it lands this close to the target (fraction).

        reward: ``reward(score, baseline_score, compression) -> reward`` (None: the score), used for the
            history and for choosing the best plan: whoever builds the environment sets it (rl_prune
            takes the agent's ``episode_reward``), agents only read rewards.

    What an agent sets: ``phase`` (a label in the history).
    """

    supports_depth = True

    def __init__(self, space: "DepthChannelSpace", score_fn: Callable[[], float], target: float, budget: str,
                 max_amount: float, baseline_score: float, tolerance: float = 0.02,
                 reward: Optional[Callable[[float, float, float], float]] = None):
        self.space = space
        self.structure = space.structure
        self.blocks = space.blocks
        self.cost_model = space.cost_model
        self.score_fn = score_fn
        self.scoring_threads = torch.get_num_threads()  # the caller's; agents run on one (threads.py)
        self.budget = budget
        self.budget_cost = space.budget_cost
        groups = self.structure.groups
        self.n = np.array([g.num_units for g in groups], dtype=np.int64)
        self.k_max = np.array([min(g.max_removed, g.effective(int(max_amount * g.num_units))) for g in groups],
                              dtype=np.int64)
        self.total_cost = float(self.budget_cost.total)
        self.baseline_score = float(baseline_score)
        self.tolerance = float(tolerance)
        self.episode_reward = reward
        self.history: List[EpisodeRecord] = []
        self.best_by_target: Dict[Optional[float], BestPlan] = {}
        self.callbacks: List[Callable[[EpisodeRecord], None]] = []
        self.phase = "search"
        self.evaluations = 0
        self.targets = None
        self.prior_method: Optional[str] = None   # set_prior: the heuristic the widths start from
        self.returned_score: Optional[Callable[[np.ndarray], float]] = None   # set by rl_prune when it refits
        self.returned_scores: List[dict] = []   # every score_as_returned, for the plan's record
        self.results_of: Optional[np.ndarray] = None   # keep_results_of: the one architecture a result may have
        self._cache: Dict[Tuple[int, ...], float] = {}
        self.replay: Dict[Tuple[int, ...], float] = {}
        self.replayed_keys: set = set()   # plans whose score came from the record (checked on resume)
        self.scoring_key: Optional[Tuple[int, ...]] = None
        self._masked = np.zeros(len(self.blocks), dtype=bool)
        self._started = time.perf_counter()
        self.set_target(target)

    # ----------------------------------------------------------------- sizes and features
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_groups(self) -> int:
        return len(self.structure.groups)

    @property
    def num_steps(self) -> int:
        return self.num_blocks + self.num_groups

    plan_width = num_steps   # entries of a plan: keep/remove per block, then a count per group

    def block_features(self) -> np.ndarray:
        """Per block: position, share of MACs, share of params, channels, positions, branches."""
        dense_macs, dense_params = self.cost_model.dense
        rows = []
        for i, b in enumerate(self.blocks):
            shape = b.shape
            if len(shape) >= 4:
                channels, positions = shape[1], int(math.prod(shape[2:]))
            elif len(shape) == 3:
                channels, positions = shape[2], shape[1]
            else:
                channels, positions = shape[-1], 1
            rows.append([i / max(len(self.blocks) - 1, 1), b.macs / max(dense_macs, 1), b.params / max(dense_params, 1),
                         math.log1p(channels), math.log1p(positions), len(b.branches)])
        x = np.asarray(rows, dtype=np.float64).reshape(len(rows), 6)
        return _normalise(x, keep=(0, 1, 2)).astype(np.float32)

    def group_features(self) -> np.ndarray:
        """Per group (AMC's static embedding): index, kind, in/out channels, positions, stride,
        kernel, parameters, and the budget's cost it controls."""
        costs = self.budget_cost.group_costs / (self.total_cost if self.total_cost > 0 else 1.0)
        rows = [[i, d.kind_code, d.in_channels, d.out_channels, d.in_positions, d.stride, d.kernel_size, d.numel,
                 float(costs[i])] for i, d in enumerate(self.space.steps)]
        x = np.asarray(rows, dtype=np.float64).reshape(len(rows), 9)
        return _normalise(x, keep=(8,)).astype(np.float32)

    # ----------------------------------------------------------------- plans and budget
    def join(self, removed, counts) -> np.ndarray:
        return np.concatenate([np.asarray(removed, dtype=np.int64), np.asarray(counts, dtype=np.int64)])

    def split(self, k) -> Tuple[np.ndarray, np.ndarray]:
        k = np.asarray(k, dtype=np.int64)
        return k[:self.num_blocks].astype(bool), k[self.num_blocks:]

    def removed_cost(self, removed, counts) -> float:
        return self.total_cost - self.budget_cost.remaining(removed, counts)

    def achieved(self, k: Optional[np.ndarray] = None) -> float:
        """Fraction of the budget's cost the plan ``k`` removes."""
        removed, counts = self.split(k)
        return self.removed_cost(removed, counts) / self.total_cost

    def set_target(self, target: float) -> None:
        self.target = float(target)
        self.goal = self.target * self.total_cost

    def episode_budget(self, removed) -> _EpisodeBudget:
        """The channel budget once ``removed`` is decided (feasibility clipping and repair)."""
        return _EpisodeBudget(self.cost_model, self.budget_cost, removed, self.k_max)

    def block_options(self, removed, i: int) -> Tuple[bool, bool]:
        """``(may keep, may remove)`` block ``i``, blocks before it decided as in ``removed``, blocks
        after it undecided: removing must not overshoot the goal with no channel pruned; keeping
        must leave the goal reachable with every later block removed and every group at its maximum.
        When neither holds (coarse blocks), the one that ends closer to the goal is allowed."""
        removed = np.asarray(removed, dtype=bool).copy()
        removed[i:] = False
        with_i = removed.copy()
        with_i[i] = True
        least_if_removed = self.removed_cost(with_i, np.zeros(self.num_groups, dtype=np.int64))
        rest = removed.copy()
        rest[i + 1:] = True
        most_if_kept = self.removed_cost(rest, self.k_max)
        slack = 1e-9 * self.total_cost
        may_remove = least_if_removed <= self.goal + slack
        may_keep = most_if_kept >= self.goal - slack
        if not (may_keep or may_remove):
            if least_if_removed - self.goal <= self.goal - most_if_kept:
                may_remove = True
            else:
                may_keep = True
        return may_keep, may_remove

    def uniform_widths(self, removed) -> np.ndarray:
        """Counts that remove the same fraction of every remaining group and land on the budget
        (a bisection on the fraction, then the budget's repair)."""
        budget = self.episode_budget(removed)

        def counts(u):
            return np.minimum(np.array([g.effective(int(round(u * n)))
                                        for g, n in zip(self.structure.groups, self.n)], dtype=np.int64), budget.k_max)

        lo, hi = 0.0, 1.0
        if budget.removed(counts(hi)) <= self.goal:
            k = counts(hi)
        else:
            for _ in range(30):
                mid = 0.5 * (lo + hi)
                if budget.removed(counts(mid)) < self.goal:
                    lo = mid
                else:
                    hi = mid
            k_lo, k_hi = counts(lo), counts(hi)
            k = min((k_lo, k_hi), key=lambda kk: abs(budget.removed(kk) - self.goal))
        return budget.repair(k, self.goal)

    # ----------------------------------------------------------------- prior
    def prior_plan(self, method: str) -> np.ndarray:
        """The channel heuristic ``method``'s plan with no block removed (a prior of the search)."""
        removed = np.zeros(self.num_blocks, dtype=bool)
        return self.join(removed, self.space.channel.prior_plan(method, self.episode_budget(removed), self.goal))

    def set_prior(self, k: np.ndarray, method: Optional[str] = None) -> None:
        """Widths of the blocks' stage come from ``method`` (:meth:`base_widths`) instead of uniform."""
        self.prior_method = method

    @property
    def anchored(self) -> bool:
        """A prior is set: the shrink stage's widths are offsets around its widths (:meth:`anchored_unit_options`)."""
        return self.prior_method is not None

    def base_widths(self, removed) -> np.ndarray:
        """Counts for the groups once ``removed`` is decided: the prior's heuristic on the remaining
        budget (uniform when there is no prior)."""
        method = self.prior_method
        if method is None or method == "uniform":
            return self.uniform_widths(removed)
        return self.space.channel.prior_plan(method, self.episode_budget(removed), self.goal)

    def keep_first_removal(self) -> np.ndarray:
        """Blocks removed only where the budget needs it (keep whenever keeping stays feasible)."""
        removed = np.zeros(self.num_blocks, dtype=bool)
        for i in range(self.num_blocks):
            may_keep, _ = self.block_options(removed, i)
            removed[i] = not may_keep
        return removed

    def closest_plan(self) -> np.ndarray:
        """A plan as close to the budget as blocks and uniform widths reach (nothing evaluated):
        blocks removed only where needed (:meth:`keep_first_removal`); when that misses by more
        than the tolerance (a block worth several points of latency), the closest of the block
        sets that remove the m cheapest or the m costliest blocks, for every m."""
        removed = self.keep_first_removal()
        best = self.join(removed, self.uniform_widths(removed))
        miss = abs(self.achieved(best) - self.target)
        if miss <= self.tolerance:
            return best
        saving = np.array([self.removed_cost(np.eye(self.num_blocks, dtype=bool)[i], np.zeros(self.num_groups))
                           for i in range(self.num_blocks)])
        for order in (np.argsort(saving, kind="stable"), np.argsort(-saving, kind="stable")):
            for m in range(self.num_blocks + 1):
                removed = np.zeros(self.num_blocks, dtype=bool)
                removed[order[:m]] = True
                k = self.join(removed, self.uniform_widths(removed))
                off = abs(self.achieved(k) - self.target)
                if off < miss:
                    best, miss = k, off
        return best

    @property
    def existing_fraction(self) -> float:
        return self.achieved(np.zeros(self.num_steps, dtype=np.int64))

    @property
    def max_fraction(self) -> float:
        return self.achieved(self.join(np.ones(self.num_blocks, dtype=bool), self.k_max))

    # ----------------------------------------------------------------- scoring
    def apply(self, k: np.ndarray) -> None:
        """Mask the plan in place: blocks through the prune API, channels with the structure's masks."""
        self.scoring_key = None   # named again by whoever scores this plan: nothing keyed on a stale plan
        removed, counts = self.split(k)
        if not np.array_equal(removed, self._masked):
            # in-place channel zeros off first: (un)masking a block re-parametrises its tensors
            self.structure.restore()
            for i in np.nonzero(self._masked & ~removed)[0]:
                unmask_block(self.blocks[i])
                self._masked[i] = False
            for i in np.nonzero(removed & ~self._masked)[0]:
                mask_block(self.blocks[i])
                self._masked[i] = True
        self.structure.set_counts(np.where(self.cost_model.inactive_groups(removed), 0, counts))

    def evaluate(self, k: np.ndarray, full: bool = False) -> float:
        """Score a plan; identical plans (same blocks, same counts) are scored once (``full``: see
        :meth:`LayerwisePruningEnv.evaluate`)."""
        removed, counts = self.split(k)
        counts = np.where(self.cost_model.inactive_groups(removed), 0, self.cost_model.effective(counts))
        return self._score_plan(tuple(int(v) for v in self.join(removed, counts)), full=full)

    def score_as_returned(self, k: np.ndarray) -> Optional[float]:
        """The plan's score as :func:`rl_prune` returns it (``None``: this search does not refit):
        least-squares refitted, unless the refit scores lower than the plan without it, which
        :func:`~torch_rlprune.rewards.repair.keep_or_undo` undoes (judged here on the search part).
        The refit restores narrowed layers, not removed blocks, so a search scores block removal too
        high against narrowing; this tells the two apart. Several seconds a plan (a refit): for a
        choice between architectures, not for every episode."""
        if self.returned_score is None:
            return None
        searched = self.evaluate(k, full=True)
        self.restore()   # the plan is applied for good and undone; the search's in-place masks must be off
        refitted = float(self.scoring(lambda: self.returned_score(np.asarray(k, dtype=np.int64))))
        returned = refitted if refit_kept(refitted, searched) else searched
        self.returned_scores.append({"removed_blocks": self.space.removed_names(self.split(k)[0]),
                                     "search_score": searched, "refit_score": refitted, "returned_score": returned})
        return returned

    def on_target(self, k: np.ndarray) -> bool:
        """Whether plan ``k`` lands within ``tolerance`` of the target: only such a plan can be the result."""
        return abs(self.target - self.achieved(k)) <= self.tolerance

    def choose_architecture(self, removed) -> None:
        """Record which of the architectures scored as returned the search goes on with (``chosen`` in
        :attr:`returned_scores`); when that is not the best plan's so far, only plans of it can be the
        result from here on (:meth:`keep_results_of`)."""
        names = self.space.removed_names(np.asarray(removed, dtype=bool))
        for record in self.returned_scores:
            record["chosen"] = record["removed_blocks"] == names
        if self.best_k is not None and not np.array_equal(self.split(self.best_k)[0], removed):
            self.keep_results_of(removed)

    def keep_results_of(self, removed) -> None:
        """From here on only plans removing exactly the blocks ``removed`` can be the result: the
        best plan and its runners-up are chosen again among the plans of that architecture scored
        so far (an agent that found another architecture better once refitted)."""
        self.results_of = np.asarray(removed, dtype=bool).copy()
        key = self._best_key()
        self.best_by_target[key], self.top_by_target[key] = BestPlan(), []
        for plan, score in list(self._cache.items()):
            k = np.array(plan, dtype=np.int64)
            if self.on_target(k):
                self._offer(self.reward_of(score, k), score, k)

    def _offer(self, reward: float, score: float, k: np.ndarray) -> None:
        if self.results_of is None or np.array_equal(self.split(k)[0], self.results_of):
            super()._offer(reward, score, k)

    def restore(self) -> None:
        """Every tensor back exactly as before the search: channel zeros first, then block masks."""
        self.scoring_key = None
        self.structure.restore()
        for i in np.nonzero(self._masked)[0]:
            unmask_block(self.blocks[i])
        self._masked[:] = False

    # ----------------------------------------------------------------- results
    def reward(self, score: float, compression: float) -> float:
        if self.episode_reward is None:
            return float(score)
        return float(self.episode_reward(score, self.baseline_score, compression))

    def unit_options(self, budget: "_EpisodeBudget", t: int, keep_scales: Sequence[float]) -> np.ndarray:
        """Units of group ``t`` removed when it keeps each of ``keep_scales`` of its units: counts the
        group can take (a head group removes whole heads), at most what ``budget`` allows it."""
        group, n = self.structure.groups[t], int(self.n[t])
        most = int(budget.k_max[t])
        return np.array([min(group.effective(int(round((1.0 - s) * n))), most) for s in keep_scales], dtype=np.int64)

    def reward_of(self, score: float, k: np.ndarray) -> float:
        return self.reward(score, self.achieved(k))

    def anchored_unit_options(self, budget: "_EpisodeBudget", t: int, base: np.ndarray,
                              actions: Sequence[float]) -> np.ndarray:
        """Units of group ``t`` removed for each anchored action around ``base[t]`` (the units the prior's
        heuristic removes from it once the blocks are decided, :meth:`base_widths`): action 0.5 asks for
        that count, 0 and 1 for its fraction moved by ``PRIOR_SPREAD`` logits (:func:`anchored_amount`),
        as the layer-wise agents' actions; counts the group can take, at most what ``budget`` allows."""
        group, n = self.structure.groups[t], int(self.n[t])
        most, prior = int(budget.k_max[t]), float(base[t]) / max(1, n)
        return np.array([min(group.effective(int(round(anchored_amount(a, prior, PRIOR_SPREAD) * n))), most)
                         for a in actions], dtype=np.int64)

    def finish(self, removed, counts, repair: bool = True) -> EpisodeRecord:
        """End an episode: repair the counts onto the budget, score (cached), reward, record.
        Only plans within ``tolerance`` of the target can become the result."""
        removed = np.asarray(removed, dtype=bool)
        counts = np.where(self.cost_model.inactive_groups(removed), 0, np.asarray(counts, dtype=np.int64))
        if repair:
            counts = self.episode_budget(removed).repair(counts, self.goal)
        counts = np.where(self.cost_model.inactive_groups(removed), 0, self.cost_model.effective(counts))
        k = self.join(removed, counts)
        score = self.evaluate(k)
        achieved = self.achieved(k)
        reward = self.reward(score, achieved)
        violation = self.target - achieved
        if abs(violation) <= self.tolerance:
            self._offer(reward, score, k)
        now = time.perf_counter()
        record = EpisodeRecord(len(self.history), reward, score, achieved, self.best_reward, self.phase,
                               now - self._started, removed.astype(float).tolist() + (counts / self.n).tolist(),
                               self.target, violation, self.evaluations)
        self._started = now
        self.history.append(record)
        for callback in self.callbacks:
            callback(record)
        return record

    def reset(self) -> None:
        """Start the clock of a new episode (its ``seconds`` in the history)."""
        self._started = time.perf_counter()

    def finalize(self) -> None:
        """Make sure the search has a plan: the closest one when no episode landed on the budget."""
        if self.best_k is None:
            k = self.closest_plan()
            score = self.evaluate(k)
            best = self._best
            best.reward, best.score, best.k = self.reward_of(score, k), score, k


def _normalise(x: np.ndarray, keep=()) -> np.ndarray:
    """Min-max per column, except the columns in ``keep`` (already fractions)."""
    if not len(x):
        return x
    lo, span = x.min(0), x.max(0) - x.min(0)
    out = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1), 0.0)
    for j in keep:
        out[:, j] = x[:, j]
    return out
