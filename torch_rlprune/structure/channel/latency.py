"""``LatencyTable``: the wall time of a channel-pruned model, predicted from layers timed alone.

AMC (He et al. 2018) budgets latency, not only FLOPs, because the two disagree: on this
package's CPUs halving resnet18's MACs made it only 1.08-1.5x faster at batch 1, and a
3.9x MAC cut 1.3x faster (FIELD-NOTES.md). A search that must land on a latency target
cannot time every candidate model, so it needs latency as arithmetic in the per-group
counts, like :meth:`ChannelStructure.cost` is for MACs. This module builds that arithmetic:

* Every MAC term of the structure is a *timed layer*: a Conv/Linear, or a whole
  LSTM/GRU/RNN module (all its matrices, layers and directions together, because PyTorch
  runs them as one fused kernel per call; its two widths are the input features and the
  hidden size). A fresh layer of the same kind and hyper-parameters with narrower widths is
  timed alone on a random input shaped like the one the layer saw in the traced forward
  (batch ``batch``), on a small grid of alive widths: fractions of the dense width plus the
  narrowest width, along each width that some group can shrink.
* ``latency(counts)`` = the rest (below) + sum over timed layers of ``calls`` times the
  bilinear interpolation of its table at the alive widths ``counts`` leave.
  ``rest_seconds`` is the whole model's measured latency minus its layers' dense
  latencies: what the table does not time (activations, norms, pooling, adds, attention
  matmuls, Python overhead, and what the layers cost in the model beyond what they cost
  alone), so the unpruned prediction is the measured model. Those ops run on the layers'
  outputs, so the rest is scaled by the activation elements the timed layers produce (held
  constant it made predictions conservative: resnet18, 1x32x32, batch 1, 1 thread, a 0.5
  latency target predicted 7.3 -> 3.6 ms and measured 2.0 ms after :func:`compact`).
* Timings are cached as plain JSON, one file per model / input / machine configuration,
  so a second search on the same model measures nothing.

A grouped conv keeps its number of groups and a depthwise conv stays depthwise at every
width, as torch-pruning prunes them. The table describes the structure as built: after
:func:`compact` (or a :meth:`ChannelStructure.verify` that excludes groups) build a new one.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ...progress import progress_bar
from ..tensors import recurrent_weight_names
from ._util import batch_size, restore_training, run_model, training_flags
from .latency_cache import (CACHE_ENV, cached_table, default_cache_dir, input_signature, parameter_shapes, read_cache,
                            write_cache)
from .recurrent import samples

__all__ = ["LatencyTable", "TimedLayer", "measure_latency", "default_cache_dir", "CACHE_ENV"]

CACHE_FORMAT = 1
DEFAULT_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
# A batch-1 layer of a small model runs in tens of microseconds, below what one perf_counter
# interval resolves reliably: each repeat times a loop of calls lasting at least this long.
_MIN_REPEAT_SECONDS = 1e-3
_MAX_LOOP = 200

# Fresh layers are built from torch's own classes: a subclass (timm's Conv2dSame, StdConv2d)
# may take other constructor arguments; its extra work stays in the rest constant.
_CONV_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_RECURRENT_BASES = (nn.LSTM, nn.GRU, nn.RNN)


@dataclass
class TimedLayer:
    """One layer called with one input shape, its wall time tabulated over two alive widths.

    The widths are those of the structure's entries: for a Conv/Linear the two dims of its
    weight (``out`` and ``in / groups``; ``in`` and ``out / groups`` when transposed), for a
    recurrent module its input features and hidden size. A width no group shrinks has a
    single grid point.

    Attributes:
        name: the module's qualified name.
        input_shape: the shape of the input it was timed on (the traced one, batch ``batch``).
        calls: how many times per forward the model calls it with that input shape.
        entries: the structure's entries (alive-size indices) of the two widths.
        widths: ascending grid of alive widths along each of the two.
        seconds: median seconds of one call at every grid point, made monotone (see
            :func:`_monotone`); ``seconds[-1, -1]`` is the dense layer.
    """

    name: str
    input_shape: Tuple[int, ...]
    calls: int
    entries: Tuple[int, int]
    widths: Tuple[Tuple[int, ...], Tuple[int, ...]]
    seconds: np.ndarray

    @property
    def dense_seconds(self) -> float:
        return float(self.seconds[-1, -1])

    def at(self, width0: float, width1: float) -> float:
        """Seconds of one call at alive widths ``(width0, width1)``: bilinear between grid
        points, clamped to the grid's ends."""
        i, s = _bracket(self.widths[0], width0)
        j, t = _bracket(self.widths[1], width1)
        table = self.seconds
        i1, j1 = min(i + 1, table.shape[0] - 1), min(j + 1, table.shape[1] - 1)
        return float((1 - s) * ((1 - t) * table[i, j] + t * table[i, j1])
                     + s * ((1 - t) * table[i1, j] + t * table[i1, j1]))


