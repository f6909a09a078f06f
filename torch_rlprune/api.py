"""``rl_prune``: search a per-layer pruning plan with an RL agent and apply it in place."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .agents import Agent
from .calibration import build_calibration, primary_output
from .channel.measured import (CalibratedLatency, CompactedTimer, Latency, MeasuredCalibration, calibrate_before_search,
                               WidthPlans, close_on_measurement, measurement_cache_path)
from .channel.counting import macs_or_params
from .compaction import compact
from .checkpoint import SearchRecorder, check_checkpoint_path, load_checkpoint
from .distributed import (DistributedSearch, SplittableReward, all_ranks_succeed, check_same_calibration,
                          distributed_context, shard)
from .env import LayerwisePruningEnv
from .importance import activation_scores
from .inputs import as_example, batch_tensors, describe_shape, run_model
from .threads import agent_threads, intra_op_threads, one_search_at_a_time
from .masking import InPlaceMask
from .plan import PruningPlan, apply_plan
from .options import STRUCTURE_DEFAULTS, STRUCTURES, PruneOptions, SearchQuality
from .priors import PRIORS, sorted_lamp_scores, threshold_allocation, uniform_allocation
from .progress import progress
from .recalibration import BatchNormRecalibration
from .repair import LeastSquaresRefit
from .results import MultiTargetResult, PruneResult, pruned_fraction
from .rewards import make_reward
from .safety import ModelSnapshot
from .selection import seed_priors, select_plans, split_calibration
from .structure import PrunableTensor, find_prunable, left_out_weights, trace_execution

__all__ = ["rl_prune", "global_rl_unstructured", "compact", "PruneResult", "MultiTargetResult", "STRUCTURES",
           "pruned_fraction"]


def _measured_repair(report, prepared: "_PreparedSearch", coordinator, model: nn.Module) -> dict:
    """What the refit changed and the scores measured after it (BatchNorm re-estimated): on the
    held-out selection part when there is one, and on the search part in one process."""
    record = report.as_dict()
    if prepared.selector is not None:
        record["selection_score"] = float(prepared.selector(model))
    if coordinator is None:
        record["search_score"] = float(prepared.scorer(model))
    return record


def _importance_by_name(importance_scores, layers: List[PrunableTensor]) -> Dict[str, torch.Tensor]:
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


class _UnstructuredSpace:
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
        self.allocation_scores = _importance_by_name(importance_scores, layers)  # what the heuristics rank
        self.scores = dict(self.allocation_scores)                                # what the masks remove first
        self.importance, self.magnitude_fallback = importance, []
        if importance == "activation":
            activation, self.magnitude_fallback = activation_scores(model, layers, batches)
            self.scores.update(activation)
        self.masks = [InPlaceMask(layer, self.scores.get(layer.name)) for layer in layers]
        self.cost = None  # the environment's additive budget

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
            for layer in self.steps:
                scores = self.allocation_scores.get(layer.name, layer.original)
                scores = scores.detach().abs().float().reshape(-1).cpu()
                existing = layer.existing_mask
                if existing is not None:
                    scores = scores.masked_fill(existing.reshape(-1).cpu() == 0, -math.inf)
                self._magnitudes.append(torch.sort(scores).values.numpy())
        return self._magnitudes

    def prior_plan(self, method: str, budget, goal: float) -> np.ndarray:
        """Units removed per step by the heuristic ``method`` (:mod:`torch_rlprune.priors`) on ``goal``."""
        if method == "uniform":
            return uniform_allocation([lay.numel for lay in self.steps], budget, goal)
        magnitudes = self._sorted_magnitudes()
        if method == "global":
            return threshold_allocation(magnitudes, budget, goal)
        if method == "lamp":
            return threshold_allocation([sorted_lamp_scores(m) for m in magnitudes], budget, goal)
        raise ValueError(f"prior must be one of {PRIORS['unstructured']} for unstructured pruning, got {method!r}")

    def apply(self, plan):
        apply_plan(self.model, plan, self.scores)
        return pruned_fraction(self.steps, self.budget)


def _warn_groups_kept_whole(excluded) -> None:
    """Say which channel groups stay whole for a reason the user did not choose (the classifier's
    output and ``exclude=`` are expected; a failed validation or an unsupported op is not)."""
    unexpected = [e for e in excluded if not e.reason.startswith(("changes the model's output",
                                                                  "contains excluded layer"))]
    if unexpected:
        shown = "; ".join(f"{e.key} ({e.reason[:300]})" for e in unexpected[:3])
        more = f"; and {len(unexpected) - 3} more (plan.metadata['excluded'])" if len(unexpected) > 3 else ""
        warnings.warn(f"rl_prune: {len(unexpected)} channel group(s) stay whole: {shown}{more}",
                      UserWarning, stacklevel=4)


class _ChannelSpace:
    """Steps are torch-pruning dependency groups of a :class:`ChannelStructure`; with
    ``budget="latency"`` their cost is a :class:`~torch_rlprune.channel.latency.LatencyTable`
    timed at the :class:`Latency` spec's batch and threads and calibrated on measured compacted
    candidates (:mod:`~torch_rlprune.channel.measured`)."""

    def __init__(self, model, example, run_first_batch, exclude, importance, round_to, budget, max_amount,
                 latency: Optional[Latency] = None):
        from .channel import ChannelStructure, count_macs_params
        from .channel_steps import ChannelBudget, GroupMask, group_descriptors, trace_descriptors

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
        _warn_groups_kept_whole(self.structure.excluded)
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
        candidates (:mod:`~torch_rlprune.channel.measured`), as the budget."""
        from .channel.latency import LatencyTable
        from .channel_steps import LatencyBudget

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
        raise ValueError(f"prior must be one of {PRIORS['channel']} for channel pruning, got {method!r}")

    def apply(self, plan):
        from .channel import apply_channel_plan

        apply_channel_plan(self.model, plan.counts(), structure=self.structure)
        if self.latency is not None:  # calibrated on measurements (the returned plan's own, see close_on_measurement)
            return self.latency.fraction_removed(plan.counts())
        after = self._count(self.model, self.example)
        return 1.0 - macs_or_params(after, self.budget) / macs_or_params(self.dense, self.budget)


