"""The inputs a search scores plans on, gathered once and kept as tensors."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn

__all__ = ["CalibrationSet", "build_calibration", "primary_output", "infer_input_shape"]


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

    inputs: List[torch.Tensor]
    labels: Optional[List[torch.Tensor]]
    synthetic: bool

    @property
    def num_samples(self) -> int:
        return sum(len(x) for x in self.inputs)


def _split_batch(batch):
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        x = batch.get("input", batch.get("x", batch.get("image")))
        y = batch.get("label", batch.get("labels", batch.get("target", batch.get("y"))))
        if x is None:
            raise ValueError("data: dict batches need an 'input', 'x' or 'image' key")
        return x, y
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        if y is not None and (y.dim() == 0 or len(y) != len(batch[0])):
            raise ValueError(f"data: inputs and labels differ in length ({len(batch[0])} inputs, "
                             f"{len(y) if y.dim() else 'a scalar as'} labels)")
        return batch[0], y
    raise ValueError(f"data: a batch must be a tensor, an (inputs, labels) pair or a dict; "
                     f"got {type(batch).__name__}")


def _iter_batches(data):
    if isinstance(data, torch.Tensor):
        yield data
        return
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data) \
            and data[0].dim() > data[1].dim() >= 1:
        yield tuple(data)  # (X, Y) tensors; their lengths are checked with every batch's
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


def infer_input_shape(model: nn.Module, example_inputs=None) -> Sequence[int]:
    """Per-sample input shape from ``example_inputs`` or timm's ``pretrained_cfg``."""
    if example_inputs is not None:
        if not isinstance(example_inputs, torch.Tensor):
            raise TypeError("example_inputs must be a tensor of shape (batch, ...)")
        return tuple(example_inputs.shape[1:])
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    shape = cfg.get("input_size")
    if shape is None:
        raise ValueError("cannot infer the model's input shape: pass data= (recommended) or "
                         "example_inputs= (a tensor of shape (batch, ...))")
    shape = list(shape)
    first_conv = cfg.get("first_conv")
    if first_conv:  # timm keeps (3, H, W) in the config even when built with in_chans=1
        names = first_conv if isinstance(first_conv, (list, tuple)) else [first_conv]
        try:
            shape[0] = model.get_submodule(names[0]).in_channels
        except (AttributeError, TypeError):
            pass
    return tuple(shape)


def build_calibration(model: nn.Module, data=None, example_inputs=None, num_samples: int = 512,
                      batch_size: int = 128, seed: int = 0) -> CalibrationSet:
    """Take up to ``num_samples`` inputs from ``data`` (or synthesise them) as fixed batches."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if data is None:
        shape = infer_input_shape(model, example_inputs)
        warnings.warn("rl_prune: no data given, scoring plans on synthetic Gaussian inputs of shape "
                      f"{tuple(shape)}; real calibration data (data=loader) gives better plans.",
                      UserWarning, stacklevel=3)
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn((num_samples, *shape), generator=generator)
        xs, ys = [x], None
    else:
        xs, ys, count = [], [], 0
        for batch in _iter_batches(data):
            x, y = _split_batch(batch)
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
        x = torch.cat(xs)[:num_samples]
        if len(x) == 0:
            raise ValueError("data: no samples (the calibration data is empty)")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError("data: the calibration inputs contain NaN or inf")
        xs = [x]
        if ys is not None:
            ys = [torch.cat(ys)[:num_samples]]
    x = xs[0]
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    inputs = list(x.split(batch_size))
    labels = list(ys[0].to(device).split(batch_size)) if ys is not None else None
    return CalibrationSet(inputs, labels, synthetic=data is None)
