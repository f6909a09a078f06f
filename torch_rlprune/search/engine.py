"""One search, from checked options to its result: calibration -> space -> reward -> MDP; run; finalize.

:func:`prepare_search` builds what an agent searches (shared with the gymnasium environment);
:class:`Search` runs one ``rl_prune`` call on it: the agent (or, on other ranks, the follower), the
choice on held-out data, the latency closing step, and the plans and results it returns. The caller
holds the :class:`~torch_rlprune.structure.snapshot.ModelSnapshot` that undoes everything on failure.
"""
from __future__ import annotations

import functools
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..agents import Agent
from ..env.channel_steps import LatencyBudget
from ..env.layerwise import LayerwisePruningEnv
from ..env.spaces import build_space
from ..options import STRUCTURE_DEFAULTS, PruneOptions, SearchQuality
from ..plan import PruningPlan
from ..results import MultiTargetResult, PruneResult
from ..rewards.calibration import build_calibration, primary_output
from ..rewards.recalibration import BatchNormRecalibration, PlanStatistics
from ..rewards.repair import LeastSquaresRefit, keep_or_undo, refit_scope, score_with_error
from ..rewards.scores import REWARDS, make_reward
from ..rewards.screening import DEFAULT_SCREEN_SAMPLES, MIN_SCREENED_SHARE, Screening
from ..structure.channel.measured import calibrate_before_search, close_on_measurement
from ..structure.depth import find_removable_blocks
from ..structure.inputs import as_example, batch_tensors, describe_shape, run_model
from ..structure.prefix_cache import PrefixCache
from ..threads import agent_threads
from .checkpoint import SearchRecorder
from .distributed import SplittableReward, all_ranks_succeed, check_same_calibration, shard
from .as_returned import returned_score
from .selection import choose_on_held_out, seed_priors, split_calibration
from .stopping import StopRule

STATISTICS_BYTES = 16 * 2 ** 20
"""The most memory kept for plans' BatchNorm statistics (:class:`PlanStatistics`): resnet18's are
38 KB a plan, so a search keeps every plan it scored in full; a larger model drops the oldest."""

__all__ = ["PreparedSearch", "prepare_search", "score_priors", "Search", "search_fingerprint"]


@dataclass
class PreparedSearch:
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
    statistics: Optional[PlanStatistics] = None  # each plan's BatchNorm statistics, kept from its full score

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

    def selection_gains(self) -> torch.Tensor:
        """The current masks' per-sample gains on the selection part (:meth:`score_selection_part`'s terms)."""
        self.refresh_statistics()
        return self.selector.sample_gains(self.space.model)

    def score_selection_part(self) -> float:
        """The current masks scored on the selection part, BatchNorm re-estimated on the search part."""
        self.refresh_statistics()
        return float(self.selector(self.space.model))

    def refresh_statistics(self) -> None:
        """BatchNorm statistics for the applied plan, as every score of it has them (:func:`_refresh`)."""
        _refresh(self.recalibrate, self.statistics, self.env)


def prepare_search(model: nn.Module, layers, options: PruneOptions, data, exclude=None, example_inputs=None,
                   distributed=None) -> PreparedSearch:
    """Calibration data, the search space (weights or channel groups), the reward and the MDP,
    every target checked for feasibility, for :meth:`PruneOptions.checked` options. Masks are
    touched only from here on: the caller holds a :class:`ModelSnapshot`."""
    o = options
    model.eval()
    calibration = build_calibration(model, data, example_inputs, int(o.calibration_samples), seed=int(o.seed),
                                    label=o.label)
    # a callable reward scores on its own data, and the guarantee's criterion is not the score
    selecting = o.quality.selection > 0 and not callable(o.reward) and o.targets is not None
    calibration, selection_part = split_calibration(calibration, o.quality.selection if selecting else 0.0,
                                                    int(o.seed))
    space = _space_on_data(model, layers, o, calibration, exclude)
    scorer = _scorer(model, o.reward, calibration, distributed)
    selector = None
    if selection_part is not None:  # every rank holds the whole set; rank 0 chooses, the others copy it
        selector = make_reward(o.reward, selection_part)
        selector.prepare(model)
    recalibrate = BatchNormRecalibration(model, calibration.inputs[:int(o.bn_recalibration)])
    # only the held-out choice reuses them; every rank re-estimates for itself under torch.distributed:
    # keeping statistics on one rank only would make the ranks' models differ by the rounding of two estimates
    statistics = PlanStatistics(recalibrate, STATISTICS_BYTES) \
        if recalibrate and selector is not None and distributed is None else None
    env = None

    def score() -> float:
        _refresh(recalibrate, statistics, env)
        return scorer(model)

    try:  # from here on BatchNorm statistics get re-estimated in place: undo that on any failure
        tick = time.perf_counter()
        baseline = float(scorer(model))
        forward_seconds = time.perf_counter() - tick
        if recalibrate:
            baseline = float(score())
        floor = baseline - float(o.max_drop) if o.targets is None else None
        env = _environment(space, score, o, baseline, floor)
        env.screening = _screening(model, o, calibration, recalibrate, baseline)
        env.prefix_cache = _prefix_cache(model, space, o, calibration, distributed)
        if getattr(space, "timer", None) is not None and o.targets:
            _calibrate_latency(space, env, o.targets, distributed)
        _check_targets_reachable(env, space, o)
        env.keep_top = max(1, int(o.quality.select_top)) if selector is not None else 1
    except BaseException:
        recalibrate.restore()
        raise
    return PreparedSearch(space, env, scorer, calibration, recalibrate, baseline, forward_seconds, floor,
                          o.quality, selector, statistics=statistics)


