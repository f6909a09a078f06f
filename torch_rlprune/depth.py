"""Depth reduction: residual blocks that can be removed whole, found without architecture names.

A residual block computes ``x + f(x)`` (timm adds drop-path, layer scale, a ``shortcut``
that is an ``Identity``, or a ReLU after the add); when ``f`` contributes exactly zero the
block *is* the identity and can be cut out of the network. That is the action of an N2N
style layer-removal agent. Three steps, each usable on its own:

* :func:`find_removable_blocks` -- which blocks qualify, decided numerically on one traced
  forward, so the same code serves ResNet, MobileNet/EfficientNet, ConvNeXt and ViT/DeiT.
* :func:`mask_block` / :func:`unmask_block` -- the soft removal, through
  torch.nn.utils.prune (:class:`BranchMask`): the last layer of every residual branch (and
  the norm / layer scale after it) is masked to zero, so the masked model computes what
  the model without the block computes; undone bit for bit.
* :func:`remove_masked_blocks` -- the hard removal: every fully masked block becomes a
  :class:`RemovedBlock` (an ``nn.Identity``), which is where MACs and parameters go down.

How detection works (no names of layers or block classes are used):

1. One forward with hooks records, per module, its call count, a copy of its input and
   whether its output has the input's shape, and the execution order of every module that
   owns parameters (a *holder*: a conv, a norm, a ``LayerScale``, or a block owning a
   ``gamma`` like ConvNeXt's, which counts as running last inside that block).
2. A candidate is a non-root module with children, called once with one tensor, returning
   a tensor of the same shape. Its holders, in execution order, are cut into *windows*: a
   Conv/Linear plus the holders that run after it up to the next Conv/Linear (resnet
   ``conv2 + bn2``, mobilenet ``conv_pwl + bn3``, convnext ``mlp.fc2 + gamma``, ViT
   ``mlp.fc2 + ls2``). Zeroing a window's weights and biases makes its output exactly zero
   (a Conv/Linear with zero weight and bias outputs 0; a BatchNorm/LayerNorm with zero
   weight and bias outputs 0 whatever its statistics; so does a zero layer scale).
3. Windows are tried from the end of the block backwards. The candidate is re-run on its
   recorded input with the window zeroed: if the output equals the input, the window ends
   the only (remaining) residual branch. If instead the output equals the *input of an
   earlier holder* (ViT: zeroing ``mlp.fc2`` leaves ``x + attn(x)``, which is exactly what
   ``norm2`` received), the window ends the *last* branch and the search continues on the
   part before that holder -- this finds both branches of a ViT block (attention and MLP)
   and works for any number of stacked branches. A window whose zeroing gives neither is
   not the end of a branch (e.g. an SE gate after ``bn3``: ``sigmoid(0) = 0.5`` rescales
   instead of zeroing); then everything from that window's Conv/Linear to the branch end is
   tried (GhostNet's branch ends in ``cat([bn(conv(x)), bn(dwconv(...))])``: both convs and
   norms must be zeroed), then the previous window (up to ``_MAX_TRIES`` per branch).
4. A candidate that is only a stack of removable blocks (a timm stage ``layer1``, a ViT's
   ``blocks`` Sequential, a ConvNeXt stage without downsampling) is not reported: zeroing
   the branches of its removable descendants already makes it the identity, so removing it
   is removing them. A genuinely nested residual (an outer skip around inner blocks) is
   kept because one of its branches is not a descendant's.

The check is numerical and data-dependent on purpose: timm's ResNet blocks apply a ReLU
*after* the add, so the block without its branch is ``relu(x)``, which is the identity only
because the block's input is itself a ReLU output. A block is reported only when the
numbers on the example input say it is an identity once masked.

Granularity: a ViT block exposes its two branches (attention, MLP) as
:attr:`RemovableBlock.branches`; :func:`mask_block` can mask a subset of them (an
attention-only or MLP-only removal, exact as well), but only a block with *all* branches
masked is replaced by :func:`remove_masked_blocks` -- a single branch cannot be replaced by
an Identity without rewriting the block's forward.

Not handled (a block is simply not reported): blocks called more than once (weight
sharing) or with several tensor inputs; leaf modules that add a residual inside their own
``forward``; branches that do not end in a Conv/Linear followed only by parameterised
layers that map zero to zero (a BatchNorm without affine parameters after the last conv, a
``x * s + f(x)`` skip with ``s != 1``); residuals whose skip path has parameters (a
downsample/projection shortcut changes the shape or the values, so the block is not an
identity without its branch: resnet blocks with ``downsample``, mobilenet blocks without
``has_skip``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.nn.utils import prune

from .channel._util import clear_attention_caches, restore_training, run_model, training_flags
from .channel.counting import count_macs_params
from .structure import _resolve_exclude

__all__ = ["ResidualBranch", "RemovableBlock", "BranchMask", "branch_mask", "RemovedBlock",
           "find_removable_blocks", "mask_block", "unmask_block", "remove_masked_blocks"]

_PROJECTIONS = (nn.modules.conv._ConvNd, nn.Linear)
_MAX_TRIES = 8        # windows tried per branch (an SE gate after bn3 costs three)
_MAX_BRANCHES = 64    # residual branches followed inside one candidate
_TAG = "_rlprune_depth_mask"  # attribute of a block module while mask_block's masks are on it


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class ResidualBranch:
    """The tensors whose zeroing makes one residual branch contribute exactly zero.

    Attributes:
        projection: qualified name of the Conv/Linear that starts the masked layers: the
            branch's last one (``layer1.0.conv2``), or an earlier one when the branch ends in
            several projections whose outputs are joined (GhostNet's concat).
        following: qualified names of the parameterised layers between it and the residual
            add (``layer1.0.bn2``; ViT ``blocks.0.ls1`` when layer scale is on; the block
            itself for ConvNeXt, whose layer scale ``gamma`` is the block's own parameter).
        tensors: ``(module path inside the block, tensor name)`` for every tensor
            :func:`mask_block` masks (``("conv2", "weight")``, ``("", "gamma")``).
    """

    projection: str
    following: Tuple[str, ...]
    tensors: Tuple[Tuple[str, str], ...]

    @property
    def layers(self) -> Tuple[str, ...]:
        return (self.projection,) + self.following


@dataclass
class RemovableBlock:
    """A residual block that is the identity once its branches are zeroed.

    Attributes:
        name: qualified module name in the model it was found in.
        module: the block itself.
        branches: its residual branches in execution order (one for CNN blocks, two for a
            ViT block: attention then MLP).
        macs: multiply-accumulates per sample the block performs (what removing it saves),
            counted like :func:`torch_rlprune.channel.count_macs_params` (mask-aware).
        params: parameters the block holds (mask-aware, the same counter).
        shape: its input (= output) shape on the example input.
        order: position of its first call in the traced forward (blocks are listed in it).
    """

    name: str
    module: nn.Module = field(repr=False, compare=False)
    branches: Tuple[ResidualBranch, ...]
    macs: int
    params: int
    shape: Tuple[int, ...]
    order: int = 0

    @property
    def end_layers(self) -> Tuple[str, ...]:
        """Every layer that ends a branch, as :func:`mask_block` masks them."""
        return tuple(n for b in self.branches for n in b.layers)

    @property
    def masked_branches(self) -> Tuple[int, ...]:
        """Indices of the branches :func:`mask_block` currently masks."""
        record = getattr(self.module, _TAG, None)
        return tuple(sorted(record.masked)) if record is not None and _record_intact(self.module, record) else ()

    @property
    def masked(self) -> bool:
        """True when every branch is masked by :func:`mask_block`."""
        return len(self.masked_branches) == len(self.branches)


# --------------------------------------------------------------------------- the prune method
class BranchMask(prune.BasePruningMethod):
    r"""Mask a whole tensor to zero: the prune-API form of "this branch contributes nothing".

    A method of its own (rather than ``prune.custom_from_mask`` with a zero mask) because it
    composes with earlier pruning: on a tensor that is already masked (e.g. channel
    pruning), torch builds a ``PruningContainer`` and hands this method only the alive
    entries, which it zeroes too; ``custom_from_mask``'s full-shape mask would not fit
    that slice. It is also how :func:`unmask_block` recognises its own hooks.
    """

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        return torch.zeros_like(default_mask)


def branch_mask(module: nn.Module, name: str) -> nn.Module:
    r"""Functional twin of :class:`BranchMask`: ``module.<name>`` becomes ``name_orig * 0``.

    Args:
        module (nn.Module): module holding the tensor.
        name (str): parameter name within ``module`` (``"weight"``, ``"bias"``, ``"gamma"``).

    Returns:
        module (nn.Module): the module, with ``name_orig``, ``name_mask`` and the hook.

    Example:
        >>> lin = branch_mask(nn.Linear(3, 2), "bias")
        >>> float(lin.bias.abs().sum()), lin.bias_mask.tolist()
        (0.0, [0.0, 0.0])
    """
    BranchMask.apply(module, name)
    return module


class RemovedBlock(nn.Identity):
    """What :func:`remove_masked_blocks` puts where a block was.

    An ``nn.Identity`` whose forward also accepts the extra arguments a parent may pass to
    its blocks (timm's ViT calls ``blk(x, attn_mask=..., is_causal=...)`` when given a mask;
    ``nn.Identity.forward`` takes one input only).
    """

    def __init__(self, name: str = ""):
        super().__init__()
        self.removed = name

    def forward(self, x, *args, **kwargs):  # noqa: D102 - identity
        return x

    def extra_repr(self) -> str:
        return f"removed={self.removed!r}" if self.removed else ""


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


def _source(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor to write to change what the forward sees (``name_orig`` for a pruned tensor,
    because the prune hook recomputes ``name`` from it on every call)."""
    orig = module._parameters.get(name + "_orig")
    return orig if orig is not None else module._parameters[name]


def _effective(module: nn.Module, name: str) -> torch.Tensor:
    orig = module._parameters.get(name + "_orig")
    if orig is not None:
        return orig.detach() * module._buffers[name + "_mask"]
    return module._parameters[name].detach()


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
                t = _source(m, name)
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
    excluded = _resolve_exclude(model, exclude)

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


# --------------------------------------------------------------------------- masking
class _Snapshot:
    """Everything prune's re-parametrisation changes on a module, to put back exactly.

    ``prune.remove`` cannot undo a mask (it bakes the zeros in), so unmasking restores the
    module's own dictionaries: the same Parameter objects in the same order (state_dict
    keys and optimizer references unchanged), the previous masks, hooks and containers.
    """

    def __init__(self, module: nn.Module):
        self.parameters = list(module._parameters.items())
        self.buffers = list(module._buffers.items())
        self.pre_hooks = list(module._forward_pre_hooks.items())
        self.containers = [(h, h._pruning_methods) for _, h in self.pre_hooks
                           if isinstance(h, prune.PruningContainer)]
        self.attributes = {k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)}

    def restore(self, module: nn.Module) -> None:
        for store, items in ((module._parameters, self.parameters), (module._buffers, self.buffers),
                             (module._forward_pre_hooks, self.pre_hooks)):
            store.clear()
            store.update(items)
        for container, methods in self.containers:
            container._pruning_methods = methods
        for k in [k for k, v in vars(module).items() if isinstance(v, torch.Tensor)]:
            if k not in self.attributes:
                del module.__dict__[k]
        module.__dict__.update(self.attributes)


@dataclass
class _MaskRecord:
    branches: Tuple[ResidualBranch, ...]
    masked: Set[int] = field(default_factory=set)
    saved: Dict[int, Tuple[nn.Module, _Snapshot]] = field(default_factory=dict)


def _has_branch_mask(module: nn.Module, name: str) -> bool:
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and getattr(hook, "_tensor_name", None) == name:
            methods = hook._pruning_methods if isinstance(hook, prune.PruningContainer) else (hook,)
            return any(isinstance(m, BranchMask) for m in methods)
    return False


def _record_intact(block_module: nn.Module, record: _MaskRecord) -> bool:
    """False once someone called ``prune.remove`` on a masked tensor: the zeros are then permanent."""
    for i in record.masked:
        for rel, name in record.branches[i].tensors:
            if not _has_branch_mask(block_module.get_submodule(rel), name):
                return False
    return True


def _branch_indices(block: RemovableBlock, branches) -> List[int]:
    if branches is None:
        return list(range(len(block.branches)))
    if isinstance(branches, int):
        branches = [branches]
    out = []
    for b in branches:
        if isinstance(b, bool) or not isinstance(b, int) or not -len(block.branches) <= b < len(block.branches):
            raise IndexError(f"block {block.name!r} has {len(block.branches)} branches; got branch {b!r}")
        out.append(b % len(block.branches))
    return sorted(set(out))


def mask_block(block: RemovableBlock, branches=None) -> RemovableBlock:
    """Mask the block's residual branches so they contribute exactly zero (soft removal).

    Every tensor of each branch's end layers (weight and bias of the last Conv/Linear, the
    norm's weight and bias, a layer scale) gets a :class:`BranchMask`, so ``name_orig``,
    ``name_mask`` and the forward-pre-hook exist and ``prune.remove`` works; with all
    branches masked the model computes what it computes with the block replaced by
    ``nn.Identity()``. Tensors pruned before (e.g. channel masks) keep their masks inside a
    ``PruningContainer``. Masking an already masked branch does nothing.

    Args:
        block: a block from :func:`find_removable_blocks`.
        branches: indices into ``block.branches`` (default: all). A ViT block's branches are
            ``0`` (attention) and ``1`` (MLP).

    Returns:
        the block.
    """
    if not isinstance(block, RemovableBlock):
        raise TypeError(f"mask_block takes a RemovableBlock (from find_removable_blocks), got {type(block).__name__}")
    indices = _branch_indices(block, branches)
    record = getattr(block.module, _TAG, None)
    if record is not None and not _record_intact(block.module, record):
        record = None  # prune.remove made the previous masks permanent; start over from there
    if record is None:
        record = _MaskRecord(branches=block.branches)
    todo = [i for i in indices if i not in record.masked]
    targets = [(block.module.get_submodule(rel), name) for i in todo for rel, name in block.branches[i].tensors]
    for module, name in targets:  # validation before anything changes
        if _has_branch_mask(module, name):
            raise ValueError(f"{block.name}: a tensor of this block is already masked by a BranchMask "
                             f"that mask_block did not record")
    with torch.no_grad():
        for module, name in targets:
            if id(module) not in record.saved:
                record.saved[id(module)] = (module, _Snapshot(module))
            BranchMask.apply(module, name)
    record.masked.update(todo)
    setattr(block.module, _TAG, record)
    return block


def unmask_block(block: RemovableBlock) -> RemovableBlock:
    """Undo :func:`mask_block` bit for bit: the same Parameter objects with the values they had,
    earlier masks and hooks as they were, state_dict keys in the same order.

    Raises ``ValueError`` when the block is not masked, or when ``prune.remove`` was called on
    its masks since (the zeros are then part of the weights and nothing is left to undo).
    """
    if not isinstance(block, RemovableBlock):
        raise TypeError(f"unmask_block takes a RemovableBlock, got {type(block).__name__}")
    record = getattr(block.module, _TAG, None)
    if record is None or not record.masked:
        raise ValueError(f"block {block.name!r} is not masked")
    if not _record_intact(block.module, record):
        raise ValueError(f"block {block.name!r}: prune.remove was called on its masks, the zeros are permanent")
    for module, snapshot in record.saved.values():
        snapshot.restore(module)
    delattr(block.module, _TAG)
    return block


def _all_zero(block_module: nn.Module, branches: Sequence[ResidualBranch]) -> bool:
    for branch in branches:
        for rel, name in branch.tensors:
            try:
                module = block_module.get_submodule(rel)
                value = _effective(module, name)
            except (AttributeError, KeyError):
                return False
            if bool(value.any()):
                return False
    return True


def remove_masked_blocks(model: nn.Module, blocks: Optional[Sequence[RemovableBlock]] = None) -> List[str]:
    """Replace every fully masked removable block of ``model`` by a :class:`RemovedBlock` (hard removal).

    A block qualifies when every tensor of every branch is zero as the forward sees it
    (masked by :func:`mask_block`, also after ``prune.remove`` baked the zeros in). Without
    ``blocks`` the model is scanned for blocks :func:`mask_block` masked; with ``blocks``
    (from :func:`find_removable_blocks`) those are checked too, however they were zeroed. The
    output is unchanged; the removed blocks' MACs and parameters are gone. Replacement is
    ``setattr`` on the parent, so ``nn.Sequential``/``nn.ModuleList`` children work.

    Returns:
        the qualified names of the removed blocks, in module order. ``RemovableBlock``
        lists found before are stale afterwards for the removed blocks.
    """
    names = {id(m): n for n, m in model.named_modules()}
    todo: Dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        record = getattr(module, _TAG, None)
        if name and record is not None and len(record.masked) == len(record.branches) \
                and _all_zero(module, record.branches):
            todo[name] = module
    for block in blocks or ():
        name = names.get(id(block.module))
        if name and name not in todo and _all_zero(block.module, block.branches):
            todo[name] = block.module
    removed = []
    order = {n: i for i, n in enumerate(names.values())}
    for name in sorted(todo, key=lambda n: order[n]):
        if any(name.startswith(r + ".") for r in removed):
            continue  # inside a block removed already
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, RemovedBlock(name))
        removed.append(name)
    return removed
