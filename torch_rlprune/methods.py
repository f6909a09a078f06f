"""Pruning methods that honour torch.nn.utils.prune's contract.

Every tensor pruned by this library carries a :class:`PolicyUnstructured` in its
forward-pre-hook, so ``prune.is_pruned``, ``prune.remove``, ``PruningContainer``
(pruning again on top) and state_dicts behave exactly as with torch's own methods.
The *amount* of each layer is what a search decides; *which* entries go is always
the smallest-magnitude ones, ranked by :func:`magnitude_order`, the same ranking
the search used when it scored the plan.
"""
from __future__ import annotations

import numbers

import torch
from torch.nn.utils import prune
from torch.nn.utils.prune import _compute_nparams_toprune, _validate_pruning_amount, _validate_pruning_amount_init

__all__ = ["PolicyUnstructured", "policy_unstructured", "magnitude_order"]


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
