"""Batches for models that take several inputs, and the one way the package calls a model.

A model taking one tensor gets plain tensors everywhere (nothing changes, nothing is slower).
A model taking several -- transformers' ``input_ids`` + ``attention_mask``, a seq2seq
``forward(src, tgt)`` -- gets an :class:`Inputs`: positional and keyword tensors that share
dim 0 (the batch), sliced, split, moved and concatenated together.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["infer_input_shape", "Inputs", "run_model", "concat", "to_device", "all_finite", "describe_shape", "as_example",
           "batch_tensors", "reduced_image_shape"]


class Inputs:
    """One batch of a multi-input model: ``model(*args, **kwargs)``, every tensor batch-first."""

    __slots__ = ("args", "kwargs")

    def __init__(self, args: Sequence[torch.Tensor] = (), kwargs: Dict[str, torch.Tensor] = None):
        self.args, self.kwargs = tuple(args), dict(kwargs or {})
        if not self.args and not self.kwargs:
            raise ValueError("data: a batch with no input tensors")
        if any(t.dim() == 0 for t in self.tensors()):
            raise ValueError(f"data: every input needs a batch dimension (dim 0); got {self.describe()}")
        lengths = {len(t) for t in self.tensors()}
        if len(lengths) > 1:
            raise ValueError(f"data: the inputs of one batch differ in length (dim 0): {self.describe()}")

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from self.args
        yield from self.kwargs.values()

    def _map(self, fn) -> "Inputs":
        return Inputs([fn(t) for t in self.args], {k: fn(t) for k, t in self.kwargs.items()})

    def __len__(self) -> int:
        return len(next(self.tensors()))

    @property
    def device(self) -> torch.device:
        return next(self.tensors()).device

    def __getitem__(self, index) -> "Inputs":
        return self._map(lambda t: t[index])

    def split(self, size: int) -> List["Inputs"]:
        parts = [list(t.split(size)) for t in self.tensors()]
        n_args = len(self.args)
        return [Inputs(p[:n_args], dict(zip(self.kwargs, p[n_args:]))) for p in zip(*parts)]

    def as_example(self) -> Union[tuple, dict, "Inputs"]:
        """The form torch-pruning takes example inputs in (``model(*tuple)`` or ``model(**dict)``);
        only a batch with both kinds of inputs stays an :class:`Inputs`."""
        if not self.kwargs:
            return self.args
        return self.kwargs if not self.args else self

    def describe(self) -> str:
        args = [tuple(t.shape) for t in self.args]
        kwargs = {k: tuple(t.shape) for k, t in self.kwargs.items()}
        return ", ".join([str(a) for a in args] + [f"{k}={v}" for k, v in kwargs.items()])

    def __repr__(self) -> str:
        return f"Inputs({self.describe()})"


Batch = Union[torch.Tensor, Inputs]


def run_model(model: nn.Module, inputs) -> Any:
    """``model(x)`` for a tensor, ``model(*args, **kwargs)`` for :class:`Inputs`, ``model(*x)`` for a
    tuple/list and ``model(**x)`` for a dict (the example inputs torch-pruning users pass).

    torch-pruning's own default tries ``model(*x)`` first, which for a plain tensor silently feeds
    ``x[0]`` (an unbatched sample) to the model; its graph is built through this instead."""
    if isinstance(inputs, Inputs):
        return model(*inputs.args, **inputs.kwargs)
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def concat(batches: Sequence[Batch]) -> Batch:
    """One batch from several (all tensors, or all :class:`Inputs` of the same layout)."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches))
    if any(not isinstance(b, Inputs) or len(b.args) != len(first.args) or b.kwargs.keys() != first.kwargs.keys()
           for b in batches):
        raise ValueError("data: batches differ in their inputs (every batch needs the same positional inputs "
                         "and the same keys)")
    args = [torch.cat([b.args[i] for b in batches]) for i in range(len(first.args))]
    return Inputs(args, {k: torch.cat([b.kwargs[k] for b in batches]) for k in first.kwargs})


