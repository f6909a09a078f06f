"""The inputs a search scores plans on, gathered once and kept as tensors."""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..structure.inputs import (Batch, Inputs, all_finite, concat, infer_input_shape, reduced_image_shape,
                                to_device)

__all__ = ["CalibrationSet", "build_calibration", "primary_output", "take_samples", "subset"]


def primary_output(out):
    """The tensor a model's output stands for: itself, the first tensor of a tuple, or ``logits``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = out.get("logits", next(iter(out.values()), None)) if out else None
        return primary_output(out) if out is not None else None
    if isinstance(out, (tuple, list)):
        for item in out:
            found = primary_output(item)
            if found is not None:
                return found
    return None


@dataclass
class CalibrationSet:
    """Input batches (and labels, when the data had them) on the model's device."""

    inputs: List[Batch]          # tensors, or Inputs for a model taking several
    labels: Optional[List[torch.Tensor]]
    synthetic: bool

    @property
    def num_samples(self) -> int:
        return sum(len(x) for x in self.inputs)


LABEL_KEYS = ("labels", "label", "target", "targets", "y")
SINGLE_INPUT_KEYS = ("input", "x", "image")   # a one-input model's dict batch: that tensor is the input


def check_label(label) -> None:
    """``label``: None (automatic), an int (position in a tuple batch), a str (key of a dict batch)
    or False (the whole batch is the model's input)."""
    if label is None or label is False or (isinstance(label, int) and not isinstance(label, bool)) \
            or isinstance(label, str):
        return
    raise TypeError(f"label must be None (automatic), an int (the label's position in a tuple batch), a str "
                    f"(its key in a dict batch) or False (no label); got {label!r}")


def _required_positional(model: nn.Module) -> Optional[int]:
    """How many positional inputs ``model.forward`` requires (None when it takes ``*args`` or has no
    readable signature); a DataParallel wrapper is read through to the model it wraps."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _is_per_sample_target(t, n: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 1 and len(t) == n


def _tuple_parts(batch: Sequence, label, required: Optional[int]) -> Tuple[List[int], Optional[int]]:
    """Positions of the inputs and of the label in a tuple batch (parts after the label of a model
    with a known number of inputs are left out, as ``(image, label, index)`` batches always were)."""
    everything = list(range(len(batch)))
    if label is False:
        return everything, None
    if isinstance(label, str):
        raise ValueError(f"label={label!r} names a key, but the batches are tuples (give a position, "
                         f"0 to {len(batch) - 1}, or False)")
    if isinstance(label, int):
        if not -len(batch) <= label < len(batch):
            raise ValueError(f"label={label} is out of range for a batch of {len(batch)} parts "
                             f"(give a position, 0 to {len(batch) - 1}, or False)")
        return [i for i in everything if i != label % len(batch)], label % len(batch)
    if required is not None and required >= 1:       # forward(x): (x, y, ...); forward(src, tgt): (src, tgt, y)
        return everything[:required], (required if len(batch) > required else None)
    # forward(*args) or every argument optional (transformers): a 1-D per-sample tensor at the end is the label
    last = len(batch) - 1
    return (everything[:-1], last) if last and _is_per_sample_target(batch[last], len(batch[0])) else (everything, None)


def _split_tuple(batch: Sequence, label, required: Optional[int]):
    positions, index = _tuple_parts(batch, label, required)
    if not positions:
        raise ValueError(f"label={label}: a batch of {len(batch)} part(s) has no input left besides the label")
    not_tensors = [i for i in positions if not isinstance(batch[i], torch.Tensor)]
    if not_tensors:
        raise ValueError(f"data: the model's inputs must be tensors, but batch part(s) {not_tensors} are "
                         f"{[type(batch[i]).__name__ for i in not_tensors]}; label= says which part is the "
                         f"label (a position, or False for none)")
    x = batch[positions[0]] if len(positions) == 1 else Inputs([batch[i] for i in positions])
    y = batch[index] if index is not None else None
    if label is None and not isinstance(y, torch.Tensor):
        y = None  # (inputs, "a name"): no label, as before
    return x, y


def _dict_label_key(batch: dict, label) -> Optional[str]:
    if label is False:
        return None
    if isinstance(label, int):
        raise ValueError(f"label={label} is a position, but the batches are dicts (give a key: {sorted(batch)}, "
                         f"or False)")
    if isinstance(label, str) and label not in batch:
        raise ValueError(f"label={label!r} is not a key of the batch; keys: {sorted(batch)}")
    return label if isinstance(label, str) else next((k for k in LABEL_KEYS if k in batch), None)


def _split_dict(batch: dict, label, required: Optional[int]):
    key = _dict_label_key(batch, label)
    rest = {k: v for k, v in batch.items() if k != key}
    single = next((k for k in SINGLE_INPUT_KEYS if k in rest), None)
    if single is not None and (len(rest) == 1 or required is None or required <= 1):
        # {"image": ..., "label": ..., "path": ...} for a one-input model: that tensor, as before
        x = rest[single]
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"data: the batch's {single!r} must be a tensor; got {type(x).__name__}")
    else:
        not_tensors = sorted(k for k, v in rest.items() if not isinstance(v, torch.Tensor))
        if not rest or not_tensors:
            raise ValueError(f"data: a dict batch is the model's keyword inputs (all tensors) and its label; "
                             f"keys {not_tensors or sorted(batch)} are not tensor inputs (label= names the "
                             f"label's key, False for none)")
        x = Inputs((), rest)
    return x, batch[key] if key is not None else None


def _check_labels(x, y) -> None:
    if y is None:
        return
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"data: the labels must be a tensor; got {type(y).__name__} (label=False: no labels)")
    if y.dim() == 0 or len(y) != len(x):
        raise ValueError(f"data: inputs and labels differ in length ({len(x)} inputs, "
                         f"{len(y) if y.dim() else 'a scalar as'} labels)")


def _split_batch(batch, label=None, required: Optional[int] = None):
    """``(inputs, labels or None)`` of one batch (see :func:`check_label` for ``label``): the inputs
    are a tensor for a one-input model and an :class:`Inputs` for several."""
    if isinstance(batch, torch.Tensor):
        if label is not None and label is not False:
            raise ValueError(f"label={label!r} was given but the batches are plain tensors (no labels in them; "
                             f"give None or False)")
        return batch, None
    if isinstance(batch, dict):
        x, y = _split_dict(batch, label, required)
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        x, y = _split_tuple(batch, label, required)
    else:
        raise ValueError(f"data: a batch must be a tensor, a tuple of tensors (inputs and labels) or a dict; "
                         f"got {type(batch).__name__}")
    _check_labels(x, y)
    return x, y


def _whole_tensors(data, required: Optional[int]) -> bool:
    """``data`` is one batch of whole tensors: ``(X, Y)`` (X of higher rank), or -- for a model not
    known to take one input -- a tuple of equal-length tensors ``(src, tgt[, y])``. A one-input
    model's tuple of equal-rank tensors stays several batches, as before."""
    if not (isinstance(data, (tuple, list)) and len(data) >= 2
            and all(isinstance(d, torch.Tensor) and d.dim() for d in data)):
        return False
    pair = len(data) == 2 and data[0].dim() > data[1].dim()          # lengths are checked with the batch
    return pair or (isinstance(data, tuple) and required != 1 and len({len(d) for d in data}) == 1)


