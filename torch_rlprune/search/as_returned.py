"""A plan's score as :func:`rl_prune` returns it: applied through the prune API, refitted by least
squares, BatchNorm re-estimated, scored on the search part, and every change undone.

A search scores its plans with in-place masks and no refit: a refit costs seconds a plan (resnet18
at 50% of the MACs: about 9 s), a search scores hundreds. Mostly the ranking survives the refit
(benchmarks/refit_landscape.py: Spearman +0.68 between the search's score and the refitted plan's
test accuracy), but not between removing residual blocks and narrowing layers: the refit restores
narrowed layers, not removed blocks. On the bench's resnet18 (seed 0) N2N's best stage-1 plan, three
blocks removed, scored 0.911 before the refit against the prior's 0.813, and 0.958 after it against
the prior's 0.984. So N2N asks for this score once, to choose which architecture its shrink stage narrows
(:meth:`~torch_rlprune.env.depth_width.DepthWidthEnv.score_as_returned`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..options import STRUCTURE_DEFAULTS, PruneOptions
from ..plan import PruningPlan
from ..rewards.repair import LeastSquaresRefit, refit_wanted
from ..rewards.scores import make_reward
from ..structure.snapshot import ModelSnapshot

__all__ = ["ReturnedScore", "returned_score"]


class ReturnedScore:
    """``score(k)``: plan vector ``k`` of ``prepared``'s space scored as the search's result would be.

    The caller takes the search's in-place masks off first. The refit's weights, the prune
    re-parametrisation and the BatchNorm statistics are all put back as they were before it returns.
    """

    def __init__(self, prepared, options: PruneOptions, reward):
        self.prepared, self.options, self.reward = prepared, options, reward

    def plan(self, k: np.ndarray) -> PruningPlan:
        space, env = self.prepared.space, self.prepared.env
        amounts, numels, extra = space.plan_entries(k)
        achieved = env.achieved(k)
        return PruningPlan(amounts=amounts, numels=numels, target=achieved, sparsity=achieved,
                           budget=self.options.budget, structure=self.options.structure, metadata=extra)

    def __call__(self, k: np.ndarray) -> float:
        p = self.prepared
        model = p.space.model
        plan = self.plan(k)
        snapshot, refit = ModelSnapshot(model), None
        # the reference the refit reproduces is the unpruned model: its own BatchNorm statistics,
        # not those of the plan the search scored last
        with p.recalibrate.as_created():
            try:
                refit = LeastSquaresRefit(model, p.calibration.inputs, seed=int(self.options.seed))  # before the masks
                p.space.apply(plan)
                refit()
                if p.recalibrate:
                    p.recalibrate()
                return float(self.reward(model))
            finally:
                if refit is not None:   # it wrote last
                    refit.restore()
                snapshot.restore()


def returned_score(prepared, options: PruneOptions, distributed: bool) -> Optional[ReturnedScore]:
    """The scorer an N2N search's environment gets when its result will be refitted; ``None`` otherwise.
    Under torch.distributed rank 0 scores alone, on the whole search part every rank holds."""
    o = options
    if not o.targets or \
            not refit_wanted(o.repair, float(o.targets[0]), STRUCTURE_DEFAULTS[o.structure].auto_refit_from):
        return None
    reward = prepared.scorer
    if distributed:   # its reference: the unpruned model as the search's scorer saw it, BatchNorm as it came
        reward = make_reward(o.reward, prepared.calibration)
        with prepared.recalibrate.as_created():
            reward.prepare(prepared.space.model)
    return ReturnedScore(prepared, o, reward)
