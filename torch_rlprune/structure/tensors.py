"""Which tensors can be pruned, in which order the model uses them, and what they cost.

This module knows the model's structure and nothing about policies: it finds the
Conv/Linear/recurrent/attention weights, traces one forward pass to learn execution order, feature-map
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
           "recurrent_weight_names", "candidate_weights", "is_transposed_linear", "is_row_layer"]

PRUNABLE_TYPES: Tuple[type, ...] = (
    nn.Linear,
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
# Recurrent layers: every weight_ih_l*/weight_hh_l* (and LSTM's weight_hr_l*) tensor is a step.
RECURRENT_TYPES: Tuple[type, ...] = (nn.LSTM, nn.GRU, nn.RNN)
SUPPORTED_NAMES = [t.__name__ for t in PRUNABLE_TYPES + RECURRENT_TYPES] + ["MultiheadAttention",
                                                                           "transformers Conv1D"]

# A stable numeric code per layer kind for the state embedding.
_KIND_CODES = {"linear": 0, "conv1d": 1, "conv2d": 2, "conv3d": 3,
               "convtranspose1d": 4, "convtranspose2d": 5, "convtranspose3d": 6,
               "lstm": 7, "gru": 8, "rnn": 9, "mha": 10}
# Linear-like kinds: their positions are rows of the whole batch until divided by the batch size.
_ROW_KINDS = ("linear", "mha")


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's attention and MLP): a Linear whose weight is stored
    ``(in, out)``. Recognised by name and shape so that transformers stays optional."""
    weight = getattr(module, "weight_orig", getattr(module, "weight", None))
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.Tensor) \
        and weight.dim() == 2


def is_row_layer(module: nn.Module) -> bool:
    """Linear-like (nn.Linear or transformers' Conv1D): its positions are the rows of its input,
    whatever the layout."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def candidate_weights(module: nn.Module) -> List[str]:
    """The names of ``module``'s own weight matrices that a search may prune (none if it has none).

    ``nn.MultiheadAttention`` contributes its input projection (``in_proj_weight``, or the
    separate q/k/v matrices when key and value have their own sizes); its ``out_proj`` is a
    Linear of its own, run by the attention's forward rather than by its own."""
    if isinstance(module, PRUNABLE_TYPES) or is_transposed_linear(module):
        return ["weight"]
    if isinstance(module, RECURRENT_TYPES):
        return recurrent_weight_names(module)
    if isinstance(module, nn.MultiheadAttention):
        return ["in_proj_weight"] if module._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight",
                                                                       "v_proj_weight"]
    return []


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if is_transposed_linear(module):
        return "linear"
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
    input_dim: int = 1              # the weight dimension that indexes input features (0: stored (in, out))
    # The module whose forward uses this tensor when it is not ``module`` itself: an attention's
    # out_proj runs inside nn.MultiheadAttention.forward, never through its own.
    runner: Optional[nn.Module] = field(default=None, repr=False, compare=False)
    # The modules of the other prunable holders of a tied weight: their calls cost MACs too.
    alias_runners: Tuple[nn.Module, ...] = field(default=(), repr=False, compare=False)

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


def describe_tensor(module_name: str, module: nn.Module, param_name: str) -> PrunableTensor:
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
    if kind == "mha" or is_transposed_linear(module):
        # q/k/v stacked (3E, E) or one of them; Conv1D stores (in, out)
        transposed = is_transposed_linear(module)
        in_ch, out_ch = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
        return PrunableTensor(module_name, param_name, module, kind, in_ch, out_ch, 1, 1, 1, weight.numel(),
                              input_dim=0 if transposed else 1)
    if kind == "linear":
        in_ch, out_ch, kernel, stride, groups = module.in_features, module.out_features, 1, 1, 1
    else:
        in_ch, out_ch = module.in_channels, module.out_channels
        kernel = math.prod(module.kernel_size)
        stride = module.stride[0]
        groups = module.groups
    transposed_conv = kind.startswith("convtranspose")   # (in, out / groups, *kernel)
    return PrunableTensor(module_name, param_name, module, kind, in_ch, out_ch, kernel, stride,
                          groups, weight.numel(), input_dim=0 if transposed_conv else 1)


