"""Prefix caching: a plan that changes only layers from some point on reuses what the unchanged
layers before that point computed for the plan scored before it.

A search scores many plans on the same calibration batches, and consecutive plans often agree on
their first layers: PuRL's dense reward changes one layer per step, and every layer a search
keeps unpruned (the protected first layer) or at the same amount is a prefix two plans share.
While a plan is scored, the outputs of the modules before each verified cut
(:mod:`.prefix_trace`) are kept, per calibration batch; the next plan's forward on that batch
replays them up to the deepest cut before its first changed layer and runs the rest.

Exact by construction: a replayed module ran on the same inputs with the same weights (every
plan entry it reads is unchanged), and its output is the stored copy. BatchNorm re-estimation
forwards (train mode) always run in full; an eval forward's stored outputs are keyed by the
re-estimation batches before it as well as by its own batch, since both decide the statistics
the replayed modules used. A forward whose only train-mode modules are BatchNorm layers that track
no running statistics (a screening slice normalised with its own statistics) depends on the plan and
its batch alone, and is keyed and replayed as such. Stored outputs never exceed ``max_bytes``:
deeper cuts are dropped first, and only cuts that one of the last :data:`RECENT` forwards could
have used are stored (an agent that changes every layer at once only ever replays what runs before
its first layer, and keeps nothing deeper).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from .prefix_trace import Cut, copy_output, find_cuts, flat_tensors, map_tensors, replaced_forwards, trace_forward

__all__ = ["PrefixCache", "PrefixCacheStats"]

CallKey = Tuple[int, int]
RECENT = 64
"""Forwards whose first changed layer decides which cuts are worth storing."""


@dataclass
class PrefixCacheStats:
    """What prefix caching did over a search's eval forwards."""

    max_bytes: int
    cuts: int = 0                   # verified cut points (at most one per plan entry)
    forwards: int = 0               # eval forwards while scoring
    reused: int = 0                 # of which replayed a prefix
    skipped_events: float = 0.0     # module calls and returns replayed, as a share of all, summed
    peak_bytes: int = 0
    setup_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"max_mb": self.max_bytes / 2 ** 20, "cuts": self.cuts, "forwards": self.forwards,
                "reused": self.reused, "skipped_share": self.skipped_events / max(1, self.forwards),
                "peak_mb": self.peak_bytes / 2 ** 20, "setup_seconds": self.setup_seconds}


@dataclass
class _Entry:
    """The stored prefix of one calibration batch (after one set of re-estimation batches)."""

    inputs: list                                   # the tensors themselves: their ids stay theirs
    plan: Tuple[int, ...] = ()
    cuts: List[int] = field(default_factory=list)  # indices into PrefixCache.cuts, ascending
    outputs: Dict[CallKey, Any] = field(default_factory=dict)
    shapes: Dict[CallKey, Any] = field(default_factory=dict)   # meta copies: placeholders' shapes

    @property
    def bytes(self) -> int:
        return sum(_nbytes(out) for out in self.outputs.values())


def _meta(obj):
    """Shapes and dtypes only: what a placeholder needs."""
    return map_tensors(obj, lambda t: torch.empty_like(t, device="meta"))


def _nan_like(meta, device):
    return map_tensors(meta, lambda m: torch.full(m.shape, float("nan") if m.is_floating_point() else 0,
                                                  dtype=m.dtype, device=device))


