"""Hidden units of LSTM / GRU / RNN layers as channels.

torch-pruning 1.6 cannot do this (its LSTM pruner indexes the gates wrongly and asserts on
``num_layers > 1``; GRU and RNN have no pruner), so we register :class:`RecurrentPruner`
for ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` and the dependency graph couples a recurrent
layer with its neighbours like any other layer: the Linear / conv / embedding that feeds it
(its input columns) and whatever reads its output sequence (a Linear head's columns).

Hidden unit ``i`` of a module with hidden size ``H``, ``G`` gates (LSTM 4, GRU 3, RNN 1)
and ``D`` directions owns, in every layer ``l`` and direction ``s``:

* rows ``g*H + i`` (every gate ``g``) of ``weight_ih_l{l}{s}``, ``weight_hh_l{l}{s}`` and
  both biases;
* column ``i`` of ``weight_hh_l{l}{s}`` (the recurrence);
* columns ``d*H + i`` (every direction ``d``) of ``weight_ih_l{l+1}{s}``;
* output features ``d*H + i`` of the module, i.e. the next module's input columns.

PyTorch's recurrent modules have one ``hidden_size`` for every layer and both directions,
so unit ``i`` leaves all of them together; that is what :func:`remove_hidden_units` can
build and what a channel group's unit is. A masked unit computes exactly what a removed
one does when the initial state is zero (PyTorch's default): zero pre-activations keep its
state at zero (LSTM ``c = 0.5 c``, GRU ``h = 0.5 h``, RNN ``h = act(0) = 0``) and its
output and recurrent columns are zero anyway. With a non-zero ``h0``/``c0`` passed in, the
masked model differs, and the compacted one needs a state of the new size.

Not supported as channel groups (excluded with the reason; their matrices still prune
unstructured): LSTM with ``proj_size`` (the output units are projections, not hidden
units), subclasses with their own ``forward``, and inputs given as ``PackedSequence``.
"""
from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import torch
import torch_pruning as tp
from torch import nn

from ._util import ChannelPruningError

__all__ = ["RECURRENT_MODULES", "RecurrentPruner", "hidden_unit_tensors", "remove_hidden_units",
           "remove_input_features", "input_column_tensors", "unsupported_reason",
           "time_steps", "samples"]

RECURRENT_MODULES = (nn.LSTM, nn.GRU, nn.RNN)
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _suffixes(rnn: nn.RNNBase) -> List[str]:
    return ["", "_reverse"] if rnn.bidirectional else [""]


def unsupported_reason(rnn: nn.Module) -> str:
    """Why this recurrent module's hidden units cannot be a channel group ('' when they can)."""
    if not isinstance(rnn, RECURRENT_MODULES):
        return f"{type(rnn).__name__} is not an nn.LSTM / nn.GRU / nn.RNN"
    base = next(c for c in RECURRENT_MODULES if isinstance(rnn, c))
    if type(rnn).forward is not base.forward:
        return f"{type(rnn).__name__} overrides forward"
    if getattr(rnn, "proj_size", 0):
        return (f"LSTM with proj_size={rnn.proj_size}: its outputs are projections, not hidden units "
                f"(its matrices still prune unstructured)")
    return ""


def time_steps(rnn: nn.RNNBase, x) -> int:
    """Time steps of one sample of the input ``x`` (0 for a PackedSequence)."""
    if not isinstance(x, torch.Tensor):
        return 0
    if x.dim() == 3:
        return int(x.shape[1] if rnn.batch_first else x.shape[0])
    return int(x.shape[0]) if x.dim() == 2 else 1   # unbatched (T, F)


def samples(rnn: nn.RNNBase, x) -> int:
    """Samples in the input ``x`` (its batch dimension; 1 when unbatched or packed)."""
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        return int(x.shape[0] if rnn.batch_first else x.shape[1])
    return 1


def hidden_unit_tensors(rnn: nn.RNNBase) -> Iterator[Tuple[str, int, torch.Tensor, torch.Tensor]]:
    """``(tensor name, dim, positions, hidden unit of each position)`` for every tensor of the
    module that a hidden unit owns (see the module docstring)."""
    H, G, L = rnn.hidden_size, _GATES[rnn.mode], rnn.num_layers
    D = 2 if rnn.bidirectional else 1
    units = torch.arange(H)
    rows = torch.cat([units + g * H for g in range(G)])
    row_units = units.repeat(G)
    inter = torch.cat([units + d * H for d in range(D)])    # next layer's input: both directions' outputs
    inter_units = units.repeat(D)
    for layer in range(L):
        for s in _suffixes(rnn):
            yield f"weight_ih_l{layer}{s}", 0, rows, row_units
            yield f"weight_hh_l{layer}{s}", 0, rows, row_units
            yield f"weight_hh_l{layer}{s}", 1, units, units
            if rnn.bias:
                yield f"bias_ih_l{layer}{s}", 0, rows, row_units
                yield f"bias_hh_l{layer}{s}", 0, rows, row_units
            if layer + 1 < L:
                yield f"weight_ih_l{layer + 1}{s}", 1, inter, inter_units


