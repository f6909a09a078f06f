"""The pruning MDP shared by every agent (AMC's layer-by-layer formulation).

One episode walks the prunable layers in execution order. At step ``t`` the agent sees
a state embedding of layer ``t`` and answers an amount in [0, 1] (the fraction of the
layer's weights to remove). The environment clips the amount into the range from which
the remaining layers can still land on the budget (AMC's action clipping, made two-sided
so that the budget is met *exactly*, not just at least), records it, and at the end of
the episode scores the masked model once. The environment never knows which algorithm
is deciding; agents never touch a module.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..structure.costs import budget_measure
from ..structure.masks import InPlaceMask
from ..structure.tensors import PrunableTensor
from ..threads import intra_op_threads
from .budget import AdditiveBudget, Budget

__all__ = ["LayerwisePruningEnv", "EpisodeRecord", "STATE_FEATURES", "ANCHORED_STATE_FEATURES",
           "CONSTRAINTS", "anchored_amount", "anchored_action", "PRIOR_SPREAD"]

# "clip": AMC's clipping keeps every episode on budget. "free": the agent sees the violation and learns
# the budget (CRL's Lagrangian); only plans projected onto the budget are results.
CONSTRAINTS = ("clip", "free")

# AMC (He et al. 2018, Sec. 3.2) embeds layer t as (t, n, c, h, w, stride, k, FLOPs[t], reduced, rest,
# a_{t-1}); ours adds the layer type and folds h*w into "positions" (1-D convs, token-wise Linears have no h, w).
STATE_FEATURES = ("index", "kind", "in_channels", "out_channels", "in_positions", "stride",
                  "kernel_size", "params", "macs", "reduced", "rest", "previous_amount")
# Anchored to a prior, the state also holds the prior's amount for the layer. Only then: an input
# that is always 0 changes nothing but the networks' random initialisation, and AMC's DDPG is that
# sensitive to it (measured: with a 13th, constant input, 3 of 6 seeds collapsed to a saturated
# actor on the test CNN, against 0 of 6 with AMC's 12).
ANCHORED_STATE_FEATURES = STATE_FEATURES + ("prior_amount",)

PRIOR_SPREAD = 1.0
"""Half-width, in logits, of the amounts an anchored action reaches around the prior's amount
(action 0 -> logit(prior) - spread, 0.5 -> the prior, 1 -> logit(prior) + spread): a layer the
prior prunes 90% can go from 77% to 96%. Chosen on an earlier model, where 2 logits did worse; re-run on
the seeded one (benchmarks/ablation.py), 0.5 and 2 logits are within noise of 1 (+0.2 pp at most)."""
_PRIOR_EPS = 1e-4  # priors of exactly 0 or 1 have no logit


def _logit(p: float) -> float:
    p = min(max(float(p), _PRIOR_EPS), 1.0 - _PRIOR_EPS)
    return math.log(p / (1.0 - p))


def anchored_amount(action: float, prior: float, spread: float = PRIOR_SPREAD) -> float:
    """The amount an action in [0, 1] stands for around ``prior``: ``sigmoid(logit(prior) +
    spread * (2 * action - 1))``; action 0.5 is the prior's amount itself."""
    z = _logit(prior) + spread * (2.0 * float(action) - 1.0)
    return 1.0 / (1.0 + math.exp(-z))


def anchored_action(amount: float, prior: float, spread: float = PRIOR_SPREAD) -> float:
    """Inverse of :func:`anchored_amount`, clipped to [0, 1]."""
    if spread <= 0:
        return 0.5
    return min(max(0.5 + (_logit(amount) - _logit(prior)) / (2.0 * spread), 0.0), 1.0)


