"""Latency that holds when measured: ``budget=Latency(batch=, threads=, runtime=)``.

A :class:`~torch_rlprune.structure.channel.latency.LatencyTable` predicts a plan's latency from layers
timed alone. Measured after :func:`~torch_rlprune.compact`, the whole model disagrees: ``make
bench`` predicted 50.0% of resnet18's batch-1 latency removed and measured 45.5%, and the
runtime matters more than the table (timm resnet18, 64x64 inputs, batch 1, 2 threads, the same
compacted model at half the MACs: 41% removed in torch eager, 78% in onnxruntime). So, as
HALP and nn-Meter fit their predictors to measured models, the search's budget is the table's
prediction *calibrated on whole compacted candidates* timed on the runtime that ships:

    before the search: a uniform plan at the target is compacted and measured, the table's
        predicted fraction mapped to the measured one, and a second uniform plan at the
        corrected target measured (a secant step);
    after the search: the returned plan is compacted and measured; while it misses the
        target by more than ``tolerance``, the plan's per-group amounts are scaled together
        onto the target as calibrated by this plan's own measurements (a secant along its
        rescalings), scored again and measured again (at most ``rounds`` times).

The calibration is a monotone piecewise-linear map from the predicted to the measured fraction
of latency removed, through (0, 0) and every measured point, so the budget stays monotone (what
AMC's clipping and the exact repair need). Fixed per-call overhead, fusion and the runtime's own
kernels are in the measurements, whatever the table misses. Measurements are cached beside the
table (plain JSON, one file per model / input / batch / threads / runtime), so a seeded rerun
reproduces the search.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ...progress import progress_bar
from ...threads import intra_op_threads
from ..compact import compact
from ._util import restore_training, run_model, training_flags

__all__ = ["Latency", "RUNTIMES", "latency_spec", "MeasuredCalibration", "CalibratedLatency", "CompactedTimer",
           "WidthPlans"]

RUNTIMES = ("eager", "onnxruntime")


@dataclass(frozen=True)
class Latency:
    """What ``budget="latency"`` optimises for, and where it is measured.

    Args:
        batch: the batch size of one inference (AMC's latency-aware mode: 1, a device).
        threads: intra-op threads of the runtime (default: ``torch.get_num_threads()`` now).
        runtime: ``"eager"`` (PyTorch) or ``"onnxruntime"`` (the compacted model exported to
            ONNX; needs the ``deploy`` extra).
        tolerance: the measured fraction removed may miss the target by this much before the
            plan is rescaled and measured again.
        rounds: at most this many measured rescaling rounds after the search.
        repeats: interleaved timed runs of the two models per block (their medians are compared).
        blocks: independent blocks per measurement; the fraction removed is their median (one
            block now and then reads several points off when the machine's load changes).
        max_blocks: more blocks, up to this many, while the median's standard error is above
            half the tolerance. Measured (mobilenetv3_small_100, onnxruntime, batch 16, the same
            compacted plan): three 3-block measurements read 0.686 / 0.728 / 0.743, so a fixed
            3 blocks could not tell a 2-point miss from noise.
    """

    batch: int = 1
    threads: Optional[int] = None
    runtime: str = "eager"
    tolerance: float = 0.02
    rounds: int = 4
    repeats: int = 10
    blocks: int = 3
    max_blocks: int = 12

    def __post_init__(self):
        for name in ("batch", "rounds", "repeats", "blocks", "max_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "rounds" else 1):
                raise ValueError(f"Latency({name}=...) must be a {'non-negative' if name == 'rounds' else 'positive'} "
                                 f"int, got {value!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"Latency(threads=...) must be a positive int or None, got {self.threads!r}")
        if self.max_blocks < self.blocks:
            raise ValueError(f"Latency(max_blocks=...) must be at least blocks={self.blocks}, got {self.max_blocks!r}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"Latency(runtime=...) must be one of {RUNTIMES}, got {self.runtime!r}")
        if not isinstance(self.tolerance, (int, float)) or not 0 < self.tolerance < 0.5:
            raise ValueError(f"Latency(tolerance=...) must be a fraction in (0, 0.5), got {self.tolerance!r}")
        if self.runtime == "onnxruntime":
            import importlib.util
            if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
                raise ImportError("Latency(runtime='onnxruntime') needs onnx and onnxruntime: "
                                  "pip install -e '.[deploy]'")

    @property
    def thread_count(self) -> int:
        return int(self.threads) if self.threads is not None else torch.get_num_threads()

    def as_dict(self) -> dict:
        return {**asdict(self), "threads": self.thread_count}


def latency_spec(budget) -> Optional[Latency]:
    """The :class:`Latency` a ``budget=`` argument asks for: ``"latency"`` means ``Latency()``."""
    if isinstance(budget, Latency):
        return budget
    return Latency() if budget == "latency" else None


# --------------------------------------------------------------------------- calibration
class MeasuredCalibration:
    """Monotone piecewise-linear map: predicted fraction of latency removed -> measured.

    Through (0, 0) and every measured point (points at the same prediction are averaged);
    a measured fraction below an earlier point's is lifted to it (noise, not a real slow-down),
    and past the last point the map follows the line from the origin through it."""

    def __init__(self, points: Sequence[Tuple[float, float]] = ()):
        self.points: List[Tuple[float, float]] = []
        self._cached_knots = None  # the budget asks for the map thousands of times per search
        for predicted, measured in points:
            self.add(predicted, measured)

    def add(self, predicted: float, measured: float) -> None:
        if not (math.isfinite(predicted) and math.isfinite(measured)):
            raise ValueError(f"a calibration point must be finite, got ({predicted}, {measured})")
        self.points.append((float(predicted), float(measured)))
        self._cached_knots = None

    def _knots(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._cached_knots is None:
            self._cached_knots = self._fit()
        return self._cached_knots

    def _fit(self) -> Tuple[np.ndarray, np.ndarray]:
        by_prediction: Dict[float, List[float]] = {}
        for p, m in self.points:
            if p > 1e-9:
                by_prediction.setdefault(round(p, 9), []).append(m)
        xs = np.array([0.0] + sorted(by_prediction), dtype=np.float64)
        ys = np.array([0.0] + [statistics.fmean(by_prediction[x]) for x in xs[1:]], dtype=np.float64)
        return xs, np.maximum.accumulate(np.minimum(ys, 0.999))

    def __call__(self, predicted: float) -> float:
        xs, ys = self._knots()
        if len(xs) == 1:
            return float(predicted)
        if predicted <= xs[-1]:
            return float(np.interp(predicted, xs, ys))
        slope = ys[-1] / xs[-1] if xs[-1] > 0 else 1.0
        return float(min(0.999, max(ys[-1], predicted * slope)))

    def as_list(self) -> List[List[float]]:
        return [[p, m] for p, m in self.points]


class CalibratedLatency:
    """A :class:`LatencyTable` whose predicted fractions go through a :class:`MeasuredCalibration`:
    what :class:`~torch_rlprune.env.channel_steps.LatencyBudget` budgets when ``budget=Latency(...)``."""

    def __init__(self, table, calibration: MeasuredCalibration):
        self.table, self.calibration = table, calibration
        self.dense_latency = table.dense_latency

    def predicted_fraction(self, counts=None) -> float:
        """The table's own prediction, before calibration."""
        return self.table.fraction_removed(counts)

    def fraction_removed(self, counts=None) -> float:
        return self.calibration(self.predicted_fraction(counts))

    def latency(self, counts=None) -> float:
        return self.dense_latency * (1.0 - self.fraction_removed(counts))

    def group_latencies(self) -> np.ndarray:
        return self.table.group_latencies()

    def summary(self) -> dict:
        return {**self.table.summary(), "calibration": self.calibration.as_list()}


# --------------------------------------------------------------------------- measuring
def median_error(values: Sequence[float]) -> float:
    """A robust standard error of the median: the MAD scaled to a normal's sigma (1.4826), times
    the median's efficiency factor (1.2533), over sqrt(n)."""
    center = statistics.median(values)
    mad = statistics.median(abs(v - center) for v in values)
    return 1.2533 * 1.4826 * mad / math.sqrt(len(values))


class CompactedTimer:
    """The fraction of latency a plan removes, measured: a copy of the model with the plan's
    channels removed by ``compact``, timed against the unpruned copy in one interleaved run.

    ``reference`` is copied once when the timer is made (shapes are what is timed, so the copy
    is made before the search masks anything); every measurement copies it again and prunes the
    copy, never the user's model.
    """

    def __init__(self, model: nn.Module, example, spec: Latency, *, cache_path: Optional[Path] = None,
                 structure_kwargs: Optional[dict] = None):
        self.spec, self.example = spec, example
        self.reference = copy.deepcopy(model).eval()
        self.structure_kwargs = dict(structure_kwargs or {})
        self.cache_path, self._cache = cache_path, {}
        self.load_cache()
        self.measurements = 0
        self._workdir, self._exported = None, {}

    # --------------------------------------------------------------- cache
    def load_cache(self) -> None:
        """Earlier measurements of this model / input / batch / threads / runtime (plain JSON,
        never executed; entries that are not a finite fraction are ignored)."""
        if self.cache_path is None:
            return
        try:
            data = json.loads(self.cache_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return
        fractions = data.get("fractions") if isinstance(data, dict) else None
        if isinstance(fractions, dict):
            self._cache.update({k: float(v) for k, v in fractions.items()
                                if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                                and math.isfinite(v) and -1 < v < 1})

    def _write_cache(self) -> None:
        if self.cache_path is None:
            return
        tmp = None
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_path.parent, prefix=self.cache_path.name, suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"fractions": self._cache}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.cache_path)
        except OSError as err:
            warnings.warn(f"latency: could not write the measurement cache {self.cache_path}: {err}",
                          RuntimeWarning, stacklevel=3)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    # --------------------------------------------------------------- measuring
    def compacted(self, plan: Dict[str, int], removed_blocks: Sequence[str] = ()) -> nn.Module:
        """A copy of the reference with ``plan`` ({group key: units}) applied, the residual blocks
        named in ``removed_blocks`` replaced by identities, and compacted."""
        from ..depth import RemovedBlock
        from .apply import apply_channel_plan

        candidate = copy.deepcopy(self.reference)
        apply_channel_plan(candidate, plan, self.example, strict=False, **self.structure_kwargs)
        for name in removed_blocks:  # a block's branch is exactly zero once removed: it is the identity
            parent, _, child = name.rpartition(".")
            setattr(candidate.get_submodule(parent), child, RemovedBlock(name))
        compact(candidate, self.example)
        return candidate.eval()

    def fraction_removed(self, plan: Dict[str, int], removed_blocks: Sequence[str] = (),
                         reading: int = 0) -> float:
        """1 - measured latency of the plan's compacted model / the unpruned model's (cached).
        ``reading``: 1, 2, ... are further independent measurements of the plan, each cached apart."""
        key = json.dumps(sorted((k, int(v)) for k, v in plan.items() if int(v) > 0))
        if removed_blocks:
            key = json.dumps([key, sorted(removed_blocks)])
        if reading:
            key = json.dumps(["reading", int(reading), key])
        if key in self._cache:
            return self._cache[key]
        if not any(int(v) > 0 for v in plan.values()) and not removed_blocks:
            return 0.0
        fraction = self.settled_fraction(self.reference, self.compacted(plan, removed_blocks))
        self.measurements += 1
        self._cache[key] = fraction
        self._write_cache()
        return fraction

    def settled_fraction(self, dense: nn.Module, pruned: nn.Module) -> float:
        """The median over blocks of ``1 - pruned / dense`` seconds: ``spec.blocks`` blocks, then
        more (up to ``spec.max_blocks``) while the median's standard error exceeds half the tolerance."""
        fractions: List[float] = []
        while True:
            dense_s, pruned_s = self.paired_seconds(dense, pruned)
            fractions.append(1.0 - pruned_s / dense_s)
            if len(fractions) >= self.spec.max_blocks or (
                    len(fractions) >= self.spec.blocks and median_error(fractions) <= self.spec.tolerance / 2):
                return statistics.median(fractions)

    def paired_seconds(self, dense: nn.Module, pruned: nn.Module) -> Tuple[float, float]:
        """Median seconds of one inference of each model on the spec's runtime, runs interleaved."""
        with intra_op_threads(self.spec.thread_count):
            if self.spec.runtime == "onnxruntime":
                return self._onnx_seconds(dense, pruned)
            return self._eager_seconds(dense, pruned)

    def _eager_seconds(self, *models: nn.Module) -> Tuple[float, ...]:
        flags = [training_flags(m) for m in models]
        times: List[List[float]] = [[] for _ in models]
        try:
            with torch.inference_mode():
                for m in models:
                    m.eval()
                    for _ in range(3):
                        run_model(m, self.example)
                loops = [self._loop_count(lambda m=m: run_model(m, self.example)) for m in models]
                for _ in range(self.spec.repeats):
                    for m, loop, out in zip(models, loops, times):
                        tick = time.perf_counter()
                        for _ in range(loop):
                            run_model(m, self.example)
                        out.append((time.perf_counter() - tick) / loop)
        finally:
            for f in flags:
                restore_training(f)
        return tuple(statistics.median(t) for t in times)

    @staticmethod
    def _loop_count(fn) -> int:
        """Calls per timed run so that a run lasts at least a millisecond (timer resolution)."""
        tick = time.perf_counter()
        fn()
        return max(1, min(200, math.ceil(1e-3 / max(time.perf_counter() - tick, 1e-7))))

    def _onnx_seconds(self, dense: nn.Module, pruned: nn.Module) -> Tuple[float, float]:
        from ..deploy import onnx_latency_ms

        if self._workdir is None:
            self._workdir = tempfile.TemporaryDirectory(prefix="rlprune-latency-")
        paths = []
        for name, model in (("unpruned", dense), ("candidate", pruned)):
            path = Path(self._workdir.name) / f"{name}.onnx"
            if self._exported.get(name) is not model:  # one export per model, not one per block
                _export_for_timing(model, self.example, path)
                self._exported[name] = model  # held, so that `is` cannot match a new model at a reused id
            paths.append(path)
        ms = onnx_latency_ms(paths, self.example, repeats=self.spec.repeats, threads=self.spec.thread_count)
        return ms[0] / 1e3, ms[1] / 1e3

    def close(self) -> None:
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir, self._exported = None, {}


def _export_for_timing(model: nn.Module, example, path: Path) -> None:
    """ONNX export for timing only (no verification: the model's outputs are not the point):
    the TorchScript exporter, faster, or torch.export's where it fails."""
    from ..deploy import export_onnx, split_example

    args, kwargs = split_example(example)
    try:
        export_onnx(model, args, kwargs, path, dynamo=False)
    except Exception:  # an op the TorchScript exporter lacks
        export_onnx(model, args, kwargs, path, dynamo=True)


def measurement_cache_path(table, spec: Latency) -> Path:
    """Beside the table's own cache: the table's key already names model, input, batch and threads."""
    digest = hashlib.sha256(f"{table.cache_path.name} {spec.runtime}".encode()).hexdigest()[:16]
    return table.cache_path.with_name(f"measured-{digest}.json")


# --------------------------------------------------------------------------- closing the loop
def scaled_plan(cost, k: np.ndarray, goal: float) -> np.ndarray:
    """``k``'s per-group amounts scaled by one common factor onto ``goal`` (the budget's units),
    then repaired exactly: the plan keeps its shape (which groups lose more) while its total
    moves. A plan that removes nothing is scaled from the largest plan allowed."""
    k = np.asarray(k, dtype=np.int64)
    base = (k if k.any() else cost.k_max).astype(np.float64)

    def at(scale: float) -> np.ndarray:
        return np.clip(np.round(scale * base), cost.k_min, cost.k_max).astype(np.int64)

    lo, hi = 0.0, float(np.max(cost.k_max[base > 0] / base[base > 0])) if (base > 0).any() else 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if cost.removed(at(mid)) < goal:
            lo = mid
        else:
            hi = mid
    return cost.repair(at(hi), goal)


class WidthPlans:
    """What the measured steps need of a width-only search's plans (a vector of units removed
    per group): the table's and the calibrated prediction, a measurement after compact, a
    rescaling onto a goal, and a plan to calibrate on. The depth search has its twin
    (:class:`~torch_rlprune.env.depth_latency.DepthPlans`)."""

    def __init__(self, space, env):
        self.space, self.env, self.latency = space, env, space.latency

    def raw(self, k) -> float:
        return self.latency.predicted_fraction(self.latency.table._resolve(k))

    def predicted(self, k) -> float:
        return self.latency.fraction_removed(self.latency.table._resolve(k))

    def measure(self, k, reading: int = 0) -> float:
        return self.space.timer.fraction_removed(self.space.structure.plan(self.latency.table._resolve(k)),
                                                 reading=reading)

    def rescaled(self, k, target: float) -> np.ndarray:
        return scaled_plan(self.env.cost, k, target * self.env.cost.total)

    def describe(self, k) -> dict:
        return {}

    def calibration_plan(self, target: float) -> np.ndarray:
        """The uniform plan the calibrated budget puts at ``target`` now."""
        cost = self.env.cost
        return self.latency.table._resolve(self.space.prior_plan("uniform", cost, target * cost.total))


def close_on_measurement(space, env, key, target: float, rescore) -> dict:
    """Measure the environment's best plan for ``key`` after compact; while it misses ``target``
    by more than the spec's tolerance, rescale it onto the target as calibrated by this plan's own
    measurements, ``rescore(k)`` it (the caller makes it the best plan, with scores measured on it)
    and measure again. The plan returned is the measured one closest to the target (a noisy
    measurement can send a rescaling past it), measured again when it was chosen among several
    (``"confirmed"``, the number reported: :func:`confirmed_reading`); its measured point is what
    the budget then predicts for it. Returns the record for ``plan.metadata["latency"]``."""
    spec, timer, latency = space.latency_spec, space.timer, space.latency
    measured_plans = space.measured_plans(env)
    k = np.asarray(env.best_by_target[key].k, dtype=np.int64)
    # From here the budget describes this plan and its rescalings only: points measured on other
    # plan shapes (the uniform ones) would pull the map away from it (one prediction, two shapes,
    # measured several points apart).
    search_points, latency.calibration = latency.calibration.as_list(), MeasuredCalibration()
    rounds, plans = [], []
    bar = progress_bar(total=spec.rounds + 1, desc="latency: measuring the plan after compact", unit="round")
    for round_ in range(spec.rounds + 1):
        predicted, raw = measured_plans.predicted(k), measured_plans.raw(k)
        measured = measured_plans.measure(k)
        latency.calibration.add(raw, measured)
        rounds.append({"table": raw, "predicted": predicted, "measured": measured, **measured_plans.describe(k)})
        bar.update(1)
        plans.append(k)
        if abs(measured - target) <= spec.tolerance or round_ == spec.rounds:
            break
        rescaled = measured_plans.rescaled(k, target)
        if np.array_equal(rescaled, k):
            break
        k = rescaled
        rescore(k)
    bar.close()
    chosen = min(range(len(rounds)), key=lambda i: (abs(rounds[i]["measured"] - target), i))
    if len(rounds) > 1:
        rounds[chosen]["confirmed"] = confirmed_reading(measured_plans, plans[chosen], rounds[chosen], spec.tolerance)
    if chosen != len(rounds) - 1:
        rescore(plans[chosen])
    measured = rounds[chosen].get("confirmed", rounds[chosen]["measured"])
    if chosen != len(rounds) - 1 or measured != rounds[chosen]["measured"]:
        # the map through this plan's point alone, so the budget predicts what was measured for it
        latency.calibration = MeasuredCalibration([(rounds[chosen]["table"], measured)])
    return {"spec": spec.as_dict(), "rounds": rounds, "chosen": chosen, "measured_fraction": measured,
            "met": abs(measured - target) <= spec.tolerance, "measurements": timer.measurements,
            "search_calibration": search_points}


def confirmed_reading(measured_plans, k, round_: dict, tolerance: float) -> float:
    """What to report for a plan chosen as the closest to the target among several measured rounds.
    Its reading is biased towards the target (regnetx_002 in onnxruntime, 1 ms at batch 1: chosen
    at 30.2% of 4 rounds, re-measured at 2.8%), so the plan is measured again; when the two readings
    disagree by more than ``tolerance``, once more, and the median of the three is reported. One
    re-reading alone is as noisy as the first (regnetx_002, onnxruntime, batch 16: read 44.0%, then
    51.1%, the benchmark's independent check 42.4%). The re-readings are recorded in ``round_``."""
    readings = [measured_plans.measure(k, reading=1)]
    if abs(readings[0] - round_["measured"]) > tolerance:
        readings.append(measured_plans.measure(k, reading=2))
    round_["rereadings"] = readings
    return readings[0] if len(readings) == 1 else statistics.median([round_["measured"], *readings])


def fit_fixed_rest(table, raw, measured: Sequence[Tuple[np.ndarray, float]]) -> float:
    """Set ``table.fixed_rest`` to the share of its rest that best explains the measured plans
    (least squares on the fraction removed; ``raw(k)`` is the table's prediction for plan ``k``,
    which is linear in that share) and return it. In torch eager at batch 1 a small model's rest
    is mostly per-call overhead that narrower layers keep: scaled with the activations, it had
    the table predict widths removing 58% of mobilenetv3_small_100's latency, measured 16%."""
    rows = []
    for share in (0.0, 1.0):
        table.fixed_rest = share
        rows.append([raw(k) for k, _ in measured])
    at_zero, at_one = np.array(rows[0]), np.array(rows[1])
    slope, target = at_one - at_zero, np.array([m for _, m in measured]) - at_zero
    share = float(np.clip((slope @ target) / (slope @ slope), 0.0, 1.0)) if slope @ slope > 1e-18 else 0.0
    table.fixed_rest = share
    return share


def calibrate_before_search(space, env, targets: Sequence[float]) -> None:
    """Two measured plans per target (at most three targets), each the one the budget puts at
    the target (uniform widths; blocks too in a depth search): one at the table's prediction,
    one at the target corrected by the first measurement (a secant step). After every
    measurement the table's fixed share of the rest is refitted (:func:`fit_fixed_rest`) and the
    calibration rebuilt through every measured point under it."""
    latency, measured_plans = space.latency, space.measured_plans(env)
    targets = list(targets)[:3]
    measured: List[Tuple[np.ndarray, float]] = []
    bar = progress_bar(total=2 * len(targets), desc="latency: measuring calibration plans", unit="plan")
    for target in targets:
        for _ in range(2):
            k = measured_plans.calibration_plan(target)
            if not np.asarray(k).any():
                break
            measured.append((np.asarray(k), measured_plans.measure(k)))
            fit_fixed_rest(latency.table, measured_plans.raw, measured)
            latency.calibration = MeasuredCalibration([(measured_plans.raw(kk), m) for kk, m in measured])
            bar.update(1)
    bar.close()