def to_device(batch: Batch, device: torch.device, dtype: torch.dtype) -> Batch:
    """On the model's device; floating tensors take the model's dtype, token ids stay integers."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    return batch._map(move) if isinstance(batch, Inputs) else move(batch)


def batch_tensors(batch: Batch) -> List[torch.Tensor]:
    """Every input tensor of a batch (the tensor itself for a one-input model)."""
    return list(batch.tensors()) if isinstance(batch, Inputs) else [batch]


def all_finite(batch: Batch) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in batch_tensors(batch) if t.is_floating_point())


def as_example(batch: Batch):
    """A batch as example inputs for the channel machinery: a tensor, a tuple or a dict."""
    return batch.as_example() if isinstance(batch, Inputs) else batch


def describe_shape(batch: Batch) -> str:
    return batch.describe() if isinstance(batch, Inputs) else str(tuple(batch.shape))


# --------------------------------------------------------------------------- the recorded example
EXAMPLE_ATTRIBUTE = "_rlprune_example"
"""Where a channel-pruned model keeps the shapes and dtypes of the example it was pruned with, so that
``compact(model)`` and ``rlprune compact`` need no input shape (a plain attribute: it survives
``copy.deepcopy`` and ``torch.save(model)``, not a ``state_dict``)."""


def _describe(x):
    if isinstance(x, torch.Tensor):
        return {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
    if isinstance(x, Inputs):
        return {"args": [_describe(a) for a in x.args], "kwargs": {k: _describe(v) for k, v in x.kwargs.items()}}
    if isinstance(x, dict):
        return {"dict": {k: _describe(v) for k, v in x.items()}}
    if isinstance(x, (tuple, list)):
        return {"tuple": [_describe(v) for v in x]}
    raise TypeError(f"cannot record an example input of type {type(x).__name__}")


def record_example(model: nn.Module, example) -> None:
    """Keep ``example``'s shapes and dtypes on ``model`` (an example no tensor describes is not kept)."""
    try:
        setattr(model, EXAMPLE_ATTRIBUTE, _describe(example))
    except TypeError:
        pass


def _build(spec, generator: torch.Generator):
    if "shape" in spec:
        dtype, shape = getattr(torch, str(spec["dtype"]), None), spec["shape"]
        if not isinstance(dtype, torch.dtype) or not all(isinstance(d, int) and d >= 0 for d in shape) \
                or math.prod(shape) > 1 << 27:
            raise ValueError(f"not a recorded input: {spec!r}"[:200])
        if dtype.is_floating_point:
            return torch.randn(spec["shape"], generator=generator).to(dtype)
        return torch.zeros(spec["shape"], dtype=dtype)  # token ids, masks: 0 is valid everywhere
    if "args" in spec:
        return Inputs(tuple(_build(a, generator) for a in spec["args"]),
                      {k: _build(v, generator) for k, v in spec["kwargs"].items()})
    if "dict" in spec:
        return {k: _build(v, generator) for k, v in spec["dict"].items()}
    return tuple(_build(v, generator) for v in spec["tuple"])


def recorded_example(model: nn.Module):
    """An example input shaped like the one ``model`` was channel-pruned with (seeded values), or None."""
    spec = getattr(model, EXAMPLE_ATTRIBUTE, None)
    if not isinstance(spec, dict):
        return None
    try:
        return as_example(_build(spec, torch.Generator().manual_seed(0)))
    except (KeyError, TypeError, AttributeError, RuntimeError, ValueError):
        return None  # a record this version does not read: as if there were none


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


def reduced_image_shape(model: nn.Module, shape: Sequence[int], side: int) -> Tuple[int, ...]:
    """An image shape ``(C, H, W)`` scaled down so that its shorter side is ``side``, when the model
    runs on it (a vision transformer with a fixed patch grid does not: then ``shape`` itself)."""
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or min(shape[1:]) <= side:
        return shape
    scale = side / min(shape[1:])
    reduced = (shape[0], max(side, round(shape[1] * scale)), max(side, round(shape[2] * scale)))
    param = next(model.parameters(), None)
    probe = torch.zeros((2, *reduced), dtype=param.dtype if param is not None and param.is_floating_point()
                        else torch.float32, device=param.device if param is not None else None)
    try:
        with torch.inference_mode():
            run_model(model, probe)
    except Exception:  # noqa: BLE001 - any refusal means: keep the shape the model was made for
        return shape
    return reduced