def resolve_exclude(model: nn.Module, exclude) -> set:
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
    excluded = resolve_exclude(model, exclude)

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
            if not candidate_weights(module):
                raise ValueError(f"parameters: {names[id(module)]!r} is a {type(module).__name__}; "
                                 f"supported layer types are {SUPPORTED_NAMES}")
            if isinstance(module, RECURRENT_TYPES) and pname not in candidate_weights(module):
                raise ValueError(f"parameters: {pname!r} of {names[id(module)]!r} is not one of its weight "
                                 f"matrices {candidate_weights(module)}")
            if not is_excluded(names[id(module)]):
                found.append(describe_tensor(names[id(module)], module, pname))
        return _one_per_tensor(_with_runners(found, model), model)
    found = []
    for name, m in model.named_modules():
        if not is_excluded(name):
            found.extend(describe_tensor(name, m, p) for p in candidate_weights(m))
    return _one_per_tensor(_with_runners(found, model), model)


def _with_runners(found: List[PrunableTensor], model: nn.Module) -> List[PrunableTensor]:
    """Name the attention whose forward runs each ``out_proj`` (its own forward never runs)."""
    attention_of = {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    for layer in found:
        layer.runner = attention_of.get(id(layer.module))
    return found


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


def tied_across_modules(model: nn.Module) -> List[List[str]]:
    """Parameters held by different module objects (an LM head tied to its embedding). A module
    reused under several names (CoaT's shared convolutional position encoding) holds its weight
    alone: one module, one set of channels, no tie to keep."""
    holders: Dict[int, Dict[int, str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None:
                name = (f"{module_name}.{pname}" if module_name else pname).removesuffix("_orig")
                holders.setdefault(id(p), {}).setdefault(id(module), name)
    return [list(names.values()) for names in holders.values() if len(names) > 1]


def _one_per_tensor(found: List[PrunableTensor], model: nn.Module) -> List[PrunableTensor]:
    """Tied weights (one Parameter held by several modules) are one prunable unit: pruned once,
    counted once, masked alike wherever they are used (:func:`torch_rlprune.plan.tie_shared_masks`);
    ``aliases`` names every other holder, prunable or not (an LM's embedding tied to its head)."""
    tied = {name: group for group in shared_parameters(model) for name in group}
    kept: Dict[int, PrunableTensor] = {}
    for layer in found:
        first = kept.get(id(layer.original))
        if first is not None:   # another holder: its forward multiplies the same weights again
            first.alias_runners += (_runner(layer),)
            continue
        kept[id(layer.original)] = layer
        layer.aliases = tuple(n for n in tied.get(layer.name, ()) if n != layer.name)
    return list(kept.values())


def _positions(shape: torch.Size, kind: str, batch_first: bool = False) -> int:
    """Spatial positions (conv), time steps (recurrent) per sample; for linear layers the rows
    of the whole batch (divided by the batch size once it is known: time-major sequence
    models put the batch in dim 1, so dim 0 is not always the batch)."""
    if kind in ("lstm", "gru", "rnn"):
        if len(shape) == 3:
            return shape[1] if batch_first else shape[0]
        return shape[0] if len(shape) == 2 else 1  # unbatched (T, F)
    if kind in _ROW_KINDS:
        return math.prod(shape[:-1]) if len(shape) > 1 else 1
    return math.prod(shape[2:]) if len(shape) > 2 else 1


def _key_value_rows(layer: PrunableTensor, inputs, query_rows: int) -> int:
    """Rows an attention's input projection multiplies: the key and value thirds of
    ``in_proj_weight`` (and ``k``/``v_proj_weight``) run over the key's tokens, which differ
    from the query's in cross-attention."""
    key = inputs[1] if layer.kind == "mha" and len(inputs) > 1 and isinstance(inputs[1], torch.Tensor) else None
    if key is None:
        return query_rows
    key_rows = _positions(key.shape, "mha")
    if layer.param_name == "in_proj_weight":
        return (query_rows + 2 * key_rows) // 3
    return query_rows if layer.param_name == "q_proj_weight" else key_rows


def _runner(layer: PrunableTensor) -> nn.Module:
    return layer.runner if layer.runner is not None else layer.module


def _batch_size_hooks(model: nn.Module, seen: List[int]) -> list:
    """Hooks that record the batch size a forward runs with: a recurrent layer's or an attention's
    batch (dim 1 of a time-major input), else dim 0 of the model's first input."""
    def recurrent(module, inputs):
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            seen.insert(0, int(x.shape[0] if module.batch_first else x.shape[1]))

    def first(module, inputs):
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            seen.append(int(x.shape[0]))

    handles = [model.register_forward_pre_hook(first)]
    handles += [m.register_forward_pre_hook(recurrent) for m in model.modules()
                if isinstance(m, (nn.RNNBase, nn.MultiheadAttention))]
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
    by_module, runners = {}, {}
    for layer in layers:
        for runner in (_runner(layer),) + layer.alias_runners:
            by_module.setdefault(id(runner), []).append(layer)
            runners[id(runner)] = runner
    order: List[PrunableTensor] = []

    def hook(module, inputs, output):
        group = by_module[id(module)]
        batch_first = bool(getattr(module, "batch_first", False))
        if isinstance(module, RECURRENT_TYPES + (nn.MultiheadAttention,)):  # (output, state or weights)
            output = output[0] if isinstance(output, tuple) else output
            if not isinstance(output, torch.Tensor):  # a PackedSequence has no fixed length
                output = getattr(output, "data", None)
                batch_first = None  # packed data: (sum of lengths, features)
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        for layer in group:
            if layer.calls:
                continue
            order.append(layer)
            if x is not None:
                layer.in_positions = _positions(x.shape, layer.kind, bool(batch_first))
            if isinstance(output, torch.Tensor) and batch_first is not None:
                layer.out_positions = _positions(output.shape, layer.kind, batch_first)
        for layer in group:
            layer.calls += 1
            if isinstance(output, torch.Tensor) and batch_first is not None:
                rows = _positions(output.shape, layer.kind, batch_first)
                layer.positions_per_forward += _key_value_rows(layer, inputs, rows)

    for layer in layers:
        layer.calls = layer.positions_per_forward = 0
    handles = [runner.register_forward_hook(hook) for runner in runners.values()]
    batches: List[int] = []
    handles += _batch_size_hooks(model, batches)
    try:
        run_forward()
    finally:
        for h in handles:
            h.remove()
    n = max(1, batches[0]) if batches else 1
    for layer in layers:
        if layer.kind in _ROW_KINDS and layer.calls:
            layer.in_positions = max(1, layer.in_positions // n)
            layer.out_positions = max(1, layer.out_positions // n)
            layer.positions_per_forward = max(layer.calls, layer.positions_per_forward // n)
    used = order
    unused = [layer for layer in layers if layer.calls == 0]
    return used, unused


def left_out_weights(model: nn.Module, layers: Sequence[PrunableTensor], exclude=None) -> Dict[str, List[str]]:
    """Weight matrices that run in the model but are not candidates, by reason (``{reason: names}``):
    what a search leaves dense without the user asking, so it can be said every time. Tensors
    under ``exclude`` are the user's choice and are not listed; neither are 1-D tensors (biases,
    norms) nor parameters that are not weights of a layer (position embeddings, tokens)."""
    excluded = resolve_exclude(model, exclude)
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