def _iter_batches(data, required: Optional[int] = None):
    if isinstance(data, torch.Tensor):
        yield data
        return
    if _whole_tensors(data, required):
        yield tuple(data)  # whole tensors: one batch, split later
        return
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset) \
            and hasattr(data, "__len__"):
        data = torch.utils.data.DataLoader(data, batch_size=64, shuffle=False)
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(f"data must be a DataLoader, an iterable of batches, a Dataset or a tensor; "
                        f"got {type(data).__name__}") from None
    yield from iterator


SYNTHETIC_SIDE = 128
"""Side of synthetic images when the shape comes from timm's config (not from ``example_inputs``).
Measured by benchmarks/synthetic_inputs.py (12 plans per model, Spearman's correlation of their scores
with the scores on 224x224 inputs): at 128, 0.99 / 0.68 / 0.88 / 0.82 / 0.98 on resnet18 /
mobilenetv3_small_050 / mobilenetv3_large_100 / efficientnet_b0 / regnetx_002; at 64, 0.81 / 0.00 / 0.54
/ 0.39 / 1.00; at 32 no better than chance. A plan scored at 128 costs about a third of one at 224."""


def build_calibration(model: nn.Module, data=None, example_inputs=None, num_samples: int = 512,
                      batch_size: int = 128, seed: int = 0, label=None) -> CalibrationSet:
    """Take up to ``num_samples`` inputs from ``data`` (or synthesise them) as fixed batches;
    ``label`` says which part of a batch is the label (:func:`check_label`)."""
    check_label(label)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if data is None:
        shape = infer_input_shape(model, example_inputs)
        native = tuple(shape)
        if example_inputs is None:
            shape = reduced_image_shape(model, shape, SYNTHETIC_SIDE)
        reduced = f" (the model's {native} scaled down: example_inputs= sets it)" if tuple(shape) != native else ""
        warnings.warn("rl_prune: no data given, scoring plans on synthetic Gaussian inputs of shape "
                      f"{tuple(shape)}{reduced}; real calibration data (data=loader) gives better plans.",
                      UserWarning, stacklevel=3)
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn((num_samples, *shape), generator=generator)
        xs, ys = [x], None
    else:
        xs, ys, count = [], [], 0
        required = _required_positional(model)
        for batch in _iter_batches(data, required):
            x, y = _split_batch(batch, label, required)
            xs.append(x)
            ys.append(y)
            count += len(x)
            if count >= num_samples:
                break
        if not xs:
            raise ValueError("data: no batches (the loader is empty)")
        has_labels = all(y is not None for y in ys)
        if not has_labels:
            ys = None
        x = concat(xs)[:num_samples]
        if len(x) == 0:
            raise ValueError("data: no samples (the calibration data is empty)")
        if not all_finite(x):
            raise ValueError("data: the calibration inputs contain NaN or inf")
        xs = [x]
        if ys is not None:
            ys = [torch.cat(ys)[:num_samples]]
    x = to_device(xs[0], device, dtype)
    inputs = list(x.split(batch_size))
    labels = list(ys[0].to(device).split(batch_size)) if ys is not None else None
    return CalibrationSet(inputs, labels, synthetic=data is None)


def take_samples(calibration: CalibrationSet, count: int, seed: int, batch_size: int = 128) -> CalibrationSet:
    """A seeded random ``count`` of the samples (all of them when there are fewer), in their order:
    random, so a loader sorted by class does not give a slice of one class."""
    order = torch.randperm(calibration.num_samples, generator=torch.Generator().manual_seed(int(seed)))
    return subset(calibration, torch.sort(order[:count]).values, batch_size)


def subset(calibration: CalibrationSet, idx: torch.Tensor, batch_size: int = 128) -> CalibrationSet:
    """The samples at positions ``idx`` (and their labels), in batches of ``batch_size``."""
    x = concat(calibration.inputs)
    labels = None
    if calibration.labels is not None:
        y = torch.cat(calibration.labels)
        labels = list(y[idx.to(y.device)].split(batch_size))
    return CalibrationSet(list(x[idx.to(x.device)].split(batch_size)), labels, calibration.synthetic)