def _bracket(grid: Sequence[int], x: float) -> Tuple[int, float]:
    """``(i, t)``: ``x`` lies ``t`` of the way from ``grid[i]`` to ``grid[i + 1]``."""
    if x <= grid[0]:
        return 0, 0.0
    if x >= grid[-1]:
        return len(grid) - 1, 0.0
    i = bisect.bisect_right(grid, x) - 1
    return i, (x - grid[i]) / (grid[i + 1] - grid[i])


def _monotone(seconds: np.ndarray) -> np.ndarray:
    """The smallest table above ``seconds`` that never decreases as either width grows.

    Timings are noisy (a narrower layer can measure slower than a wider one), but the budget
    built on this table must be monotone: removing more units may never remove less latency.
    A cumulative max along each width keeps that for every grid point, and bilinear
    interpolation between monotone grid points is monotone in each width too.
    """
    return np.maximum.accumulate(np.maximum.accumulate(seconds, axis=0), axis=1)


# --------------------------------------------------------------------------- timing
def device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without waiting, the clock times the launch only.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of one ``fn()`` call over ``repeats`` timed loops, after ``warmup`` calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _synchronize(device)
        started = time.perf_counter()
        fn()
        _synchronize(device)
        once = max(time.perf_counter() - started, 1e-7)
        loop = max(1, min(_MAX_LOOP, math.ceil(_MIN_REPEAT_SECONDS / once)))
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(loop):
                fn()
            _synchronize(device)
            timings.append((time.perf_counter() - started) / loop)
    return statistics.median(timings)


def _example_samples(model: nn.Module, modules: Mapping[str, nn.Module], example_inputs) -> int:
    """Samples in ``example_inputs``: what a recurrent layer sees as its batch (a time-major
    sequence holds it in dim 1), else dim 0 of the first input."""
    recurrent = [m for m in modules.values() if isinstance(m, nn.RNNBase)]
    seen: List[int] = []
    handles = [m.register_forward_pre_hook(lambda module, args: seen.append(samples(module, args[0] if args else None)))
               for m in recurrent]
    try:
        if handles:
            with torch.inference_mode():
                run_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return batch_size(example_inputs, seen)