@dataclass
class _PreparedSearch:
    space: object
    env: LayerwisePruningEnv
    scorer: object
    calibration: object
    recalibrate: BatchNormRecalibration
    baseline: float
    forward_seconds: float
    floor: Optional[float]
    quality: SearchQuality = field(default_factory=SearchQuality)
    selector: Optional[object] = None          # scores the held-out selection part (None: no selection)
    priors: Dict[float, object] = field(default_factory=dict)  # target -> PriorChoice, once seeded
    selections: Dict[Optional[float], object] = field(default_factory=dict)  # key -> Selection

    @property
    def calibration_samples(self) -> int:
        """Samples taken from the data: the search part and the held-out part together."""
        held = 0 if self.selector is None else sum(len(x) for x in self.selector.calibration.inputs)
        return self.calibration.num_samples + held

    @property
    def example(self):
        """Two calibration samples as example inputs: a tensor, or a tuple/dict for a model
        taking several (what torch-pruning and :func:`compact` take)."""
        return as_example(self.calibration.inputs[0][:2])

    def score_selection_part(self) -> float:
        """The current masks scored on the selection part, BatchNorm re-estimated on the search part."""
        if self.recalibrate:
            self.recalibrate()
        return float(self.selector(self.space.model))


def prepare_search(model: nn.Module, layers, options: PruneOptions, data, exclude=None, example_inputs=None,
                   distributed=None) -> _PreparedSearch:
    """Calibration data, the search space (weights or channel groups), the reward and the MDP,
    every target checked for feasibility, for :meth:`PruneOptions.checked` options. Masks are
    touched only from here on: the caller holds a :class:`ModelSnapshot`."""
    o = options
    targets, reward, budget, structure, seed, max_amount, round_to, importance, quality = (
        o.targets, o.reward, o.budget, o.structure, o.seed, o.max_amount, o.round_to, o.importance, o.quality)
    depth, latency, tolerance = o.needs_depth, o.latency, o.tolerance
    model.eval()
    calibration = build_calibration(model, data, example_inputs, int(o.calibration_samples), seed=int(seed),
                                    label=o.label)
    # a callable reward scores on its own data, and the guarantee's criterion is not the score
    selecting = quality.selection > 0 and not callable(reward) and targets is not None
    calibration, selection_part = split_calibration(calibration, quality.selection if selecting else 0.0, int(seed))
    first_output = []

    def run_first_batch():
        with torch.inference_mode():
            first_output.append(primary_output(run_model(model, calibration.inputs[0])))

    # The first forward both checks that the data fits and records execution order and shapes.
    try:
        if structure == "unstructured":
            space = _UnstructuredSpace(model, layers, run_first_batch, o.importance_scores, budget, max_amount,
                                       protect=quality.protect_first_last and not quality.parameters_given,
                                       importance=importance or "magnitude", batches=calibration.inputs)
        else:
            run_first_batch()
            example = as_example(calibration.inputs[0][:2])  # a tuple/dict for a model taking several inputs
            space = _ChannelSpace(model, example, run_first_batch, exclude, importance, round_to, budget, max_amount,
                                  latency=latency)
            if depth:  # agents that also remove residual blocks (N2N)
                from .depth_search import DepthChannelSpace
                space = DepthChannelSpace(space, exclude)
    except Exception as err:
        if first_output:  # the data fitted: the failure is the model's structure
            raise
        several = isinstance(err, TypeError) and "argument" in str(err)
        raise ValueError(f"data: the model cannot run on a batch of shape "
                         f"{describe_shape(calibration.inputs[0])}: {err}"
                         + ("; a model taking several inputs gets batches as tuples (model(*batch)) or dicts "
                            "(model(**batch)), and label= says which part is the label (a position, a key, "
                            "or False for none)" if several else "")
                         ) from err
    if first_output[0] is None:
        raise ValueError("data: the model's output holds no tensor to score")
    if distributed is None:
        scorer = make_reward(reward, calibration)
    else:  # every rank scores its share of the calibration set (distributed.py)
        check_same_calibration(calibration, distributed.device)
        if reward == "accuracy":  # the label checks see the whole set, as in one process, on every rank
            make_reward(reward, calibration).prepare(model)
        scorer = SplittableReward(make_reward(reward, shard(calibration, distributed.rank, distributed.world)),
                                  distributed.device)
    scorer.prepare(model)
    selector = None
    if selection_part is not None:  # every rank holds the whole set: each selects alone, identically
        selector = make_reward(reward, selection_part)
        selector.prepare(model)
    recalibrate = BatchNormRecalibration(model, calibration.inputs[:int(o.bn_recalibration)])

    def score() -> float:
        if recalibrate:
            recalibrate()
        return scorer(model)

    try:  # from here on BatchNorm statistics get re-estimated in place: undo that on any failure
        tick = time.perf_counter()
        baseline = float(scorer(model))
        forward_seconds = time.perf_counter() - tick
        if recalibrate:
            baseline = float(score())

        floor = baseline - float(o.max_drop) if targets is None else None
        if depth:
            env = space.make_env(score, targets[0], max_amount, baseline, tolerance,
                                 reward=getattr(o.agent_type, "episode_reward", None))
        else:
            env = LayerwisePruningEnv(space.steps, space.masks, score, targets[0] if targets else 0.0, budget,
                                      max_amount, cost=space.cost, score_floor=floor)
        if getattr(space, "timer", None) is not None and targets:
            if distributed is None:
                calibrate_before_search(space, env, targets)
            else:  # every process would measure its own calibration, and their budgets must be equal
                _share_latency_timings(space, env, distributed)
                warnings.warn("rl_prune: budget=Latency under torch.distributed budgets the latency table's own "
                              "prediction, not calibrated or checked by measurements; time the result after "
                              "compact", UserWarning, stacklevel=3)
        for t in targets or ():
            env.set_target(t)
            if env.existing_fraction > t + tolerance:
                raise ValueError(f"target {t} is below what the model's existing masks already remove "
                                 f"({env.existing_fraction:.4f})")
            if env.max_fraction < t - tolerance:
                raise ValueError(f"target {t} cannot be reached with at most max_amount={max_amount} of "
                                 f"each layer removed (at most {env.max_fraction:.4f})"
                                 + _depth_hint(space, budget, depth))
            closest = env.achieved(env.closest_plan())
            if abs(closest - t) > tolerance:
                raise ValueError(f"target {t} cannot be met within {tolerance * 100:g} percentage points: "
                                 f"the layers are too coarse (the closest plan removes {closest:.4f})")
        if targets:
            env.set_target(targets[0])
        env.targets = targets
        env.keep_top = max(1, int(quality.select_top)) if selector is not None else 1
    except BaseException:
        recalibrate.restore()
        raise
    return _PreparedSearch(space, env, scorer, calibration, recalibrate, baseline, forward_seconds, floor,
                           quality, selector)


