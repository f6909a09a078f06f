"""Alive sizes of masked tensors, and the MACs of ``nn.MultiheadAttention`` computed from them
(shared by the MAC counter and the channel cost model, so the two agree)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

__all__ = ["alive_sizes", "attention_tokens", "attention_call_macs", "multihead_attention_macs"]


def _effective(module: nn.Module, name: str) -> torch.Tensor:
    orig = module._parameters.get(name + "_orig")
    if orig is not None:
        return orig.detach() * module._buffers[name + "_mask"]
    return getattr(module, name).detach()


def alive_sizes(module: nn.Module, name: str, count_zeros: bool = False,
                rows: Optional[slice] = None) -> Tuple[int, ...]:
    """Per dimension, how many slices of ``module.<name>`` (of its ``rows`` only, if given) are
    not entirely masked."""
    mask = module._buffers.get(name + "_mask")
    t = _effective(module, name) if count_zeros else None
    if rows is not None:
        mask = mask[rows] if mask is not None else None
        t = t[rows] if t is not None else None
    shape = (mask if mask is not None else t if t is not None else getattr(module, name)[rows or slice(None)]).shape
    out = []
    for d in range(len(shape)):
        other = [k for k in range(len(shape)) if k != d]
        dead = torch.zeros(shape[d], dtype=torch.bool)
        if mask is not None:
            dead |= ((mask.abs().sum(dim=other) == 0) if other else (mask == 0)).cpu()
        if t is not None:
            dead |= ((t.abs().sum(dim=other) == 0) if other else (t == 0)).cpu()
        out.append(int(shape[d] - int(dead.sum())))
    return tuple(out)


def attention_tokens(attention: nn.MultiheadAttention, x: torch.Tensor) -> Tuple[int, int]:
    """``(samples, tokens per sample)`` of one attention input, batch-first or not, or unbatched."""
    if x.dim() == 2:
        return 1, int(x.shape[0])
    return (int(x.shape[0]), int(x.shape[1])) if attention.batch_first else (int(x.shape[1]), int(x.shape[0]))


def _projection_macs(attention: nn.MultiheadAttention, name: str, rows: Optional[slice], tokens: int,
                     count_zeros: bool) -> int:
    alive = alive_sizes(attention, name, count_zeros, rows)
    return tokens * alive[0] * alive[1]


def attention_call_macs(attention: nn.MultiheadAttention, args, kwargs,
                        count_zeros: bool = False) -> Optional[Tuple[int, int]]:
    """``(samples, MACs)`` of one call seen by a ``with_kwargs`` forward hook (query and key may be
    positional or keywords), or None when they are not tensors."""
    query = args[0] if args else kwargs.get("query")
    key = args[1] if len(args) > 1 else kwargs.get("key", query)
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor)):
        return None
    return attention_tokens(attention, query)[0], multihead_attention_macs(attention, query, key, count_zeros)


def multihead_attention_macs(attention: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                             count_zeros: bool = False) -> int:
    """MACs of one ``nn.MultiheadAttention`` call: q/k/v projections (keys and values over the
    key's tokens), the score and value matmuls, and ``out_proj`` (run inside this forward)."""
    samples_, queries = attention_tokens(attention, query)
    keys = attention_tokens(attention, key)[1]
    e = attention.embed_dim
    if attention._qkv_same_embed_dim:
        projections = [("in_proj_weight", slice(i * e, (i + 1) * e), t) for i, t in enumerate((queries, keys, keys))]
    else:
        projections = [("q_proj_weight", None, queries), ("k_proj_weight", None, keys), ("v_proj_weight", None, keys)]
    macs = sum(_projection_macs(attention, name, rows, t, count_zeros) for name, rows, t in projections)
    macs += 2 * queries * keys * e
    out = alive_sizes(attention.out_proj, "weight", count_zeros)
    return samples_ * (macs + queries * out[0] * out[1])
