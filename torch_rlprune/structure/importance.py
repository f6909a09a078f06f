"""Which weights go inside a layer: the smallest magnitudes, or the smallest activation-weighted ones.

The search decides *how many* weights each layer loses; an importance decides *which*. Two:

* ``"magnitude"``: |w|, the default of ``torch.nn.utils.prune`` and of every heuristic here.
* ``"activation"`` (Wanda, Sun et al. 2023): ``|W_ij| * ||X_j||_2`` where ``||X_j||`` is the norm
  of input feature j over the calibration inputs, compared *within each output row*: every row
  loses the same share of its weights. Convolutions use one norm per input channel (over batch
  and positions), grouped convolutions the channels of their own group. Tensors whose input the
  model's forward does not expose (an LSTM's recurrent matrices, its deeper layers' input
  matrices, an attention's ``out_proj`` and its projections in cross-attention) keep magnitude,
  and the search reports them.

Both become per-entry scores for :class:`~torch_rlprune.structure.masks.InPlaceMask` (search) and
:class:`~torch_rlprune.structure.methods.PolicyUnstructured` (the final masks): entries with the smallest
scores go first. Row-wise comparison is encoded in the scores themselves -- an entry's score is
its rank within its row -- so the stable ascending order the two share removes the least
important entry of every row, then the second least important of every row, and so on.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from .inputs import run_model
from .tensors import RECURRENT_TYPES, PrunableTensor

__all__ = ["IMPORTANCES", "input_feature_norms", "wanda_scores", "row_rank_scores", "activation_scores"]

IMPORTANCES = ("magnitude", "activation")


def _feature_sums(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sum of squares per input feature of one call's input."""
    x = x.detach().float()
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return x.pow(2).sum(dim=[d for d in range(x.dim()) if d != 1])
    return x.reshape(-1, x.shape[-1]).pow(2).sum(0)


def input_feature_norms(model: nn.Module, layers: Sequence[PrunableTensor],
                        batches: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``||X_j||_2`` of every input feature of every layer whose input the forward exposes, over
    ``batches`` (one forward each, inference mode). Keys are the layers' qualified names."""
    sums: Dict[str, torch.Tensor] = {}
    by_module: Dict[int, List[PrunableTensor]] = {}
    for layer in layers:
        by_module.setdefault(id(layer.module), []).append(layer)

    def hook(module, inputs, output):
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        if x is None:
            return
        if isinstance(module, nn.MultiheadAttention) and not (len(inputs) > 2 and inputs[0] is inputs[1] is inputs[2]):
            return  # cross-attention: keys and values are other inputs than the one norm we would take
        for layer in by_module[id(module)]:
            if isinstance(module, RECURRENT_TYPES) and layer.param_name != "weight_ih_l0":
                continue  # recurrent and deeper-layer inputs live inside the module
            value = _feature_sums(module, x)
            sums[layer.name] = sums[layer.name] + value if layer.name in sums else value

    handles = []
    seen = set()
    for layer in layers:
        if id(layer.module) not in seen:
            seen.add(id(layer.module))
            handles.append(layer.module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for x in batches:
                run_model(model, x)
    finally:
        for h in handles:
            h.remove()
    return {name: s.sqrt() for name, s in sums.items()}


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``|W| * ||X||`` broadcast along the weight's input dimension (dim 1), per conv group."""
    w = weight.detach().abs().float()
    norms = norms.to(w.device, torch.float32)
    per_group = w.shape[1]
    if norms.numel() != per_group * groups:
        raise ValueError(f"{norms.numel()} input norms for a weight of shape {tuple(w.shape)} in {groups} group(s)")
    out_per_group = w.shape[0] // groups
    index = (torch.arange(w.shape[0], device=w.device)[:, None] // out_per_group) * per_group \
        + torch.arange(per_group, device=w.device)[None, :]
    scale = norms[index]                                   # (out, in per group)
    return w * scale.reshape(*scale.shape, *([1] * (w.dim() - 2)))


def row_rank_scores(scores: torch.Tensor) -> torch.Tensor:
    """Each entry's rank within its output row (dim 0), as float scores of the same shape.

    A stable ascending sort of the result lists rank 0 of every row (rows in order), then rank 1
    of every row, ...: a prefix of k entries removes ``k // rows`` from every row and one more
    from the first ``k % rows`` rows -- Wanda's per-output comparison, as one order."""
    flat = scores.reshape(scores.shape[0], -1)
    order = torch.argsort(flat, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return rank.to(torch.float32).reshape(scores.shape)


def activation_scores(model: nn.Module, layers: Sequence[PrunableTensor],
                      batches: Sequence[torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Wanda scores, row-ranked (:func:`row_rank_scores`), of every layer whose input the forward
    exposes; returns ``(scores by name, names left to magnitude)``."""
    norms = input_feature_norms(model, layers, batches)
    scores, fallback = {}, []
    for layer in layers:
        if layer.name not in norms:
            fallback.append(layer.name)
            continue
        if layer.kind.startswith("convtranspose"):
            fallback.append(layer.name)  # its weight is (in, out / groups, ...): grouped rows do not line up
            continue
        if layer.input_dim == 0:  # a Linear stored (in, out): rank within its rows once transposed
            scores[layer.name] = row_rank_scores(wanda_scores(layer.original.t(), norms[layer.name])).t()
            continue
        groups = layer.groups if layer.kind.startswith("conv") else 1
        scores[layer.name] = row_rank_scores(wanda_scores(layer.original, norms[layer.name], groups))
    return scores, fallback
