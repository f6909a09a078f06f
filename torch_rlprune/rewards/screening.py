"""Multi-fidelity scoring: most plans an agent proposes are worse than the best plan a search
already holds, and a few dozen samples are enough to say so.

Every plan is first read on a small seeded slice of the search part (``samples``), BatchNorm
normalising the slice with its own statistics. It is *promoted* to the full score (every
re-estimation batch, every sample: what scoring always was) unless a one-sided paired test says it
is worse than the *plan to beat* (the search's best, once it keeps as many results as the held-out
choice compares: :meth:`~torch_rlprune.env.layerwise.BestPlanResults.plan_to_beat`)::

    c_i = -KL(unpruned softmax || plan's softmax) on slice sample i    ("closeness")
    g_i = the reward's own term: 0/1 agreement with the unpruned model  ("gains")
    d_i = x_i(candidate) - x_i(plan to beat), for x = c and x = g      (same samples, same protocol)
    promising  <=>  mean(d) + z * std(d) / sqrt(n) >= 0 for both       (z = PROMOTION_Z = 1)

A plan the first slice finds promising is read on a second, disjoint slice
(:data:`CONFIRMATION_SHARE` times larger) and tested again on both slices' samples; only a plan
still promising is promoted (successive halving, Jamieson & Talwalkar 2016, with a paired
confidence bound instead of a fixed fraction kept). Why two stages: 64 samples cannot tell plans a
point or two worse than the best from it, and AMC promoted 26-31 of 102 plans of which all but one
or two were 0.3-3 points worse in full (``benchmarks/search_cost.py``); a full score costs ~15
first-slice reads, a second read 3.

The 0/1 terms alone cannot keep out plans near the best (they agree with it on nearly every
sample, and a test on identical terms promotes them); the smooth closeness tells them apart, the
agreement test on top keeps out plans the closeness favours but whose decisions are clearly worse.
The closeness ranks plans as agreement does once BatchNorm is re-estimated (Spearman +0.95..+0.99,
benchmarks/reward_ranking.py).

A plan kept out gets an *estimate* of its full score: the plan to beat's full score plus the
difference of the two slice scores (on the samples read), never above the plan to beat's score,
so it can never become a result; agents learn from it as from any score. Results, the held-out
choice and everything a search returns are full scores, as without screening.

Plans scored only to shape a reward (PuRL's partial plans) are never promoted: their estimate is
the unpruned model's full score plus the first slice's difference to the unpruned model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .calibration import CalibrationSet, subset
from .recalibration import BatchNormRecalibration
from .scores import make_reward

__all__ = ["Screening", "ScreeningStats", "PROMOTION_Z", "PROMOTION_TESTS", "DEFAULT_SCREEN_SAMPLES",
           "MIN_SCREENED_SHARE", "CONFIRMATION_SHARE", "staged_slices"]

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

CONFIRMATION_SHARE = 3
"""The second slice holds this many times the first's samples (at most half of the search part's
other samples; no second slice when that is fewer than the first's): one forward of 192 samples
on the bench's resnet18 costs a fifth of a full score."""

PROMOTION_TESTS = ("closeness", "gains")
"""What the paired bound compares, each in turn; a plan is promoted only if every one says it may be
as good as the plan to beat: ``"closeness"`` (minus each sample's KL divergence from the unpruned
model's softmax to the plan's, for classifier outputs) and ``"gains"`` (the reward's own per-sample
terms: 0/1 agreement)."""

Key = Tuple[int, ...]


class SliceRead(NamedTuple):
    """A plan on the slices read so far, sample by sample: the reward's gains, and a smooth
    closeness to the unpruned model (minus the KL divergence for classifiers; the gains otherwise)."""

    gains: torch.Tensor
    closeness: torch.Tensor

    def first(self, n: int) -> "SliceRead":
        return SliceRead(self.gains[:n], self.closeness[:n])


def _log_softmax_rows(outputs: List[torch.Tensor]) -> Optional[List[torch.Tensor]]:
    if not all(o.dim() == 2 and o.shape[1] > 1 for o in outputs):
        return None
    return [torch.log_softmax(o.float(), dim=1) for o in outputs]


