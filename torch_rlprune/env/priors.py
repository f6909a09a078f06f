"""One-shot heuristics: how much of each layer the cheap methods remove.

They are the bar every search has to beat and the plan every search starts from
(``rl_prune(prior=...)``): the environment scores the prior's plan first and the agents act
relative to it (:mod:`torch_rlprune.env.layerwise`), so no search can return a plan it scored worse.

* **global magnitude** (``prune.global_unstructured(..., L1Unstructured)``): one threshold on
  |w| over every layer;
* **LAMP** (Lee et al., ICLR 2021): the score of weight u is ``w_u^2 / sum of w_v^2`` over the
  weights v of the same layer with ``|w_v| >= |w_u|``, one threshold over all layers; no
  hyper-parameters, and it never empties a layer (the largest weight of each scores 1);
* **uniform**: the same fraction of every layer (``prune.l1_unstructured`` on each);
* for channel groups: **uniform** (the same fraction of every group) and **global** (one
  threshold on the groups' per-unit importance, which is mean-normalised per group, as
  torch-pruning's global pruning does).

Every allocation here lands on any budget (params, MACs, latency): a threshold is bisected until
the plan removes the goal, then the budget's own repair spends what rounding left over. The
functional twins at the bottom apply the unstructured heuristics through
``torch.nn.utils.prune`` directly, in the style of ``prune.global_unstructured``.
"""
from __future__ import annotations

import numbers
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from .budget import Budget

__all__ = ["PRIOR_CHOICES", "lamp_scores", "sorted_lamp_scores", "threshold_allocation",
           "uniform_allocation", "lamp_unstructured", "global_magnitude_unstructured", "uniform_unstructured"]

PRIOR_CHOICES = ("best", "lamp", "global", "uniform", "none")
"""What ``rl_prune(prior=...)`` takes: ``"best"`` scores the structure's candidates (LAMP and global
magnitude for weights, global and uniform for channels) and keeps the better one; which heuristics
each structure offers is registered with its search space (``SpaceKind.priors`` / ``best_of`` in
:mod:`torch_rlprune.env.spaces`)."""


