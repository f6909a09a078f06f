"""timm attention blocks: which ones the MAC counts include, which ones lose whole heads, and the
tensor slices of a head group."""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

from .groups import Reject, TensorSlice
from .members import tensor_size
from .norms import norm_kind

__all__ = ["countable_attention", "find_attention_blocks", "head_spec"]


def countable_attention(model: nn.Module) -> Dict[str, nn.Module]:
    """timm ``Attention`` blocks (default forward) whose score/value matmuls the MAC counts include."""
    try:
        from timm.layers import Attention as TimmAttention
    except Exception:
        return {}
    return {n: m for n, m in model.named_modules()
            if isinstance(m, TimmAttention) and type(m).forward is TimmAttention.forward
            and isinstance(getattr(m, "qkv", None), nn.Linear)}


def find_attention_blocks(model: nn.Module, excluded: Callable[[str], bool]) -> Dict[str, nn.Module]:
    """timm attention blocks whose heads we prune ourselves, by qualified name.

    Only ``timm.layers.Attention`` with its own forward (ViT, DeiT, BEiT-style layouts:
    ``qkv`` -> ``reshape(B, N, 3, heads, head_dim)`` -> SDPA -> ``proj``) qualifies: for
    that layout removing whole heads keeps ``head_dim`` and therefore the softmax scale
    (fused SDPA and ``attn.scale`` agree), and a masked head is exactly a removed head
    (zero q and k give uniform attention over a zero v). Other attention layouts are
    left to torch-pruning's grouping and to validation.
    """
    try:
        from timm.layers import Attention as TimmAttention
    except Exception:  # timm missing or too old
        return {}
    found = {}
    for name, m in model.named_modules():
        if type(m).forward is not TimmAttention.forward or not isinstance(m, TimmAttention):
            continue
        if excluded(name) or excluded(f"{name}.qkv"):
            continue
        qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
            continue
        heads, hd = int(m.num_heads), int(m.head_dim)
        if qkv.out_features != 3 * heads * hd or proj.in_features != heads * hd or heads < 2:
            continue
        found[name] = m
    return found


def head_spec(name: str, attn: nn.Module, exact_norms: bool = True) -> dict:
    """The slices of ``attn``'s head group (``qkv`` rows, ``proj`` columns, a gate and a norm over
    the heads when present), or raise :class:`Reject`."""
    H, hd = int(attn.num_heads), int(attn.head_dim)
    A = H * hd
    heads = torch.arange(H).repeat_interleave(hd)
    chans = torch.arange(A)
    slices = []
    qkv, proj = attn.qkv, attn.proj
    qname, pname = f"{name}.qkv", f"{name}.proj"
    qkv_pos = torch.cat([chans + t * A for t in range(3)])
    qkv_units = heads.repeat(3)
    slices.append(TensorSlice(qname, "weight", 0, 3 * A, qkv_pos, qkv_units, "qkv", qkv))
    if tensor_size(qkv, "bias") is not None:
        slices.append(TensorSlice(qname, "bias", 0, 3 * A, qkv_pos.clone(), qkv_units.clone(), "qkv", qkv))
    layers = [(qname, "qkv"), (pname, "proj")]
    inexact = []
    norms: list = []
    gate = getattr(attn, "gate", None)
    if isinstance(gate, nn.Linear):
        slices.append(TensorSlice(f"{name}.gate", "weight", 0, A, chans.clone(), heads.clone(), "gate", gate))
        if tensor_size(gate, "bias") is not None:
            slices.append(TensorSlice(f"{name}.gate", "bias", 0, A, chans.clone(), heads.clone(), "gate", gate))
        layers.append((f"{name}.gate", "gate"))
    norm = getattr(attn, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (A,):
            raise Reject(f"attention '{name}' has a {type(norm).__name__} over its heads that cannot be pruned")
        if exact_norms and norm_kind(norm) == "last" and norm.weight is not None:
            norms.append((f"{name}.norm", norm, "last"))
        else:
            inexact.append(f"LayerNorm '{name}.norm' over the heads: statistics include zeroed heads")
        for tname in ("weight", "bias"):
            if tensor_size(norm, tname) is not None:
                slices.append(TensorSlice(f"{name}.norm", tname, 0, A, chans.clone(), heads.clone(), "norm", norm))
        layers.append((f"{name}.norm", "norm"))
    slices.append(TensorSlice(pname, "weight", 1, A, chans.clone(), heads.clone(), "proj", proj))
    return {"slices": slices, "inexact": inexact, "layers": layers, "num_channels": A, "num_units": H,
            "head_dim": hd, "root_unit": heads.clone(), "norms": norms}

