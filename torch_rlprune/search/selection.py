"""What a search starts from and what it returns: the prior's plans scored first, and the result
chosen on calibration data the search never saw.

* **Priors first.** Before an agent acts, the heuristic plans (:mod:`torch_rlprune.env.priors`) of
  every target are scored and offered as results; the best becomes the anchor of the agents'
  actions (:meth:`LayerwisePruningEnv.set_prior`). A search can only return a plan it scored at
  least as well as the prior.
* **Held-out selection.** The calibration set is split into a search part (every score the
  agents see) and a selection part. A search over hundreds of plans overfits the few hundred
  images it scores on; the returned plan is the best *on the selection part* among the search's
  ``top`` best plans (the prior among them), which is an unbiased estimate of the plans the
  search found, not of its luck.
* **Without data, the prior unless clearly better.** Synthetic inputs rank plans only roughly like
  real data: on the bench's trained resnet18 the no-data search's plan, chosen on noise, lost 0.56
  points of test accuracy to its own prior, LAMP (benchmarks/search_cost.py). With synthetic
  calibration the returned plan must beat the prior on the selection part by a paired bound of
  :data:`PRIOR_MARGIN_Z` standard errors, sample by sample; otherwise the prior is returned.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..env.layerwise import BestPlan
from ..env.spaces import SPACES
from ..rewards.calibration import CalibrationSet, subset
from .as_returned import held_out_as_returned

__all__ = ["split_calibration", "PriorChoice", "seed_priors", "Selection", "select_plans", "choose_on_held_out",
           "keep_prior_unless_clearly_better", "PRIOR_MARGIN_Z"]

PRIOR_MARGIN_Z = 2.0
"""How clearly a search's plan must beat the prior on held-out synthetic samples to be returned:
mean paired difference - 2 standard errors > 0 (one-sided, about 98%). A choice, not a fit: the
prior is the data-free state of the art, and noise is all a no-data search has to beat it on."""


def split_calibration(calibration: CalibrationSet, fraction: float, seed: int,
                      batch_size: int = 128) -> Tuple[CalibrationSet, Optional[CalibrationSet]]:
    """``(search part, selection part)``: a seeded random ``fraction`` of the samples is held out
    (random, so a loader sorted by class does not hold out whole classes). No selection part
    (``None``) when ``fraction`` is 0 or the set is too small to leave both parts 2 samples."""
    total = calibration.num_samples
    held = int(round(fraction * total))
    if fraction <= 0 or held < 2 or total - held < 2:
        return calibration, None
    order = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))
    return (subset(calibration, torch.sort(order[held:]).values, batch_size),
            subset(calibration, torch.sort(order[:held]).values, batch_size))


@dataclass
class PriorChoice:
    """The prior of one target: the method kept and every candidate's search score."""

    method: str
    score: float
    candidates: Dict[str, float] = field(default_factory=dict)
    plans: Dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """Every candidate's plan that was scored in full (not a screening estimate): the held-out
    choice compares them all, not only the one kept."""

    def as_dict(self) -> dict:
        return {"method": self.method, "score": self.score, "candidates": dict(self.candidates)}


def seed_priors(env, plan_of: Callable[[str], np.ndarray], structure: str, prior: str,
                targets: Sequence[float], tolerance: float) -> Dict[float, PriorChoice]:
    """Score the heuristic plans of every target first, offer them as results and anchor the
    environment's actions to the best (``prior="best"``) or to the one named.

    ``plan_of(method)`` builds a method's plan for the environment's current target.
    """
    methods = SPACES[structure].best_of if prior == "best" else (prior,)
    choices = {}
    for target in targets:
        env.set_target(target)
        scored = {}
        for method in methods:
            k = plan_of(method)
            if abs(env.achieved(k) - target) > tolerance:  # a heuristic that cannot land here
                continue
            score = env.evaluate(k)
            env._offer(env.reward_of(score, k), score, k)
            scored[method] = (score, k)
        if not scored:
            continue
        method = max(scored, key=lambda m: scored[m][0])  # ties: the first in best_of's order
        env.set_prior(scored[method][1], method)
        estimated = getattr(env, "estimated_keys", set())
        choices[target] = PriorChoice(method, scored[method][0], {m: v[0] for m, v in scored.items()},
                                      {m: np.array(v[1], dtype=np.int64) for m, v in scored.items()
                                       if tuple(int(x) for x in v[1]) not in estimated})
    if targets:
        env.set_target(targets[0])
    return choices


@dataclass
class Selection:
    """How the returned plan of one target was chosen."""

    search_score: float                 # its score on the search part (what the agents saw)
    selection_score: float              # its score on the held-out selection part
    candidates: List[Tuple[float, float]]  # (search score, selection score) of every plan compared
    chosen: int                         # index of the returned plan among the candidates (0: the search's best)
    prior_test: Optional[dict] = None   # without data: the paired comparison with the prior
    returned: Optional[List[float]] = None   # the candidates' held-out scores as returned (refitted), chosen on

    def as_dict(self) -> dict:
        return {"search_score": self.search_score, "selection_score": self.selection_score,
                "candidates": [list(c) for c in self.candidates], "chosen": self.chosen,
                **({"prior_test": dict(self.prior_test)} if self.prior_test is not None else {}),
                **({"returned_scores": list(self.returned)} if self.returned is not None else {})}