# --------------------------------------------------------------------------- scores
def sorted_lamp_scores(sorted_magnitudes: np.ndarray) -> np.ndarray:
    """LAMP scores of a layer whose |weights| are given in ascending order (same order out).

    ``score_i = w_i^2 / sum_{j >= i} w_j^2``: ascending magnitudes give ascending scores, so
    a threshold on the scores removes a prefix of the layer's magnitude order. Entries at
    ``-inf`` (already removed by an existing mask) stay ``-inf``.
    """
    values = np.asarray(sorted_magnitudes, dtype=np.float64)
    alive = np.isfinite(values)
    squares = np.where(alive, values, 0.0) ** 2
    suffix = np.cumsum(squares[::-1])[::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.where(suffix > 0, squares / np.where(suffix > 0, suffix, 1.0), 0.0)
    return np.where(alive, scores, -np.inf)


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP score of every entry of ``weight`` (same shape): the importance whose one global
    threshold is LAMP."""
    flat = weight.detach().abs().double().reshape(-1)
    order = torch.argsort(flat, stable=True)
    ranked = torch.from_numpy(sorted_lamp_scores(flat[order].cpu().numpy()))
    scores = torch.empty_like(flat, device="cpu")
    scores[order.cpu()] = ranked
    return scores.reshape(weight.shape).to(weight.device, torch.float32)


# --------------------------------------------------------------------------- allocations on a budget
def _closest(budget: Budget, goal: float, plans: Sequence[np.ndarray]) -> np.ndarray:
    return min(plans, key=lambda k: abs(budget.removed(k) - goal))


def _bisect(counts_at: Callable[[float], np.ndarray], budget: Budget, goal: float, lo: float, hi: float,
            iterations: int) -> np.ndarray:
    """The plan of the smallest parameter in [lo, hi] whose plan removes at least ``goal``
    (``counts_at`` is monotone), compared with the one just below it, then repaired."""
    if budget.removed(counts_at(hi)) < goal:
        return budget.repair(counts_at(hi), goal)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if budget.removed(counts_at(mid)) >= goal:
            hi = mid
        else:
            lo = mid
    return budget.repair(_closest(budget, goal, [counts_at(lo), counts_at(hi)]), goal)


def threshold_allocation(step_scores: Sequence[np.ndarray], budget: Budget, goal: float,
                         effective: Optional[Callable[[int, int], int]] = None) -> np.ndarray:
    """Units removed per step by one global threshold on per-unit scores, landing on ``goal``.

    Args:
        step_scores: per step, the scores of its units in the order the step removes them
            (ascending; ``-inf`` for units that are gone already).
        budget: what a plan removes (its ``k_min``/``k_max`` bound every step).
        goal: the cost to remove, in the budget's units.
        effective: optional ``(step, count) -> count`` rounding (channel groups round what
            remains to ``round_to``).
    """
    scores = [np.asarray(s, dtype=np.float64) for s in step_scores]
    finite = np.concatenate([s[np.isfinite(s)] for s in scores] + [np.zeros(1)])
    lo, hi = float(finite.min()) - 1.0, float(finite.max()) + 1.0

    def counts_at(threshold: float) -> np.ndarray:
        k = np.array([np.searchsorted(s, threshold, side="right") for s in scores], dtype=np.int64)
        if effective is not None:
            k = np.array([effective(i, int(v)) for i, v in enumerate(k)], dtype=np.int64)
        return np.clip(k, budget.k_min, budget.k_max)

    return _bisect(counts_at, budget, goal, lo, hi, iterations=200)


def uniform_allocation(sizes: Sequence[int], budget: Budget, goal: float,
                       effective: Optional[Callable[[int, int], int]] = None) -> np.ndarray:
    """The same fraction of every step (bisected onto ``goal``), then repaired."""
    sizes = np.asarray(sizes, dtype=np.int64)

    def counts_at(fraction: float) -> np.ndarray:
        k = np.rint(fraction * sizes).astype(np.int64)
        if effective is not None:
            k = np.array([effective(i, int(v)) for i, v in enumerate(k)], dtype=np.int64)
        return np.clip(k, budget.k_min, budget.k_max)

    return _bisect(counts_at, budget, goal, 0.0, 1.0, iterations=60)


# --------------------------------------------------------------------------- functional twins
def _check_amount(amount) -> None:
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real) or not 0.0 <= float(amount) <= 1.0:
        if isinstance(amount, numbers.Integral) and not isinstance(amount, bool) and amount >= 0:
            return
        raise ValueError(f"amount must be a fraction in [0, 1] or a number of entries, got {amount!r}")


def _pairs(parameters) -> list:
    try:
        pairs = list(parameters)
    except TypeError:
        raise TypeError("parameters must be an iterable of (module, name) tuples") from None
    if not pairs or not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], str) for p in pairs):
        raise TypeError("parameters must be a non-empty iterable of (module, name) tuples")
    return pairs


def _prunable_names(module: nn.Module) -> list:
    """The tensors ``torch.nn.utils.prune`` can prune on ``module``: its own parameters, a tensor
    pruned before under its own name (``weight`` for ``weight_orig`` + ``weight_mask``)."""
    buffers = dict(module.named_buffers(recurse=False))
    names = []
    for name, _ in module.named_parameters(recurse=False):
        base = name[:-len("_orig")]
        names.append(base if name.endswith("_orig") and base + "_mask" in buffers else name)
    return names


def _checked_pairs(parameters, importance_scores: Optional[Dict] = None) -> list:
    """``parameters`` as a list, every pair checked before any tensor is pruned: the prune calls go
    pair by pair, so a bad pair found there would leave the pairs before it pruned."""
    pairs = _pairs(parameters)
    if importance_scores is not None and not isinstance(importance_scores, dict):
        raise TypeError(f"importance_scores must be a dict {{(module, name): tensor}}, "
                        f"got {type(importance_scores).__name__}")
    for module, name in pairs:
        if not isinstance(module, nn.Module):
            raise TypeError(f"parameters must hold (torch.nn.Module, name) tuples; the pair for {name!r} "
                            f"holds a {type(module).__name__}")
        prunable = _prunable_names(module)
        if name not in prunable:
            raise ValueError(f"parameters names {name!r} of a {type(module).__name__}, which has no such "
                             f"parameter to prune; it has {prunable}")
        score = (importance_scores or {}).get((module, name))
        shape = _live(module, name).shape
        if score is not None and (not isinstance(score, torch.Tensor) or score.shape != shape):
            got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            raise ValueError(f"importance_scores for {name!r} of a {type(module).__name__} must be a tensor "
                             f"of the parameter's shape {tuple(shape)}, got {got}")
    return pairs


def _live(module, name: str) -> torch.Tensor:
    """The values the forward uses (``orig * mask`` when already pruned)."""
    orig = getattr(module, name + "_orig", None)
    return orig * getattr(module, name + "_mask") if orig is not None else getattr(module, name)


def lamp_unstructured(parameters, amount, importance_scores: Optional[Dict] = None) -> None:
    r"""LAMP over ``parameters``, through ``prune.global_unstructured``.

    Each tensor's entries are scored with :func:`lamp_scores` (of ``importance_scores[(module,
    name)]`` when given, else of the live weights) and one global threshold removes ``amount``
    of all entries together. Every tensor gets ``name_orig``, ``name_mask`` and a forward-pre-hook,
    exactly as ``prune.global_unstructured`` leaves them; on tensors pruned before, ``amount`` is
    taken of the entries still alive, as for every method pruned on top.

    Args:
        parameters: iterable of ``(module, name)`` tuples.
        amount: fraction (float in [0, 1]) or number (int) of all entries to remove.
        importance_scores: optional ``{(module, name): tensor}`` ranking entries instead of |w|.

    Example:
        >>> m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
        >>> lamp_unstructured([(m[0], "weight"), (m[1], "weight")], amount=0.5)
        >>> int(m[0].weight_mask.sum() + m[1].weight_mask.sum())
        40
    """
    pairs = _checked_pairs(parameters, importance_scores)
    _check_amount(amount)
    importance_scores = importance_scores or {}
    scores = {}
    for module, name in pairs:
        base = importance_scores.get((module, name))
        base = _live(module, name) if base is None else base
        # entries an existing mask removed are left out by the PruningContainer global_unstructured
        # builds (``amount`` counts the entries still alive, as with any method pruned on top)
        scores[(module, name)] = lamp_scores(base)
    prune.global_unstructured(pairs, prune.L1Unstructured, importance_scores=scores, amount=amount)


def global_magnitude_unstructured(parameters, amount, importance_scores: Optional[Dict] = None) -> None:
    """Global magnitude pruning: ``prune.global_unstructured(parameters, L1Unstructured, amount)``,
    named for symmetry with :func:`lamp_unstructured`."""
    pairs = _checked_pairs(parameters, importance_scores)
    _check_amount(amount)
    prune.global_unstructured(pairs, prune.L1Unstructured, importance_scores=importance_scores, amount=amount)


def uniform_unstructured(parameters, amount) -> None:
    """The same fraction of every tensor by magnitude: ``prune.l1_unstructured`` on each."""
    pairs = _checked_pairs(parameters)
    _check_amount(amount)
    if isinstance(amount, numbers.Integral) and not isinstance(amount, bool):
        raise ValueError("uniform_unstructured takes a fraction (every tensor loses the same share), "
                         f"got the count {amount!r}")
    for module, name in pairs:
        prune.l1_unstructured(module, name, amount=float(amount))