def _depth_hint(space, budget: str, depth: bool) -> str:
    """For a latency target that widths cannot reach: whether removing residual blocks could."""
    if budget != "latency" or depth:
        return ""
    from .depth import find_removable_blocks

    try:
        blocks = find_removable_blocks(space.model, space.example)
    except Exception:  # noqa: BLE001 - a hint only; the refusal stands either way
        return ""
    if not blocks:
        return ""
    return (f"; widths alone cannot remove the per-call overhead that dominates a small model's latency: "
            f"agent='n2n' also removes whole residual blocks ({len(blocks)} removable here)")


def _share_latency_timings(space, env, coordinator) -> None:
    """Every rank budgets rank 0's latency table: each timed its own, and a plan one rank finds on
    the budget must be on it for all (the followers check the plan they are sent)."""
    from .channel_steps import LatencyBudget

    space.latency.table.use_timings(coordinator.share(space.latency.table.timings()))
    space.latency.dense_latency = space.latency.table.dense_latency
    space.cost = LatencyBudget(space.structure, space.latency, space.cost_max_amount)
    env.use_cost(space.cost)


def _rescore(prepared: _PreparedSearch, key: float, k: np.ndarray) -> None:
    """A plan changed after the search (rescaled onto a measured latency) becomes the best plan of
    ``key`` with scores measured on it: the search part and, when held out, the selection part."""
    env, best = prepared.env, prepared.env.best_by_target[key]
    best.k = np.array(k, dtype=np.int64)
    best.score = best.reward = env.evaluate(best.k)
    selection = prepared.selections.get(key)
    if selection is not None:
        selection.search_score = best.score
        selection.selection_score = env.measure(best.k, prepared.score_selection_part)


