"""What ``rl_prune`` returns: one :class:`PruneResult`, or a :class:`MultiTargetResult` of them."""
from __future__ import annotations

import math
import numbers
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .env.spaces import space_kind
from .plan import PruningPlan, apply_plan
from .rewards.recalibration import BatchNormRecalibration
from .rewards.repair import LeastSquaresRefit, keep_or_undo, refit_scope
from .structure.channel.counting import count_macs_params
from .structure.compact import compact
from .structure.costs import budget_measure, pruned_fraction
from .structure.inputs import run_model
from .structure.snapshot import ModelSnapshot
from .structure.tensors import PrunableTensor, find_prunable, trace_execution

__all__ = ["PruneResult", "MultiTargetResult", "pruned_fraction"]  # pruned_fraction: structure/costs.py


@dataclass
class PruneResult:
    """What :func:`rl_prune` returns.

    Attributes:
        model: the same module object that was passed in, now pruned in place.
        plan: the :class:`PruningPlan` that was applied.
        sparsity: achieved fraction of the budget's cost removed, read back from the masks
            (``budget="latency"``: the fraction of latency removed as measured after compact on
            the runtime, ``plan.metadata["latency"]["measured"]``).
        history: one dict per episode: reward, score, sparsity, best_reward, phase, seconds, target,
            violation, evaluations (plans scored so far) and amounts (the fraction of each step removed).
        baseline_score: the unpruned model's score under the same reward.
        wall_time: seconds for the whole call.
        forward_seconds: seconds of one scoring pass of the unpruned model (an episode's floor).
        search_seconds: seconds the agent's search took (episodes, learning and scoring; without
            the set-up before it and applying the plan after it).
        scoring_seconds: the part of ``search_seconds`` spent scoring plans (the rest is the agent's
            and the environment's own work).
    """

    model: nn.Module
    plan: PruningPlan
    sparsity: float
    history: List[dict]
    baseline_score: float
    wall_time: float
    forward_seconds: float
    layers: List[PrunableTensor] = field(repr=False, default_factory=list)
    example_inputs: Any = field(repr=False, default=None)  # a tensor; a tuple or dict for several inputs
    search_seconds: float = math.nan
    scoring_seconds: float = math.nan

    def compact(self) -> dict:
        """Physically remove the masked channels (``structure="channel"``); see :func:`compact`."""
        if not space_kind(self.plan.structure).removes_channels:
            raise ValueError("compact() removes channels; this result pruned unstructured weights "
                             "(use prune.remove to make them permanent)")
        info = compact(self.model, self.example_inputs)
        self._honest_after_compact(info)
        return info

    def _honest_after_compact(self, info: dict) -> None:
        """When ``compact`` could not remove every planned group, ``sparsity`` becomes what it
        really removed (of the dense model's MACs or params, per the budget)."""
        dense = self.plan.metadata.get("dense") or {}
        measure = budget_measure(self.plan.budget)
        if measure.of_counts is None:   # a measured budget: what compact removed, counted in MACs
            measure = budget_measure("macs")
        if not (info.get("failed") or info.get("partial")) or not dense.get("macs") or not dense.get("params"):
            return
        planned, self.sparsity = self.sparsity, measure.removed_fraction(
            (dense["macs"], dense["params"]), (info["macs_after"], info["params_after"]))
        info["sparsity"] = self.sparsity
        warnings.warn(f"compact: result.sparsity is now {self.sparsity:.4f} of the dense model's {measure.name} "
                      f"(planned {planned:.4f}); the groups in info['failed'] stay masked at full size",
                      UserWarning, stacklevel=3)

    @property
    def score(self) -> float:
        return self.plan.score

    @property
    def episode_seconds(self) -> float:
        """Median wall time of one episode (agent work included)."""
        return statistics.median(h["seconds"] for h in self.history) if self.history else float("nan")

    def summary(self) -> str:
        """The table ``rlprune prune`` prints: per-layer amounts, achieved sparsity, MACs and params
        before and after, score, wall time (:func:`torch_rlprune.report.format_summary`)."""
        from .report import format_summary, summarize

        return format_summary(summarize(self))