def _refresh(recalibrate: BatchNormRecalibration, statistics: Optional[PlanStatistics], env) -> None:
    """BatchNorm statistics re-estimated for the plan ``env`` is scoring (``env.scoring_key``; no
    environment yet: the unpruned model), or the ones kept from an earlier score of it (``statistics``)."""
    if statistics is not None:
        statistics.refresh(getattr(env, "scoring_key", None))
    elif recalibrate:
        recalibrate()


def _space_on_data(model, layers, options: PruneOptions, calibration, exclude):
    """The search space, built while the first forward pass checks that the data fits the model."""
    first_output = []

    def run_first_batch():
        with torch.inference_mode():
            first_output.append(primary_output(run_model(model, calibration.inputs[0])))

    try:
        space = build_space(model, layers, options, calibration.inputs, run_first_batch, exclude)
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
    return space


def _scorer(model, reward, calibration, distributed):
    """The reward on the search part; under torch.distributed every rank scores its share."""
    if distributed is None:
        scorer = make_reward(reward, calibration)
    else:
        check_same_calibration(calibration, distributed.device)
        if reward == "accuracy":  # the label checks see the whole set, as in one process, on every rank
            make_reward(reward, calibration).prepare(model)
        scorer = SplittableReward(make_reward(reward, shard(calibration, distributed.rank, distributed.world)),
                                  distributed.device)
    scorer.prepare(model)
    return scorer


def _environment(space, score, o: PruneOptions, baseline: float, floor):
    first = o.targets[0] if o.targets else 0.0
    if o.needs_depth:
        return space.make_env(score, first, o.max_amount, baseline, o.tolerance,
                              reward=getattr(o.agent_type, "episode_reward", None))
    return LayerwisePruningEnv(space.steps, space.masks, score, first, o.budget, o.max_amount, cost=space.cost,
                               score_floor=floor)


def _screening(model, o: PruneOptions, calibration, recalibrate, baseline: float) -> Optional[Screening]:
    """Multi-fidelity scoring (:mod:`torch_rlprune.rewards.screening`) for a search of targets with
    a built-in reward, on ``screen`` samples (automatic: when the search part is large enough)."""
    if o.screen == 0 or o.reward not in REWARDS or o.targets is None or o.needs_depth:
        return None
    samples = DEFAULT_SCREEN_SAMPLES if o.screen is None else int(o.screen)
    if calibration.num_samples < (MIN_SCREENED_SHARE * samples if o.screen is None else samples + 1):
        return None
    return Screening(model, o.reward, calibration, samples, int(o.seed), bool(recalibrate), baseline)


def _prefix_cache(model, space, o: PruneOptions, calibration, distributed) -> Optional[PrefixCache]:
    """Prefix caching (:mod:`torch_rlprune.structure.prefix_cache`) where the space says which
    modules read each step, with a built-in reward: a callable's own batches may be new tensors
    every call, and only the calibration tensors, held for the whole search, identify a batch.
    Not under torch.distributed: the other ranks score their shards outside the leader's scoring."""
    step_modules = getattr(space, "step_modules", None)
    if not o.cache_mb or step_modules is None or o.reward not in REWARDS or o.needs_depth or distributed:
        return None
    try:
        return PrefixCache(model, step_modules(), calibration.inputs[0][:2], int(o.cache_mb * 2 ** 20))
    except Exception as err:   # a speed-up, never a reason to fail: the trace runs on two samples only
        warnings.warn(f"rl_prune: prefix caching is off for this search: tracing a forward on two calibration "
                      f"samples failed ({type(err).__name__}: {err})", UserWarning, stacklevel=4)
        return None