def _warn_latency_missed(record: dict, target: float) -> None:
    if not record["met"]:
        warnings.warn(f"rl_prune: measured after compact on {record['spec']['runtime']}, the plan removes "
                      f"{record['measured_fraction']:.1%} of the latency for a target of {target:.1%} (tolerance "
                      f"{record['spec']['tolerance']:.0%}) after {len(record['rounds'])} measurement(s); "
                      "plan.metadata['latency']['measured'] has every round", UserWarning, stacklevel=3)


def score_priors(prepared: _PreparedSearch, structure: str, targets) -> None:
    """The prior plans of every target, scored before any agent acts (see :mod:`.selection`)."""
    quality, space, env = prepared.quality, prepared.space, prepared.env
    if quality.prior == "none" or not targets:
        return
    if getattr(env, "supports_depth", False):
        plan_of = env.prior_plan
    else:
        def plan_of(method: str) -> np.ndarray:
            return space.prior_plan(method, env.cost, env.goal)
    tolerance = STRUCTURE_DEFAULTS[structure].tolerance
    prepared.priors = seed_priors(env, plan_of, structure, quality.prior, targets, tolerance)


def _run_search(agent_obj: Agent, agent_cls, agent_config, seed, prepared: _PreparedSearch, structure: str,
                episodes: int, targets, one_search: bool, recorder: Optional[SearchRecorder], coordinator) -> None:
    """The agent's part of a search (rank 0's, when distributed); releases the other ranks at the end."""
    env = prepared.env
    try:
        with agent_threads():  # scoring switches back to the caller's threads (threads.py)
            score_priors(prepared, structure, targets)
            if one_search:
                agent_obj.search(env, episodes)
            else:  # one fresh agent per target, one search after the other
                for i, t in enumerate(targets):
                    env.set_target(t)
                    searcher = agent_obj if i == 0 else agent_cls(agent_config, seed=int(seed))
                    if recorder is not None:
                        recorder.agent = searcher
                    searcher.search(env, episodes)
            env.finalize()
            if recorder is not None:  # a resumed search reports nothing it did not measure
                recorder.verify_replayed()
    except BaseException:
        if recorder is not None:  # first: releasing the other ranks may not return (they may be gone)
            recorder.save_after_failure()
        if coordinator is not None:
            coordinator.finish(failed=True)
        raise
    if recorder is not None:
        recorder.save()
    if coordinator is not None:
        coordinator.finish()


