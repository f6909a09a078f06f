"""Every pruning method of the package, each honouring torch.nn.utils.prune's contract, with its
functional twin: :class:`PolicyUnstructured` (entries, unstructured plans), :class:`ChannelMask` (whole
channels, channel plans) and :class:`BranchMask` (a whole tensor, residual blocks masked to the identity).

Every tensor an unstructured plan prunes carries a :class:`PolicyUnstructured` in its
forward-pre-hook, so ``prune.is_pruned``, ``prune.remove``, ``PruningContainer``
(pruning again on top) and state_dicts behave exactly as with torch's own methods.
The *amount* of each layer is what a search decides; *which* entries go is always
the smallest-magnitude ones, ranked by :func:`magnitude_order`, the same ranking
the search used when it scored the plan.
"""
from __future__ import annotations

import numbers
from typing import Dict, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import prune
from torch.nn.utils.prune import _compute_nparams_toprune, _validate_pruning_amount, _validate_pruning_amount_init

__all__ = ["PolicyUnstructured", "policy_unstructured", "magnitude_order", "ChannelMask", "channel_mask", "dims_mask",
           "BranchMask", "branch_mask"]


def magnitude_order(scores: torch.Tensor) -> torch.Tensor:
    """Flat indices of ``scores`` from least to most important (|score| ascending).

    A *stable* sort: ties (zeros in particular) are broken by position, so the
    order of a subset of entries is the subset of the full order. That is what
    makes a mask computed inside a ``PruningContainer`` (which sees only the
    still-alive entries) identical to the mask the search evaluated.
    """
    return torch.argsort(scores.detach().abs().reshape(-1), stable=True)