def select_plans(env, keys: Sequence[Optional[float]], measure: Callable[[], float],
                 priors: Optional[Dict[Optional[float], PriorChoice]] = None,
                 as_returned: Optional[Callable[[Optional[float]], Optional[Callable[[np.ndarray], float]]]] = None
                 ) -> Dict[Optional[float], Selection]:
    """For each target key, re-score its top plans and its priors with ``measure`` (the selection
    part) and make the best the environment's best plan (``best_by_target``); ties keep the better
    search score. Targets whose search kept a single plan are measured too, so the summary can
    report it. Every prior candidate (``priors``: LAMP and global magnitude, not only the one the
    actions were anchored to) is compared: a search whose top plans all beat them on the search
    part but not on the held-out part returns the best of them on the held-out part, as
    ``agent="prior"`` would. ``as_returned(key)``, where it gives a scorer of plans as returned
    (refitted; :func:`~torch_rlprune.search.as_returned.held_out_as_returned`), makes the choice
    on those scores instead; ``measure``'s stay on record (the refit is judged against them)."""
    chosen = {}
    for key in keys:
        top = list(env.top_by_target.get(key, ()))
        best = env.best_by_target.get(key)
        if best is None or best.k is None:
            continue
        if not top or not any(np.array_equal(p.k, best.k) for p in top):
            top.insert(0, best)
        for prior, score in _prior_plans(env, key, priors):
            if not any(np.array_equal(p.k, prior) for p in top):
                score = env.evaluate(prior) if score is None else score   # on record: scored first
                top.append(BestPlan(env.reward_of(score, prior), score, np.array(prior, dtype=np.int64)))
        held = [env.measure(p.k, measure) for p in top]
        returned_score = as_returned(key) if as_returned is not None else None
        returned = [returned_score(p.k) for p in top] if returned_score is not None else None
        deciding = returned if returned is not None else held
        finite = [i for i, v in enumerate(deciding) if math.isfinite(v)]
        index = max(finite, key=lambda i: (deciding[i], held[i], top[i].reward)) if finite else 0
        pick = top[index]
        best.reward, best.score, best.k = pick.reward, pick.score, np.array(pick.k, dtype=np.int64)
        chosen[key] = Selection(pick.score, held[index], [(p.score, h) for p, h in zip(top, held)], index,
                                returned=returned)
    return chosen


def choose_on_held_out(prepared, options, targets: Sequence[float]) -> Dict[Optional[float], Selection]:
    """Each target's plan, chosen on ``prepared``'s selection part among its search's best and its
    priors (:func:`select_plans`). Refitted candidates only on real data: without it the prior stays
    unless clearly beaten, by a paired test of the plans as searched."""
    p, synthetic = prepared, options.synthetic_data
    as_returned = None if synthetic else functools.partial(held_out_as_returned, p, options)
    selections = select_plans(p.env, targets, p.score_selection_part, p.priors, as_returned)
    if synthetic:
        keep_prior_unless_clearly_better(p.env, selections, p.score_selection_part, p.selection_gains)
    return selections


def _prior_plans(env, key: Optional[float], priors: Optional[Dict[Optional[float], PriorChoice]]) -> List:
    """``(plan, search score)`` of target ``key``'s priors, the anchor first. The scores are rank 0's
    record (every rank of a distributed search selects alone); ``None``: read from ``env``."""
    plans = []
    choice = (priors or {}).get(key)
    if choice is not None and choice.method in choice.plans:
        order = [choice.method] + [m for m in choice.plans if m != choice.method]
        plans = [(choice.plans[m], choice.candidates[m]) for m in order]
    anchor = getattr(env, "priors", {}).get(key)
    if anchor is not None and not any(np.array_equal(anchor, k) for k, _ in plans):
        plans.insert(0, (anchor, None))
    return plans


def keep_prior_unless_clearly_better(env, selections: Dict[Optional[float], Selection], measure: Callable[[], float],
                                     gains: Callable[[], torch.Tensor], z: float = PRIOR_MARGIN_Z) -> None:
    """For each selected plan that is not its target's prior: compare the two sample by sample on
    the selection part (``gains()`` of the plan applied, ``measure()`` its score) and return the
    prior unless the plan wins by ``z`` standard errors of the mean difference."""
    for key, selection in selections.items():
        prior, best = env.priors.get(key), env.best_by_target.get(key)
        if prior is None or best is None or best.k is None or np.array_equal(best.k, prior):
            continue
        difference = env.on_plan(best.k, gains) - env.on_plan(prior, gains)
        n = len(difference)
        error = float(difference.std()) / math.sqrt(n) if n > 1 else math.inf
        mean = float(difference.mean())
        kept = not mean - z * error > 0
        selection.prior_test = {"mean_difference": mean, "standard_error": error, "z": z, "samples": n,
                                "prior_kept": kept}
        if kept:
            score = env.evaluate(prior)      # the prior was scored first: this is its search score
            best.reward, best.score, best.k = env.reward_of(score, prior), score, np.array(prior, dtype=np.int64)
            selection.search_score = score
            selection.selection_score = env.measure(prior, measure)