@one_search_at_a_time
def rl_prune(model: nn.Module, target: Union[float, Sequence[float], None] = 0.8, data=None, reward="fidelity",
             agent="amc",
             episodes: Optional[int] = None, budget: Union[str, Latency, None] = None, structure: str = "unstructured",
             exclude=None, example_inputs=None, seed: int = 0, verbose: bool = True,
             agent_config=None, calibration_samples: int = 512, max_amount: Optional[float] = None,
             importance_scores=None, parameters=None, importance=None, round_to: Optional[int] = None,
             bn_recalibration: Optional[int] = None, max_drop: Optional[float] = None,
             repair: Optional[str] = None, checkpoint=None, checkpoint_every: int = 10, resume=None,
             distributed: bool = False,
             prior: str = "best", selection: float = 0.25, select_top: int = 5, protect_first_last: bool = True,
             label=None):
    """Search per-layer pruning amounts with an RL agent and prune ``model`` in place.

    Args:
        model: any ``nn.Module`` (timm models included). Pruned in place; the same object
            is returned in ``result.model``.
        target: fraction of the budget removed, in (0, 1): of the prunable weights
            (unstructured, ``budget="params"``), of their MACs (``"macs"``), of the whole
            model's MACs/params (``structure="channel"``), or of its predicted latency
            (``budget="latency"``). Met within 0.5 percentage points for unstructured pruning
            and 2 for channel pruning, always (for latency: as measured after compact, within
            ``Latency.tolerance``, or a warning says by how much it missed). A list of targets
            returns a :class:`MultiTargetResult` and leaves the model unpruned: ``agent="cacp"``
            runs one search conditioned on the target, other agents one search per target
            (``episodes`` each). ``None`` with ``max_drop=``: AMC's accuracy-guaranteed
            compression, the smallest plan found whose score stays within ``max_drop`` of the
            unpruned model's (reward ``-(1 - score) * log(remaining MACs or params)``).
        data: calibration data: a DataLoader, an iterable of batches (tensors,
            ``(inputs, labels)``, tuples of several inputs -- ``model(*batch)`` -- or dicts --
            ``model(**batch)``, transformers style), a Dataset, or a tensor. ``None`` synthesises
            Gaussian inputs from ``example_inputs`` or timm's ``pretrained_cfg`` (with a warning).
        reward: ``"fidelity"`` (label-free agreement with the unpruned model),
            ``"accuracy"`` (needs labels) or ``callable(model) -> float``.
        agent: a registered name (``list_agents()``) or an :class:`Agent` instance.
            ``"n2n"`` (needs ``structure="channel"``, one target) also removes whole residual
            blocks (:mod:`torch_rlprune.depth_search`); the plan lists them in
            ``metadata["removed_blocks"]`` and :func:`compact` replaces them by identities.
        episodes: episodes to run; ``None`` takes the agent's default.
        budget: ``"params"``, ``"macs"``, ``"latency"`` or a :class:`Latency`; default ``"params"``
            for unstructured and ``"macs"`` for channel pruning. ``"latency"`` (AMC's
            latency-aware mode; ``structure="channel"`` only) is
            ``Latency()``: the wall time of one inference at ``Latency(batch=1)`` on
            ``runtime="eager"`` (or ``"onnxruntime"``) with ``threads`` intra-op threads (default
            ``torch.get_num_threads()``). A :class:`~torch_rlprune.channel.latency.LatencyTable`
            predicts it (every Conv/Linear and LSTM/GRU/RNN timed alone at a few narrower widths,
            the rest scaled with the activations), calibrated on whole compacted candidates
            measured on the runtime before the search; after it, the returned plan is compacted
            and measured, and rescaled onto the target until it lands within
            ``Latency.tolerance`` (:mod:`~torch_rlprune.channel.measured`). Timings are cached
            (``$TORCH_RLPRUNE_CACHE`` or ``~/.cache/torch_rlprune/latency``); the plan's
            ``metadata["latency"]`` holds the predictions, the calibration and every measured round
            (``["measured"]``); a plan still off target after ``Latency.rounds`` warns. With
            ``agent="n2n"`` whole residual blocks go too, each timed alone in the model
            (:mod:`~torch_rlprune.depth_latency`): on small models at batch 1 the per-call
            overhead, which only removing blocks cuts, is most of the latency.
        structure: ``"unstructured"`` (weights) or ``"channel"`` (torch-pruning dependency
            groups: whole channels, residual adds, concats and attention heads kept consistent).
        exclude: module names or modules to leave unpruned (with everything below them; for
            channels: their output channels stay).
        example_inputs: one input batch, used when ``data`` is None.
        seed: makes the search bit-for-bit reproducible.
        verbose: show a progress bar.
        agent_config: the agent's config dataclass or a dict of overrides.
        calibration_samples: inputs taken from ``data`` to score plans on.
        max_amount: largest fraction removable from any single tensor (default 0.98) or
            channel group (default 0.8, AMC's bound).
        importance_scores: unstructured only: ``{name or (module, name): tensor}`` ranking
            entries (smallest pruned first) instead of weight magnitude.
        parameters: unstructured only: ``[(module, name), ...]`` restricting the search.
        importance: channel only: a torch-pruning importance (``tp.importance.*``) choosing
            which channels go; default group magnitude.
        round_to: channel only: what remains of each group is a multiple of this. Default
            ``None`` (any width), 8 with ``budget="latency"``: CPU conv kernels are much slower
            at odd widths than the timed grid predicts (resnet18 at a 0.3 latency target, batch 1:
            measured 4% slower than dense without rounding, 26% faster with 8).
        bn_recalibration: re-estimate BatchNorm running statistics on this many calibration
            batches before every score (0: off). The final model gets the statistics
            re-estimated for the plan applied, so it is the model that was scored. Default 4
            (EagleEye's adaptive BN; 4 batches of 128 beat 1 by +0.5 / +1.5 pp at 90 / 95% of
            weights, ``benchmarks/ablation.py``). Measured on Fashion-MNIST resnet18, no fine-tune: channel
            pruning at 50% MACs +9.7 pp test accuracy; LAMP at 80/90/95% of the weights 87.4 ->
            89.3%, 52.1 -> 88.0%, 9.7 -> 84.1%; and the rewards rank plans like the test set
            does far better with it (``benchmarks/reward_ranking.py``).
        repair: ``"lstsq"`` (the default for ``structure="channel"``) refits, after the search, every
            layer whose input lost channels so that it reproduces the unpruned model's output on the
            calibration set (ridge least squares, AMC's and ThiNet's reconstruction:
            :class:`~torch_rlprune.repair.LeastSquaresRefit`); only kept weights change, never a mask.
            Measured on Fashion-MNIST resnet18 at 50% of the MACs: the prior's plan 85.4 -> 88.2%
            test accuracy, no fine-tune. ``"none"`` (the only choice for unstructured pruning) keeps
            the weights. The plan's ``metadata["repair"]`` lists the layers refitted and the score
            measured after it.
        max_drop: with ``target=None``: the largest score drop allowed (absolute, in the
            reward's units: 0.01 = one point of fidelity or accuracy).
        checkpoint: a file the search is saved to every ``checkpoint_every`` episodes, when it
            ends, and when it is interrupted or fails (:mod:`torch_rlprune.checkpoint`).
        checkpoint_every: episodes between two checkpoints.
        resume: a checkpoint file (or a directory holding ``checkpoint.pt``) of an earlier call
            with the same arguments: the search continues from it and ends with the same plan as
            an uninterrupted run. Plans it already scored are not scored again. Unless
            ``checkpoint`` is given, the resumed search keeps saving to the same file.
        distributed: call on every rank under ``torchrun``: the calibration set is split over the
            processes (gloo on CPU, nccl on CUDA; the default process group is created from
            torchrun's environment if none exists), the agent runs on rank 0, and every rank ends
            with the same plan applied (:mod:`torch_rlprune.distributed`). Needs
            ``reward="fidelity"`` or ``"accuracy"`` and the same ``data`` on every rank; only rank 0
            shows progress and writes ``checkpoint``.
        label: which part of a ``data`` batch is the label. ``None`` (automatic): a tuple batch's
            inputs are as many elements as ``forward`` requires and the next one is the label
            (``(x, y)``, ``(src, tgt, y)``); for ``forward(*args)`` or all-optional arguments
            (transformers) the last element is the label when it is 1-D with one value per sample.
            A dict batch's label is its ``"labels"``/``"label"``/``"target"``/``"targets"``/``"y"``
            key and the rest are keyword inputs (a one-input model's ``"input"``/``"x"``/``"image"``
            is passed positionally, as before). Or a position in a tuple batch (``int``), a key of
            a dict batch (``str``), or ``False`` (no label: the whole batch is the input).

    Returns:
        :class:`PruneResult` (one target or ``target=None``) or :class:`MultiTargetResult`.

    The model is touched only after every argument has been checked; if anything fails
    or is interrupted (KeyboardInterrupt included), parameters, buffers, hooks and
    training flags are exactly as before the call.
    """
    started = time.perf_counter()
    # ---- validate everything before any weight is touched
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    options = PruneOptions(
        target=target, max_drop=max_drop, structure=structure, budget=budget, agent=agent, reward=reward,
        episodes=episodes, seed=seed, calibration_samples=calibration_samples, max_amount=max_amount,
        importance=importance, importance_scores=importance_scores, parameters=parameters, round_to=round_to,
        bn_recalibration=bn_recalibration, repair=repair, prior=prior, selection=selection, select_top=select_top,
        protect_first_last=protect_first_last, label=label, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
        resume=resume, distributed=distributed).checked()
    targets, budget, max_amount, round_to, repair = (options.targets, options.budget, options.max_amount,
                                                     options.round_to, options.repair)
    agent_cls = options.agent_type
    if isinstance(agent, Agent):
        agent_obj = agent
    leader = True
    coordinator = None
    if distributed:
        rank, world = distributed_context(model)
        param = next(model.parameters(), None)
        coordinator = DistributedSearch(rank, world, param.device if param is not None and param.is_cuda
                                        else torch.device("cpu"))
        leader = coordinator.leader
        if not leader:  # the agent, its progress bar and its checkpoints live on rank 0
            verbose, checkpoint, resume = False, None, None
    with all_ranks_succeed(coordinator, "reading the checkpoint"):  # rank 0 alone reads it
        resumed = load_checkpoint(resume) if resume is not None else None
    if resumed is not None and checkpoint is None:
        checkpoint = resumed["path"]
    with all_ranks_succeed(coordinator, "checking the checkpoint path"):
        existing = check_checkpoint_path(checkpoint, resumed) if checkpoint is not None else None
    if not isinstance(agent, Agent):
        agent_obj = agent_cls(agent_config, seed=int(seed))
    episodes = int(episodes if episodes is not None else agent_obj.config.episodes)
    tolerance = options.tolerance

    layers = find_prunable(model, exclude, parameters)
    if not layers:
        raise ValueError("the model has no prunable layers (Conv/Linear weights) left after 'exclude'")
    left_out = left_out_weights(model, layers, exclude) if parameters is None else {}
    if left_out:
        warnings.warn("rl_prune: weight tensors that are not candidates stay dense: " + "; ".join(
            f"{reason}: {len(names)} ({', '.join(names[:2])}{', ...' if len(names) > 2 else ''})"
            for reason, names in left_out.items()), UserWarning, stacklevel=3)

    snapshot = ModelSnapshot(model)
    env = recalibrate = recorder = refit = measured_latency = None
    try:
        with torch.random.fork_rng(devices=[]), progress(verbose and leader):
            torch.manual_seed(int(seed))
            prepared = prepare_search(model, layers, options, data, exclude, example_inputs, distributed=coordinator)
            space, env, scorer, calibration, recalibrate = (prepared.space, prepared.env, prepared.scorer,
                                                            prepared.calibration, prepared.recalibrate)
            baseline, forward_seconds, floor = prepared.baseline, prepared.forward_seconds, prepared.floor
            one_search = targets is None or len(targets) == 1 or agent_obj.multi_target
            total_episodes = episodes if one_search else episodes * len(targets)

            with all_ranks_succeed(coordinator, "checking the checkpoint"):
                if checkpoint is not None or resumed is not None:
                    fingerprint = _search_fingerprint(agent_obj, options, episodes, scorer, calibration, space,
                                                      baseline, model)
                    recorder = SearchRecorder(checkpoint, checkpoint_every, fingerprint, resumed, existing)
                    recorder.attach(env, agent_obj)
            bar = tqdm(total=total_episodes, desc=f"rl_prune[{agent_obj.name}]", disable=not verbose,
                       leave=False, dynamic_ncols=True)
            env.callbacks.append(lambda rec: (bar.update(1), bar.set_postfix(best=f"{rec.best_reward:.4f}",
                                                                             last=f"{rec.reward:.4f}")))
            if coordinator is not None and leader:
                env.score_fn = coordinator.wrap_leader_score(env, env.score_fn, scorer)
            search_started = time.perf_counter()
            try:
                if not leader:
                    coordinator.serve(env, env.score_fn, scorer)
                else:
                    _run_search(agent_obj, agent_cls if not isinstance(agent, Agent) else None, agent_config, seed,
                                prepared, structure, episodes, targets, one_search, recorder, coordinator)
                if coordinator is not None:
                    prepared.priors = coordinator.share_results(env, prepared.priors)
                if prepared.selector is not None:
                    prepared.selections = select_plans(env, list(targets), prepared.score_selection_part)
                if getattr(space, "timer", None) is not None and targets is not None and len(targets) == 1 \
                        and coordinator is None:
                    measured_latency = close_on_measurement(space, env, targets[0], targets[0],
                                                            lambda k: _rescore(prepared, targets[0], k))
            finally:
                bar.close()
                env.restore()
                recalibrate.restore()
                if getattr(space, "timer", None) is not None:
                    space.timer.close()
            search_seconds = time.perf_counter() - search_started

            def plan_for(key: Optional[float]) -> PruningPlan:
                best = env.best_by_target.get(key)
                if best is None or best.k is None:
                    raise RuntimeError(f"agent {agent_obj.name!r} finished without a plan"
                                       + ("" if key is None else f" for target {key}"))
                amounts, numels, extra = space.plan_entries(best.k)
                planned = env.achieved(best.k)
                mode = {"mode": "accuracy-guaranteed", "max_drop": float(max_drop),
                        "score_floor": floor} if key is None else {}
                if key in prepared.priors:
                    mode["prior"] = prepared.priors[key].as_dict()
                if resumed is not None:
                    mode["resume"] = {"replayed_plans": len(env.replayed_keys), "remeasured": recorder.remeasured}
                if key in prepared.selections:
                    mode["selection"] = {**prepared.selections[key].as_dict(),
                                         "samples": sum(len(x) for x in prepared.selector.calibration.inputs)}
                return PruningPlan(amounts=amounts, numels=numels, target=planned if key is None else key,
                                   sparsity=planned, budget=budget, structure=structure, agent=agent_obj.name,
                                   reward=scorer.name, seed=int(seed), score=best.score,
                                   baseline_score=baseline,
                                   episodes=sum(1 for h in env.history if h.target == key),
                                   metadata={"agent_config": agent_obj.hyperparameters(),
                                             "calibration_samples": prepared.calibration_samples,
                                             "synthetic_calibration": calibration.synthetic,
                                             "max_amount": max_amount,
                                             "bn_recalibration": int(options.bn_recalibration),
                                             **({"left_out": left_out} if left_out else {}),
                                             **mode, **extra})

            example = prepared.example
            if targets is not None and len(targets) > 1:
                results = {}
                for t in targets:
                    plan = plan_for(t)
                    results[t] = PruneResult(model, plan, plan.sparsity,
                                             [h.as_dict() for h in env.history if h.target == t], baseline,
                                             time.perf_counter() - started, forward_seconds, space.steps,
                                             example_inputs=example, search_seconds=search_seconds)
                outcome = MultiTargetResult(model, results, agent_obj.name, time.perf_counter() - started,
                                            [h.as_dict() for h in env.history], latency=getattr(space, "latency", None),
                                            bn_batches=recalibrate.batches,
                                            refit_batches=calibration.inputs if repair == "lstsq" else ())
            else:
                plan = plan_for(None if targets is None else targets[0])
                if repair == "lstsq":  # created before the masks: it reproduces the model as it is now
                    refit = LeastSquaresRefit(model, calibration.inputs, seed=int(seed))
                achieved = space.apply(plan)
                report = refit() if refit is not None else None
                if recalibrate:
                    recalibrate()
                if report is not None:
                    plan.metadata["repair"] = _measured_repair(report, prepared, coordinator, model)
                if measured_latency is not None:  # the target is met as measured, or a warning says by how much not
                    plan.metadata["latency"]["measured"] = measured_latency
                    plan.sparsity = achieved = measured_latency["measured_fraction"]
                    _warn_latency_missed(measured_latency, targets[0])
                on_target = measured_latency is not None or not targets or abs(achieved - targets[0]) <= tolerance
                if abs(achieved - plan.sparsity) > tolerance or not on_target:
                    raise RuntimeError(f"internal error: achieved {achieved:.4f} for target {plan.target}; "
                                       "please report this")
                outcome = PruneResult(model, plan, achieved, [h.as_dict() for h in env.history], baseline,
                                      time.perf_counter() - started, forward_seconds, space.steps,
                                      example_inputs=example, search_seconds=search_seconds)
    except BaseException:  # the search saved its checkpoint itself (_run_search)
        if refit is not None:  # values written into the user's own parameters: put back first
            refit.restore()
        if env is not None:
            env.restore()
        if recalibrate is not None:
            recalibrate.restore()
        snapshot.restore()
        raise
    snapshot_modes = {id(m): t for m, t, *_ in snapshot.modules}
    for m in model.modules():
        m.training = snapshot_modes.get(id(m), m.training)
    return outcome