def _calibrate_latency(space, env, targets, distributed) -> None:
    if distributed is None:
        calibrate_before_search(space, env, targets)
        return
    # every process would measure its own calibration, and their budgets must be equal
    share_latency_timings(space, env, distributed)
    warnings.warn("rl_prune: budget=Latency under torch.distributed budgets the latency table's own "
                  "prediction, not calibrated or checked by measurements; time the result after "
                  "compact", UserWarning, stacklevel=4)


def _check_targets_reachable(env, space, o: PruneOptions) -> None:
    tolerance, max_amount = o.tolerance, o.max_amount
    for t in o.targets or ():
        env.set_target(t)
        if env.existing_fraction > t + tolerance:
            raise ValueError(f"target {t} is below what the model's existing masks already remove "
                             f"({env.existing_fraction:.4f})")
        if env.max_fraction < t - tolerance:
            raise ValueError(f"target {t} cannot be reached with at most max_amount={max_amount} of "
                             f"each layer removed (at most {env.max_fraction:.4f})"
                             + _depth_hint(space, o.budget, o.needs_depth))
        closest = env.achieved(env.closest_plan())
        if abs(closest - t) > tolerance:
            raise ValueError(f"target {t} cannot be met within {tolerance * 100:g} percentage points: "
                             f"the layers are too coarse (the closest plan removes {closest:.4f})")
    if o.targets:
        env.set_target(o.targets[0])
    env.targets = o.targets


def _depth_hint(space, budget: str, depth: bool) -> str:
    """For a latency target that widths cannot reach: whether removing residual blocks could."""
    if budget != "latency" or depth:
        return ""
    try:
        blocks = find_removable_blocks(space.model, space.example)
    except Exception:  # noqa: BLE001 - a hint only; the refusal stands either way
        return ""
    if not blocks:
        return ""
    return (f"; widths alone cannot remove the per-call overhead that dominates a small model's latency: "
            f"agent='n2n' also removes whole residual blocks ({len(blocks)} removable here)")


def share_latency_timings(space, env, coordinator) -> None:
    """Every rank budgets rank 0's latency table: each timed its own, and a plan one rank finds on
    the budget must be on it for all (the followers check the plan they are sent)."""
    space.latency.table.use_timings(coordinator.share(space.latency.table.timings()))
    space.latency.dense_latency = space.latency.table.dense_latency
    space.cost = LatencyBudget(space.structure, space.latency, space.cost_max_amount)
    env.use_cost(space.cost)


def rescore(prepared: PreparedSearch, key: float, k: np.ndarray) -> None:
    """A plan changed after the search (rescaled onto a measured latency) becomes the best plan of
    ``key`` with scores measured on it: the search part and, when held out, the selection part."""
    env, best = prepared.env, prepared.env.best_by_target[key]
    best.k = np.array(k, dtype=np.int64)
    best.score = best.reward = env.evaluate(best.k, full=True)   # a result: never a screening estimate
    selection = prepared.selections.get(key)
    if selection is not None:
        selection.search_score = best.score
        selection.selection_score = env.measure(best.k, prepared.score_selection_part)


def warn_latency_missed(record: dict, target: float) -> None:
    if not record["met"]:
        warnings.warn(f"rl_prune: measured after compact on {record['spec']['runtime']}, the plan removes "
                      f"{record['measured_fraction']:.1%} of the latency for a target of {target:.1%} (tolerance "
                      f"{record['spec']['tolerance']:.0%}) after {len(record['rounds'])} measurement(s); "
                      "plan.metadata['latency']['measured'] has every round", UserWarning, stacklevel=3)


def score_priors(prepared: PreparedSearch, structure: str, targets) -> None:
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