def _with_batch(example_inputs, batch: int, samples_now: int):
    """``example_inputs`` with ``batch`` samples (cut or tiled) along the batch dim of every
    tensor: its first dim of size ``samples_now`` (dim 1 of a time-major sequence), else dim 0."""
    def resize(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return x
        dim = list(x.shape).index(samples_now) if samples_now in x.shape else 0
        size = x.shape[dim]
        if size < batch:
            x = torch.cat([x] * math.ceil(batch / size), dim=dim)
        return x.narrow(dim, 0, batch)

    if isinstance(example_inputs, dict):
        return {k: resize(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(resize(v) for v in example_inputs)
    return resize(example_inputs)


def measure_latency(model: nn.Module, example_inputs, *, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time in seconds of ``model(example_inputs)`` under ``torch.inference_mode``,
    in eval mode (the model's training flags are put back), on the model's device and with
    the current ``torch.get_num_threads()``. Use it to check a prediction after :func:`compact`."""
    device = device_of(model)
    flags = training_flags(model)
    try:
        model.eval()
        return median_seconds(lambda: run_model(model, example_inputs), device, repeats, warmup)
    finally:
        restore_training(flags)


# --------------------------------------------------------------------------- fresh layers
def _base_class(module: nn.Module, bases: Tuple[type, ...]) -> type:
    return next(cls for cls in bases if isinstance(module, cls))


def _weight_shape(module: nn.Module) -> torch.Size:
    orig = getattr(module, "weight_orig", None)
    return (orig if orig is not None else module.weight).shape


def _groups_follow_channels(module: nn.Module) -> bool:
    """Depthwise-like: one channel per group on the weight's dim 1, so torch-pruning removes
    whole groups and the layer stays depthwise at any width."""
    return module.groups > 1 and _weight_shape(module)[1] == 1


def _width_steps(module: nn.Module) -> Tuple[int, int]:
    """Granularity of each width: a fixed number of groups needs multiples of it on dim 0, a
    depthwise layer multiples of its channel multiplier."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        per_group = _weight_shape(module)[0] // module.groups
        return (per_group if _groups_follow_channels(module) else module.groups), 1
    return 1, 1


def _with_width(shape: Sequence[int], dim: int, width: int) -> Tuple[int, ...]:
    shape = list(shape)
    shape[dim] = width
    return tuple(shape)


def _fresh_conv(module, width0: int, width1: int, input_shape, device, dtype):
    size0 = _weight_shape(module)[0]
    groups = width0 // (size0 // module.groups) if _groups_follow_channels(module) else module.groups
    lead, rest = width0, width1 * groups                       # weight dims 0 and 1 (times groups)
    in_channels, out_channels = (lead, rest) if module.transposed else (rest, lead)
    extra = {"output_padding": module.output_padding} if module.transposed else {}
    layer = _base_class(module, _CONV_BASES)(
        in_channels, out_channels, module.kernel_size, stride=module.stride, padding=module.padding,
        dilation=module.dilation, groups=groups, bias=module.bias is not None, padding_mode=module.padding_mode,
        device=device, dtype=dtype, **extra)
    channel_dim = len(input_shape) - len(module.kernel_size) - 1   # 0 for an unbatched input
    return layer, _with_width(input_shape, channel_dim, in_channels)


def _fresh_linear(module, width0: int, width1: int, input_shape, device, dtype):
    layer = nn.Linear(width1, width0, bias=module.bias is not None, device=device, dtype=dtype)
    return layer, _with_width(input_shape, -1, width1)


def _fresh_recurrent(module, width0: int, width1: int, input_shape, device, dtype):
    cls = _base_class(module, _RECURRENT_BASES)
    options = dict(num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                   bidirectional=module.bidirectional, device=device, dtype=dtype)
    if cls is nn.RNN:
        options["nonlinearity"] = module.nonlinearity
    hidden = width1
    if getattr(module, "proj_size", 0):  # weight_hh's dim 1 is then the projection
        options["proj_size"], hidden = width1, module.hidden_size
    return cls(width0, hidden, **options), _with_width(input_shape, -1, width0)


def _fresh_layer(module: nn.Module, width0: int, width1: int, input_shape, generator) -> Tuple[nn.Module, torch.Tensor]:
    """A new layer like ``module`` at alive widths ``(width0, width1)`` and a random input for it."""
    reference = next(module.parameters())
    device, dtype = reference.device, reference.dtype
    if isinstance(module, nn.modules.conv._ConvNd):
        layer, shape = _fresh_conv(module, width0, width1, input_shape, device, dtype)
    elif isinstance(module, nn.Linear):
        layer, shape = _fresh_linear(module, width0, width1, input_shape, device, dtype)
    else:
        layer, shape = _fresh_recurrent(module, width0, width1, input_shape, device, dtype)
    x = torch.randn(shape, generator=generator, dtype=dtype).to(device)
    return layer.eval(), x


def _grid(size: int, step: int, shrinks: bool, fractions: Sequence[float]) -> Tuple[int, ...]:
    """Alive widths to time along one width: the dense one, ``fractions`` of it and the
    narrowest one (so interpolation never has to extrapolate), in multiples of ``step``."""
    if not shrinks:
        return (int(size),)

    def snap(width: float) -> int:
        return int(min(size, max(step, round(width / step) * step)))

    return tuple(sorted({int(size), snap(step)} | {snap(f * size) for f in fractions}))


# --------------------------------------------------------------------------- the structure's cost model
def _layer_entries(structure) -> Dict[str, Tuple[int, int]]:
    """Module name -> the structure's entries of its two widths, from its MAC terms."""
    terms: Dict[str, List[Tuple[int, int]]] = {}
    for name, (e0, e1) in zip(structure._mac_modules, structure._mac_e.tolist()):
        terms.setdefault(name, []).append((int(e0), int(e1)))
    entries = {}
    for name, module_terms in terms.items():
        module = structure.traces[name].module
        if isinstance(module, nn.RNNBase):  # input features: weight_ih_l0's columns; hidden: weight_hh_l0's
            by_matrix = dict(zip(recurrent_weight_names(module), module_terms))
            entries[name] = (by_matrix["weight_ih_l0"][1], by_matrix["weight_hh_l0"][1])
        else:
            entries[name] = module_terms[0]
    return entries


def _activation_terms(structure) -> List[Tuple[int, int]]:
    """``(output positions per sample, entry of the output width)`` of every traced Conv/Linear:
    the activation elements the layers hand to norms, activations and adds."""
    terms = []
    for name, (e0, e1), coef in zip(structure._mac_modules, structure._mac_e.tolist(), structure._mac_coef.tolist()):
        module = structure.traces[name].module
        if isinstance(module, nn.RNNBase):
            continue
        shape = module.weight.shape if "weight" in module._parameters else module.weight_orig.shape
        kernel = int(math.prod(shape[2:])) if len(shape) > 2 else 1
        out_entry = e1 if getattr(module, "transposed", False) else e0
        terms.append((int(coef) // kernel, int(out_entry)))
    return terms


def alive_entry_sizes(structure, counts: np.ndarray) -> np.ndarray:
    """Alive size of every entry once ``counts`` units are removed per group (the same
    arithmetic as :meth:`ChannelStructure.cost`)."""
    alive = structure._sizes.copy()
    if len(structure._sl_entry):
        killed = structure._ptr[np.arange(len(structure._sl_entry)), counts[structure._sl_group]]
        np.subtract.at(alive, structure._sl_entry, killed)
    return alive


def _record_input_shapes(model: nn.Module, modules: Mapping[str, nn.Module], example_inputs) -> Dict[str, Counter]:
    """Per module name: how many calls of one forward saw each input shape (a PackedSequence
    or a call without a tensor input is recorded as ``None``)."""
    seen: Dict[str, Counter] = {name: Counter() for name in modules}
    handles = []

    def make_hook(name):
        def hook(module, args):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            seen[name][None if x is None else tuple(x.shape)] += 1
        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(make_hook(name)))
    try:
        with torch.inference_mode():
            run_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


# --------------------------------------------------------------------------- the table
class LatencyTable:
    """Predicted wall time of ``structure.model`` for any vector of per-group removed counts.

    Building it traces the model once at batch ``batch``, then times the whole model and
    every layer alone on its grid of alive widths (or reads those timings from the cache),
    on the model's device with the current ``torch.get_num_threads()``. Predictions are
    arithmetic afterwards (see the module docstring).

    Args:
        structure: the :class:`ChannelStructure` whose groups the counts refer to.
        example_inputs: inputs of the model (default ``structure.example_inputs``), cut or
            tiled to ``batch`` samples along their batch dim (dim 0, or dim 1 of a time-major
            sequence fed to a recurrent layer).
        batch: the batch size the latency is for (AMC's latency-aware mode: 1).
        fractions: fractions of each shrinkable width to time (the narrowest width is
            always added).
        repeats: timed repeats per measurement (the median is kept); ``warmup`` untimed
            calls before them.
        cache_dir: where timings are cached (default :func:`default_cache_dir`).

    Attributes:
        layers: the :class:`TimedLayer` s (one per layer and input shape it is called with).
        untimed: layers left to the rest constant, with the reason (no tensor input, e.g. a
            PackedSequence).
        measured_seconds: the whole model's measured median latency.
        rest_seconds: ``measured_seconds`` minus the layers' dense latencies (negative when
            the layers alone measure slower than the whole model: noise, or a model that fuses).
        fixed_rest: the fraction of the rest that pruning does not shrink (per-call overhead);
            0 until fitted to measured models (:func:`~torch_rlprune.structure.channel.measured.fit_fixed_rest`).
        dense_latency: the prediction for the unpruned model (equals ``measured_seconds``).
        measurements: timings taken while building (0 when everything came from the cache).
        cache_path: the JSON file of this model / input / batch / device / torch version /
            thread count. Repeats and warm-up are not part of the key.
    """

    def __init__(self, structure, example_inputs=None, *, batch: int = 1,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, repeats: int = 5, warmup: int = 2,
                 cache_dir: Optional[Union[str, os.PathLike]] = None):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        if not fractions or not all(0 < f <= 1 for f in fractions):
            raise ValueError(f"fractions must be numbers in (0, 1], got {fractions!r}")
        self.structure = structure
        self.batch, self.repeats, self.warmup = batch, repeats, warmup
        self.fractions = tuple(float(f) for f in fractions)
        model = structure.model
        example = structure.example_inputs if example_inputs is None else example_inputs
        self.device = device_of(model)
        self.threads = torch.get_num_threads()
        entries = _layer_entries(structure)
        modules = {name: structure.traces[name].module for name in entries}
        flags = training_flags(model)
        try:
            model.eval()
            example = _with_batch(example, batch, _example_samples(model, modules, example))
            shapes = _record_input_shapes(model, modules, example)
        finally:
            restore_training(flags)
        self.example = example  # at batch ``batch``: what a measured check of a prediction runs on
        key = self._cache_key(model, modules, example)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        self.cache_path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"latency-{digest}.json"
        self.measurements = 0
        self._measure_and_cache(model, example, entries, modules, shapes, key)
        self.rest_seconds = self.measured_seconds - sum(lay.calls * lay.dense_seconds for lay in self.layers)
        self.fixed_rest = 0.0
        self._activation_terms = _activation_terms(structure)
        self._dense_activations = self._activations(np.zeros(len(structure.groups), dtype=np.int64))
        self.dense_latency = self._latency(np.zeros(len(structure.groups), dtype=np.int64))

    def _cache_key(self, model: nn.Module, modules: Mapping[str, nn.Module], example) -> dict:
        return {"format": CACHE_FORMAT, "model": f"{type(model).__module__}.{type(model).__qualname__}",
                "parameters": parameter_shapes(model), "layers": [[n, repr(m)] for n, m in modules.items()],
                "inputs": input_signature(example), "batch": self.batch, "device": str(self.device),
                "torch": torch.__version__, "threads": self.threads, "fractions": list(self.fractions)}

    def _measure_and_cache(self, model, example, entries, modules, shapes, key) -> None:
        cached = read_cache(self.cache_path, key)
        raw: Dict[str, dict] = dict(cached["layers"]) if cached is not None else {}  # other structures' grids stay
        self.layers: List[TimedLayer] = []
        self.untimed: Dict[str, str] = {}
        # fresh layers draw their initial weights from the global generator: fork it so that a
        # cache hit and a miss leave a seeded search in the same random state
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            generator = torch.Generator().manual_seed(0)
            self.measured_seconds = self._model_seconds(cached, model, example)
            bar = progress_bar(total=len(entries), desc="latency table", unit="layer")
            for name, (e0, e1) in entries.items():
                widths = self._grid_of(modules[name], e0, e1)
                for shape, calls in shapes[name].items():
                    if shape is None:
                        self.untimed[name] = "called without a tensor input (e.g. a PackedSequence)"
                        continue
                    signature = f"{name} {list(shape)}"
                    table = cached_table(cached, signature, widths)
                    if table is None:
                        table = self._time_grid(modules[name], widths, shape, generator)
                    raw[signature] = {"widths": [list(w) for w in widths], "seconds": table.tolist()}
                    self.layers.append(TimedLayer(name, shape, calls, (e0, e1), widths, _monotone(table)))
                bar.update(1)
            bar.close()
        if self.measurements:
            write_cache(self.cache_path, key, self.measured_seconds, raw)

    def _model_seconds(self, cached: Optional[dict], model: nn.Module, example) -> float:
        if cached is not None:
            return float(cached["dense_seconds"])
        self.measurements += 1
        return measure_latency(model, example, repeats=self.repeats, warmup=self.warmup)

    def _grid_of(self, module: nn.Module, e0: int, e1: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """The alive widths to time ``module`` at: a grid along each width some group shrinks."""
        shrinkable = set(self.structure._sl_entry.tolist())
        sizes, steps = self.structure._sizes, _width_steps(module)
        return (_grid(int(sizes[e0]), steps[0], e0 in shrinkable, self.fractions),
                _grid(int(sizes[e1]), steps[1], e1 in shrinkable, self.fractions))

    def _time_grid(self, module, widths, input_shape, generator) -> np.ndarray:
        table = np.empty((len(widths[0]), len(widths[1])))
        for i, w0 in enumerate(widths[0]):
            for j, w1 in enumerate(widths[1]):
                layer, x = _fresh_layer(module, w0, w1, input_shape, generator)
                table[i, j] = median_seconds(lambda: layer(x), self.device, self.repeats, self.warmup)
                self.measurements += 1
        return table

    def timings(self) -> dict:
        """What the table measured, as plain data (see :meth:`use_timings`)."""
        return {"measured_seconds": self.measured_seconds,
                "layers": [[lay.name, list(lay.input_shape), lay.seconds.tolist()] for lay in self.layers]}

    def use_timings(self, timings: dict) -> None:
        """Predict from another table's timings of the same model (rank 0's, under torch.distributed,
        so that every process budgets the same latency); the layers must match."""
        mine = [[lay.name, list(lay.input_shape)] for lay in self.layers]
        theirs = [[name, list(shape)] for name, shape, _ in timings["layers"]]
        if mine != theirs:
            raise ValueError("use_timings: the timings are of other layers or input shapes")
        for lay, (_, _, seconds) in zip(self.layers, timings["layers"]):
            lay.seconds = np.asarray(seconds, dtype=np.float64)
        self.measured_seconds = float(timings["measured_seconds"])
        self.rest_seconds = self.measured_seconds - sum(lay.calls * lay.dense_seconds for lay in self.layers)
        self.dense_latency = self._latency(np.zeros(len(self.structure.groups), dtype=np.int64))

    # ------------------------------------------------------------------ predictions
    def _activations(self, counts: np.ndarray) -> float:
        alive = alive_entry_sizes(self.structure, counts)
        return float(sum(positions * alive[entry] for positions, entry in self._activation_terms))

    def rest_at(self, counts: np.ndarray) -> float:
        """The unmodelled rest (norms, activations, adds, pooling) for ``counts``: it works on the
        layers' outputs, so it shrinks in proportion to the activation elements they produce, but
        for its :attr:`fixed_rest` share, the per-call overhead no width removes (most of a small
        model's time in torch eager at batch 1)."""
        if self.rest_seconds <= 0 or self._dense_activations <= 0:
            return self.rest_seconds
        shrinking = self._activations(counts) / self._dense_activations
        return self.rest_seconds * (self.fixed_rest + (1.0 - self.fixed_rest) * shrinking)

    def _latency(self, counts: np.ndarray) -> float:
        alive = alive_entry_sizes(self.structure, counts).tolist()
        return self.rest_at(counts) + sum(lay.calls * lay.at(alive[lay.entries[0]], alive[lay.entries[1]])
                                          for lay in self.layers)

    def _resolve(self, counts) -> np.ndarray:
        # the same rounding and capping as ChannelStructure.cost / set_removed
        if counts is None:
            return self.structure.counts.copy()
        if isinstance(counts, Mapping):
            return self.structure.resolve_plan(counts)
        c = np.asarray(counts, dtype=np.int64)
        groups = self.structure.groups
        if c.shape != (len(groups),):
            raise ValueError(f"expected {len(groups)} counts, got shape {c.shape}")
        return np.array([g.effective(int(n)) for g, n in zip(groups, c)], dtype=np.int64)

    def latency(self, counts: Optional[Union[Sequence[int], Mapping]] = None) -> float:
        """Predicted seconds of one forward at batch :attr:`batch` with ``counts`` units removed
        per group (a vector, ``{group key: units or fraction}``, or None: the structure's
        current counts), rounded and capped as :meth:`ChannelStructure.set_removed` would."""
        return self._latency(self._resolve(counts))

    def fraction_removed(self, counts: Optional[Union[Sequence[int], Mapping]] = None) -> float:
        """``1 - latency(counts) / dense_latency``: the fraction of the latency ``counts`` remove."""
        return 1.0 - self.latency(counts) / self.dense_latency

    def group_latencies(self) -> np.ndarray:
        """Per group, the predicted seconds removing all of its units would save (alone)."""
        saved = []
        for g in self.structure.groups:
            counts = np.zeros(len(self.structure.groups), dtype=np.int64)
            counts[g.index] = g.num_units
            saved.append(self.dense_latency - self._latency(counts))
        return np.array(saved, dtype=np.float64)

    def summary(self) -> dict:
        """JSON-ready facts of the table, for plans and reports."""
        return {"dense_ms": self.dense_latency * 1e3, "rest_ms": self.rest_seconds * 1e3,
                "fixed_rest": self.fixed_rest, "batch": self.batch,
                "threads": self.threads, "device": str(self.device), "layers": len(self.layers),
                "untimed": dict(self.untimed)}

    def __repr__(self) -> str:
        return (f"LatencyTable({type(self.structure.model).__name__}: {self.dense_latency * 1e3:.3g} ms at batch "
                f"{self.batch}, {len(self.layers)} timed layers, rest {self.rest_seconds * 1e3:.3g} ms, "
                f"{self.threads} threads, {self.device})")