def _digest(tensors) -> List[float]:
    """Two float64 sums that change when any value does (not a hash: enough to tell models apart)."""
    first = second = 0.0
    with torch.no_grad():
        for t in tensors:
            t = t.detach().double().reshape(-1)
            first += float(t.abs().sum())
            second += float((t * torch.arange(1, len(t) + 1, dtype=torch.float64, device=t.device)).sum())
    return [first, second]


def _search_fingerprint(agent, options: PruneOptions, episodes: int, scorer, calibration, space, baseline,
                        model) -> dict:
    """What a resumed search must share with the checkpointed one (plain data, compared with ==).
    The weights and the calibration data are in it as digests: the replay answers plans from the
    record, so a changed model or data would otherwise go unnoticed."""
    def plain(value):
        if isinstance(value, np.generic):  # np.float64 is a float, but weights_only refuses to load it
            return value.item()
        if isinstance(value, torch.Tensor):
            return [float(value.detach().double().abs().sum()), float(value.detach().double().square().sum())]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)

    o, importance = options, options.importance
    return plain({"agent": agent.name, "agent_config": agent.hyperparameters(), "targets": o.targets,
                  "max_drop": o.max_drop, "structure": o.structure, "budget": o.budget, "reward": scorer.name,
                  "latency": getattr(space, "latency_spec", None) and space.latency_spec.as_dict(),
                  "seed": int(o.seed), "episodes": int(episodes), "max_amount": float(o.max_amount),
                  "calibration_samples": calibration.num_samples, "synthetic_calibration": calibration.synthetic,
                  "bn_recalibration": int(o.bn_recalibration), "round_to": o.round_to,
                  "importance": importance if importance is None or isinstance(importance, str)
                  else type(importance).__name__,
                  "quality": asdict(o.quality),
                  "importance_scores": dict(sorted(getattr(space, "scores", {}).items())) or None,
                  "baseline_score": float(baseline),
                  "weights": _digest(p for p in model.parameters()),
                  "calibration": _digest(t for batch in calibration.inputs for t in batch_tensors(batch)),
                  "steps": [f"{layer.name}:{getattr(layer, 'numel', '')}" for layer in space.steps]})


def global_rl_unstructured(parameters, target: float, importance_scores=None, *, model: nn.Module,
                           agent="amc", reward="fidelity", data=None, **kwargs) -> PruneResult:
    """RL counterpart of ``prune.global_unstructured``: one search over exactly ``parameters``.

    Args:
        parameters: iterable of ``(module, name)`` tuples, as for ``prune.global_unstructured``.
        target: fraction of these tensors' entries to remove overall, in (0, 1).
        importance_scores: optional ``{(module, name): tensor}``, as for ``global_unstructured``.
        model: the model the tensors belong to (needed to score plans).
        agent, reward, data, **kwargs: as for :func:`rl_prune` (``label=`` included).
    """
    if not isinstance(model, nn.Module):
        raise TypeError("global_rl_unstructured needs model= (the nn.Module the parameters belong to)")
    try:
        parameters = list(parameters)
    except TypeError:
        raise TypeError("parameters must be an iterable of (module, name) tuples") from None
    if not parameters:
        raise ValueError("parameters is empty: give at least one (module, name) tuple")
    return rl_prune(model, target, data=data, reward=reward, agent=agent, parameters=parameters,
                    importance_scores=importance_scores, **kwargs)
