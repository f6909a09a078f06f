"""Mask-aware MAC and parameter counts, without copying the model.

``torch_pruning.utils.count_ops_and_params`` deep-copies the model (which fails once a
pruned model has run a forward with gradients) and counts the dense tensors, ignoring
masks. This counter runs the model once with forward hooks and counts *structurally*:
a row or column of a weight counts as removed when its mask slice is entirely zero
(``count_zeros=True`` also treats all-zero slices of the weight itself as removed, for
models masked in place by :class:`ChannelStructure`). Dead output channels and dead
input channels both reduce a layer's MACs: ``positions * kernel * alive_out * alive_in``.

Counted: Conv/Linear multiply-accumulates (every call; transformers' ``Conv1D`` too), LSTM/GRU/RNN
weight matrices (once per time step), the score/value matmuls of timm ``Attention`` blocks
(``2 * N^2 * head_dim * heads``) and everything ``nn.MultiheadAttention`` multiplies (its
projections, ``2 * L * S * E`` for scores and values, and ``out_proj``, which runs inside it).
Not counted: norms, activations, pooling, element-wise ops -- so totals are a few percent below
torch-pruning's op counter, which counts those too.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

from ..tensors import is_row_layer, is_transposed_linear, recurrent_weight_names
from ._util import batch_size, clear_attention_caches, restore_training, run_model, training_flags
from .alive import alive_sizes, attention_call_macs
from .attention import countable_attention
from .recurrent import samples, time_steps

__all__ = ["count_macs_params", "alive_sizes"]


@torch.no_grad()
def count_macs_params(model: nn.Module, example_inputs, count_zeros: bool = False) -> Tuple[int, int]:
    """``(MACs per forward of example_inputs, parameters)``, honouring masks (see module docstring).

    MACs are for the batch in ``example_inputs`` divided by its batch size (per sample) when the
    first input is a tensor; parameters count each tensor once.
    """
    conv_linear = (nn.modules.conv._ConvNd, nn.Linear)
    attention = {id(m): m for m in countable_attention(model).values()}
    macs = [0]
    handles = []
    recurrent_batches = []

    def hook(module, inputs, output):
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        if isinstance(module, nn.RNNBase):  # every matrix runs once per time step of each sample
            if x is not None:
                recurrent_batches.append(samples(module, x))
                per_step = sum(math.prod(alive_sizes(module, n, count_zeros)) for n in recurrent_weight_names(module))
                macs[0] += samples(module, x) * time_steps(module, x) * per_step
            return
        if id(module) in attention:
            if x is None or x.dim() < 3:
                return
            tokens = int(math.prod(x.shape[1:-1]))
            hd = int(module.head_dim)
            rows = alive_sizes(module.qkv, "weight", count_zeros)[0]
            heads = rows // (3 * hd)
            macs[0] += 2 * tokens * tokens * hd * heads * x.shape[0]
            return
        out = output if isinstance(output, torch.Tensor) else None
        alive = alive_sizes(module, "weight", count_zeros)
        kernel = int(math.prod(alive[2:])) if len(alive) > 2 else 1
        if is_row_layer(module):
            ref = out if out is not None else x
            positions = int(math.prod(ref.shape[:-1])) if ref is not None else 1
        elif getattr(module, "transposed", False):
            positions = x.shape[0] * int(math.prod(x.shape[2:]))
        else:
            positions = out.shape[0] * int(math.prod(out.shape[2:]))
        macs[0] += positions * kernel * alive[0] * alive[1]

    def attention_hook(module, args, kwargs, output):
        call = attention_call_macs(module, args, kwargs, count_zeros)
        if call is not None:
            recurrent_batches.append(call[0])   # time-major: the batch is dim 1
            macs[0] += call[1]

    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            handles.append(m.register_forward_hook(attention_hook, with_kwargs=True))
        elif isinstance(m, conv_linear + (nn.RNNBase,)) or id(m) in attention or is_transposed_linear(m):
            handles.append(m.register_forward_hook(hook))
    flags = training_flags(model)
    model.eval()
    try:
        run_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        restore_training(flags)
        clear_attention_caches(model)
    batch = batch_size(example_inputs, recurrent_batches)

    params = 0
    seen = set()
    for m in model.modules():
        for pname, p in m._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            name = pname[:-len("_orig")] if pname.endswith("_orig") else pname
            if name + "_mask" in m._buffers or count_zeros:
                params += int(math.prod(alive_sizes(m, name, count_zeros)))
            else:
                params += p.numel()
    return macs[0] // max(batch, 1), params