class PrefixCache:
    """Replays unchanged prefixes of the forward passes that score plans.

    Args:
        model: the model whose plans are scored (its weights are masked in place).
        units: per plan entry, the modules whose forward reads that entry's weights.
        example: a batch of a few scoring samples, for the trace.
        max_bytes: bound on the stored outputs.

    Set :attr:`plan` (one int per entry) whenever the masks change, and score inside
    :meth:`active`; forwards outside it, and train-mode forwards, are never touched.
    """

    def __init__(self, model: nn.Module, units: Sequence[Sequence[nn.Module]], example, max_bytes: int):
        started = time.perf_counter()
        self.model, self.max_bytes = model, int(max_bytes)
        trace = trace_forward(model, example)
        self.modules, self.events = trace.modules, trace.events
        self.example_numel = flat_tensors(example)[0].numel()
        index = {id(m): i for i, m in enumerate(trace.modules)}
        self.entry_events = [min((trace.first_start(index[id(m)]) if id(m) in index else 0) for m in unit)
                             if unit else 0 for unit in units]
        self.entry_events = [max(0, e) for e in self.entry_events]
        self.cuts: List[Cut] = find_cuts(model, example, trace, self.entry_events,
                                         len(flat_tensors(example)[0]))
        self.stats = PrefixCacheStats(self.max_bytes, cuts=len(self.cuts),
                                      setup_seconds=time.perf_counter() - started)
        self.plan: Optional[Tuple[int, ...]] = None
        self._entries: Dict[tuple, _Entry] = {}
        self._recal_pending: Optional[list] = None   # train-mode batches since the last eval forward
        self._recal_done: list = []                   # the re-estimation the eval forwards now follow
        self._forward: Optional[dict] = None
        self._recent_changes: Deque[float] = deque(maxlen=RECENT)   # where recent plans first differed

    @contextlib.contextmanager
    def active(self):
        handles = [self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                   self.model.register_forward_hook(self._after, with_kwargs=True)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._end_forward()     # after a forward that raised: its replacements and hooks must go

    def _end_forward(self) -> Optional[dict]:
        f, self._forward = self._forward, None
        if f is not None:
            f["replay"].__exit__(None, None, None)
            for h in f["hooks"]:
                h.remove()
        return f

    def clear(self) -> None:
        self._entries.clear()

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self._entries.values())

    @property
    def stored_events(self) -> List[int]:
        """The events of the cuts stored for some batch now."""
        return sorted({self.cuts[j].event for e in self._entries.values() for j in e.cuts})

    def _first_changed(self, stored: Tuple[int, ...]) -> float:
        if self.plan is None or len(stored) != len(self.plan):
            return 0
        return min((self.entry_events[i] for i, (a, b) in enumerate(zip(stored, self.plan)) if a != b),
                   default=math.inf)

    def _entry(self, inputs: List[torch.Tensor], own_statistics: bool) -> _Entry:
        statistics = [] if own_statistics else list(self._recal_done)
        key = (own_statistics, tuple(id(t) for t in statistics), tuple(id(t) for t in inputs))
        entry = self._entries.get(key)
        if entry is None:   # the entry holds the tensors, so their ids cannot be reused meanwhile
            entry = self._entries[key] = _Entry(inputs=statistics + list(inputs))
        return entry

    def _before(self, module, args, kwargs):
        inputs = flat_tensors((args, kwargs))
        training = [m for m in (module, *self.modules) if m.training]
        own_statistics = bool(training) and all(_own_statistics(m) for m in training)
        if training and not own_statistics:
            self._recal_pending = (self._recal_pending or []) + inputs
            return
        if self._recal_pending is not None and not own_statistics:
            self._recal_done, self._recal_pending = self._recal_pending, None
        if self.plan is None or not inputs:
            return
        entry = self._entry(inputs, own_statistics)
        changed = self._first_changed(entry.plan)
        if entry.plan:
            self._recent_changes.append(changed)
        usable = [j for j in entry.cuts if self.cuts[j].event <= changed]
        use = usable[-1] if usable else None
        kept = usable
        capture = self._cuts_to_capture(entry, use, kept, inputs[0].numel() / self.example_numel)
        replay = self._replay(entry, use, inputs[0].device)
        replay.__enter__()
        self._forward = {"entry": entry, "use": use, "kept": kept, "capture": capture, "replay": replay,
                         "captured": {}, "shapes": {}, "counts": {},
                         "hooks": self._capture_hooks(entry, use, capture)}
        self.stats.forwards += 1
        if use is not None:
            self.stats.reused += 1
            self.stats.skipped_events += self.cuts[use].event / self.events

    def _replay(self, entry: _Entry, use: Optional[int], device) -> replaced_forwards:
        if use is None:
            return replaced_forwards(self.modules, [], lambda i, call: None)
        cut = self.cuts[use]

        def output(i: int, call: int):
            if (i, call) in cut.stored:
                return copy_output(entry.outputs[(i, call)])
            return _nan_like(entry.shapes[(i, call)], device)   # unread: the trace's poison check
        return replaced_forwards(self.modules, cut.replaced, output)

    def _cuts_to_capture(self, entry: _Entry, use: Optional[int], kept: List[int], scale: float) -> List[int]:
        """Cuts deeper than the one replayed whose outputs fit in the bound, shallow first."""
        unavailable = set() if use is None else self.cuts[use].unread
        others = self.bytes - entry.bytes
        held = {c for j in kept for c in self.cuts[j].stored}
        budget = self.max_bytes - others - sum(_nbytes(entry.outputs[c]) for c in held)
        chosen, start = [], (-1 if use is None else use)
        reach = max(self._recent_changes, default=-math.inf)
        for j in range(start + 1, len(self.cuts)):
            cut = self.cuts[j]
            if cut.event > reach:     # no recent plan could have replayed this far
                break
            if cut.stored & unavailable:
                continue
            extra = sum(b for c, b in cut.bytes_per_sample.items() if c not in held) * scale
            if extra > budget:
                break
            budget -= extra
            held |= cut.stored
            chosen.append(j)
        return chosen

    def _capture_hooks(self, entry: _Entry, use: Optional[int], capture: List[int]) -> list:
        """Hooks keeping the outputs (and shapes) of the modules the captured cuts replace; a
        replayed output that is stored is the entry's own tensor, kept as it is."""
        wanted: Set[int] = {i for j in capture for i in self.cuts[j].replaced}
        replayed = set() if use is None else {c for c in self.cuts[use].stored}
        stored = {c for j in capture for c in self.cuts[j].stored}
        return [self.modules[i].register_forward_hook(self._capture(i, replayed, stored, entry)) for i in wanted]

    def _capture(self, i: int, replayed: Set[CallKey], stored: Set[CallKey], entry: _Entry):
        def hook(module, args, output):
            f = self._forward
            key = (i, f["counts"].get(i, 0))
            f["counts"][i] = key[1] + 1
            f["shapes"][key] = _meta(output)
            if key in stored:
                f["captured"][key] = entry.outputs[key] if key in replayed else copy_output(output)
        return hook

    def _after(self, module, args, kwargs, output):
        f = self._end_forward()
        if f is not None:
            self._commit(f)

    def _commit(self, f: dict) -> None:
        entry: _Entry = f["entry"]
        cuts = list(f["kept"]) + list(f["capture"])
        stored = {c for j in cuts for c in self.cuts[j].stored}
        needed = {(i, n) for j in cuts for i in self.cuts[j].replaced for n in range(self.cuts[j].calls[i])}
        outputs = {c: entry.outputs[c] for c in stored if c in entry.outputs}
        outputs.update({c: f["captured"][c] for c in stored if c in f["captured"]})
        shapes = {c: entry.shapes[c] for c in needed if c in entry.shapes}
        shapes.update({c: f["shapes"][c] for c in needed if c in f["shapes"]})
        entry.plan, entry.cuts, entry.outputs, entry.shapes = self.plan, cuts, outputs, shapes
        while entry.cuts and self.bytes > self.max_bytes:     # the estimate was short: drop the deepest
            entry.cuts.pop()
            keep = {c for j in entry.cuts for c in self.cuts[j].stored}
            entry.outputs = {c: v for c, v in entry.outputs.items() if c in keep}
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.bytes)


def _own_statistics(module: nn.Module) -> bool:
    """A train-mode module whose output depends on its batch alone: BatchNorm without running statistics."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats


def _nbytes(out) -> int:
    return sum(t.numel() * t.element_size() for t in flat_tensors(out))