class MultiTargetResult(Mapping):
    """What :func:`rl_prune` returns for a list of targets: ``{target: PruneResult}``.

    The model is left unpruned (every plan was searched on the same masks); apply one with
    :meth:`apply`, which also re-estimates BatchNorm statistics as the search scored the plan
    (``bn_recalibration`` batches). Each :class:`PruneResult`'s ``sparsity`` is its plan's planned sparsity and
    its ``history`` holds the episodes spent on that target.
    """

    def __init__(self, model: nn.Module, results: Dict[float, PruneResult], agent: str, wall_time: float,
                 history: List[dict], latency=None, bn_batches: Sequence[torch.Tensor] = (),
                 refit_batches: Sequence = (), repair: str = "lstsq", auto_refit_from: float = 0.0,
                 judge: Optional[Callable[[nn.Module], dict]] = None):
        self.model, self._results, self.agent, self.wall_time, self.history = model, results, agent, wall_time, \
            history
        self.latency = latency  # the search's LatencyTable (budget="latency")
        self.bn_batches = list(bn_batches)  # what the search re-estimated BatchNorm on before each score
        self.refit_batches = list(refit_batches)  # what apply() refits the layers on (empty: no refit)
        self.repair, self.auto_refit_from = repair, auto_refit_from  # refit_scope decides per plan
        self.judge = judge  # a model's scores after a refit (the search's scorers); None: not judged

    def __getitem__(self, target: float) -> PruneResult:
        return self._results[self._key(target)]

    def __iter__(self) -> Iterator[float]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    def _key(self, target) -> float:
        for t in self._results:
            if isinstance(target, numbers.Real) and abs(float(target) - t) < 1e-9:
                return t
        raise KeyError(f"target must be one of {sorted(self._results)}, got {target!r}")

    @property
    def plans(self) -> Dict[float, PruningPlan]:
        return {t: r.plan for t, r in self._results.items()}

    def apply(self, model: Optional[nn.Module] = None, target: Optional[float] = None) -> float:
        """Prune ``model`` (default: the searched model) with the plan for ``target``; returns
        the sparsity achieved, read back from the masks (``budget="latency"``: predicted by the
        search's latency table).

        If the plan, the refit, the BatchNorm re-estimate or the judge fails, or the call is
        interrupted, ``model`` is left exactly as it was."""
        if target is None:
            raise ValueError(f"apply() needs target=, one of {sorted(self._results)}")
        result = self[target]
        model = self.model if model is None else model
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        plan = result.plan
        snapshot = ModelSnapshot(model)  # prune hooks, masks and re-parametrised weights: references only
        # created before the plan so that it holds the statistics to put back on failure
        recalibrate = BatchNormRecalibration(model, self.bn_batches)
        refit = None
        try:
            scope = (refit_scope(self.repair, plan.sparsity, self.auto_refit_from, model, plan.amounts)
                     if self.refit_batches else None)
            refit = LeastSquaresRefit(model, self.refit_batches, seed=plan.seed, scope=scope) if scope else None
            achieved = self._apply(model, result)
            record = refit().as_dict() if refit is not None else None
            if recalibrate:
                recalibrate()
            if record is not None:
                def undo():
                    refit.restore()
                    if recalibrate:
                        recalibrate()
                scores = self.judge(model) if self.judge is not None else {}
                plan.metadata["repair"] = keep_or_undo({**record, **scores}, plan, undo)
        except BaseException:
            # the refit and the re-estimate write into tensors the snapshot only references: their
            # values go back first (the refit's through the masks still on), then the structure
            if refit is not None:
                refit.restore()
            recalibrate.restore()
            snapshot.restore()
            raise
        return achieved

    def _apply(self, model: nn.Module, result: PruneResult) -> float:
        if result.plan.budget == "latency":  # the calibrated prediction, as during the search
            apply_plan(model, result.plan)
            return self.latency.fraction_removed(result.plan.counts())
        if space_kind(result.plan.structure).removes_channels:
            dense = count_macs_params(model, result.example_inputs)
            apply_plan(model, result.plan, example_inputs=result.example_inputs)
            after = count_macs_params(model, result.example_inputs)
            return budget_measure(result.plan.budget).removed_fraction(dense, after)
        apply_plan(model, result.plan)
        names = set(result.plan.amounts)
        layers = [lay for lay in find_prunable(model, None) if lay.name in names]
        if budget_measure(result.plan.budget).traced:  # e.g. a weight's MACs: feature-map sizes of a forward
            def run():
                with torch.inference_mode():
                    run_model(model, result.example_inputs)
            layers, _ = trace_execution(model, layers, run)
        return pruned_fraction(layers, result.plan.budget)

    def summary(self) -> str:
        lines = [f"rl_prune: agent={self.agent}, {len(self)} targets, wall time {self.wall_time:.1f}s",
                 f"{'target':>8} {'planned':>8} {'score':>8} {'episodes':>8}"]
        for t, r in self._results.items():
            lines.append(f"{t:>8.4f} {r.sparsity:>8.4f} {r.score:>8.4f} {r.plan.episodes:>8}")
        return "\n".join(lines)
