"""A plan's score as :func:`rl_prune` returns it: applied through the prune API, refitted by least
squares, BatchNorm re-estimated, scored on the search part, and every change undone.

A search scores its plans with in-place masks and no refit: a refit costs seconds a plan (resnet18
at 50% of the MACs: about 9 s), a search scores hundreds. The ranking partly survives the refit
(benchmarks/refit_landscape.py: Spearman +0.40 to +0.68 between the search's score and the refitted
plan's test accuracy), but not between removing residual blocks and narrowing layers: the refit restores
narrowed layers, not removed blocks. On the bench's resnet18 (seed 0) N2N's best stage-1 plan, three
blocks removed, scored 0.911 before the refit against the prior's 0.813, and 0.958 after it against
the prior's 0.984. So N2N asks for this score once, to choose which architecture its shrink stage narrows
(:meth:`~torch_rlprune.env.depth_width.DepthWidthEnv.score_as_returned`).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..options import STRUCTURE_DEFAULTS, PruneOptions
from ..plan import PruningPlan
from ..rewards.recurrent_refit import RECURRENT
from ..rewards.repair import LeastSquaresRefit, refit_scope, refit_wanted
from ..rewards.scores import FidelityReward, make_reward
from ..structure.snapshot import ModelSnapshot

__all__ = ["ReturnedScore", "returned_score", "held_out_as_returned"]


class ReturnedScore:
    """``score(k)``: plan vector ``k`` of ``prepared``'s space scored as the search's result would be.

    The caller takes the search's in-place masks off first. The refit's weights, the prune
    re-parametrisation and the BatchNorm statistics are all put back as they were before it returns.
    """

    def __init__(self, prepared, options: PruneOptions, reward, scope: str = "all"):
        self.prepared, self.options, self.reward, self.scope = prepared, options, reward, scope

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
                refit = LeastSquaresRefit(model, p.calibration.inputs, seed=int(self.options.seed),
                                          scope=self.scope)   # before the masks
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


def held_out_as_returned(prepared, options: PruneOptions,
                         key: Optional[float]) -> Optional[Callable[[np.ndarray], float]]:
    """The held-out choice's score of target ``key``'s plans as :func:`rl_prune` returns them, when
    they are refitted and the search prunes nothing but LSTM / GRU / RNN layers (weights or hidden
    units); ``None`` otherwise.

    Refitted, the candidates are compared by how close their outputs (logits) come to the unpruned
    model's on the held-out part (``FidelityReward(top1=False)``), not by the search's reward: they
    agree with it almost everywhere, and top-1 agreement on a few samples then picks at random.
    Measured on the sequential-MNIST LSTM (examples/lstm_sequential_mnist.py, ``agent="prior"`` and
    ``"amc"``, 80% and 90%, seeds 0-2: twelve choices among 2-6 candidates): mean test accuracy of
    the plan chosen unrefitted 97.02% (what the search did before), refitted by top-1 agreement
    97.53%, by KL divergence 97.55%, by output distance 97.63%; the candidates' mean 97.52%, the best
    candidate's 97.67%. The refit moves an LSTM's plans more than the held-out part can see before
    it: at 90% LAMP's and global magnitude's plans score within 0.03 of each other there unrefitted,
    and 97.0-97.1% against 96.1-96.3% test accuracy refitted. About two seconds a candidate there.
    Where convolutions are pruned too, a candidate is not refitted: their refit takes seconds to a
    minute, and on resnet18's channel plans scores after it ranked them no better (benchmarks/refit_landscape.py)."""
    p, o = prepared, options
    if key is None or p.selector is None:
        return None
    scope = refit_scope(o.repair, float(key), STRUCTURE_DEFAULTS[o.structure].auto_refit_from, p.space.model)
    if scope is None or not all(isinstance(getattr(step, "module", None), RECURRENT) for step in p.space.steps):
        return None
    closeness = FidelityReward(p.selector.calibration, top1=False)
    p.env.restore()
    with p.recalibrate.as_created():   # the unpruned model's outputs, BatchNorm as it came
        p.env.scoring(lambda: closeness.prepare(p.space.model))
    score = ReturnedScore(p, o, closeness, scope=scope)

    def measure(k: np.ndarray) -> float:
        p.env.restore()   # the plan is applied through the prune API and undone: the in-place masks off
        return float(p.env.scoring(lambda: score(np.asarray(k, dtype=np.int64))))
    return measure
