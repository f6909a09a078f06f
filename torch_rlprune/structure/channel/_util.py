"""Small machinery the channel layer needs: time limits, model snapshots, input handling.

None of it knows about groups or pruning policies.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import traceback
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import prune

from ..inputs import Inputs, run_model  # noqa: F401 - run_model is re-exported to the channel modules

__all__ = ["ChannelPruningError", "ChannelTimeoutError", "time_limit", "Deadline",
           "run_model", "primary_tensor", "training_flags", "restore_training", "prune_hooks",
           "remove_prune_hooks", "clear_attention_caches"]


class ChannelPruningError(RuntimeError):
    """Structured pruning cannot proceed; the message names the model part responsible."""


class ChannelTimeoutError(ChannelPruningError):
    """A torch-pruning call (graph building, group enumeration, pruning) ran past its time limit."""


def _alarm_usable() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def time_limit(seconds: Optional[float], what: str) -> Iterator[None]:
    """Raise :class:`ChannelTimeoutError` naming ``what`` if the block runs longer than ``seconds``.

    torch-pruning's hangs (index-mapping blow-ups in group enumeration) are pure-Python
    loops, so a SIGALRM raised between two bytecodes interrupts them. Signals only reach
    the main thread: elsewhere (and for ``seconds=None``) the block runs unbounded. An
    enclosing timer (pytest-timeout, a caller's own alarm) is re-armed afterwards with
    what was left of it.
    """
    if seconds is None or not _alarm_usable():
        yield
        return
    if seconds <= 0:
        raise ChannelTimeoutError(f"{what}: no time left (limit already spent)")

    def _raise(signum, frame):
        raise ChannelTimeoutError(f"{what} did not finish within {seconds:.3g} s")

    started = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, _raise)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:  # give an outer timer back what it had left (at least a tick)
            left = max(old_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, old_interval)


class Deadline:
    """An overall budget shared by several time-limited steps."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self, cap: Optional[float] = None) -> Optional[float]:
        if self.end is None:
            return cap
        left = self.end - time.monotonic()
        return left if cap is None else min(cap, left)


# --------------------------------------------------------------------------- failures
_LIBRARY_PARTS = (f"{os.sep}torch{os.sep}", f"{os.sep}torch_pruning{os.sep}", f"{os.sep}torch_rlprune{os.sep}")


def describe_failure(error: BaseException, limit: int = 200) -> str:
    """``Type: message`` plus the model's own line that raised it (the innermost frame outside
    torch, torch-pruning and this package): the op that blocks removing the channels, e.g.
    BERT's ``.view(bsz, -1, heads, head_dim)``."""
    text = f"{type(error).__name__}: {str(error)[:limit]}"
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not any(part in f.filename for part in _LIBRARY_PARTS)]
    if frames:
        frame = frames[-1]
        text += f" at {os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()[:120]}`"
    return text


# --------------------------------------------------------------------------- inputs and outputs
def batch_size(example_inputs, recurrent_batches: Sequence[int] = ()) -> int:
    """Samples in ``example_inputs``: what a recurrent layer saw as its batch (time-major
    inputs put it in dim 1), else dim 0 of the first input tensor, else 1."""
    if recurrent_batches:
        return max(1, int(recurrent_batches[0]))
    first = example_inputs
    if isinstance(first, Inputs):
        first = next(first.tensors())
    elif isinstance(first, dict):
        first = next(iter(first.values()), None)
    elif isinstance(first, (tuple, list)):
        first = first[0] if first else None
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] else 1


def primary_tensor(out) -> torch.Tensor:
    """The first tensor of a (possibly nested) model output."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            found = primary_tensor(item)
            if found is not None:
                return found
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return out.logits
    return None


def training_flags(model: nn.Module) -> List[Tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def restore_training(flags) -> None:
    for m, flag in flags:
        m.training = flag


def clear_attention_caches(model: nn.Module) -> None:
    """Drop cached attention biases (LeViT & co. cache them in eval mode; a cache filled while
    tracing with gradients enabled holds a graph that a later backward would reuse)."""
    for m in model.modules():
        cache = getattr(m, "attention_bias_cache", None)
        if isinstance(cache, dict):
            cache.clear()


# --------------------------------------------------------------------------- prune hooks
def prune_hooks(model: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """``(module_name, module, tensor_name)`` for every torch.nn.utils.prune re-parametrisation."""
    found = []
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                found.append((name, module, hook._tensor_name))
    return found


def remove_prune_hooks(model: nn.Module) -> Dict[Tuple[int, str], torch.Tensor]:
    """``prune.remove`` every pruned tensor (zeros stay) and return the masks, keyed by
    ``(id(module), tensor_name)``."""
    masks = {}
    for _, module, tname in prune_hooks(model):
        masks[(id(module), tname)] = getattr(module, tname + "_mask").detach().cpu().clone()
        prune.remove(module, tname)
    return masks
