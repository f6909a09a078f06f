"""Budget accounting for the pruning MDP: what a plan removes, and which actions keep the
budget reachable.

A plan is a vector ``k`` of units removed per step (weights of a tensor, channels of a
group). A budget knows the model's total cost (params or MACs) and how much a plan
removes; it is monotone: removing more units never removes less cost. From that alone it
derives AMC's action clipping and the end-of-episode repair, so every plan an agent
produces lands on the target.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

__all__ = ["Budget", "AdditiveBudget"]


class Budget:
    """Base class: subclasses set ``total``, ``k_min``, ``k_max``, ``step_cost`` and implement
    :meth:`removed`. ``step_cost[i]`` is the dense cost step ``i`` controls (a state feature)."""

    total: float
    k_min: np.ndarray
    k_max: np.ndarray
    step_cost: np.ndarray

    def removed(self, k: np.ndarray) -> float:
        raise NotImplementedError

    def _removed_with(self, k: np.ndarray, t: int, kt: int, rest: np.ndarray) -> float:
        trial = k.copy()
        trial[t] = kt
        trial[t + 1:] = rest[t + 1:]
        return self.removed(trial)

    def bounds(self, k: np.ndarray, t: int, goal: float) -> Tuple[int, int]:
        """Integer range for step ``t`` (steps before it decided in ``k``) from which the steps
        after it can still land on ``goal``: AMC's clipping, made two-sided."""
        lo_k, hi_k = int(self.k_min[t]), int(self.k_max[t])
        # lo: fewest units such that the rest, removing as much as they may, still reaches goal
        a, b = lo_k, hi_k
        if self._removed_with(k, t, b, self.k_max) < goal:
            a = b
        while a < b:
            mid = (a + b) // 2
            if self._removed_with(k, t, mid, self.k_max) >= goal:
                b = mid
            else:
                a = mid + 1
        lo = a
        # hi: most units such that the rest, removing as little as they may, stays within goal
        a, b = lo_k, hi_k
        if self._removed_with(k, t, a, self.k_min) > goal:
            b = a
        while a < b:
            mid = (a + b + 1) // 2
            if self._removed_with(k, t, mid, self.k_min) <= goal:
                a = mid
            else:
                b = mid - 1
        hi = a
        if lo > hi:  # no integer fits: the one whose middle-of-the-road completion is closest
            middle = (self.k_min + self.k_max) // 2
            candidates = range(max(hi - 1, lo_k), min(lo + 1, hi_k) + 1)
            lo = hi = min(candidates, key=lambda kt: abs(self._removed_with(k, t, kt, middle) - goal))
        return lo, hi

    def repair(self, k: np.ndarray, goal: float) -> np.ndarray:
        """Move ``k`` as close to ``goal`` as single-step changes allow, coarse steps first
        (so what is left is smaller than the finest step's unit)."""
        k = k.copy()
        unit = self.step_cost / np.maximum(self.k_max - self.k_min, 1)
        for j in np.argsort(-unit, kind="stable"):
            k[j], _ = self._closest_single(k, j, goal)
        if abs(self.removed(k) - goal) > self.pair_repair_above * self.total:
            k = self._pair_repair(k, goal)
        return k

    pair_repair_above = 0.005
    """Fraction of the total cost the single-step repair may leave before pairs are tried."""

    def _closest_single(self, k: np.ndarray, j: int, goal: float) -> Tuple[int, float]:
        """Best ``k[j]`` for ``goal`` with the other steps fixed (``k`` is left as it was)."""
        keep, best, best_gap = int(k[j]), int(k[j]), abs(self.removed(k) - goal)
        a, b = int(self.k_min[j]), int(self.k_max[j])
        while a <= b:
            mid = (a + b) // 2
            k[j] = mid
            value = self.removed(k)
            if abs(value - goal) < best_gap:
                best, best_gap = mid, abs(value - goal)
            if value < goal:
                a = mid + 1
            elif value > goal:
                b = mid - 1
            else:
                break
        k[j] = keep
        return best, best_gap

    def _pair_repair(self, k: np.ndarray, goal: float, reach: int = 3) -> np.ndarray:
        """Coarse, coupled steps (channel groups whose MACs depend on their neighbours) can leave
        a plan no single-step change brings close: [1, 8] -> [0, 10] moves two steps at once.
        Try every small shift of one coarse step with the best value of each other step."""
        k = k.copy()
        best_k, best_gap = k.copy(), abs(self.removed(k) - goal)
        unit = self.step_cost / np.maximum(self.k_max - self.k_min, 1)
        coarse = np.argsort(-unit, kind="stable")[:8]
        for i in coarse:
            for ki in range(max(int(self.k_min[i]), int(k[i]) - reach), min(int(self.k_max[i]), int(k[i]) + reach) + 1):
                trial = k.copy()
                trial[i] = ki
                for j in range(len(k)):
                    if j == i:
                        continue
                    kj, gap = self._closest_single(trial, j, goal)
                    if gap < best_gap:
                        best_gap = gap
                        best_k = trial.copy()
                        best_k[j] = kj
        return best_k


class AdditiveBudget(Budget):
    """Costs that add up over steps: each removed unit of step ``i`` removes ``unit_cost[i]``
    (unstructured weights: 1 param, or the MACs the weight takes part in). Closed forms
    replace the base class's searches."""

    def __init__(self, numel: Sequence[int], unit_cost: Sequence[float], k_min: Sequence[int],
                 k_max: Sequence[int]):
        self.numel = np.asarray(numel, dtype=np.int64)
        self.unit_cost = np.asarray(unit_cost, dtype=np.float64)
        self.k_min = np.asarray(k_min, dtype=np.int64)
        self.k_max = np.maximum(self.k_min, np.asarray(k_max, dtype=np.int64))
        self.step_cost = self.numel * self.unit_cost
        self.total = float(self.step_cost.sum())
        # Suffix sums: the least and most the steps after t can still remove.
        self._rest_min = np.concatenate([np.cumsum((self.k_min * self.unit_cost)[::-1])[::-1][1:], [0.0]])
        self._rest_max = np.concatenate([np.cumsum((self.k_max * self.unit_cost)[::-1])[::-1][1:], [0.0]])

    def removed(self, k: np.ndarray) -> float:
        return float((np.asarray(k) * self.unit_cost).sum())

    def bounds(self, k: np.ndarray, t: int, goal: float) -> Tuple[int, int]:
        left = goal - float((k[:t] * self.unit_cost[:t]).sum())
        c = self.unit_cost[t]
        lo = math.ceil((left - self._rest_max[t]) / c - 1e-9)
        hi = math.floor((left - self._rest_min[t]) / c + 1e-9)
        lo, hi = max(lo, self.k_min[t]), min(hi, self.k_max[t])
        if lo > hi:  # no integer fits (last steps, rounding): the closest to the goal
            closest = int(round((left - 0.5 * (self._rest_min[t] + self._rest_max[t])) / c))
            lo = hi = int(min(max(closest, self.k_min[t]), self.k_max[t]))
        return int(lo), int(hi)

    def repair(self, k: np.ndarray, goal: float) -> np.ndarray:
        # Coarse layers first: each takes the whole multiples of its unit the residual holds,
        # so what is left is below half the finest unit.
        k = k.copy()
        residual = goal - self.removed(k)
        for j in np.argsort(-self.unit_cost, kind="stable"):
            step = int(round(residual / self.unit_cost[j]))
            if step:
                new = int(min(max(k[j] + step, self.k_min[j]), self.k_max[j]))
                residual -= (new - k[j]) * self.unit_cost[j]
                k[j] = new
        return k