def run_search(agent: Agent, fresh_agent, prepared: PreparedSearch, structure: str, episodes: int, targets,
               one_search: bool, recorder: Optional[SearchRecorder], coordinator, stop: Optional[StopRule] = None
               ) -> None:
    """The agent's part of a search (rank 0's, when distributed); releases the other ranks at the end.
    ``stop`` may end an agent's loop early (a time budget is shared equally by one-target searches)."""
    env = prepared.env
    stop = stop if stop is not None else StopRule()
    if stop.active:
        env.callbacks.append(stop.after_episode)   # last: the episode is recorded and saved first
    try:
        with agent_threads():  # scoring switches back to the caller's threads (threads.py)
            score_priors(prepared, structure, targets)
            if one_search:
                stop.run(agent, env, episodes, targets or [None])
            else:  # one fresh agent per target, one search after the other
                for i, t in enumerate(targets):
                    env.set_target(t)
                    searcher = agent if i == 0 else fresh_agent()
                    if recorder is not None:
                        recorder.agent = searcher
                    stop.run(searcher, env, episodes, [t], share=1.0 / len(targets))
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


def measured_scores(prepared: "PreparedSearch", coordinator, model: nn.Module) -> dict:
    """``model``'s scores as it is (a refit's, BatchNorm re-estimated): on the held-out selection
    part when there is one, and on the search part in one process."""
    record = {}
    if prepared.selector is not None:
        record["selection_score"], error = score_with_error(prepared.selector, model)
        if error is not None:
            record["selection_error"] = error
    if coordinator is None:
        record["search_score"] = float(prepared.scorer(model))
    return record


def _digest(tensors) -> List[float]:
    """Two float64 sums that change when any value does (not a hash: enough to tell models apart)."""
    first = second = 0.0
    with torch.no_grad():
        for t in tensors:
            t = t.detach().double().reshape(-1)
            first += float(t.abs().sum())
            second += float((t * torch.arange(1, len(t) + 1, dtype=torch.float64, device=t.device)).sum())
    return [first, second]


def search_fingerprint(agent, options: PruneOptions, episodes: int, scorer, calibration, space, baseline,
                        model, refit_in_search: bool = False) -> dict:
    """What a resumed search must share with the checkpointed one (plain data, compared with ==).
    The weights and the calibration data are in it as digests: the replay answers plans from the
    record, so a changed model or data would otherwise go unnoticed. ``refit_in_search``: the
    search scores plans refitted (N2N's architecture choice), so the repair is part of it too."""
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
    fingerprint = {"agent": agent.name, "agent_config": agent.hyperparameters(), "targets": o.targets,
                   "max_drop": o.max_drop, "structure": o.structure, "budget": o.budget, "reward": scorer.name,
                   "latency": getattr(space, "latency_spec", None) and space.latency_spec.as_dict(),
                   "seed": int(o.seed), "episodes": int(episodes), "max_amount": float(o.max_amount),
                   "calibration_samples": calibration.num_samples, "synthetic_calibration": calibration.synthetic,
                   "bn_recalibration": int(o.bn_recalibration), "round_to": o.round_to,
                   "importance": importance if importance is None or isinstance(importance, str)
                   else type(importance).__name__,
                   "quality": asdict(o.quality), "screen": o.screen,
                   "importance_scores": dict(sorted(getattr(space, "scores", {}).items())) or None,
                   "baseline_score": float(baseline),
                   "weights": _digest(p for p in model.parameters()),
                   "calibration": _digest(t for batch in calibration.inputs for t in batch_tensors(batch)),
                   "steps": [f"{layer.name}:{getattr(layer, 'numel', '')}" for layer in space.steps]}
    if refit_in_search:
        fingerprint["repair"] = o.repair
    return plain(fingerprint)


