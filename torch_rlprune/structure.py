"""Which tensors can be pruned, in which order the model uses them, and what they cost.

This module knows the model's structure and nothing about policies: it finds the
Conv/Linear weights, traces one forward pass to learn execution order, feature-map
sizes and how often each layer runs, and describes every layer with the numbers
AMC's state embedding needs.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["PRUNABLE_TYPES", "RECURRENT_TYPES", "PrunableTensor", "find_prunable", "trace_execution",
           "recurrent_weight_names"]

PRUNABLE_TYPES: Tuple[type, ...] = (
    nn.Linear,
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
# Recurrent layers: every weight_ih_l*/weight_hh_l* (and LSTM's weight_hr_l*) tensor is a step.
RECURRENT_TYPES: Tuple[type, ...] = (nn.LSTM, nn.GRU, nn.RNN)

# A stable numeric code per layer kind for the state embedding.
_KIND_CODES = {"linear": 0, "conv1d": 1, "conv2d": 2, "conv3d": 3,
               "convtranspose1d": 4, "convtranspose2d": 5, "convtranspose3d": 6,
               "lstm": 7, "gru": 8, "rnn": 9}


def _kind(module: nn.Module) -> str:
    for cls in PRUNABLE_TYPES + RECURRENT_TYPES:
        if isinstance(module, cls):
            return cls.__name__.lower()
    raise TypeError(f"{type(module).__name__} is not a prunable layer type")


def recurrent_weight_names(module: nn.Module) -> List[str]:
    """The matrices of an LSTM/GRU/RNN, layer by layer, forward direction first (biases stay)."""
    return [n for n in module._flat_weights_names if n.startswith("weight_")]


@dataclass
class PrunableTensor:
    """One weight tensor that takes part in the search, with its static description."""

    module_name: str
    param_name: str
    module: nn.Module = field(repr=False, compare=False)
    kind: str = ""
    in_channels: int = 0
    out_channels: int = 0
    kernel_size: int = 1        # product of the kernel dims (1 for Linear)
    stride: int = 1
    groups: int = 1
    numel: int = 0
    in_positions: int = 1       # spatial positions (or tokens) of the input, per sample
    out_positions: int = 1      # spatial positions (or tokens) of the output, per sample
    calls: int = 0              # forward calls per model forward (weight sharing counts twice)
    positions_per_forward: int = 0  # output positions summed over every call of one model forward
    aliases: Tuple[str, ...] = ()   # other qualified names of this very tensor (tied weights): one unit

    @property
    def name(self) -> str:
        """Qualified parameter name, the key a :class:`PruningPlan` uses."""
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def kind_code(self) -> int:
        return _KIND_CODES[self.kind]

    @property
    def macs_per_weight(self) -> int:
        """Multiply-accumulates each weight takes part in per sample: once per output position of
        every call (a layer shared across resolutions counts each call at its own size)."""
        return max(self.positions_per_forward, self.out_positions)

    @property
    def macs(self) -> int:
        """Dense multiply-accumulates per sample."""
        return self.numel * self.macs_per_weight

    @property
    def existing_mask(self) -> Optional[torch.Tensor]:
        """The mask torch.nn.utils.prune already holds for this tensor, if any."""
        return getattr(self.module, self.param_name + "_mask", None)

    @property
    def original(self) -> torch.Tensor:
        """The unmasked values (``weight_orig`` when already pruned)."""
        return tensor_of(self.module, self.param_name)


def _describe(module_name: str, module: nn.Module, param_name: str) -> PrunableTensor:
    kind = _kind(module)
    weight = getattr(module, param_name + "_orig", None)
    if weight is None:
        weight = getattr(module, param_name)
    if isinstance(module, RECURRENT_TYPES):
        # AMC's conv features, read for a recurrent matrix: in/out channels are its columns
        # (input or hidden size) and rows (gates x hidden); "kernel" is the layer index + 1
        # and "stride" the direction + 1 (1 forward, 2 reverse); positions are time steps.
        layer_index = int(param_name.split("_l")[-1].split("_")[0])
        direction = 2 if param_name.endswith("_reverse") else 1
        return PrunableTensor(module_name, param_name, module, kind, weight.shape[1], weight.shape[0],
                              layer_index + 1, direction, 1, weight.numel())
    if kind == "linear":
        in_ch, out_ch, kernel, stride, groups = module.in_features, module.out_features, 1, 1, 1
    else:
        in_ch, out_ch = module.in_channels, module.out_channels
        kernel = math.prod(module.kernel_size)
        stride = module.stride[0]
        groups = module.groups
    return PrunableTensor(module_name, param_name, module, kind, in_ch, out_ch, kernel, stride,
                          groups, weight.numel())


def _resolve_exclude(model: nn.Module, exclude) -> set:
    """Module names to leave out; unknown names are an error, with suggestions."""
    if exclude is None:
        return set()
    if isinstance(exclude, (str, nn.Module)):
        exclude = [exclude]
    try:
        items = list(exclude)
    except TypeError:
        raise TypeError(f"exclude must be a module name, a module, or a list of them; "
                        f"got {type(exclude).__name__}") from None
    names = {id(m): n for n, m in model.named_modules()}
    all_names = set(names.values())
    out = set()
    for item in items:
        if isinstance(item, nn.Module):
            if id(item) not in names:
                raise ValueError(f"exclude: module {type(item).__name__} is not part of the model")
            out.add(names[id(item)])
        elif isinstance(item, str):
            name = item[:-len(".weight")] if item.endswith(".weight") and item not in all_names else item
            if name not in all_names:
                close = difflib.get_close_matches(name, sorted(all_names), n=3)
                hint = f"; did you mean {close}?" if close else ""
                raise ValueError(f"exclude: the model has no module named {item!r}{hint}")
            out.add(name)
        else:
            raise TypeError(f"exclude entries must be module names (str) or modules, "
                            f"got {type(item).__name__}")
    return out


def find_prunable(model: nn.Module, exclude=None,
                  parameters: Optional[Sequence[Tuple[nn.Module, str]]] = None) -> List[PrunableTensor]:
    """Every Conv/Linear weight of ``model`` (module order), minus ``exclude``.

    ``exclude`` removes a module and everything below it. ``parameters`` (a list of
    ``(module, name)`` pairs, as ``prune.global_unstructured`` takes) restricts the
    search to exactly those tensors instead.
    """
    excluded = _resolve_exclude(model, exclude)

    def is_excluded(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") or e == "" for e in excluded)

    if parameters is not None:
        names = {id(m): n for n, m in model.named_modules()}
        found, seen = [], set()
        for pair in parameters:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], nn.Module)
                    and isinstance(pair[1], str)):
                raise TypeError("parameters must be an iterable of (module, name) tuples")
            module, pname = pair
            if id(module) not in names:
                raise ValueError(f"parameters: a {type(module).__name__} is not part of the model")
            if not isinstance(getattr(module, pname + "_orig", getattr(module, pname, None)), torch.Tensor):
                raise ValueError(f"parameters: {names[id(module)]!r} has no tensor named {pname!r}")
            if (id(module), pname) in seen:
                raise ValueError(f"parameters: ({names[id(module)]!r}, {pname!r}) is given twice; each tensor "
                                 "once (one search decides one amount per tensor)")
            seen.add((id(module), pname))
            if not isinstance(module, PRUNABLE_TYPES + RECURRENT_TYPES):
                raise ValueError(f"parameters: {names[id(module)]!r} is a {type(module).__name__}; "
                                 f"supported layer types are "
                                 f"{[t.__name__ for t in PRUNABLE_TYPES + RECURRENT_TYPES]}")
            if isinstance(module, RECURRENT_TYPES) and pname not in recurrent_weight_names(module):
                raise ValueError(f"parameters: {pname!r} of {names[id(module)]!r} is not one of its weight "
                                 f"matrices {recurrent_weight_names(module)}")
            if not is_excluded(names[id(module)]):
                found.append(_describe(names[id(module)], module, pname))
        return _one_per_tensor(found, model)
    found = []
    for name, m in model.named_modules():
        if is_excluded(name):
            continue
        if isinstance(m, PRUNABLE_TYPES):
            found.append(_describe(name, m, "weight"))
        elif isinstance(m, RECURRENT_TYPES):
            found.extend(_describe(name, m, p) for p in recurrent_weight_names(m))
    return _one_per_tensor(found, model)


def tensor_of(module: nn.Module, param_name: str) -> torch.Tensor:
    """The stored tensor behind ``module.<param_name>`` (``<param_name>_orig`` once pruned)."""
    orig = getattr(module, param_name + "_orig", None)
    return orig if orig is not None else getattr(module, param_name)


def shared_parameters(model: nn.Module) -> List[List[str]]:
    """Groups of qualified names that hold the very same Parameter (tied weights), found by identity."""
    holders: Dict[int, List[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None:
                name = f"{module_name}.{pname}" if module_name else pname
                owners = holders.setdefault(id(p), [])
                if name.removesuffix("_orig") not in owners:
                    owners.append(name.removesuffix("_orig"))
    return [names for names in holders.values() if len(names) > 1]


def _one_per_tensor(found: List[PrunableTensor], model: nn.Module) -> List[PrunableTensor]:
    """Tied weights (one Parameter held by several modules) are one prunable unit: pruned once,
    counted once, masked alike wherever they are used (:func:`torch_rlprune.plan.tie_shared_masks`);
    ``aliases`` names every other holder, prunable or not (an LM's embedding tied to its head)."""
    tied = {name: group for group in shared_parameters(model) for name in group}
    seen, kept = set(), []
    for layer in found:
        key = id(layer.original)
        if key in seen:
            continue
        seen.add(key)
        layer.aliases = tuple(n for n in tied.get(layer.name, ()) if n != layer.name)
        kept.append(layer)
    return kept


def _positions(shape: torch.Size, kind: str, batch_first: bool = False) -> int:
    """Spatial positions (conv), time steps (recurrent) per sample; for linear layers the rows
    of the whole batch (divided by the batch size once it is known: time-major sequence
    models put the batch in dim 1, so dim 0 is not always the batch)."""
    if kind in ("lstm", "gru", "rnn"):
        if len(shape) == 3:
            return shape[1] if batch_first else shape[0]
        return shape[0] if len(shape) == 2 else 1  # unbatched (T, F)
    if kind == "linear":
        return math.prod(shape[:-1]) if len(shape) > 1 else 1
    return math.prod(shape[2:]) if len(shape) > 2 else 1


def _batch_size_hooks(model: nn.Module, seen: List[int]) -> list:
    """Hooks that record the batch size a forward runs with: a recurrent layer's batch (dim 1 of
    a time-major input), else dim 0 of the model's first input."""
    def recurrent(module, inputs):
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            seen.insert(0, int(x.shape[0] if module.batch_first else x.shape[1]))

    def first(module, inputs):
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            seen.append(int(x.shape[0]))

    handles = [model.register_forward_pre_hook(first)]
    handles += [m.register_forward_pre_hook(recurrent) for m in model.modules() if isinstance(m, nn.RNNBase)]
    return handles


def trace_execution(model: nn.Module, layers: Iterable[PrunableTensor],
                    run_forward) -> Tuple[List[PrunableTensor], List[PrunableTensor]]:
    """Run ``run_forward()`` once with hooks and return ``(used, unused)`` layers.

    ``used`` is in first-call order (the order data flows, which is what AMC's
    layer-by-layer MDP assumes; module registration order is often different,
    e.g. a ResNet's downsample conv is registered last but runs mid-block).
    Feature-map sizes and call counts are filled in from the trace.
    """
    layers = list(layers)
    by_module = {}
    for layer in layers:
        by_module.setdefault(id(layer.module), []).append(layer)
    order: List[int] = []
    handles = []

    def hook(module, inputs, output):
        key = id(module)
        group = by_module[key]
        batch_first = bool(getattr(module, "batch_first", False))
        if isinstance(module, RECURRENT_TYPES):  # (output, state); a PackedSequence has no fixed length
            output = output[0] if isinstance(output, tuple) else output
            if not isinstance(output, torch.Tensor):
                output = getattr(output, "data", None)
                batch_first = None  # packed data: (sum of lengths, features)
        if group[0].calls == 0:
            order.append(key)
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            for layer in group:
                if x is not None:
                    layer.in_positions = _positions(x.shape, layer.kind, bool(batch_first))
                if isinstance(output, torch.Tensor) and batch_first is not None:
                    layer.out_positions = _positions(output.shape, layer.kind, batch_first)
        for layer in group:
            layer.calls += 1
            if isinstance(output, torch.Tensor) and batch_first is not None:
                layer.positions_per_forward += _positions(output.shape, layer.kind, batch_first)

    for layer in layers:
        layer.calls = layer.positions_per_forward = 0
    seen = set()
    for layer in layers:
        if id(layer.module) not in seen:
            seen.add(id(layer.module))
            handles.append(layer.module.register_forward_hook(hook))
    batches: List[int] = []
    handles += _batch_size_hooks(model, batches)
    try:
        run_forward()
    finally:
        for h in handles:
            h.remove()
    n = max(1, batches[0]) if batches else 1
    for layer in layers:
        if layer.kind == "linear" and layer.calls:
            layer.in_positions = max(1, layer.in_positions // n)
            layer.out_positions = max(1, layer.out_positions // n)
            layer.positions_per_forward = max(layer.calls, layer.positions_per_forward // n)
    used = [layer for key in order for layer in by_module[key]]
    unused = [layer for layer in layers if layer.calls == 0]
    return used, unused


def left_out_weights(model: nn.Module, layers: Sequence[PrunableTensor], exclude=None) -> Dict[str, List[str]]:
    """Weight matrices that run in the model but are not candidates, by reason (``{reason: names}``):
    what a search leaves dense without the user asking, so it can be said every time. Tensors
    under ``exclude`` are the user's choice and are not listed; neither are 1-D tensors (biases,
    norms) nor parameters that are not weights of a layer (position embeddings, tokens)."""
    excluded = _resolve_exclude(model, exclude)
    candidates = {id(lay.original) for lay in layers}
    out: Dict[str, List[str]] = {}
    for module_name, module in model.named_modules():
        if any(module_name == e or module_name.startswith(e + ".") for e in excluded):
            continue
        for pname, p in module._parameters.items():
            base = pname.removesuffix("_orig")
            if p is None or p.dim() < 2 or id(p) in candidates or "weight" not in base:
                continue
            name = f"{module_name}.{base}" if module_name else base
            kind = type(module).__name__
            reason = f"{kind} (a lookup, not a matmul)" if isinstance(module, nn.Embedding) else \
                f"{kind}.{base} (not supported yet)"
            out.setdefault(reason, []).append(name)
    return out
