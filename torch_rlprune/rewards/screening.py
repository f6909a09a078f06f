"""Multi-fidelity scoring: most plans an agent proposes are worse than the best plan a search
already holds, and a few dozen samples are enough to say so.

Every plan is first read on a small seeded slice of the search part (``samples``), sample by
sample, BatchNorm fitted to the slice. It is *promoted* to the full score (every re-estimation
batch, every sample: what scoring always was) unless a one-sided paired test on the slice says it
is worse than the *plan to beat* (the search's best, once it keeps as many results as the held-out
choice compares: :meth:`~torch_rlprune.env.layerwise.BestPlanResults.plan_to_beat`)::

    c_i = -KL(unpruned softmax || plan's softmax) on slice sample i    ("closeness")
    g_i = the reward's own term: 0/1 agreement with the unpruned model  ("gains")
    d_i = x_i(candidate) - x_i(plan to beat), for x = c and x = g      (same samples, same protocol)
    promote  <=>  mean(d) + z * std(d) / sqrt(n) >= 0 for both         (z = PROMOTION_Z = 1)

The 0/1 terms alone cannot keep out plans near the best: those mostly agree with it on all 64
samples, and a test on identical terms promotes every one of them (AMC, 100 episodes: 78-90 of 102
plans promoted). The smooth closeness tells them apart (9-27 promoted); the agreement test on top
keeps out the plans the closeness favours but whose decisions are clearly worse (9-15 promoted;
benchmarks/search_cost.py). The closeness ranks plans as agreement does once BatchNorm is
re-estimated (Spearman +0.95..+0.99, benchmarks/reward_ranking.py).

A plan kept out gets an *estimate* of its full score: the plan to beat's full score plus the
difference of the two slice scores, never above the plan to beat's score, so it can never become a
result; agents learn from it as from any score. Results, the held-out choice and everything a
search returns are full scores, as without screening (Jamieson & Talwalkar 2016 call the scheme
successive halving; here with a paired confidence bound instead of a fixed fraction kept).

Plans scored only to shape a reward (PuRL's partial plans) are never promoted: their estimate is
the unpruned model's full score plus the slice difference to the unpruned model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .calibration import CalibrationSet, take_samples
from .recalibration import BatchNormRecalibration
from .scores import make_reward

__all__ = ["Screening", "ScreeningStats", "PROMOTION_Z", "PROMOTION_TESTS", "DEFAULT_SCREEN_SAMPLES",
           "MIN_SCREENED_SHARE"]

PROMOTION_Z = 1.0
"""Width of the paired bound, in standard errors: a plan is kept out only when its slice says it is
worse than the plan to beat by more than one standard error. Measured (benchmarks/search_cost.py,
random search on the bench's resnet18, 5 seeds, screening against the best on both tests): at 1 the
returned plan was the full search's in 4 of 5 seeds, at 0 in 3 of 5 (mean test accuracy 88.96% and
88.82%, in full 88.86%), 1 keeping out 156 of 210 plans and 0 178. (Against the fifth best on 0/1
agreement alone: at 1 and 2 in 5 of 5, at 0 in 2 of 5.)"""
DEFAULT_SCREEN_SAMPLES = 64
"""Samples of the slice when ``screen`` is not given: one forward of a batch of 64 (BatchNorm on
its own statistics) costs a twentieth of the full score of a 384-sample search part with 4
re-estimation batches."""
MIN_SCREENED_SHARE = 4
"""Screening is on only when the search part holds at least this many times the slice's samples:
on a smaller set the slice saves too little to be worth a second protocol."""

PROMOTION_TESTS = ("closeness", "gains")
"""What the paired bound compares, each in turn; a plan is promoted only if every one says it may be
as good as the plan to beat: ``"closeness"`` (minus each sample's KL divergence from the unpruned
model's softmax to the plan's, for classifier outputs) and ``"gains"`` (the reward's own per-sample
terms: 0/1 agreement)."""

Key = Tuple[int, ...]


class SliceRead(NamedTuple):
    """A plan on the slice: the reward's per-sample gains, and a smooth per-sample closeness to the
    unpruned model (minus the KL divergence for classifiers; the gains otherwise)."""

    gains: torch.Tensor
    closeness: torch.Tensor


def _log_softmax_rows(outputs: List[torch.Tensor]) -> Optional[List[torch.Tensor]]:
    if not all(o.dim() == 2 and o.shape[1] > 1 for o in outputs):
        return None
    return [torch.log_softmax(o.float(), dim=1) for o in outputs]


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
        self.teacher = _log_softmax_rows(self.reward.outputs(model))
        self.recalibrate = BatchNormRecalibration(model, self.slice.inputs) if recalibrate else None
        self.stats = ScreeningStats(self.slice.num_samples)
        self.reads: Dict[Key, SliceRead] = {}      # slice reads of fully scored plans: the possible plans to beat
        self.reference = self._read_slice()    # the unpruned model's
        self.reference_score = self.reward.score_of_gains(self.reference.gains)

    def _read_slice(self) -> SliceRead:
        outputs = self._slice_outputs()
        gains = self.reward.gains_of_outputs(outputs)
        if self.teacher is None:
            return SliceRead(gains, gains)
        divergence = [(t.exp() * (t - torch.log_softmax(o.float(), dim=1))).sum(1)
                      for t, o in zip(self.teacher, outputs)]
        return SliceRead(gains, -torch.cat(divergence).double())

    def _slice_outputs(self) -> List[torch.Tensor]:
        """The plan's outputs on the slice, BatchNorm fitted to the slice: one batch (the default) in
        one forward on its own statistics, half the cost of re-estimating them and evaluating."""
        if not self.recalibrate:
            return self.reward.outputs(self.model)
        if len(self.slice.inputs) > 1:
            self.recalibrate()
            return self.reward.outputs(self.model)
        with self.recalibrate.own_statistics():
            return self.reward.outputs(self.model)

    def score(self, key: Key, plan_to_beat: Optional[Tuple[Key, float]], full_score: Callable[[], float],
              apply_plan: Callable[[Key], None], shaping: bool = False) -> Tuple[float, bool]:
        """``(score, full)`` of plan ``key``, which is applied: ``full_score()``, or (``full`` False)
        an estimate. ``plan_to_beat`` is ``(its key, its full score)``, None while anything may
        become a result; ``apply_plan`` masks the model with a plan (to read the plan to beat's
        slice when this object has not scored it)."""
        read = self._read_slice()
        slice_score = self.reward.score_of_gains(read.gains)
        self.stats.screened += 1
        if shaping:
            self.stats.shaping += 1
            return self.baseline + slice_score - self.reference_score, False
        if plan_to_beat is not None:
            bar_key, bar_score = plan_to_beat
            bar = self._read_of(bar_key, apply_plan, key)
            if not all(promising(getattr(read, test) - getattr(bar, test)) for test in PROMOTION_TESTS):
                self.stats.kept_out += 1
                # never above the plan to beat: a plan kept out must not become a result
                return bar_score + min(0.0, slice_score - self.reward.score_of_gains(bar.gains)), False
        self.stats.promoted += 1
        self.reads[key] = read
        return float(full_score()), True

    def _read_of(self, key: Key, apply_plan: Callable[[Key], None], current: Key) -> SliceRead:
        """The slice read of a plan that was scored fully elsewhere (a resumed search's record)."""
        if key not in self.reads:
            apply_plan(key)
            self.reads[key] = self._read_slice()
            apply_plan(current)   # the full score, if it follows, re-estimates BatchNorm for it
        return self.reads[key]


def promising(differences: torch.Tensor) -> bool:
    """The one-sided paired bound: the candidate may be at least as good as the plan to beat."""
    n = len(differences)
    mean = float(differences.mean())
    spread = float(differences.std()) / n ** 0.5 if n > 1 else 0.0
    return mean + PROMOTION_Z * spread >= 0.0