@dataclass
class EpisodeRecord:
    """What one episode did and scored."""

    episode: int
    reward: float
    score: float             # a free plan near the budget: its projection's (``_score_free_plan``)
    sparsity: float          # fraction of the budget's cost removed
    best_reward: float
    phase: str
    seconds: float
    amounts: List[float] = field(repr=False, default_factory=list)
    target: Optional[float] = None
    violation: float = 0.0   # target minus sparsity: > 0 removed too little (always ~0 when clipped)
    evaluations: int = 0     # plans scored so far, over the whole search

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in
                ("episode", "reward", "score", "sparsity", "best_reward", "phase", "seconds", "target",
                 "violation", "evaluations", "amounts")}


@dataclass
class BestPlan:
    reward: float = -math.inf
    score: float = math.nan
    k: Optional[np.ndarray] = None


class BestPlanResults:
    """The best plan of the current target (``_best_key()``), read from ``best_by_target``, and its
    runners-up (``top_by_target``, the ``keep_top`` best distinct plans, best first): what
    ``rl_prune`` reads back from any environment, and what held-out selection re-scores."""

    best_by_target: Dict[Optional[float], BestPlan]
    keep_top: int = 1

    @property
    def top_by_target(self) -> Dict[Optional[float], List[BestPlan]]:
        if not hasattr(self, "_top_by_target"):
            self._top_by_target = {}
        return self._top_by_target

    @top_by_target.setter
    def top_by_target(self, value) -> None:
        self._top_by_target = value

    @property
    def estimated_keys(self) -> set:
        """Plans whose cached score is a screening estimate, not a measurement (``screening``)."""
        if not hasattr(self, "_estimated_keys"):
            self._estimated_keys = set()
        return self._estimated_keys

    screening = None
    """An optional two-stage scorer (:class:`~torch_rlprune.rewards.screening.Screening`), set by
    whoever builds the environment: plans that cannot become results get an estimate."""
    prefix_cache = None
    """An optional :class:`~torch_rlprune.structure.prefix_cache.PrefixCache`, set by whoever builds
    the environment: scoring forwards replay the activations a plan shares with the plans before it
    (exact: the same scores, sooner)."""
    scoring_seconds = 0.0
    """Seconds spent scoring plans (both stages, the held-out choice): the rest of a search is the
    agent's and the environment's own work."""

    def reward_of(self, score: float, k: np.ndarray) -> float:
        """The reward of a plan on the current target's budget that scored ``score``: what an episode
        ending on ``k`` would be rewarded, so a plan scored outside an episode (a prior) ranks among
        the search's plans on the same scale."""
        return float(score)

    def plan_to_beat(self) -> Optional[Tuple[Tuple[int, ...], float]]:
        """``(plan, reward)`` a new plan of the current target is screened against (``screening``):
        None while fewer than ``keep_top`` plans are kept (anything may become a result), then the
        best. Against the best, not the last kept: a search that has filled its runners-up needs a
        new plan only if it may be the best, and a search that has converged proposes many plans
        that may beat its fifth best but few that may beat its best (measured on AMC,
        benchmarks/search_cost.py)."""
        top = self.top_by_target.get(self._best_key(), [])
        if len(top) < max(1, self.keep_top):
            return None
        return tuple(int(v) for v in top[0].k), float(top[0].reward)

    def _offer(self, reward: float, score: float, k: np.ndarray) -> None:
        """A candidate result of the current target: the best if it beats it, and one of the top
        ``keep_top`` (distinct plans) if it beats the last of them. A plan whose score is a
        screening estimate is no candidate: kept out as unlikely to beat the best, it may still
        look better than the last runner-up, and the held-out choice would then compare (and
        report) a score nobody measured."""
        key = tuple(int(v) for v in k)
        if key in self.estimated_keys:
            return
        best = self._best
        if reward > best.reward:
            best.reward, best.score, best.k = reward, score, np.array(k, dtype=np.int64)
        top = self.top_by_target.setdefault(self._best_key(), [])
        if any(tuple(int(v) for v in p.k) == key for p in top):
            return
        if len(top) < self.keep_top or reward > top[-1].reward:
            top.append(BestPlan(reward, score, np.array(k, dtype=np.int64)))
            top.sort(key=lambda p: -p.reward)  # stable: earlier plans first among equals
            del top[max(1, self.keep_top):]

    def measure(self, k: np.ndarray, score_fn: Callable[[], float]) -> float:
        """Score plan ``k`` with another function (held-out selection), outside the cache and the
        count of plans scored, on the caller's threads, RNG-neutral as any scoring."""
        return float(self.on_plan(k, score_fn))

    def on_plan(self, k: np.ndarray, fn: Callable):
        """``fn()`` with plan ``k`` applied, as :meth:`measure` scores, whatever ``fn`` returns."""
        self.apply(np.asarray(k, dtype=np.int64))
        self.scoring_key = tuple(int(v) for v in k)
        return self.scoring(fn)

    def scoring(self, score_fn: Callable):
        """``score_fn()`` on the caller's threads, RNG-neutral, its seconds counted: a resumed search
        skips the scoring of plans it has on record, so anything random in a forward must not shift
        what the agent draws afterwards."""
        started = time.perf_counter()
        replaying = self.prefix_cache.active() if self.prefix_cache is not None else contextlib.nullcontext()
        try:
            with intra_op_threads(self.scoring_threads), torch.random.fork_rng(devices=[]), replaying:
                return score_fn()
        finally:
            self.scoring_seconds += time.perf_counter() - started

    def _best_key(self) -> Optional[float]:
        return self.target

    @property
    def _best(self) -> BestPlan:
        return self.best_by_target.setdefault(self._best_key(), BestPlan())

    @property
    def best_reward(self) -> float:
        return self._best.reward

    @property
    def best_score(self) -> float:
        return self._best.score

    @property
    def best_k(self) -> Optional[np.ndarray]:
        return self._best.k

    def _score_plan(self, key: Tuple[int, ...], shaping: bool = False, full: bool = False) -> float:
        """The score of plan ``key``: from this search's cache, from the record of the search
        being resumed (``replay``, see :mod:`torch_rlprune.search.checkpoint`), or measured.
        ``shaping``: the score only shapes a reward (an estimate will do, see ``screening``); a
        plan whose cached score is an estimate is scored again when it may become a result.
        ``full``: the plan is a result whatever the plan to beat (chosen after the search): never
        screened out."""
        if key not in self._cache or (key in self.estimated_keys and not shaping):
            if key in self.replay:
                self._cache[key] = self.replay.pop(key)
                self.replayed_keys.add(key)
            else:
                self._cache[key], measured = self._measure(key, shaping, full)
                (self.estimated_keys.discard if measured else self.estimated_keys.add)(key)
            self.evaluations += 1
        return self._cache[key]

    def remeasure(self, key: Tuple[int, ...]) -> float:
        """Measure plan ``key`` now, in full, whatever the cache or a record says."""
        return self.measure(key, self._full_score(key))

    def _full_score(self, key: Tuple[int, ...]) -> Callable[[], float]:
        def score() -> float:
            self.scoring_key = key
            return self.score_fn()
        return score

    def _measure(self, key: Tuple[int, ...], shaping: bool, full: bool = False) -> Tuple[float, bool]:
        """``(score, measured)``: the full score, or the screening's (an estimate when ``measured``
        is False); ``full``: nothing to beat, so screening scores it in full."""
        if self.screening is None:
            return self.remeasure(key), True
        bar = None if shaping or full else self.plan_to_beat()
        self.apply(key)
        self.scoring_key = key
        return self.scoring(lambda: self.screening.score(key, bar, self._full_score(key), self.apply, shaping))


