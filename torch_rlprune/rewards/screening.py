"""Multi-fidelity scoring: most plans an agent proposes are worse than the plans a search already
keeps, and a few dozen samples are enough to say so.

Every plan is first scored on a small seeded slice of the search part (``samples``), sample by
sample, with BatchNorm re-estimated on the same slice. It is *promoted* to the full score (every
re-estimation batch, every sample: what scoring always was) unless a one-sided paired test on the
slice says it is worse than the *plan to beat* (the last of the plans the search keeps as results,
:meth:`~torch_rlprune.env.layerwise.BestPlanResults.plan_to_beat`)::

    d_i = gain_i(candidate) - gain_i(plan to beat)        (the same slice samples, the same protocol)
    promote  <=>  mean(d) + z * std(d) / sqrt(n) >= 0        (z = PROMOTION_Z = 1)

A plan kept out gets an *estimate* of its full score, the plan to beat's full score plus the
difference of the two slice scores: below the plan to beat's score, so it can never become a
result; agents learn from it as from any score. Results, the held-out choice and everything a
search returns are full scores, as without screening (Jamieson & Talwalkar 2016 call the scheme
successive halving; here with a paired confidence bound instead of a fixed fraction kept).

Plans scored only to shape a reward (PuRL's partial plans) are never promoted: their estimate is
the unpruned model's full score plus the slice difference to the unpruned model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .calibration import CalibrationSet, take_samples
from .recalibration import BatchNormRecalibration
from .scores import make_reward

__all__ = ["Screening", "ScreeningStats", "PROMOTION_Z", "DEFAULT_SCREEN_SAMPLES", "MIN_SCREENED_SHARE"]

PROMOTION_Z = 1.0
"""Width of the paired bound, in standard errors: a plan is kept out only when its slice says it is
worse than the plan to beat by more than one standard error. Measured (benchmarks/search_cost.py,
random search on the bench's resnet18, 5 seeds): at 1 and at 2 the returned plan was the full
search's in 5 of 5 seeds, at 0 in 2 of 5; 1 kept out about twice as many plans as 2."""
DEFAULT_SCREEN_SAMPLES = 64
"""Samples of the slice when ``screen`` is not given: one BatchNorm re-estimation and one scoring
batch of 64 cost a tenth of the full score of a 384-sample search part with 4 re-estimation batches."""
MIN_SCREENED_SHARE = 4
"""Screening is on only when the search part holds at least this many times the slice's samples:
on a smaller set the slice saves too little to be worth a second protocol."""

Key = Tuple[int, ...]


@dataclass
class ScreeningStats:
    """What the screening did over a search: plans scored on the slice, promoted to the full
    score, kept out with an estimate, and reward-shaping plans estimated."""

    samples: int
    screened: int = 0
    promoted: int = 0
    kept_out: int = 0
    shaping: int = 0

    def as_dict(self) -> dict:
        return {"samples": self.samples, "z": PROMOTION_Z, "screened": self.screened, "promoted": self.promoted,
                "kept_out": self.kept_out, "shaping_estimates": self.shaping}


class Screening:
    """The two-stage score of an environment's plans (``env.screening``).

    Args:
        model: the model the environment masks; unpruned when this is built (the reference).
        reward: the reward's name (``"fidelity"`` or ``"accuracy"``): scored again on the slice.
        search_part: the calibration samples the search scores on; the slice is drawn from it.
        samples: size of the slice.
        seed: draws the slice.
        recalibrate: whether the full score re-estimates BatchNorm (then so does the slice).
        baseline: the unpruned model's full score.
    """

    def __init__(self, model: nn.Module, reward: str, search_part: CalibrationSet, samples: int, seed: int,
                 recalibrate: bool, baseline: float):
        self.model, self.baseline = model, float(baseline)
        self.slice = take_samples(search_part, samples, seed)
        self.reward = make_reward(reward, self.slice)
        self.reward.prepare(model)
        self.recalibrate = BatchNormRecalibration(model, self.slice.inputs) if recalibrate else None
        self.stats = ScreeningStats(self.slice.num_samples)
        self.gains: Dict[Key, torch.Tensor] = {}   # slice gains of fully scored plans: the possible plans to beat
        self.reference = self._slice_gains()       # the unpruned model's
        self.reference_score = self.reward.score_of_gains(self.reference)

    def _slice_gains(self) -> torch.Tensor:
        if self.recalibrate:
            self.recalibrate()
        return self.reward.sample_gains(self.model)

    def score(self, key: Key, plan_to_beat: Optional[Tuple[Key, float]], full_score: Callable[[], float],
              apply_plan: Callable[[Key], None], shaping: bool = False) -> Tuple[float, bool]:
        """``(score, full)`` of plan ``key``, which is applied: ``full_score()``, or (``full`` False)
        an estimate. ``plan_to_beat`` is ``(its key, its full score)``, None while anything may
        become a result; ``apply_plan`` masks the model with a plan (to read the plan to beat's
        slice when this object has not scored it)."""
        gains = self._slice_gains()
        self.stats.screened += 1
        if shaping:
            self.stats.shaping += 1
            return self.baseline + self.reward.score_of_gains(gains) - self.reference_score, False
        if plan_to_beat is not None:
            bar_key, bar_score = plan_to_beat
            bar_gains = self._gains_of(bar_key, apply_plan, key)
            if not promising(gains - bar_gains):
                self.stats.kept_out += 1
                return bar_score + self.reward.score_of_gains(gains) - self.reward.score_of_gains(bar_gains), False
        self.stats.promoted += 1
        self.gains[key] = gains
        return float(full_score()), True

    def _gains_of(self, key: Key, apply_plan: Callable[[Key], None], current: Key) -> torch.Tensor:
        """The slice gains of a plan that was scored fully elsewhere (a resumed search's record)."""
        if key not in self.gains:
            apply_plan(key)
            self.gains[key] = self._slice_gains()
            apply_plan(current)   # the full score, if it follows, re-estimates BatchNorm for it
        return self.gains[key]


def promising(differences: torch.Tensor) -> bool:
    """The one-sided paired bound: the candidate may be at least as good as the plan to beat."""
    n = len(differences)
    mean = float(differences.mean())
    spread = float(differences.std()) / n ** 0.5 if n > 1 else 0.0
    return mean + PROMOTION_Z * spread >= 0.0