class PolicyUnstructured(prune.BasePruningMethod):
    r"""Prune the ``amount`` smallest-magnitude entries of a tensor.

    The per-layer ``amount`` is chosen by a reinforcement-learning policy
    (see :func:`torch_rlprune.rl_prune`); this method is what applies it.

    Args:
        amount (int or float): if ``float`` in [0, 1], the fraction of entries to
            prune; if ``int``, the absolute number of entries.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount) -> None:
        _validate_pruning_amount_init(amount)
        self.amount = amount

    def compute_mask(self, t, default_mask):
        n_prune = _compute_nparams_toprune(self.amount, t.nelement())
        _validate_pruning_amount(n_prune, t.nelement())
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        if n_prune:
            mask.view(-1)[magnitude_order(t)[:n_prune]] = 0
        return mask

    @classmethod
    def apply(cls, module, name, amount, importance_scores=None):  # type: ignore[override]
        """Add the mask, ``name_orig`` and the forward-pre-hook to ``module``."""
        return super().apply(module, name, amount=amount, importance_scores=importance_scores)


def policy_unstructured(module, name: str, amount, importance_scores=None):
    r"""Functional twin of :class:`PolicyUnstructured`, in the style of ``prune.l1_unstructured``.

    Args:
        module (nn.Module): module containing the tensor to prune.
        name (str): parameter name within ``module``.
        amount (int or float): fraction (float in [0, 1]) or number (int) of entries to prune.
        importance_scores (torch.Tensor, optional): scores of the same shape as the
            parameter; entries with the smallest |score| are pruned. Defaults to the
            parameter itself.

    Returns:
        module (nn.Module): the module, with ``name_orig``, ``name_mask`` and the hook.

    Example:
        >>> m = policy_unstructured(nn.Linear(4, 3), "weight", amount=0.5)
        >>> int(m.weight_mask.sum())
        6
    """
    if not isinstance(amount, numbers.Real):
        raise TypeError(f"amount must be an int or a float, got {type(amount).__name__}")
    PolicyUnstructured.apply(module, name, amount=amount, importance_scores=importance_scores)
    return module


# --------------------------------------------------------------------------- channels
# A channel group masks many tensors, each along one or two dimensions (a conv weight can
# lose output rows to its own group and input columns to the group feeding it). The
# search decides which channels; this method only *applies* the decision, so it takes
# the channel indices per dimension, like ``prune.custom_from_mask`` takes a mask, and
# everything torch's machinery offers keeps working: ``prune.is_pruned``,
# ``prune.remove``, state_dicts with ``name_orig``/``name_mask``, and pruning again on top
# (``PruningContainer``).
def dims_mask(shape: Sequence[int], channels: Mapping[int, Sequence[int]], dtype=torch.float32,
              device=None) -> torch.Tensor:
    """A mask of ``shape`` with ones everywhere except the listed indices of each dimension."""
    mask = torch.ones(tuple(shape), dtype=dtype, device=device)
    for dim, idx in channels.items():
        idx = torch.as_tensor(list(idx) if not isinstance(idx, torch.Tensor) else idx, dtype=torch.long,
                              device=mask.device)
        if idx.numel():
            mask.index_fill_(dim, idx, 0)
    return mask


class ChannelMask(prune.BasePruningMethod):
    r"""Zero whole slices of a tensor: ``channels[d]`` lists the indices removed along dim ``d``.

    ``PRUNING_TYPE`` is ``"structured"`` (with ``dim``) when a single dimension is masked,
    ``"unstructured"`` when several are (an entry is removed when any of its indices is).

    Inside a ``PruningContainer`` (the tensor was pruned before), torch hands
    ``compute_mask`` only the still-alive channels (structured) or entries
    (unstructured); :meth:`apply` records the previous mask so that the slice can be
    reproduced and the requested channels are removed *in the original indexing*.

    Args:
        channels (dict): ``{dim: indices}`` to remove, indices in the tensor's full shape.
    """

    PRUNING_TYPE = "structured"

    def __init__(self, channels: Mapping[int, Sequence[int]]):
        if not isinstance(channels, Mapping) or not channels:
            raise TypeError("channels must be a non-empty {dim: indices} mapping")
        self.channels: Dict[int, list] = {}
        for dim, idx in channels.items():
            if not isinstance(dim, int):
                raise TypeError(f"channel dims must be ints, got {dim!r}")
            values = sorted({int(i) for i in (idx.tolist() if isinstance(idx, torch.Tensor) else idx)})
            if values and values[0] < 0:
                raise ValueError(f"negative channel index {values[0]} along dim {dim}")
            self.channels[dim] = values
        dims = [d for d, v in self.channels.items() if v]
        if len(dims) <= 1:
            self.PRUNING_TYPE = "structured"
            self.dim = dims[0] if dims else next(iter(self.channels))
        else:
            self.PRUNING_TYPE = "unstructured"
            self.dim = None

    def full_mask(self, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        for dim, idx in self.channels.items():
            if dim >= len(shape) or dim < -len(shape):
                raise IndexError(f"ChannelMask: dim {dim} out of range for a tensor of shape {tuple(shape)}")
            if idx and idx[-1] >= shape[dim]:
                raise IndexError(f"ChannelMask: index {idx[-1]} out of range for dim {dim} of size {shape[dim]}")
        return dims_mask(shape, self.channels, dtype=dtype, device=device)

    def compute_mask(self, t, default_mask):
        full_shape = t.shape if self._previous_mask is None else self._previous_mask.shape
        mask = self.full_mask(full_shape, dtype=default_mask.dtype, device=default_mask.device)
        if tuple(t.shape) != tuple(full_shape):
            # Called by a PruningContainer on the slice it derived from the previous mask:
            # rebuild the same slice (torch/nn/utils/prune.py, PruningContainer._combine_masks).
            prev = self._previous_mask.to(device=default_mask.device)
            if self.PRUNING_TYPE == "unstructured":
                slc = prev == 1
            else:
                dim = self.dim % prev.dim()
                keep = prev.sum(dim=[d for d in range(prev.dim()) if d != dim]) != 0
                slc = [slice(None)] * prev.dim()
                slc[dim] = keep
                slc = tuple(slc)
            mask = mask[slc]
        return default_mask * mask

    @classmethod
    def apply(cls, module, name, channels, importance_scores=None):  # type: ignore[override]
        """Add (or extend) the mask, ``name_orig`` and the forward-pre-hook on ``module.name``."""
        previous = getattr(module, name + "_mask", None)
        previous = None if previous is None else previous.detach().clone()
        _PENDING_PREVIOUS[0] = previous
        try:
            method = super().apply(module, name, channels=channels, importance_scores=importance_scores)
        finally:
            _PENDING_PREVIOUS[0] = None
        ours = method[-1] if isinstance(method, prune.PruningContainer) else method
        ours._previous_mask = None  # only needed while the mask is computed; keep pickles small
        return method

    # BasePruningMethod.apply constructs the method itself (cls(*args, **kwargs)), so the
    # previous mask travels through this module-level slot (not thread-safe, like the rest of
    # torch.nn.utils.prune's re-parametrisation) and is picked up right after construction.
    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj._previous_mask = _PENDING_PREVIOUS[0]
        return obj


_PENDING_PREVIOUS = [None]


def channel_mask(module, name: str, channels: Mapping[int, Sequence[int]]):
    r"""Functional twin of :class:`ChannelMask`, in the style of ``prune.custom_from_mask``.

    Args:
        module (nn.Module): module holding the tensor.
        name (str): parameter name within ``module`` (``"weight"``, ``"bias"``, ...).
        channels (dict): ``{dim: indices}`` removed along each dimension.

    Returns:
        module (nn.Module): the module, with ``name_orig``, ``name_mask`` and the hook.

    Example:
        >>> m = channel_mask(nn.Conv2d(4, 6, 3), "weight", {0: [1, 4], 1: [0]})
        >>> m.weight_mask[1].sum().item(), m.weight_mask[:, 0].sum().item()
        (0.0, 0.0)
    """
    ChannelMask.apply(module, name, channels=channels)
    return module


# --------------------------------------------------------------------------- residual branches
class BranchMask(prune.BasePruningMethod):
    r"""Mask a whole tensor to zero: the prune-API form of "this branch contributes nothing".

    A method of its own (rather than ``prune.custom_from_mask`` with a zero mask) because it
    composes with earlier pruning: on a tensor that is already masked (e.g. channel
    pruning), torch builds a ``PruningContainer`` and hands this method only the alive
    entries, which it zeroes too; ``custom_from_mask``'s full-shape mask would not fit
    that slice. It is also how :func:`~torch_rlprune.structure.depth.unmask_block` recognises its own hooks.
    """

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        return torch.zeros_like(default_mask)


def branch_mask(module: nn.Module, name: str) -> nn.Module:
    r"""Functional twin of :class:`BranchMask`: ``module.<name>`` becomes ``name_orig * 0``.

    Args:
        module (nn.Module): module holding the tensor.
        name (str): parameter name within ``module`` (``"weight"``, ``"bias"``, ``"gamma"``).

    Returns:
        module (nn.Module): the module, with ``name_orig``, ``name_mask`` and the hook.

    Example:
        >>> lin = branch_mask(nn.Linear(3, 2), "bias")
        >>> float(lin.bias.abs().sum()), lin.bias_mask.tolist()
        (0.0, [0.0, 0.0])
    """
    BranchMask.apply(module, name)
    return module
