"""Search spaces: what one MDP step acts on, for each ``structure`` -- the one place structures differ.

A space turns the model into steps (weight tensors, or torch-pruning channel groups), one undoable
mask per step and a budget, gives the one-shot prior plans, and applies a plan for good. Each
``structure`` is a :class:`SpaceKind` registered by name in :data:`SPACES`, with its defaults, the
budgets and priors it takes, its own argument checks and how a saved plan is applied; everything
else (options, plans, reports, the command line) asks the kind, never compares names. The depth +
width space of N2N wraps the channel one (:mod:`~torch_rlprune.env.depth_width`).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..rewards.repair import AUTO_REFIT_FROM
from ..structure.apply import apply_group_counts, apply_tensor_amounts
from ..structure.channel import ChannelStructure, apply_channel_plan, count_macs_params
from ..structure.channel.latency import LatencyTable
from ..structure.channel.measured import (CalibratedLatency, CompactedTimer, Latency, MeasuredCalibration, WidthPlans,
                                          measurement_cache_path)
from ..structure.costs import BudgetMeasure, budget_measure, budget_names, pruned_fraction
from ..structure.importance import IMPORTANCES, activation_scores
from ..structure.inputs import as_example
from ..structure.masks import InPlaceMask
from ..structure.tensors import PrunableTensor, trace_execution
from ..threads import intra_op_threads
from ..validation import check_count
from .channel_steps import ChannelBudget, GroupMask, LatencyBudget, group_descriptors, trace_descriptors
from .depth_space import DepthChannelSpace
from .priors import sorted_lamp_scores, threshold_allocation, uniform_allocation

__all__ = ["SPACES", "STRUCTURES", "SpaceKind", "StructureDefaults", "space_kind", "build_space", "UnstructuredSpace",
           "ChannelSpace", "protected_steps", "PROTECT_MAX_SHARE", "LATENCY_ROUND_TO"]

LATENCY_ROUND_TO = 8   # channel widths a latency search leaves (see rl_prune's round_to)


def importance_by_name(importance_scores, layers: List[PrunableTensor]) -> Dict[str, torch.Tensor]:
    if not importance_scores:
        return {}
    by_key = {}
    for key, scores in importance_scores.items():
        if isinstance(key, tuple):
            match = [lay for lay in layers if lay.module is key[0] and lay.param_name == key[1]]
            if not match:
                raise ValueError("importance_scores: a (module, name) key is not among the pruned tensors")
            key = match[0].name
        by_key[key] = scores
    unknown = set(by_key) - {lay.name for lay in layers}
    if unknown:
        raise ValueError(f"importance_scores: unknown tensor(s) {sorted(unknown)}")
    return by_key


PROTECT_MAX_SHARE = 0.1
"""The first layer and the classifier are kept dense only while they hold at most this share of
the prunable weights: in a deep model they are small and sensitive (Gale et al. 2019, followed by
LAMP); in a small one where they are most of the weights, keeping them would change the problem."""


def protected_steps(model: nn.Module, steps: List[PrunableTensor]) -> List[str]:
    """The tensors standard practice leaves dense (Gale et al. 2019, followed by LAMP): the first
    layer to run and the classifier (timm's ``get_classifier()``, else the last layer to run).
    Nothing is protected when they hold more than :data:`PROTECT_MAX_SHARE` of the weights or
    when fewer than two tensors would be left to prune."""
    classifier = None
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            classifier = get_classifier()
        except Exception:  # a model whose get_classifier needs arguments, or has none
            classifier = None
    if not isinstance(classifier, nn.Module) or not any(s.module is classifier for s in steps):
        classifier = steps[-1].module
    names = [steps[0].name] + [s.name for s in steps if s.module is classifier and s.name != steps[0].name]
    share = sum(s.numel for s in steps if s.name in names) / max(1, sum(s.numel for s in steps))
    return names if len(steps) - len(names) >= 2 and share <= PROTECT_MAX_SHARE else []


class UnstructuredSpace:
    """Steps are weight tensors; masks are :class:`InPlaceMask`; costs add up."""

    def __init__(self, model, layers, run_first_batch, importance_scores, budget, max_amount, protect=False,
                 importance: str = "magnitude", batches=()):
        self.model, self.budget, self.max_amount = model, budget, max_amount
        layers, unused = trace_execution(model, layers, run_first_batch)
        self.never_ran = [u.name for u in unused]
        if unused:
            more = f" and {len(unused) - 5} more (plan.metadata['never_ran'])" if len(unused) > 5 else ""
            warnings.warn(f"rl_prune: {len(unused)} layer(s) never ran as modules in a forward pass and stay dense "
                          f"(a parent that reads their weight itself, e.g. F.linear(x, self.qkv.weight), or "
                          f"unused): {self.never_ran[:5]}{more}", UserWarning, stacklevel=3)
        if not layers:
            raise ValueError("none of the prunable layers ran in a forward pass of the model")
        self.protected = protected_steps(model, layers) if protect else []
        layers = [lay for lay in layers if lay.name not in self.protected]
        self.steps = layers
        self.allocation_scores = importance_by_name(importance_scores, layers)  # what the heuristics rank
        self.scores = dict(self.allocation_scores)                                # what the masks remove first
        self.importance, self.magnitude_fallback = importance, []
        if importance == "activation":
            activation, self.magnitude_fallback = activation_scores(model, layers, batches)
            self.scores.update(activation)
        self.masks = [InPlaceMask(layer, self.scores.get(layer.name)) for layer in layers]
        self.cost = None  # the environment's additive budget

    def step_modules(self) -> List[List[nn.Module]]:
        """Per step, the modules whose forward reads its weights: where a plan that changes the step
        starts to differ from one that does not (:mod:`torch_rlprune.structure.prefix_cache`). Every
        module holding the tensor counts, pruned or not: an embedding tied to the classifier reads the
        classifier's mask at the very start of the forward."""
        holders: Dict[int, List[nn.Module]] = {}
        for module in self.model.modules():
            tensors = [t for _, t in module.named_parameters(recurse=False)]
            for t in tensors + [t for _, t in module.named_buffers(recurse=False)]:
                holders.setdefault(t.untyped_storage().data_ptr(), []).append(module)
        units = []
        for layer, mask in zip(self.steps, self.masks):
            unit = [m for m in (layer.module, layer.runner, *layer.alias_runners) if m is not None]
            for t in (mask.written, getattr(layer.module, layer.param_name)):
                unit += holders.get(t.untyped_storage().data_ptr(), [])
            units.append(unit)
        return units

    def plan_entries(self, k):
        return ({lay.name: int(kk) / lay.numel for lay, kk in zip(self.steps, k)},
                {lay.name: lay.numel for lay in self.steps},
                {**({"protected": list(self.protected)} if self.protected else {}),
                 **({"never_ran": list(self.never_ran)} if self.never_ran else {}),
                 "importance": self.importance,
                 **({"magnitude_fallback": list(self.magnitude_fallback)} if self.magnitude_fallback else {})})

    def _sorted_magnitudes(self) -> List[np.ndarray]:
        """Per step, |w| (or |importance_scores|) in ascending order, entries an existing mask
        removed first at -inf: the order a magnitude threshold removes them in."""
        if getattr(self, "_magnitudes", None) is None:
            self._magnitudes = []
            for layer, mask in zip(self.steps, self.masks):
                scores = self.allocation_scores.get(layer.name, layer.original)
                scores = scores.detach().abs().float().reshape(-1).cpu()
                existing = layer.existing_mask
                if existing is not None:
                    scores = scores.masked_fill(existing.reshape(-1).cpu() == 0, -math.inf)
                # the mask sorted the same scores already (a stable sort of |w|, removed entries first):
                # a gather, where sorting a resnet18's weights again took a second
                ranked_alike = self.scores.get(layer.name) is self.allocation_scores.get(layer.name)
                ordered = scores[mask.order.cpu()] if ranked_alike else torch.sort(scores).values
                self._magnitudes.append(ordered.numpy())
        return self._magnitudes

    def prior_plan(self, method: str, budget, goal: float) -> np.ndarray:
        """Units removed per step by the heuristic ``method`` (:mod:`torch_rlprune.env.priors`) on ``goal``."""
        if method == "uniform":
            return uniform_allocation([lay.numel for lay in self.steps], budget, goal)
        magnitudes = self._sorted_magnitudes()
        if method == "global":
            return threshold_allocation(magnitudes, budget, goal)
        if method == "lamp":
            return threshold_allocation([sorted_lamp_scores(m) for m in magnitudes], budget, goal)
        raise ValueError(f"prior must be one of {SPACES['unstructured'].priors} for unstructured pruning, "
                         f"got {method!r}")

    def apply(self, plan):
        apply_tensor_amounts(self.model, plan.amounts, plan.numels, self.scores)
        return pruned_fraction(self.steps, self.budget)


def warn_groups_kept_whole(excluded) -> None:
    """Say which channel groups stay whole for a reason the user did not choose (the classifier's
    output and ``exclude=`` are expected; a failed validation or an unsupported op is not)."""
    unexpected = [e for e in excluded if not e.reason.startswith(("changes the model's output",
                                                                  "contains excluded layer"))]
    if unexpected:
        shown = "; ".join(f"{e.key} ({e.reason[:300]})" for e in unexpected[:3])
        more = f"; and {len(unexpected) - 3} more (plan.metadata['excluded'])" if len(unexpected) > 3 else ""
        warnings.warn(f"rl_prune: {len(unexpected)} channel group(s) stay whole: {shown}{more}",
                      UserWarning, stacklevel=4)


class ChannelSpace:
    """Steps are torch-pruning dependency groups of a :class:`ChannelStructure`; with
    ``budget="latency"`` their cost is a :class:`~torch_rlprune.structure.channel.latency.LatencyTable`
    timed at the :class:`Latency` spec's batch and threads and calibrated on measured compacted
    candidates (:mod:`~torch_rlprune.structure.channel.measured`)."""

    def __init__(self, model, example, run_first_batch, exclude, importance, round_to, budget, max_amount,
                 latency: Optional[Latency] = None):
        self.model, self.example, self.budget = model, example, budget
        self.latency_spec = (latency or Latency()) if budget == "latency" else None
        # the timing copy is made before the structure hooks or masks anything
        self.timer = (CompactedTimer(model, example, self.latency_spec, structure_kwargs={
            "exclude": exclude, "round_to": round_to}) if self.latency_spec is not None else None)
        self.structure = ChannelStructure(model, example, importance=importance, exclude=exclude,
                                          round_to=round_to)
        if not self.structure.groups:
            reasons = "; ".join(str(e) for e in self.structure.excluded[:5])
            raise ValueError(f"the model has no channel group that can be pruned safely ({reasons})")
        warn_groups_kept_whole(self.structure.excluded)
        self.steps = group_descriptors(model, self.structure)
        trace_descriptors(model, self.steps, run_first_batch)
        self.masks = [GroupMask(self.structure, i) for i in range(len(self.structure.groups))]
        self.latency = None
        if self.latency_spec is not None:
            self._latency_budget(max_amount)
        else:
            self.cost = ChannelBudget(self.structure, budget, max_amount)
        self._count = count_macs_params
        self.dense = count_macs_params(model, example)

    def _latency_budget(self, max_amount: float) -> None:
        """The latency table timed at the spec's batch and threads, calibrated on measured compacted
        candidates (:mod:`~torch_rlprune.structure.channel.measured`), as the budget."""
        spec, self.cost_max_amount = self.latency_spec, max_amount
        with intra_op_threads(spec.thread_count):
            table = LatencyTable(self.structure, self.example, batch=spec.batch)
        self.timer.example = table.example
        self.timer.cache_path = measurement_cache_path(table, spec)
        self.timer.load_cache()
        self.latency = CalibratedLatency(table, MeasuredCalibration())
        self.cost = LatencyBudget(self.structure, self.latency, max_amount)

    def measured_plans(self, env) -> WidthPlans:
        return WidthPlans(self, env)

    def plan_entries(self, k):
        groups = self.structure.groups
        metadata = {"input_shape": list(self.example.shape[1:]) if isinstance(self.example, torch.Tensor) else None,
                    "round_to": self.structure.groups[0].round_to,
                    "excluded": {e.key: e.reason for e in self.structure.excluded},
                    "dense": {"macs": int(self.dense[0]), "params": int(self.dense[1])}}
        if self.latency is not None:
            # the table's own prediction; the calibrated one and the measurements are beside it
            metadata["latency"] = {**self.latency.summary(), "planned_ms": self.latency.table.latency(k) * 1e3}
        return ({g.key: int(kk) / g.num_units for g, kk in zip(groups, k)},
                {g.key: g.num_units for g in groups}, metadata)

    def prior_plan(self, method: str, budget, goal: float) -> np.ndarray:
        """Units removed per group by the heuristic ``method`` on ``goal``: ``"uniform"`` (the same
        fraction of every group) or ``"global"`` (one threshold on the groups' unit importance)."""
        groups = self.structure.groups

        def effective(i: int, n: int) -> int:
            return groups[i].effective(min(max(n, 0), groups[i].num_units))

        if method == "uniform":
            return uniform_allocation([g.num_units for g in groups], budget, goal, effective)
        if method == "global":
            scores = [g.importance[g.order].double().numpy() for g in groups]
            return threshold_allocation(scores, budget, goal, effective)
        raise ValueError(f"prior must be one of {SPACES['channel'].priors} for channel pruning, got {method!r}")

    def apply(self, plan):
        apply_channel_plan(self.model, plan.counts(), structure=self.structure)
        if self.latency is not None:  # calibrated on measurements (the returned plan's own, see close_on_measurement)
            return self.latency.fraction_removed(plan.counts())
        after = self._count(self.model, self.example)
        return budget_measure(self.budget).removed_fraction(self.dense, after)


def _unstructured(model, layers, options, batches, run_first_batch, exclude) -> UnstructuredSpace:
    quality = options.quality
    return UnstructuredSpace(model, layers, run_first_batch, options.importance_scores, options.budget,
                             options.max_amount, protect=quality.protect_first_last and not quality.parameters_given,
                             importance=options.importance or "magnitude", batches=batches)


def _channel(model, layers, options, batches, run_first_batch, exclude):
    run_first_batch()
    example = as_example(batches[0][:2])  # a tuple/dict for a model taking several inputs
    space = ChannelSpace(model, example, run_first_batch, exclude, options.importance, options.round_to,
                         options.budget, options.max_amount, latency=options.latency)
    return DepthChannelSpace(space, exclude) if options.needs_depth else space  # N2N also removes blocks


@dataclass(frozen=True)
class StructureDefaults:
    """What ``None`` means for a structure's options, and how close a plan must land."""

    budget: str
    max_amount: float       # AMC's channel search keeps at least 20% of a layer (its lbound); weights go to 98%
    bn_recalibration: int   # measured (rl_prune's docstring, benchmarks/ablation.py): the largest single gain
    repair: str
    repairs: tuple          # the repairs it accepts
    auto_refit_from: float  # repair="auto" refits plans removing at least this much (rewards/repair.py)
    tolerance: float        # |achieved - target| a returned plan may differ by


@dataclass(frozen=True)
class SpaceKind:
    """One ``structure``: its search space and everything else that differs by structure."""

    name: str
    defaults: StructureDefaults
    priors: Tuple[str, ...]     # the one-shot heuristics a search can start from (env/priors.py)
    best_of: Tuple[str, ...]    # what prior="best" scores, in order (ties: the first)
    build: Callable             # (model, layers, options, batches, run_first_batch, exclude) -> space
    apply_plan: Callable        # (model, plan, importance_scores, example_inputs) -> None
    check_options: Callable     # (options, name) -> None: the arguments only this structure takes
    counts: Callable            # (BudgetMeasure) -> bool: the budgets it can count (structure/costs.py)
    removes_channels: bool      # compact() shrinks it; residual blocks and the least-squares refit apply
    step_label: str             # what one step is, in reports
    size_label: str             # what a step's size counts, in reports

    @property
    def budgets(self) -> Tuple[str, ...]:
        """The registered budgets (:mod:`~torch_rlprune.structure.costs`) this structure can count."""
        return tuple(name for name in budget_names() if self.counts(budget_measure(name)))


SPACES: Dict[str, SpaceKind] = {}
"""``structure`` name -> :class:`SpaceKind`, in registration order."""


def register_space(kind: SpaceKind) -> SpaceKind:
    SPACES[kind.name] = kind
    return kind


def space_kind(structure: str) -> SpaceKind:
    if not isinstance(structure, str) or structure not in SPACES:
        raise ValueError(f"structure must be one of {tuple(SPACES)}, got {structure!r}")
    return SPACES[structure]


def build_space(model: nn.Module, layers: List[PrunableTensor], options, batches, run_first_batch, exclude=None):
    """The search space of ``options.structure`` (checked :class:`~torch_rlprune.options.PruneOptions`);
    ``run_first_batch`` is the first forward pass, run while the space records execution order."""
    return SPACES[options.structure].build(model, layers, options, batches, run_first_batch, exclude)


def _apply_unstructured(model, plan, importance_scores, example_inputs) -> None:
    apply_tensor_amounts(model, plan.amounts, plan.numels, importance_scores)


def _apply_channel(model, plan, importance_scores, example_inputs) -> None:
    if importance_scores is not None:
        raise ValueError("importance_scores apply to structure='unstructured' plans only: a channel plan ranks "
                         "channels by group magnitude")
    # the metadata (an untrusted file's) is checked there, before it builds inputs from its input_shape
    apply_group_counts(model, plan.numels, plan.counts(), plan.metadata, example_inputs)


def _check_importance_scores(scores, name) -> None:
    """``importance_scores``: ``None`` or a dict ``{parameter name or (module, name): torch.Tensor}``
    (as :func:`importance_by_name` reads it); a TypeError naming the argument otherwise."""
    if scores is None:
        return
    argument = name("importance_scores")
    if not isinstance(scores, Mapping):
        raise TypeError(f"{argument} must be a dict {{parameter name or (module, name): torch.Tensor}}, "
                        f"got {type(scores).__name__}")
    for key, value in scores.items():
        named = isinstance(key, str) or (isinstance(key, tuple) and len(key) == 2
                                         and isinstance(key[0], nn.Module) and isinstance(key[1], str))
        if not named:
            shown = (f"({', '.join(type(k).__name__ for k in key)})" if isinstance(key, tuple)
                     else type(key).__name__)
            raise TypeError(f"{argument}: keys must be parameter names ('0.weight') or (module, name) tuples, "
                            f"got a key of type {shown}")
        if not isinstance(value, torch.Tensor):
            shown = repr(key) if isinstance(key, str) else f"({type(key[0]).__name__}, {key[1]!r})"
            raise TypeError(f"{argument}[{shown}] must be a torch.Tensor of the parameter's shape, "
                            f"got {type(value).__name__}")


def _check_unstructured_options(o, name) -> None:
    _check_importance_scores(o.importance_scores, name)
    if o.round_to is not None:
        raise ValueError(f"{name('round_to')}= applies to {name.given('structure', 'channel')} (what remains of a "
                         f"channel group)")
    importance = o.importance
    if importance is not None and (not isinstance(importance, str) or importance not in IMPORTANCES):
        raise ValueError(f"{name('importance')} must be one of {name.allowed(IMPORTANCES)} with "
                         f"{name.given('structure', 'unstructured')} (or None: magnitude), got {importance!r}; "
                         f"torch-pruning importances "
                         f"apply to {name.given('structure', 'channel')}")
    if importance == "activation" and o.importance_scores is not None:
        raise ValueError(f"{name.given('importance', 'activation')} computes its own scores: pass "
                         f"{name('importance_scores')}= or {name.given('importance', 'activation')}, not both")


def _check_channel_importance(o, name) -> None:
    """None or ``"magnitude"`` (group magnitude, torch-pruning's default) or a torch-pruning importance:
    anything else would fail on every group and fall back to magnitude without a word."""
    importance = o.importance
    if isinstance(importance, str) and importance == "magnitude":
        o.importance = None   # the default itself, not a callable that fails on every group
        return
    if importance is None or (callable(importance) and not isinstance(importance, (str, type))):
        return
    if isinstance(importance, type):
        why = f" (a class: pass an instance, {importance.__name__}())"
    elif isinstance(importance, str) and importance in IMPORTANCES:
        why = f" ({name.given('importance', importance)} applies to {name.given('structure', 'unstructured')})"
    else:
        why = ""
    raise ValueError(f"{name('importance')} must be None or 'magnitude' (group magnitude) or a torch-pruning "
                     f"importance instance (e.g. tp.importance.GroupMagnitudeImportance(), any callable(group) -> "
                     f"per-channel scores) with {name.given('structure', 'channel')}, got {importance!r}{why}")


def _check_channel_options(o, name) -> None:
    for argument in ("importance_scores", "parameters"):
        if getattr(o, argument) is not None:
            raise ValueError(f"{name(argument)} applies to {name.given('structure', 'unstructured')} only; for "
                             f"channels pass {name('importance')}=")
    _check_channel_importance(o, name)
    check_count(o.round_to, "round_to", name, or_none=True)
    if o.round_to is None and o.budget == "latency":
        o.round_to = LATENCY_ROUND_TO


def _counts_per_weight(measure: BudgetMeasure) -> bool:
    """Weights are removed one by one: a budget each weight carries a share of adds up."""
    return measure.per_weight is not None


def _counts_groups(measure: BudgetMeasure) -> bool:
    """The channel cost model counts MACs and parameters without a forward; latency is timed and
    calibrated (``ChannelSpace``), the one measured budget it has a cost model for."""
    return measure.of_counts is not None or measure.name == "latency"


register_space(SpaceKind(
    "unstructured", StructureDefaults(budget="params", max_amount=0.98,
                                      bn_recalibration=4, repair="auto", repairs=("none", "lstsq", "auto"),
                                      tolerance=0.005, auto_refit_from=AUTO_REFIT_FROM),
    priors=("lamp", "global", "uniform"), best_of=("lamp", "global"), build=_unstructured,
    apply_plan=_apply_unstructured, check_options=_check_unstructured_options, counts=_counts_per_weight,
    removes_channels=False, step_label="layer", size_label="params"))
register_space(SpaceKind(
    "channel", StructureDefaults(budget="macs", max_amount=0.8,
                                 bn_recalibration=4, repair="lstsq", repairs=("none", "lstsq", "auto"),
                                 tolerance=0.02, auto_refit_from=0.0),
    priors=("global", "uniform"), best_of=("global", "uniform"), build=_channel,
    apply_plan=_apply_channel, check_options=_check_channel_options, counts=_counts_groups,
    removes_channels=True, step_label="channel group", size_label="units"))
STRUCTURES = tuple(SPACES)