class Search:
    """One ``rl_prune`` call on a model whose arguments are checked: prepare, run, return the result.

    ``undo()`` puts back what the search itself wrote (mask values, BatchNorm statistics, a refit);
    the caller's :class:`~torch_rlprune.structure.snapshot.ModelSnapshot` puts back the structure.
    """

    def __init__(self, model: nn.Module, options: PruneOptions, agent: Agent, episodes: int, coordinator=None,
                 fresh_agent=None, left_out: Optional[dict] = None):
        self.model, self.options, self.agent, self.episodes = model, options, agent, episodes
        self.coordinator, self.fresh_agent, self.left_out = coordinator, fresh_agent, left_out or {}
        self.leader = coordinator is None or coordinator.leader
        targets = options.targets
        self.one_search = targets is None or len(targets) == 1 or agent.multi_target
        self.prepared: Optional[PreparedSearch] = None
        self.recorder: Optional[SearchRecorder] = None
        self.resumed: Optional[dict] = None
        self.refit: Optional[LeastSquaresRefit] = None
        self.measured_latency: Optional[dict] = None
        self.search_seconds = 0.0
        self.stop = StopRule(options.time_budget, options.patience)

    def prepare(self, layers, data, exclude=None, example_inputs=None) -> None:
        self.prepared = prepare_search(self.model, layers, self.options, data, exclude, example_inputs,
                                       distributed=self.coordinator)

    def record(self, checkpoint, every: int, resumed: Optional[dict], existing) -> None:
        """Save the search to ``checkpoint`` (and replay ``resumed``'s plans) as it runs."""
        p = self.prepared
        self.resumed = resumed
        fingerprint = search_fingerprint(self.agent, self.options, self.episodes, p.scorer, p.calibration, p.space,
                                         p.baseline, self.model, getattr(p.env, "supports_depth", False))
        self.recorder = SearchRecorder(checkpoint, every, fingerprint, resumed, existing)
        self.recorder.attach(p.env, self.agent)

    def run(self, verbose: bool) -> None:
        """The agent's episodes (a follower's, on other ranks), the choice on held-out data and, for a
        measured latency, the closing step; every mask is off again when this returns."""
        p, targets, coordinator = self.prepared, self.options.targets, self.coordinator
        env, space = p.env, p.space
        total = self.episodes if self.one_search else self.episodes * len(targets)
        bar = tqdm(total=total, desc=f"rl_prune[{self.agent.name}]", disable=not verbose, leave=False,
                   dynamic_ncols=True)
        bar.set_postfix_str(self.stop.forecast(total, p.forward_seconds))   # an ETA before the first episode
        env.callbacks.append(lambda rec: (bar.update(1), bar.set_postfix(best=f"{rec.best_reward:.4f}",
                                                                         last=f"{rec.reward:.4f}",
                                                                         **self.stop.remaining())))
        if coordinator is not None and self.leader:
            env.score_fn = coordinator.wrap_leader_score(env, env.score_fn, p.scorer)
        started = time.perf_counter()
        try:
            if not self.leader:
                coordinator.serve(env, env.score_fn, p.scorer)
            else:
                if getattr(env, "supports_depth", False):
                    env.returned_score = returned_score(p, self.options, coordinator is not None)
                run_search(self.agent, self.fresh_agent, p, self.options.structure, self.episodes, targets,
                           self.one_search, self.recorder, coordinator, self.stop)
            if coordinator is not None:
                p.priors = coordinator.share_results(env, p.priors)
            if p.selector is not None:
                with all_ranks_succeed(coordinator, "choosing the plan on held-out data"):
                    if self.leader:
                        p.selections = choose_on_held_out(p, self.options, list(targets))
                if coordinator is not None:
                    p.selections = coordinator.share_choice(env, p.selections)
            if getattr(space, "timer", None) is not None and targets is not None and len(targets) == 1 \
                    and coordinator is None:
                self.measured_latency = close_on_measurement(space, env, targets[0], targets[0],
                                                             lambda k: rescore(p, targets[0], k))
        finally:
            bar.close()
            env.restore()
            p.recalibrate.restore()
            if p.statistics is not None:
                p.statistics.clear()
            if getattr(space, "timer", None) is not None:
                space.timer.close()
        self.search_seconds = time.perf_counter() - started

    def plan_for(self, key: Optional[float]) -> PruningPlan:
        """The best plan of target ``key`` (``None``: the accuracy-guaranteed search) with its record."""
        p, o, env = self.prepared, self.options, self.prepared.env
        best = env.best_by_target.get(key)
        if best is None or best.k is None:
            raise RuntimeError(f"agent {self.agent.name!r} finished without a plan"
                               + ("" if key is None else f" for target {key}"))
        amounts, numels, extra = p.space.plan_entries(best.k)
        planned = env.achieved(best.k)
        mode = {"mode": "accuracy-guaranteed", "max_drop": float(o.max_drop),
                "score_floor": p.floor} if key is None else {}
        if key in p.priors:
            mode["prior"] = p.priors[key].as_dict()
        if key in self.stop.stops:
            mode["stopped"] = dict(self.stop.stops[key])
        if getattr(env, "returned_scores", None):
            mode["architecture_choice"] = [dict(r) for r in env.returned_scores]
        if env.screening is not None:
            mode["screening"] = env.screening.stats.as_dict()
        if env.prefix_cache is not None:
            mode["prefix_cache"] = env.prefix_cache.stats.as_dict()
        if p.statistics is not None:
            mode["bn_statistics"] = p.statistics.as_dict()

        if self.resumed is not None:
            mode["resume"] = {"replayed_plans": len(env.replayed_keys), "remeasured": self.recorder.remeasured}
        if key in p.selections:
            mode["selection"] = {**p.selections[key].as_dict(),
                                 "samples": sum(len(x) for x in p.selector.calibration.inputs)}
        return PruningPlan(amounts=amounts, numels=numels, target=planned if key is None else key,
                           sparsity=planned, budget=o.budget, structure=o.structure, agent=self.agent.name,
                           reward=p.scorer.name, seed=int(o.seed), score=best.score, baseline_score=p.baseline,
                           episodes=sum(1 for h in env.history if h.target == key),
                           metadata={"agent_config": self.agent.hyperparameters(),
                                     "calibration_samples": p.calibration_samples,
                                     "synthetic_calibration": p.calibration.synthetic,
                                     "max_amount": o.max_amount, "bn_recalibration": int(o.bn_recalibration),
                                     **({"left_out": self.left_out} if self.left_out else {}), **mode, **extra})

    def results(self, started: float) -> MultiTargetResult:
        """Several targets: every target's plan, the model left unpruned."""
        p, env = self.prepared, self.prepared.env
        results = {}
        for t in self.options.targets:
            plan = self.plan_for(t)
            results[t] = PruneResult(self.model, plan, plan.sparsity, [h.as_dict() for h in env.history
                                                                        if h.target == t],
                                     p.baseline, time.perf_counter() - started, p.forward_seconds, p.space.steps,
                                     example_inputs=p.example, search_seconds=self.search_seconds,
                                     scoring_seconds=env.scoring_seconds)
        return MultiTargetResult(self.model, results, self.agent.name, time.perf_counter() - started,
                                 [h.as_dict() for h in env.history], latency=getattr(p.space, "latency", None),
                                 bn_batches=p.recalibrate.batches,
                                 refit_batches=p.calibration.inputs if self.options.repair != "none" else (),
                                 repair=self.options.repair,
                                 auto_refit_from=STRUCTURE_DEFAULTS[self.options.structure].auto_refit_from,
                                 judge=functools.partial(measured_scores, p, self.coordinator))

    def apply(self, started: float) -> PruneResult:
        """One target (or none): its plan applied for good, refitted and recalibrated, checked on target."""
        p, o, targets = self.prepared, self.options, self.options.targets
        plan = self.plan_for(None if targets is None else targets[0])
        # created before the masks: the refit reproduces the model as it is now
        scope = refit_scope(o.repair, plan.sparsity, STRUCTURE_DEFAULTS[o.structure].auto_refit_from, self.model,
                            plan.amounts)
        if scope is not None:
            self.refit = LeastSquaresRefit(self.model, p.calibration.inputs, seed=int(o.seed), scope=scope)
        achieved = p.space.apply(plan)
        report = self.refit() if self.refit is not None else None
        if p.recalibrate:
            p.recalibrate()
        if report is not None:
            record = {**report.as_dict(), **measured_scores(p, self.coordinator, self.model)}
            plan.metadata["repair"] = keep_or_undo(record, plan, self.undo_refit)
        measured = self.measured_latency
        if measured is not None:  # the target is met as measured, or a warning says by how much not
            plan.metadata["latency"]["measured"] = measured
            plan.sparsity = achieved = measured["measured_fraction"]
            warn_latency_missed(measured, targets[0])
        on_target = measured is not None or not targets or abs(achieved - targets[0]) <= o.tolerance
        if abs(achieved - plan.sparsity) > o.tolerance or not on_target:
            raise RuntimeError(f"internal error: achieved {achieved:.4f} for target {plan.target}; "
                               "please report this")
        return PruneResult(self.model, plan, achieved, [h.as_dict() for h in p.env.history], p.baseline,
                           time.perf_counter() - started, p.forward_seconds, p.space.steps,
                           example_inputs=p.example, search_seconds=self.search_seconds,
                           scoring_seconds=p.env.scoring_seconds)

    def undo_refit(self) -> None:
        """The refit's weights back, BatchNorm statistics re-estimated for them."""
        self.refit.restore()
        if self.prepared.recalibrate:
            self.prepared.recalibrate()

    def undo(self) -> None:
        """Values written into the user's own tensors, put back (the refit first: it wrote last)."""
        if self.refit is not None:
            self.refit.restore()
        if self.prepared is not None:
            self.prepared.env.restore()
            self.prepared.recalibrate.restore()
