"""Where a plan's layers sit in a forward pass, and which activations a cut before them needs.

The model side of prefix caching (:mod:`.prefix_cache`). One forward on a small example batch
records every module call as a (start, end) pair of event numbers. Plan entry ``i`` reads the
modules ``units[i]``; its *cut* is the first event at which any of them runs. A module whose calls
all end before a cut computes the same output for every plan that agrees on the entries whose
cuts come earlier: its inputs and weights are the same, and an eval-mode forward is deterministic.

For each cut, the *replaced* modules are the largest such modules (no replaceable ancestor); at
replay their forward returns stored outputs instead of running. Only the outputs something after
the cut reads need storing. The trace proposes them by identity (an output tensor that a later
module call receives, or that the model returns) and a poison check decides: with every other
replaced module returning NaN, the model's output must be bitwise the traced one. Outputs the
check shows are unread are dropped one by one; a cut the check rejects is never used.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from .inputs import Inputs, run_model

__all__ = ["ForwardTrace", "Cut", "trace_forward", "find_cuts", "flat_tensors", "copy_output", "placeholder",
           "storable", "replaced_forwards", "map_tensors"]

CallKey = Tuple[int, int]          # (module index, call number within one forward)


def flat_tensors(obj) -> List[torch.Tensor]:
    """The tensors in a (nested) tuple, list, dict or :class:`Inputs`, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Inputs):
        return list(obj.tensors())
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in flat_tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in flat_tensors(item)]
    return []


def storable(obj) -> bool:
    """A module output replay can hand back: a tensor, or (named) tuples and lists of them."""
    if isinstance(obj, torch.Tensor):
        return True
    return isinstance(obj, (tuple, list)) and all(storable(item) or item is None for item in obj)


