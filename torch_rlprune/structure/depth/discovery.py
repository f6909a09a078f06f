"""Which residual blocks can be removed: found on one traced forward, decided numerically
(the package docstring says how)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..channel._util import clear_attention_caches, restore_training, run_model, training_flags
from ..channel.counting import count_macs_params
from ..tensors import resolve_exclude
from .blocks import RemovableBlock, ResidualBranch, tensor_source

_PROJECTIONS = (nn.modules.conv._ConvNd, nn.Linear)
_MAX_TRIES = 8        # windows tried per branch (an SE gate after bn3 costs three)
_MAX_BRANCHES = 64    # residual branches followed inside one candidate

# --------------------------------------------------------------------------- tracing
def _own_params(module: nn.Module) -> List[str]:
    """Names of the tensors a module owns, as the forward sees them (``weight``, not ``weight_orig``)."""
    names = []
    for key, p in module._parameters.items():
        if p is None:
            continue
        if key.endswith("_orig") and key[:-5] + "_mask" in module._buffers:
            key = key[:-5]
        names.append(key)
    return names


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


@dataclass
class _Call:
    args: tuple
    kwargs: dict
    same_shape: bool = False


@dataclass
class _Trace:
    names: Dict[int, str]
    calls: Dict[str, int]
    order: Dict[str, int]           # first-call position of every module
    holders: List[str]              # modules owning parameters, in first-call order
    first: Dict[str, _Call]         # first call of every non-leaf module with one tensor input


def _trace(model: nn.Module, example_inputs) -> _Trace:
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    tr = _Trace(names, {}, {}, [], {})

    def pre(module, args, kwargs):
        n = names.get(id(module))
        if n is None:
            return
        tr.calls[n] = tr.calls.get(n, 0) + 1
        if tr.calls[n] > 1:
            return
        tr.order[n] = len(tr.order)
        if _own_params(module):
            tr.holders.append(n)
        if n and len(module._modules) and len(args) == 1 and isinstance(args[0], torch.Tensor) \
                and not any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            tr.first[n] = _Call(_clone(args), dict(kwargs))

    def post(module, args, kwargs, output):
        n = names.get(id(module))
        call = tr.first.get(n)
        if call is not None and tr.calls.get(n) == 1 and isinstance(output, torch.Tensor):
            x = call.args[0]
            call.same_shape = output.shape == x.shape and output.dtype == x.dtype

    handles = []
    try:
        for m in modules.values():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        run_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return tr


# --------------------------------------------------------------------------- numerical probing
def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return False
    if not bool(torch.isfinite(a).all()):
        return False
    if a.numel() == 0:
        return True
    scale = max(1.0, float(b.abs().max()))
    return float((a.float() - b.float()).abs().max()) <= tolerance * scale


class _Probe:
    """Re-runs one candidate on its recorded input with chosen tensors zeroed in place (and
    restored bit for bit), recording what each of its holders received."""

    def __init__(self, module: nn.Module, call: _Call, holders: List[Tuple[str, nn.Module]]):
        self.module, self.call, self.holders = module, call, holders
        self.x = call.args[0]

    def run(self, zero: Sequence[Tuple[nn.Module, str]]) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
        saved, seen_ids = [], set()
        seen: List[Optional[torch.Tensor]] = [None] * len(self.holders)
        handles = []
        try:
            for m, name in zero:
                t = tensor_source(m, name)
                if id(t) in seen_ids:
                    continue
                seen_ids.add(id(t))
                saved.append((t, t.detach().clone()))
                t.data.zero_()
            for i, (rel, h) in enumerate(self.holders):
                if rel == "":  # the candidate's own parameters: no separate call to watch
                    continue

                def pre(module, args, i=i):
                    if seen[i] is None and args and isinstance(args[0], torch.Tensor):
                        seen[i] = args[0].detach().clone()
                handles.append(h.register_forward_pre_hook(pre))
            out = self.module(*_clone(self.call.args), **self.call.kwargs)
        finally:
            for h in handles:
                h.remove()
            for t, value in reversed(saved):
                t.data.copy_(value)
        return out, seen


def _tensors(window: Sequence[Tuple[str, nn.Module]]) -> List[Tuple[nn.Module, str]]:
    return [(m, p) for _, m in window for p in _own_params(m)]


def _find_branches(probe: _Probe, tolerance: float) -> Optional[List[List[Tuple[str, nn.Module]]]]:
    """The windows ending each residual branch, in execution order, or None (see the module docstring, step 3)."""
    holders = probe.holders
    is_proj = [rel != "" and isinstance(m, _PROJECTIONS) for rel, m in holders]
    found: List[List[Tuple[str, nn.Module]]] = []
    zeroed: List[Tuple[nn.Module, str]] = []
    end = len(holders)
    for _ in range(_MAX_BRANCHES):
        projections = [j for j in range(end) if is_proj[j]]
        progressed = False
        tries = []
        for j in list(reversed(projections))[:_MAX_TRIES]:
            stop = next((k for k in projections if k > j), end)
            tries.append(holders[j:stop])           # the minimal window first
            if stop != end:
                tries.append(holders[j:end])        # then everything from there to the branch end
        for window in tries:
            j = holders.index(window[0])
            out, seen = probe.run(zeroed + _tensors(window))
            # Does the rest of the block now pass on what an earlier holder received? Then this
            # window ends the last branch and that holder starts it (it must leave a projection
            # before it, or it is just the block's first layer reading the block's input).
            split = next((k for k in range(j - 1, 0, -1)
                          if seen[k] is not None and any(is_proj[:k]) and _close(out, seen[k], tolerance)), None)
            if split is not None:
                found.append(window)
                zeroed += _tensors(window)
                end = split
                progressed = True
                break
            if _close(out, probe.x, tolerance):
                found.append(window)
                return found[::-1]
        if not progressed:
            return None
    return None


def _branch_record(block_name: str, window: Sequence[Tuple[str, nn.Module]]) -> ResidualBranch:
    def full(rel):
        return f"{block_name}.{rel}" if rel else block_name
    rel0 = window[0][0]
    return ResidualBranch(projection=full(rel0), following=tuple(full(rel) for rel, _ in window[1:]),
                          tensors=tuple((rel, p) for rel, m in window for p in _own_params(m)))


class _Bound(nn.Module):
    """A block with its recorded keyword arguments bound, for counting its MACs."""

    def __init__(self, module: nn.Module, kwargs: dict):
        super().__init__()
        self.block = module
        self._kwargs = kwargs

    def forward(self, *args):
        return self.block(*args, **self._kwargs)


def find_removable_blocks(model: nn.Module, example_inputs, *, exclude=None,
                          tolerance: float = 1e-6) -> List[RemovableBlock]:
    """Residual blocks of ``model`` that become the identity when their branches are zeroed.

    Detection is structural + numerical (module docstring): one traced forward of
    ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs),
    then each same-shape candidate is re-run on its recorded input with the last layer(s)
    of its branch(es) zeroed. The model is left exactly as it was (tensors zeroed for a
    probe are restored bit for bit; training flags restored).

    Args:
        model: any ``nn.Module`` (timm models need no special treatment).
        example_inputs: inputs for one forward; the identity check uses the activations
            they produce, so use realistic data when the model has data-dependent blocks.
        exclude: module names or modules that must stay: no block is reported that is one of
            them, lies inside one, or contains one.
        tolerance: a probe output counts as equal to the block input when the max abs
            difference is at most ``tolerance * max(1, max |input|)``.

    Returns:
        The blocks in execution order. Nested stacks of removable blocks (a stage made only
        of them) are reported as their blocks, not as the stack.
    """
    excluded = resolve_exclude(model, exclude)

    def is_excluded(name: str) -> bool:  # removing a block would remove what it contains, too
        return any(name == e or name.startswith(e + ".") or e.startswith(name + ".") or e == "" for e in excluded)

    modules = dict(model.named_modules())
    flags = training_flags(model)
    model.eval()
    try:
        with torch.no_grad():
            tr = _trace(model, example_inputs)
            candidates = [n for n, c in tr.first.items()
                          if c.same_shape and tr.calls.get(n) == 1 and not is_excluded(n)]
            candidates.sort(key=lambda n: (-n.count("."), tr.order[n]))  # innermost first
            found: Dict[str, Tuple[List[List[Tuple[str, nn.Module]]], _Call]] = {}
            for name in candidates:
                module, call = modules[name], tr.first[name]
                prefix = name + "."
                holders = [(h[len(prefix):], modules[h]) for h in tr.holders if h.startswith(prefix)]
                if _own_params(module):
                    holders.append(("", module))  # a block's own gamma scales its branch output last
                if not any(rel and isinstance(m, _PROJECTIONS) for rel, m in holders):
                    continue
                probe = _Probe(module, call, holders)
                inner = [d for d in found if d.startswith(prefix)]
                inner_tensors = [(m, p) for d in inner for window in found[d][0] for m, p in _tensors(window)]
                if inner:
                    out, _ = probe.run(inner_tensors)
                    if _close(out, probe.x, tolerance):
                        continue  # only a stack of the removable blocks already found
                branches = _find_branches(probe, tolerance)
                if branches is None:
                    continue
                if inner:
                    known = {(id(m), p) for m, p in inner_tensors}
                    if all((id(m), p) in known for window in branches for m, p in _tensors(window)):
                        continue
                found[name] = (branches, call)
    finally:
        restore_training(flags)
        clear_attention_caches(model)

    blocks = []
    for name in sorted(found, key=lambda n: tr.order[n]):
        branches, call = found[name]
        module = modules[name]
        counted = module if not call.kwargs else _Bound(module, call.kwargs)
        macs, params = count_macs_params(counted, call.args)
        blocks.append(RemovableBlock(name=name, module=module,
                                     branches=tuple(_branch_record(name, w) for w in branches),
                                     macs=int(macs), params=int(params), shape=tuple(call.args[0].shape),
                                     order=tr.order[name]))
    return blocks