class LayerwisePruningEnv(BestPlanResults):
    """Layer-by-layer pruning MDP over in-place masks.

    Args:
        layers: prunable tensors in execution order.
        masks: one :class:`InPlaceMask` per layer, same order.
        score_fn: scores the model as currently masked (higher is better).
        target: fraction of the budget's total cost to remove, in (0, 1).
        budget: a registered budget (:mod:`~torch_rlprune.structure.costs`): ``"params"`` (each
            weight costs 1), ``"macs"`` (each weight costs the multiply-accumulates it takes part in
            per sample), ...; one weights carry none of (``"latency"``) needs ``cost``, e.g. a
            :class:`~torch_rlprune.env.channel_steps.LatencyBudget` over channel groups.
        max_amount: the largest fraction of any single layer that may be removed; keeps
            every layer alive (a fully pruned layer cuts the network).
        score_floor: accuracy-guaranteed mode (AMC's second strategy): ``target`` is ignored,
            the reward is AMC's ``-(1 - score) * log(remaining cost)`` and the best plan is the
            smallest one whose score stays at or above ``score_floor``.

    What an agent may switch (attributes, set before ``reset``):
        ``constraint``: ``"clip"`` (default) or ``"free"``, see :data:`CONSTRAINTS`.
        ``dense``: every step returns the change in score its layer caused (the score of the
            plan decided so far, later layers unpruned, minus the one before); the rewards of
            an episode add up to its final score minus the unpruned score, so the dense reward
            shapes without changing which plan is best (potential-based shaping, Ng et al. 1999).
        ``set_target(t)``: the budget of the next episodes (conditional search over targets).
    """

    def __init__(self, layers: Sequence[PrunableTensor], masks: Sequence[InPlaceMask],
                 score_fn: Callable[[], float], target: float, budget: str = "params",
                 max_amount: float = 0.98, cost: Optional[Budget] = None,
                 score_floor: Optional[float] = None):
        per_weight = budget_measure(budget).per_weight
        if per_weight is None and cost is None:
            raise ValueError(f"budget={budget!r} needs cost= (e.g. a LatencyBudget over channel groups): weights "
                             f"carry no {budget} of their own")
        self.layers = list(layers)
        self.masks = list(masks)
        self.score_fn = score_fn
        self.scoring_threads = torch.get_num_threads()  # the caller's; agents run on one (threads.py)
        self.target = float(target)
        self.budget = budget
        self.n = np.array([m.numel for m in self.masks], dtype=np.int64)
        if cost is None:
            k_min = [m.k_min for m in self.masks]
            cost = AdditiveBudget(self.n, [per_weight(layer) for layer in self.layers],
                                  k_min, np.maximum(k_min, np.floor(max_amount * self.n).astype(np.int64)))
        self.cost = cost
        self.k_min, self.k_max = cost.k_min, cost.k_max
        self.total_cost = cost.total
        self.goal = self.target * self.total_cost
        self._static = self._static_features()
        self.history: List[EpisodeRecord] = []
        self.score_floor = score_floor
        self.constraint = "free" if score_floor is not None else "clip"
        self.dense = False
        self.feasibility_slack = 0.02
        """A free plan this close to the budget (fraction of the total cost) is projected onto
        it and scored as a candidate result."""
        self.best_by_target: Dict[Optional[float], BestPlan] = {}
        self.priors: Dict[Optional[float], np.ndarray] = {}
        """Per target, the prior plan the actions are anchored to (:meth:`set_prior`)."""
        self.prior_spread = PRIOR_SPREAD
        self.phase = "search"
        self.callbacks: List[Callable[[EpisodeRecord], None]] = []
        self._cache: Dict[Tuple[int, ...], float] = {}
        self.replay: Dict[Tuple[int, ...], float] = {}
        self.replayed_keys: set = set()   # plans whose score came from the record (checked on resume)
        self.scoring_key: Optional[Tuple[int, ...]] = None  # the plan being scored (distributed scoring reads it)
        self.evaluations = 0
        self.reset()

    def use_cost(self, cost: Budget) -> None:
        """Budget with ``cost`` from now on (rank 0's latency timings under torch.distributed), before
        any episode: the totals, the goal and the state features follow it."""
        self.cost, self.k_min, self.k_max, self.total_cost = cost, cost.k_min, cost.k_max, cost.total
        self.goal = self.target * self.total_cost
        self._static = self._static_features()
        self.reset()

    # ----------------------------------------------------------------- results
    def _best_key(self) -> Optional[float]:
        return None if self.score_floor is not None else self.target

    def set_target(self, target: float) -> None:
        """Change the budget for the next episodes (their best plans are kept per target)."""
        if self.t not in (0, self.num_steps):
            raise RuntimeError("set_target() between episodes only")
        self.target = float(target)
        self.goal = self.target * self.total_cost
        self.reset()

    # ----------------------------------------------------------------- prior
    def set_prior(self, k: Optional[np.ndarray], method: Optional[str] = None) -> None:
        """Anchor the actions of the current target to plan ``k`` (``None``: absolute amounts).
        Anchored, an action a in [0, 1] asks for :func:`anchored_amount` ``(a, k_t / n_t)``: 0.5
        everywhere replays ``k`` (which must meet the budget), so every agent starts from it.
        ``method`` names the heuristic that made it (for the record)."""
        if k is None:
            self.priors.pop(self.target, None)
            return
        k = np.asarray(k, dtype=np.int64)
        if k.shape != self.n.shape or (k < self.k_min).any() or (k > self.k_max).any():
            raise ValueError("set_prior: the plan does not fit the steps' ranges")
        self.priors[self.target] = k.copy()

    @property
    def prior_k(self) -> Optional[np.ndarray]:
        """The prior plan of the current target, or None."""
        return self.priors.get(self.target)

    @property
    def anchored(self) -> bool:
        """Actions are offsets around the prior (see :meth:`set_prior`)."""
        return self.prior_k is not None

    def _prior_fraction(self, t: int) -> float:
        return float(self.prior_k[t]) / float(self.n[t])

    def amount_for(self, action: float) -> float:
        """The fraction of the current step an action asks for (before the budget's clipping)."""
        action = float(np.clip(np.nan_to_num(action, nan=0.5 if self.anchored else 0.0), 0.0, 1.0))
        if not self.anchored:
            return action
        return anchored_amount(action, self._prior_fraction(self.t), self.prior_spread)

    # ----------------------------------------------------------------- feasibility
    @property
    def existing_fraction(self) -> float:
        return self.cost.removed(self.k_min) / self.total_cost

    @property
    def max_fraction(self) -> float:
        return self.cost.removed(self.k_max) / self.total_cost

    @property
    def num_steps(self) -> int:
        return len(self.layers)

    @property
    def observation_dim(self) -> int:
        return len(ANCHORED_STATE_FEATURES if self.priors else STATE_FEATURES)

    def _k_bounds(self, t: int) -> Tuple[int, int]:
        """Integer range for step t that keeps the budget reachable by the steps after it
        (with ``constraint="free"``: the layer's whole range)."""
        if self.constraint == "free":
            return int(self.k_min[t]), int(self.k_max[t])
        return self.cost.bounds(self.k, t, self.goal)

    def action_bounds(self) -> Tuple[float, float]:
        """The actions the current layer may take: the fractions of the layer the budget allows,
        or (anchored to a prior) the actions that ask for them."""
        lo, hi = self._k_bounds(self.t)
        lo, hi = lo / self.n[self.t], hi / self.n[self.t]
        if not self.anchored:
            return lo, hi
        prior = self._prior_fraction(self.t)
        return (anchored_action(lo, prior, self.prior_spread) if lo > 0 else 0.0,
                anchored_action(hi, prior, self.prior_spread) if hi < 1 else 1.0)

    # ----------------------------------------------------------------- state
    def _static_features(self) -> np.ndarray:
        rows = [[i, layer.kind_code, layer.in_channels, layer.out_channels, layer.in_positions,
                 layer.stride, layer.kernel_size, layer.numel, self.cost.step_cost[i]]
                for i, layer in enumerate(self.layers)]
        x = np.asarray(rows, dtype=np.float64)
        lo, span = x.min(0), x.max(0) - x.min(0)
        return np.where(span > 0, (x - lo) / np.where(span > 0, span, 1), 0.0)

    def _observation(self) -> np.ndarray:
        if self.t >= self.num_steps:
            return np.zeros(self.observation_dim, dtype=np.float32)
        decided = np.where(np.arange(self.num_steps) < self.t, self.k, self.k_min)
        reduced = self.cost.removed(decided) / self.total_cost
        rest = float(self.cost.step_cost[self.t + 1:].sum()) / self.total_cost
        features = [reduced, rest, self.previous_amount]
        if self.priors:
            features.append(self._prior_fraction(self.t) if self.anchored else 0.0)
        return np.concatenate([self._static[self.t], features]).astype(np.float32)

    # ----------------------------------------------------------------- episode
    def reset(self) -> np.ndarray:
        if self.constraint not in CONSTRAINTS:
            raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {self.constraint!r}")
        self.t = 0
        self.k = self.k_min.copy()
        self.previous_amount = 0.0
        self._started = time.perf_counter()
        self._last_partial_score = None
        return self._observation()

    def step(self, action: float) -> Tuple[np.ndarray, float, bool, dict]:
        """Set the current layer's amount from ``action`` (the fraction itself, or an offset around
        the prior's: :meth:`amount_for`), clipped to the feasible range; score at the end."""
        if self.t >= self.num_steps:
            raise RuntimeError("episode is over; call reset()")
        amount = self.amount_for(action)
        lo, hi = self._k_bounds(self.t)
        self.k[self.t] = min(max(int(round(amount * self.n[self.t])), lo), hi)
        self.previous_amount = self.k[self.t] / self.n[self.t]
        applied_action = (anchored_action(self.previous_amount, self._prior_fraction(self.t), self.prior_spread)
                          if self.anchored else self.previous_amount)
        self.t += 1
        done = self.t == self.num_steps
        # the action that asks for what was applied (after clipping): what produced the outcome
        info = {"amount": self.previous_amount, "action": applied_action}
        reward = 0.0
        if self.dense and self._last_partial_score is None:
            self._last_partial_score = self.estimate(self.k_min)
        if done:
            record = self._finish_episode()
            reward = record.score - self._last_partial_score if self.dense else record.reward
            info.update(record.as_dict())
        elif self.dense:
            partial = self.estimate(self.k)  # layers after t still unpruned
            reward, self._last_partial_score = partial - self._last_partial_score, partial
            info["partial_score"] = partial
        return self._observation(), reward, done, info

    def achieved(self, k: Optional[np.ndarray] = None) -> float:
        """Fraction of the budget's cost removed by ``k`` (default: the current episode)."""
        k = self.k if k is None else k
        return self.cost.removed(k) / self.total_cost

    @property
    def plan_width(self) -> int:
        """Entries of a plan: one count per layer."""
        return len(self.layers)

    def evaluate(self, k: np.ndarray, full: bool = False) -> float:
        """Score a plan (per-layer counts); identical plans are scored once. ``full``: a plan that
        becomes a result whatever it is measured at, so never a screening estimate."""
        return self._score_plan(tuple(int(v) for v in k), full=full)

    def estimate(self, k: np.ndarray) -> float:
        """Score a plan that only shapes a reward (never a result as it is): with ``screening``
        an estimate, otherwise :meth:`evaluate`."""
        return self._score_plan(tuple(int(v) for v in k), shaping=True)

    def apply(self, k) -> None:
        self.scoring_key = None   # named again by whoever scores this plan: nothing keyed on a stale plan
        for mask, kk in zip(self.masks, k):
            mask.set_k(int(kk))
        if self.prefix_cache is not None:
            self.prefix_cache.plan = tuple(int(kk) for kk in k)

    def _repair(self) -> None:
        """Spend the rounding left over by coarse steps on steps that can absorb it (the
        clipping treats the budget of the steps still to come as continuous)."""
        self.k = self.cost.repair(self.k, self.goal)

    def closest_plan(self) -> np.ndarray:
        """A plan as close to the budget as the clipping and repair reach (uniform actions,
        nothing evaluated): used to refuse targets no plan can meet before a search starts."""
        self.reset()
        while self.t < self.num_steps:
            lo, hi = self._k_bounds(self.t)
            self.k[self.t] = min(max(int(round(self.target * self.n[self.t])), lo), hi)
            self.t += 1
        self._repair()
        k = self.k.copy()
        self.reset()
        return k

    def project(self, k: np.ndarray) -> np.ndarray:
        """The on-budget plan nearest to ``k`` along its own amounts: ``k`` replayed through
        the clipping, then repaired (what ``constraint="clip"`` would have produced)."""
        saved = self.t, self.k, self.previous_amount, self.constraint
        try:
            self.constraint, self.k = "clip", self.k_min.copy()
            for t in range(self.num_steps):
                lo, hi = self.cost.bounds(self.k, t, self.goal)
                self.k[t] = min(max(int(k[t]), lo), hi)
            return self.cost.repair(self.k, self.goal)
        finally:
            self.t, self.k, self.previous_amount, self.constraint = saved

    def _score_free_plan(self, achieved: float) -> float:
        """A free plan's score: near the budget its projection's, a candidate result (scoring the plan
        too spent a second plan on one that can never be returned); off it, its own estimate."""
        if abs(self.target - achieved) > self.feasibility_slack:
            return self.estimate(self.k)
        projected = self.project(self.k)
        score = self.evaluate(projected)  # once: a screened-out plan would be screened again
        self._offer(score, score, projected)
        return score

    def _finish_episode(self) -> EpisodeRecord:
        if self.constraint == "clip":
            self._repair()
        free = self.constraint == "free" and self.score_floor is None
        achieved = self.achieved()
        score = self._score_free_plan(achieved) if free else self.evaluate(self.k)
        if self.score_floor is not None:
            # AMC's accuracy-guaranteed reward; the best plan is the smallest one above the floor.
            remaining = max(self.total_cost - self.cost.removed(self.k), 1.0)
            reward = -(1.0 - score) * math.log(remaining)
            violation = max(0.0, self.score_floor - score)
            if score >= self.score_floor:
                self._offer(achieved + 1e-9 * score, score, self.k)
        else:
            reward = score
            violation = self.target - achieved
            if not free:
                self._offer(reward, score, self.k)
        record = EpisodeRecord(len(self.history), reward, score, achieved, self.best_reward,
                               self.phase, time.perf_counter() - self._started,
                               (self.k / self.n).tolist(), None if self.score_floor is not None else self.target,
                               violation, self.evaluations)
        self.history.append(record)
        for callback in self.callbacks:
            callback(record)
        return record

    def finalize(self) -> None:
        """After a search: make sure every target searched (or the guarantee) has a plan.
        A free search that never came near the budget gets its least-violating plan
        projected; an accuracy-guaranteed search that never stayed above the floor gets the
        unpruned plan (``k_min``), which always does."""
        if self.score_floor is not None:
            if self.best_k is None:
                self._offer(self.achieved(self.k_min), self.evaluate(self.k_min), self.k_min)
            return
        for target in sorted({h.target for h in self.history if h.target is not None}):
            if self.best_by_target.get(target, BestPlan()).k is not None:
                continue
            self.set_target(target)
            last = min((h for h in self.history if h.target == target), key=lambda h: abs(h.violation))
            raw = np.array([int(round(a * n)) for a, n in zip(last.amounts, self.n)], dtype=np.int64)
            projected = self.project(raw)
            score = self.evaluate(projected, full=True)
            self._offer(score, score, projected)

    def restore(self) -> None:
        """Put every tensor back exactly as it was before the search (and free any stored prefix)."""
        self.scoring_key = None
        for mask in self.masks:
            mask.restore()
        if self.prefix_cache is not None:
            self.prefix_cache.plan = None
            self.prefix_cache.clear()

    def best_amounts(self) -> Dict[str, float]:
        if self.best_k is None:
            raise RuntimeError("no episode has finished")
        return {layer.name: int(k) / int(n) for layer, k, n in zip(self.layers, self.best_k, self.n)}
