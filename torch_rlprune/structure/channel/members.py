"""Which tensors (and along which dimension) one node of torch-pruning's dependency graph acts on,
by the node's op type; what no mask can follow raises :class:`Reject`."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn
from torch_pruning import ops as tp_ops

from .graph import RNN_TYPES
from .groups import Reject
from .norms import norm_kind
from .recurrent import input_column_tensors, unsupported_reason

__all__ = ["member_tensors", "tensor_size", "Member"]

OPT = tp_ops.OPTYPE
Member = Tuple[str, nn.Module, str, int, str]
"""``(module name, module, tensor name, dim, role)``."""
_Found = Tuple[List[Member], List[str], Optional[Tuple[str, int]]]


def tensor_size(module: nn.Module, tensor_name: str) -> Optional[torch.Size]:
    t = getattr(module, tensor_name + "_orig", None)
    if t is None:
        t = getattr(module, tensor_name, None)
    return t.shape if isinstance(t, torch.Tensor) else None


def _param_owner(model: nn.Module, qualified: str) -> Tuple[str, nn.Module, str]:
    owner_name, _, attr = qualified.rpartition(".")
    if attr.endswith("_orig"):
        attr = attr[: -len("_orig")]
    owner = model.get_submodule(owner_name) if owner_name else model
    return owner_name, owner, attr


def member_tensors(DG, node, is_out: bool, model, names, exact_norms: bool = True, norms: Optional[list] = None
                   ) -> _Found:
    """The ``(module name, module, tensor name, dim, role)`` a group item acts on.

    Also returns inexactness notes and, for grouped layers, ``(kind, groups)``; norms whose
    statistics :class:`MaskedNormStatistics` will fix are appended to ``norms``.
    """
    m, t = node.module, node.type
    name = names.get(id(m), "?")
    if t in (OPT.CONV, OPT.DEPTHWISE_CONV):
        return _conv_tensors(m, t, name, is_out)
    if t == OPT.LINEAR:
        return _row_col_tensors(m, name, is_out, out_dim=0, in_dim=1), [], None
    if t in (OPT.BN, OPT.LN, OPT.GN, OPT.IN):
        return _norm_tensors(m, t, name, exact_norms, norms)
    if t in (OPT.PRELU, OPT.EMBED, OPT.PARAMETER):
        return _parameter_tensors(DG, node, model, name), [], None
    if t == OPT.OUTPUT:
        raise Reject("changes the model's output (the group reaches the output unchanged)")
    if isinstance(m, RNN_TYPES):
        why = unsupported_reason(m)
        if why:
            raise Reject(f"touches {type(m).__name__} '{name}': {why}")
        if is_out:  # hidden units: built by build_group, which knows the root mapping
            return [], [], None
        return [(name, m, tname, 1, "in") for tname in input_column_tensors(m)], [], None
    if t == OPT.CUSTOMIZED:
        raise Reject(f"touches unsupported layer '{name}' ({type(m).__name__}, customised pruner)")
    if t == OPT.MHA:
        raise Reject(f"touches nn.MultiheadAttention '{name}' (not supported by channel groups)")
    raise Reject(f"touches unsupported layer '{name}' ({type(m).__name__}, {t.name})")


def _row_col_tensors(m: nn.Module, name: str, is_out: bool, out_dim: int, in_dim: int) -> List[Member]:
    """A Conv/Linear's output rows (weight and bias) or input columns."""
    if not is_out:
        return [(name, m, "weight", in_dim, "in")]
    out = [(name, m, "weight", out_dim, "out")]
    if tensor_size(m, "bias") is not None:
        out.append((name, m, "bias", 0, "out"))
    return out


def _conv_tensors(m: nn.Module, t, name: str, is_out: bool) -> _Found:
    transposed = bool(getattr(m, "transposed", False))
    if t == OPT.DEPTHWISE_CONV:
        if m.in_channels != m.out_channels:
            raise Reject(f"depthwise conv '{name}' with channel multiplier "
                         f"({m.in_channels} -> {m.out_channels}) is not pruned consistently by torch-pruning")
        out = [(name, m, "weight", 1 if transposed else 0, "out")]
        if m.bias is not None or tensor_size(m, "bias") is not None:
            out.append((name, m, "bias", 0, "out"))
        return out, [], None
    if transposed and m.groups > 1:
        raise Reject(f"grouped transposed conv '{name}' is not supported")
    grouped = ("conv", m.groups) if m.groups > 1 else None
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    return _row_col_tensors(m, name, is_out, out_dim, in_dim), [], grouped


def _affine(m: nn.Module, name: str) -> List[Member]:
    return [(name, m, "weight", 0, "norm"), (name, m, "bias", 0, "norm")]


def _norm_tensors(m: nn.Module, t, name: str, exact_norms: bool, norms: Optional[list]) -> _Found:
    if t == OPT.BN:
        if tensor_size(m, "weight") is None:
            return [], [f"BatchNorm '{name}' has no affine parameters: a zeroed channel becomes -mean/std"], None
        return _affine(m, name), [], None
    if t == OPT.LN:
        return _layer_norm_tensors(m, name, exact_norms, norms)
    if t == OPT.GN:
        return _group_norm_tensors(m, name, exact_norms, norms)
    return (_affine(m, name) if getattr(m, "affine", False) else []), [], None


def _layer_norm_tensors(m: nn.Module, name: str, exact_norms: bool, norms: Optional[list]) -> _Found:
    shape = tuple(m.normalized_shape)
    if len(shape) != 1:
        raise Reject(f"LayerNorm '{name}' normalises over {len(shape)} dims; only 1-D LayerNorm is pruned")
    notes = []
    kind = norm_kind(m)
    if exact_norms and kind is not None and tensor_size(m, "weight") is not None:
        if norms is not None:
            norms.append((name, m, kind))
    else:
        notes.append(f"LayerNorm '{name}': statistics include zeroed channels")
    out = [(name, m, tname, 0, "norm") for tname in ("weight", "bias") if tensor_size(m, tname) is not None]
    return out, notes, None


def _group_norm_tensors(m: nn.Module, name: str, exact_norms: bool, norms: Optional[list]) -> _Found:
    notes, grouped = [], None
    if m.num_groups < m.num_channels:
        grouped = ("groupnorm", m.num_groups)
        if exact_norms and norm_kind(m) is not None and m.affine:
            if norms is not None:
                norms.append((name, m, "group"))
        else:
            notes.append(f"GroupNorm '{name}': group statistics include zeroed channels")
    return (_affine(m, name) if m.affine else []), notes, grouped


def _parameter_tensors(DG, node, model: nn.Module, name: str) -> List[Member]:
    """PReLU slopes, embedding columns, and bare parameters (cls tokens, position embeddings, ...)."""
    m, t = node.module, node.type
    if t == OPT.PRELU:
        return [(name, m, "weight", 0, "param")] if m.num_parameters > 1 else []
    if t == OPT.EMBED:
        return [(name, m, "weight", 1, "param")]
    qualified = DG._param_to_name.get(m)
    if qualified is None:
        raise Reject("a parameter torch-pruning found has no name in the model")
    owner_name, owner, attr = _param_owner(model, qualified)
    return [(owner_name, owner, attr, node.pruning_dim % m.dim(), "param")]