def map_tensors(obj, fn: Callable[[torch.Tensor], Any]):
    """``obj`` (a tensor, or (named) tuples and lists of them and None) with ``fn`` applied to each tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if obj is None:
        return None
    items = [map_tensors(item, fn) for item in obj]
    if hasattr(obj, "_fields"):          # a namedtuple
        return type(obj)(*items)
    return type(obj)(items)


def copy_output(obj):
    """A copy no later in-place operation can change (a ReLU(inplace=True) after a convolution)."""
    return map_tensors(obj, lambda t: t.clone())


def placeholder(obj):
    """An output of the same shapes whose values nothing reads (the poison check showed it): NaN
    where the dtype has one, so that a read would show."""
    return map_tensors(obj, lambda t: torch.full_like(t, float("nan")) if t.is_floating_point() else t.clone())


@dataclass
class ForwardTrace:
    """One eval-mode forward on an example batch, module by module."""

    modules: List[nn.Module]                        # every submodule, in registration order
    parents: List[Optional[int]]                    # index of each module's parent (None: the root's child)
    shared: Set[int]                                # modules registered under several names
    calls: List[List[Tuple[int, int]]]              # per module: (start, end) event of every call
    outputs: Dict[CallKey, Any]                     # a copy of every call's output
    produced: Dict[int, CallKey]                    # tensor id -> the last call that returned it
    reads: List[Tuple[int, int, Set[int]]]          # (module, start event, ids of the input tensors)
    returned: Set[int]                              # ids of the tensors the model returned
    result: List[torch.Tensor]                      # the model's output tensors, copied
    events: int
    keep_alive: list = field(default_factory=list, repr=False)   # so that no two tensors share an id

    def first_start(self, module_index: int) -> int:
        return self.calls[module_index][0][0] if self.calls[module_index] else -1

    def last_end(self, module_index: int) -> int:
        return max((end for _, end in self.calls[module_index]), default=-1)


def _module_tree(model: nn.Module) -> Tuple[List[nn.Module], List[Optional[int]], Set[int]]:
    """Submodules, their parents, and those registered under several names (never replaced: their
    calls from a replaced parent and from elsewhere could not be told apart)."""
    seen: Dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        seen[id(module)] = seen.get(id(module), 0) + 1
    modules, parents, index = [], [], {id(model): None}
    for name, module in model.named_modules():
        if module is model:
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        index[id(module)] = len(modules)
        modules.append(module)
        parents.append(index[id(parent)])
    return modules, parents, {i for i, m in enumerate(modules) if seen[id(m)] > 1}


def trace_forward(model: nn.Module, example) -> ForwardTrace:
    modules, parents, shared = _module_tree(model)
    trace = ForwardTrace(modules, parents, shared, [[] for _ in modules], {}, {}, [], set(), [], 0)
    counter = itertools.count()
    open_calls: Dict[int, List[int]] = {}

    def before(i):
        def hook(module, args, kwargs):
            start = next(counter)
            open_calls.setdefault(i, []).append(start)
            inputs = flat_tensors((args, kwargs))
            trace.keep_alive.extend(inputs)
            trace.reads.append((i, start, {id(t) for t in inputs}))
        return hook

    def after(i):
        def hook(module, args, kwargs, output):
            trace.calls[i].append((open_calls[i].pop(), next(counter)))
            call = (i, len(trace.calls[i]) - 1)
            tensors = flat_tensors(output)
            trace.keep_alive.extend(tensors)
            for t in tensors:
                trace.produced[id(t)] = call
            if storable(output):
                trace.outputs[call] = copy_output(output)
        return hook

    handles = []
    try:
        for i, module in enumerate(modules):
            handles.append(module.register_forward_pre_hook(before(i), with_kwargs=True))
            handles.append(module.register_forward_hook(after(i), with_kwargs=True))
        with torch.inference_mode():
            output = run_model(model, example)
    finally:
        for h in handles:
            h.remove()
    tensors = flat_tensors(output)
    trace.keep_alive.extend(tensors)
    trace.returned = {id(t) for t in tensors}
    trace.result = [t.clone() for t in tensors]
    trace.events = next(counter)
    return trace


@dataclass
class Cut:
    """Replay before ``event``: ``replaced`` modules return stored outputs of ``stored`` calls
    (the others a placeholder); ``bytes_per_sample`` of stored output per example sample."""

    event: int
    replaced: List[int]
    calls: Dict[int, int]                # calls of each replaced module in one forward
    stored: Set[CallKey]
    bytes_per_sample: Dict[CallKey, float]

    @property
    def unread(self) -> Set[CallKey]:
        """Replaced calls that get a placeholder."""
        return {(i, n) for i in self.replaced for n in range(self.calls[i])} - self.stored


class replaced_forwards:
    """Within the block, ``modules[i]`` (for ``i`` in ``replaced``) returns ``output(i, call)``
    instead of running; the calls are numbered from 0 per module."""

    def __init__(self, modules: Sequence[nn.Module], replaced: Sequence[int], output: Callable[[int, int], Any]):
        self.modules, self.replaced, self.output = modules, list(replaced), output

    def __enter__(self):
        self.counts = {i: 0 for i in self.replaced}
        for i in self.replaced:
            self.modules[i].forward = self._replay(i)
        return self

    def _replay(self, i: int):
        def forward(*args, **kwargs):
            call = self.counts[i]
            self.counts[i] += 1
            return self.output(i, call)
        return forward

    def __exit__(self, *exc):
        for i in self.replaced:
            self.modules[i].__dict__.pop("forward", None)
        return False


def _replaceable(trace: ForwardTrace, i: int, event: int) -> bool:
    calls = trace.calls[i]
    return (i not in trace.shared and bool(calls) and trace.last_end(i) < event
            and all((i, n) in trace.outputs for n in range(len(calls))))


def _largest_replaceable(trace: ForwardTrace, event: int) -> List[int]:
    ok = [_replaceable(trace, i, event) for i in range(len(trace.modules))]

    def has_replaceable_ancestor(i: int) -> bool:
        parent = trace.parents[i]
        while parent is not None:
            if ok[parent]:
                return True
            parent = trace.parents[parent]
        return False

    return [i for i in range(len(trace.modules)) if ok[i] and not has_replaceable_ancestor(i)]


def _read_later(trace: ForwardTrace, replaced: List[int], event: int, spanning: bool) -> Set[CallKey]:
    """Calls of ``replaced`` modules whose output the model returns or a module call outside them
    receives. ``spanning``: count the inputs of the calls that started before the cut and end after
    it (a residual block around the cut reads its input again after it, a container only passes it on)."""
    calls_of_replaced = {(i, n) for i in replaced for n in range(len(trace.calls[i]))}
    read: Set[int] = set(trace.returned)
    for module, start, ids in trace.reads:
        if any(_within(trace, module, r) for r in replaced):
            continue
        if start >= event or spanning or trace.last_end(module) < event:
            read |= ids
    return {trace.produced[t] for t in read if trace.produced.get(t) in calls_of_replaced}


def _within(trace: ForwardTrace, i: int, ancestor: int) -> bool:
    while i is not None:
        if i == ancestor:
            return True
        i = trace.parents[i]
    return False


def _replays_exactly(model: nn.Module, example, trace: ForwardTrace, replaced: List[int],
                     stored: Set[CallKey]) -> bool:
    def output(i: int, call: int):
        kept = trace.outputs[(i, call)]
        return copy_output(kept) if (i, call) in stored else placeholder(kept)

    try:
        with replaced_forwards(trace.modules, replaced, output), torch.inference_mode():
            result = flat_tensors(run_model(model, example))
    except Exception:    # a placeholder the forward could not take (an in-place write into it): reject
        return False
    return len(result) == len(trace.result) and all(
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(result, trace.result))


def _bytes_per_sample(trace: ForwardTrace, call: CallKey, samples: int) -> float:
    return sum(t.numel() * t.element_size() for t in flat_tensors(trace.outputs[call])) / max(1, samples)


def find_cuts(model: nn.Module, example, trace: ForwardTrace, events: Sequence[int], samples: int) -> List[Cut]:
    """The verified cuts before ``events`` (ascending, one per distinct event, those that replace
    nothing or fail the poison check left out)."""
    cuts = []
    for event in sorted(set(e for e in events if e > 0)):
        replaced = _largest_replaceable(trace, event)
        if not replaced:
            continue
        guesses = (_read_later(trace, replaced, event, spanning=False), _read_later(trace, replaced, event, True),
                   {(i, n) for i in replaced for n in range(len(trace.calls[i]))})
        stored = next((g for g in guesses if _replays_exactly(model, example, trace, replaced, g)), None)
        if stored is None:
            continue
        cuts.append(Cut(event, replaced, {i: len(trace.calls[i]) for i in replaced}, stored,
                        {c: _bytes_per_sample(trace, c, samples) for c in stored}))
    return cuts
