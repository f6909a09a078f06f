"""The terms of :class:`~.structure.ChannelStructure`'s arithmetic cost model: the MACs of every traced
layer and attention block and the size of every parameter, over the alive sizes of ``(tensor, dim)`` entries."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..tensors import is_transposed_linear, recurrent_weight_names
from .groups import ChannelGroup
from .trace import LayerTrace

__all__ = ["mac_terms", "attention_terms", "parameter_terms"]

EntryKey = Tuple[int, str, int]


def mac_terms(traces: Dict[str, LayerTrace], entry: Callable[[nn.Module, str, int, int], int]
              ) -> Tuple[List[int], List[List[int]], List[str]]:
    """MAC terms: every traced Conv/Linear, every recurrent matrix (once per time step), as
    coefficients, the entries of their two dims (``entry`` registers them) and module names;
    the module names let DepthCost drop the terms of removed blocks."""
    mac_coef, mac_e, mac_modules = [], [], []
    for name, tr in traces.items():
        m = tr.module
        if tr.calls == 0:
            continue
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or is_transposed_linear(m):
            shape = _shape_of(m, "weight")
            kernel = int(math.prod(shape[2:])) if len(shape) > 2 else 1
            terms = [("weight", tr.positions * kernel, shape)]
        elif isinstance(m, nn.RNNBase):
            terms = [(w, tr.positions, _shape_of(m, w)) for w in recurrent_weight_names(m)]
        else:
            continue
        for wname, coef, shape in terms:
            mac_coef.append(coef)
            mac_e.append([entry(m, wname, 0, shape[0]), entry(m, wname, 1, shape[1])])
            mac_modules.append(name)
    return mac_coef, mac_e, mac_modules


def attention_terms(traces: Dict[str, LayerTrace], groups: Sequence[ChannelGroup]
                    ) -> Tuple[List[int], List[int], List[str], List[Tuple[str, int]]]:
    """Attention matmuls: per-head coefficients of the blocks a head group prunes (with that group
    and the module name), and ``(module name, MACs)`` of the rest, which no group changes."""
    head_group = {id(g._attention): g.index for g in groups if g.kind == "heads"}
    att_coef, att_group, att_modules, att_const_terms = [], [], [], []
    for name, tr in traces.items():
        if tr.calls == 0 or not tr.attention:
            continue
        hd, H = int(tr.module.head_dim), int(tr.module.num_heads)
        coef = 2 * tr.tokens_sq * hd
        if id(tr.module) in head_group:
            att_coef.append(coef)
            att_group.append(head_group[id(tr.module)])
            att_modules.append(name)
        else:
            att_const_terms.append((name, coef * H))
    # nn.MultiheadAttention: groups never reach its channels, so its MACs are a constant
    att_const_terms += [(name, tr.fixed_macs) for name, tr in traces.items() if tr.calls and tr.fixed_macs]
    return att_coef, att_group, att_modules, att_const_terms


def parameter_terms(model: nn.Module, entries: Dict[EntryKey, int]) -> Tuple[List[int], List[List[int]], int]:
    """Parameter terms: per parameter a group reaches, the product of its untouched dims and the
    entries of the others; and the size of all parameters no group reaches."""
    par_const, par_e, par_fixed = [], [], 0
    seen = set()
    for mname, m in model.named_modules():
        for pname, p in m._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            ename = pname[:-len("_orig")] if pname.endswith("_orig") else pname
            shape = p.shape
            dims = [d for d in range(len(shape)) if (id(m), ename, d) in entries]
            if not dims:
                par_fixed += p.numel()
                continue
            const = int(math.prod(shape[d] for d in range(len(shape)) if d not in dims))
            par_const.append(const)
            par_e.append([entries[(id(m), ename, d)] for d in dims])
    return par_const, par_e, par_fixed


def _shape_of(module: nn.Module, name: str) -> torch.Size:
    t = getattr(module, name + "_orig", None)
    if t is None:
        t = getattr(module, name)
    return t.shape
