"""One forward pass with hooks: when each Conv/Linear/recurrent layer and attention block first runs,
and how many positions, tokens or time steps it sees (what group order and MAC counts need)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import nn

from ..tensors import is_row_layer, is_transposed_linear
from ._util import batch_size, run_model
from .alive import attention_call_macs
from .graph import RNN_TYPES
from .recurrent import samples, time_steps

__all__ = ["LayerTrace", "trace_layers"]


@dataclass
class LayerTrace:
    """What one Conv/Linear (or attention block) does in one forward pass."""

    name: str
    module: nn.Module = field(repr=False)
    calls: int = 0
    positions: int = 0       # summed over calls, per sample: output positions (input positions for
    #                          transposed convs), tokens (Linear), time steps (recurrent)
    rows: int = 0            # Linear: rows of its input summed over calls, for the whole batch
    attention: bool = False  # a timm attention block (tokens_sq counts its score/value matmuls)
    tokens_sq: int = 0       # attention blocks: sum over calls of N^2
    first_call: int = -1
    fixed_macs: int = 0      # nn.MultiheadAttention: all its MACs (its channels are never grouped)
    packed: bool = False     # a recurrent layer fed a PackedSequence


def trace_layers(model, example_inputs, attention: Dict[str, nn.Module]) -> Dict[str, LayerTrace]:
    """Run ``model`` once on ``example_inputs`` with a hook on every traced layer (``attention``: the
    timm blocks whose score/value matmuls are counted)."""
    traces: Dict[str, LayerTrace] = {}
    handles = []
    counter = [0]
    recurrent_batches: List[int] = []
    conv_linear = (nn.modules.conv._ConvNd, nn.Linear)

    def make_hook(tr: LayerTrace, is_attention: bool):
        def hook(module, inputs, output):
            if tr.first_call < 0:
                tr.first_call = counter[0]
                counter[0] += 1
            tr.calls += 1
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            out = output if isinstance(output, torch.Tensor) else None
            if is_attention:
                if x is not None and x.dim() >= 3:
                    tr.tokens_sq += int(math.prod(x.shape[1:-1])) ** 2
                return
            if isinstance(module, nn.Embedding):  # a lookup: order only, no MACs
                return
            if isinstance(module, RNN_TYPES):  # every matrix runs once per time step
                tr.packed |= isinstance(inputs[0] if inputs else None, nn.utils.rnn.PackedSequence)
                tr.positions += time_steps(module, inputs[0] if inputs else None)
                recurrent_batches.append(samples(module, inputs[0] if inputs else None))
                return
            if is_row_layer(module):  # per-sample tokens: rows / batch, whatever the layout
                ref = out if out is not None else x
                tr.rows += int(math.prod(ref.shape[:-1])) if ref is not None and ref.dim() > 1 else 1
            elif getattr(module, "transposed", False):
                tr.positions += int(math.prod(x.shape[2:])) if x is not None and x.dim() > 2 else 1
            else:
                tr.positions += int(math.prod(out.shape[2:])) if out is not None and out.dim() > 2 else 1
        return hook

    def multihead_hook(tr: LayerTrace):
        def hook(module, args, kwargs, output):
            if tr.first_call < 0:
                tr.first_call = counter[0]
                counter[0] += 1
            tr.calls += 1
            call = attention_call_macs(module, args, kwargs)
            if call is not None:
                recurrent_batches.append(call[0])
                tr.fixed_macs += call[1]
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            traces[name] = tr = LayerTrace(name, m)
            handles.append(m.register_forward_hook(multihead_hook(tr), with_kwargs=True))
        elif isinstance(m, conv_linear + RNN_TYPES + (nn.Embedding,)) or name in attention or \
                is_transposed_linear(m):
            tr = LayerTrace(name, m, attention=name in attention)
            traces[name] = tr
            handles.append(m.register_forward_hook(make_hook(tr, name in attention)))
    try:
        with torch.no_grad():
            run_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    n = batch_size(example_inputs, recurrent_batches)
    for tr in traces.values():
        if is_row_layer(tr.module) and tr.calls:
            tr.positions = max(tr.calls, tr.rows // n)
        tr.fixed_macs //= max(n, 1)
    return traces
