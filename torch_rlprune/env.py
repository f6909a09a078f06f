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

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .budget import AdditiveBudget, Budget
from .masking import InPlaceMask
from .structure import PrunableTensor

__all__ = ["LayerwisePruningEnv", "EpisodeRecord", "BUDGETS", "STATE_FEATURES"]

BUDGETS = ("params", "macs")

# AMC (He et al. 2018, Sec. 3.2) embeds layer t as
# (t, n, c, h, w, stride, k, FLOPs[t], reduced, rest, a_{t-1}); we use the same with
# the layer type added and h*w folded into one "positions" entry (1-D convs and
# token-wise Linear layers have no h, w).
STATE_FEATURES = ("index", "kind", "in_channels", "out_channels", "in_positions", "stride",
                  "kernel_size", "params", "macs", "reduced", "rest", "previous_amount")


@dataclass
class EpisodeRecord:
    """What one episode did and scored."""

    episode: int
    reward: float
    score: float
    sparsity: float          # fraction of the budget's cost removed
    best_reward: float
    phase: str
    seconds: float
    amounts: List[float] = field(repr=False, default_factory=list)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in
                ("episode", "reward", "score", "sparsity", "best_reward", "phase", "seconds")}


class LayerwisePruningEnv:
    """Layer-by-layer pruning MDP over in-place masks.

    Args:
        layers: prunable tensors in execution order.
        masks: one :class:`InPlaceMask` per layer, same order.
        score_fn: scores the model as currently masked (higher is better).
        target: fraction of the budget's total cost to remove, in (0, 1).
        budget: ``"params"`` (each weight costs 1) or ``"macs"`` (each weight costs the
            multiply-accumulates it takes part in per sample).
        max_amount: the largest fraction of any single layer that may be removed; keeps
            every layer alive (a fully pruned layer cuts the network).
    """

    def __init__(self, layers: Sequence[PrunableTensor], masks: Sequence[InPlaceMask],
                 score_fn: Callable[[], float], target: float, budget: str = "params",
                 max_amount: float = 0.98, cost: Optional[Budget] = None):
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
        self.layers = list(layers)
        self.masks = list(masks)
        self.score_fn = score_fn
        self.target = float(target)
        self.budget = budget
        self.n = np.array([m.numel for m in self.masks], dtype=np.int64)
        if cost is None:
            k_min = [m.k_min for m in self.masks]
            cost = AdditiveBudget(self.n, [1 if budget == "params" else layer.macs_per_weight
                                           for layer in self.layers],
                                  k_min, np.maximum(k_min, np.floor(max_amount * self.n).astype(np.int64)))
        self.cost = cost
        self.k_min, self.k_max = cost.k_min, cost.k_max
        self.total_cost = cost.total
        self.goal = self.target * self.total_cost
        self._static = self._static_features()
        self.history: List[EpisodeRecord] = []
        self.best_reward = -math.inf
        self.best_k: Optional[np.ndarray] = None
        self.best_score = math.nan
        self.phase = "search"
        self.callbacks: List[Callable[[EpisodeRecord], None]] = []
        self._cache: Dict[Tuple[int, ...], float] = {}
        self.evaluations = 0
        self.reset()

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
        return len(STATE_FEATURES)

    def _k_bounds(self, t: int) -> Tuple[int, int]:
        """Integer range for step t that keeps the budget reachable by the steps after it."""
        return self.cost.bounds(self.k, t, self.goal)

    def action_bounds(self) -> Tuple[float, float]:
        """The amounts the current layer may take, as fractions of the layer."""
        lo, hi = self._k_bounds(self.t)
        return lo / self.n[self.t], hi / self.n[self.t]

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
        return np.concatenate([self._static[self.t], [reduced, rest, self.previous_amount]]).astype(np.float32)

    # ----------------------------------------------------------------- episode
    def reset(self) -> np.ndarray:
        self.t = 0
        self.k = self.k_min.copy()
        self.previous_amount = 0.0
        self._started = time.perf_counter()
        return self._observation()

    def step(self, amount: float) -> Tuple[np.ndarray, float, bool, dict]:
        """Set the current layer's amount (clipped to the feasible range); score at the end."""
        if self.t >= self.num_steps:
            raise RuntimeError("episode is over; call reset()")
        amount = float(np.clip(np.nan_to_num(amount, nan=0.0), 0.0, 1.0))
        lo, hi = self._k_bounds(self.t)
        self.k[self.t] = min(max(int(round(amount * self.n[self.t])), lo), hi)
        self.previous_amount = self.k[self.t] / self.n[self.t]
        self.t += 1
        done = self.t == self.num_steps
        info = {"amount": self.previous_amount}
        reward = 0.0
        if done:
            record = self._finish_episode()
            reward = record.reward
            info.update(record.as_dict())
        return self._observation(), reward, done, info

    def achieved(self, k: Optional[np.ndarray] = None) -> float:
        """Fraction of the budget's cost removed by ``k`` (default: the current episode)."""
        k = self.k if k is None else k
        return self.cost.removed(k) / self.total_cost

    def evaluate(self, k: np.ndarray) -> float:
        """Score a plan (per-layer counts); identical plans are scored once."""
        key = tuple(int(v) for v in k)
        if key not in self._cache:
            self.apply(k)
            self._cache[key] = float(self.score_fn())
            self.evaluations += 1
        return self._cache[key]

    def apply(self, k: np.ndarray) -> None:
        for mask, kk in zip(self.masks, k):
            mask.set_k(int(kk))

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

    def _finish_episode(self) -> EpisodeRecord:
        self._repair()
        score = self.evaluate(self.k)
        reward = score
        if reward > self.best_reward:
            self.best_reward, self.best_score, self.best_k = reward, score, self.k.copy()
        record = EpisodeRecord(len(self.history), reward, score, self.achieved(), self.best_reward,
                               self.phase, time.perf_counter() - self._started,
                               (self.k / self.n).tolist())
        self.history.append(record)
        for callback in self.callbacks:
            callback(record)
        return record

    def restore(self) -> None:
        """Put every tensor back exactly as it was before the search."""
        for mask in self.masks:
            mask.restore()

    def best_amounts(self) -> Dict[str, float]:
        if self.best_k is None:
            raise RuntimeError("no episode has finished")
        return {layer.name: int(k) / int(n) for layer, k, n in zip(self.layers, self.best_k, self.n)}