def input_column_tensors(rnn: nn.RNNBase) -> List[str]:
    """The tensors whose columns are the module's input features (first layer, each direction)."""
    return [f"weight_ih_l0{s}" for s in _suffixes(rnn)]


def _keep(n: int, drop: Sequence[int]) -> torch.Tensor:
    dropped = set(int(i) for i in drop)
    return torch.tensor([i for i in range(n) if i not in dropped], dtype=torch.long)


def _rebind(rnn: nn.RNNBase, name: str, dim: int, keep: torch.Tensor) -> None:
    old = getattr(rnn, name)
    data = old.data.index_select(dim, keep.to(old.device)).contiguous()
    setattr(rnn, name, nn.Parameter(data, requires_grad=old.requires_grad))


def _refresh_flat_weights(rnn: nn.RNNBase) -> None:
    """Point ``_flat_weights`` at the new Parameters; on CUDA also re-pack them into one
    cuDNN buffer, as the module's constructor does (otherwise every call warns and copies)."""
    rnn._init_flat_weights()
    if any(w.is_cuda for w in rnn._flat_weights if isinstance(w, torch.Tensor)):
        rnn.flatten_parameters()


@torch.no_grad()
def remove_hidden_units(rnn: nn.RNNBase, units: Sequence[int]) -> None:
    """Physically remove hidden units (from every layer and direction); ``hidden_size`` shrinks."""
    why = unsupported_reason(rnn)
    if why:
        raise ChannelPruningError(why)
    if any(n.endswith("_orig") for n in rnn._parameters):
        raise ChannelPruningError("remove the prune re-parametrisation first (prune.remove)")
    H = rnn.hidden_size
    units = sorted({int(u) for u in units})
    if not units:
        return
    if units[0] < 0 or units[-1] >= H or len(units) >= H:
        raise ChannelPruningError(f"cannot remove hidden units {units[:8]}... of {H}")
    drop = torch.tensor(units, dtype=torch.long)
    plans = {}
    for name, dim, positions, owner in hidden_unit_tensors(rnn):
        gone = positions[torch.isin(owner, drop)]
        plans.setdefault(name, []).append((dim, gone))
    for name, per_dim in plans.items():
        for dim, gone in per_dim:
            size = getattr(rnn, name).shape[dim]
            _rebind(rnn, name, dim, _keep(size, gone.tolist()))
    rnn.hidden_size = H - len(units)
    _refresh_flat_weights(rnn)


@torch.no_grad()
def remove_input_features(rnn: nn.RNNBase, features: Sequence[int]) -> None:
    """Physically remove input features (columns of the first layer); ``input_size`` shrinks."""
    features = sorted({int(f) for f in features})
    if not features:
        return
    if features[0] < 0 or features[-1] >= rnn.input_size or len(features) >= rnn.input_size:
        raise ChannelPruningError(f"cannot remove input features {features[:8]}... of {rnn.input_size}")
    keep = _keep(rnn.input_size, features)
    for name in input_column_tensors(rnn):
        _rebind(rnn, name, 1, keep)
    rnn.input_size = int(keep.numel())
    _refresh_flat_weights(rnn)


class RecurrentPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's pruning function for ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``.

    Output channels are the module's output features (``D * hidden_size``); pruning them
    removes hidden units, and torch-pruning must be given both directions' features of a unit
    (``i`` and ``H + i``) -- a channel group does that, a partial set is refused rather than
    leaving the next layer out of step. Input channels are the first layer's input features.
    """

    TARGET_MODULES = RECURRENT_MODULES

    def prune_out_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
        why = unsupported_reason(layer)
        if why:
            raise ChannelPruningError(why)
        H, D = layer.hidden_size, 2 if layer.bidirectional else 1
        idxs = {int(i) for i in idxs}
        units = sorted({i % H for i in idxs})
        missing = [d * H + u for u in units for d in range(D) if d * H + u not in idxs]
        if missing:
            raise ChannelPruningError(f"{type(layer).__name__}: output features {missing[:4]} belong to the same "
                                      f"hidden units as the ones removed (every direction must lose them)")
        remove_hidden_units(layer, units)
        return layer

    def prune_in_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
        remove_input_features(layer, idxs)
        return layer

    def get_out_channels(self, layer: nn.RNNBase) -> int:
        width = getattr(layer, "proj_size", 0) or layer.hidden_size
        return width * (2 if layer.bidirectional else 1)

    def get_in_channels(self, layer: nn.RNNBase) -> int:
        return layer.input_size