def staged_slices(search_part: CalibrationSet, samples: int, seed: int) -> CalibrationSet:
    """The screening's slices as one batch each: ``samples`` seeded random samples of the search
    part, then a disjoint second slice of up to :data:`CONFIRMATION_SHARE` times as many (none when
    the search part has too few)."""
    total = search_part.num_samples
    order = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))
    second = min(CONFIRMATION_SHARE * samples, (total - samples) // 2)
    bounds = [0, min(samples, total)] + ([samples + second] if second >= samples else [])
    stages = [torch.sort(order[a:b]).values for a, b in zip(bounds, bounds[1:])]
    parts = [subset(search_part, idx, batch_size=len(idx)) for idx in stages]
    labels = [p.labels[0] for p in parts] if search_part.labels is not None else None
    return CalibrationSet([p.inputs[0] for p in parts], labels, search_part.synthetic)


@dataclass
class ScreeningStats:
    """What the screening did over a search: plans read on the first slice, read on the second,
    promoted to the full score, kept out with an estimate, and reward-shaping plans estimated."""

    samples: int
    second_samples: int = 0
    screened: int = 0
    second_reads: int = 0
    promoted: int = 0
    kept_out: int = 0
    shaping: int = 0

    def as_dict(self) -> dict:
        return {"samples": self.samples, "second_samples": self.second_samples, "z": PROMOTION_Z,
                "screened": self.screened, "second_reads": self.second_reads, "promoted": self.promoted,
                "kept_out": self.kept_out, "shaping_estimates": self.shaping}


class Screening:
    """The staged score of an environment's plans (``env.screening``).

    Args:
        model: the model the environment masks; unpruned when this is built (the reference).
        reward: the reward's name (``"fidelity"`` or ``"accuracy"``): scored again on the slices.
        search_part: the calibration samples the search scores on; the slices are drawn from it.
        samples: size of the first slice.
        seed: draws the slices.
        recalibrate: whether the full score re-estimates BatchNorm (then the slices are read with
            their own statistics).
        baseline: the unpruned model's full score.
    """

    def __init__(self, model: nn.Module, reward: str, search_part: CalibrationSet, samples: int, seed: int,
                 recalibrate: bool, baseline: float):
        self.model, self.baseline = model, float(baseline)
        self.slices = staged_slices(search_part, samples, seed)   # one batch per stage
        self.reward = make_reward(reward, self.slices)
        self.reward.prepare(model)
        # a score of the first slice alone is read with that slice's reward (a regression output's
        # error is scaled by the spread of the outputs read; for classifiers both are the same)
        first = CalibrationSet(self.slices.inputs[:1], self.slices.labels[:1] if self.slices.labels else None,
                               self.slices.synthetic)
        self.first_reward = make_reward(reward, first)
        self.first_reward.prepare(model)
        self.teacher = _log_softmax_rows(self.reward.outputs(model))
        self.norms = BatchNormRecalibration(model, self.slices.inputs) if recalibrate else None
        sizes = [len(x) for x in self.slices.inputs]
        self.stats = ScreeningStats(sizes[0], sum(sizes[1:]))
        self.reads: Dict[Key, SliceRead] = {}      # every slice of fully scored plans: the possible plans to beat
        self.reference = self._read(self._outputs(range(len(sizes))))    # the unpruned model's

    def _outputs(self, stages) -> List[torch.Tensor]:
        """The plan's outputs on the slices ``stages``, each normalised with its own BatchNorm
        statistics when the full score re-estimates them: one forward per slice, half the cost of
        re-estimating the statistics on it and evaluating it."""
        with self.norms.own_statistics() if self.norms else contextlib.nullcontext():
            return self.reward.outputs(self.model, list(stages))

    def _read(self, outputs: List[torch.Tensor]) -> SliceRead:
        """The read of the first ``len(outputs)`` slices."""
        gains = self.reward.gains_of_outputs(outputs)
        if self.teacher is None:
            return SliceRead(gains, gains)
        divergence = [(t.exp() * (t - torch.log_softmax(o.float(), dim=1))).sum(1)
                      for t, o in zip(self.teacher, outputs)]
        return SliceRead(gains, -torch.cat(divergence).double())

    def _score(self, read: SliceRead) -> float:
        first = len(read.gains) == len(self.slices.inputs[0])
        return (self.first_reward if first else self.reward).score_of_gains(read.gains)

    def score(self, key: Key, plan_to_beat: Optional[Tuple[Key, float]], full_score: Callable[[], float],
              apply_plan: Callable[[Key], None], shaping: bool = False) -> Tuple[float, bool]:
        """``(score, full)`` of plan ``key``, which is applied: ``full_score()``, or (``full`` False)
        an estimate. ``plan_to_beat`` is ``(its key, its full score)``, None while anything may
        become a result; ``apply_plan`` masks the model with a plan (to read the plan to beat's
        slices when this object has not scored it)."""
        outputs = self._outputs([0])
        read = self._read(outputs)
        self.stats.screened += 1
        if shaping:
            self.stats.shaping += 1
            return self.baseline + self._score(read) - self._score(self.reference.first(len(read.gains))), False
        stages = len(self.slices.inputs)
        if plan_to_beat is not None:
            bar_key, bar_score = plan_to_beat
            bar = self._read_of(bar_key, apply_plan, key)
            for stage in range(stages):
                if stage:
                    self.stats.second_reads += 1
                    outputs += self._outputs([stage])
                    read = self._read(outputs)
                bar_here = bar.first(len(read.gains))
                if not all(promising(getattr(read, test) - getattr(bar_here, test)) for test in PROMOTION_TESTS):
                    self.stats.kept_out += 1
                    # never above the plan to beat: a plan kept out must not become a result
                    return bar_score + min(0.0, self._score(read) - self._score(bar_here)), False
        self.stats.promoted += 1
        self.reads[key] = self._read(outputs + self._outputs(range(len(outputs), stages)))
        return float(full_score()), True

    def _read_of(self, key: Key, apply_plan: Callable[[Key], None], current: Key) -> SliceRead:
        """The slices' read of a plan that was scored fully elsewhere (a resumed search's record)."""
        if key not in self.reads:
            apply_plan(key)
            self.reads[key] = self._read(self._outputs(range(len(self.slices.inputs))))
            apply_plan(current)   # the full score, if it follows, re-estimates BatchNorm for it
        return self.reads[key]


def promising(differences: torch.Tensor) -> bool:
    """The one-sided paired bound: the candidate may be at least as good as the plan to beat."""
    n = len(differences)
    mean = float(differences.mean())
    spread = float(differences.std()) / n ** 0.5 if n > 1 else 0.0
    return mean + PROMOTION_Z * spread >= 0.0
