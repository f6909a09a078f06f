"""Ridge regression per output on its own kept weights: the solve every least-squares refit shares
(:mod:`.repair` for linear and convolutional layers, :mod:`.recurrent_refit` for gate matrices)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["masked_ridge_solve", "SOLVE_ELEMENTS"]

SOLVE_ELEMENTS = 2 ** 24
"""At most this many float64 entries (128 MB) of per-output systems solved at once."""

def masked_ridge_solve(gram: torch.Tensor, cross: torch.Tensor, keep: torch.Tensor, start: torch.Tensor,
                       ridge: float, max_kept: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per output ``i``, the kept weights ``K_i = keep[i]`` minimising
    ``||X[:, K_i] w - Y_i||^2 + ridge * ||w - start[i, K_i]||^2``, given ``gram = X^T X`` and
    ``cross = X^T Y``; the other weights keep ``start``'s values.

    Outputs with more kept weights than ``max_kept`` (fewer regression rows than unknowns) are
    left as they were. Returns the new weights [outputs, inputs] and which outputs were solved.
    """
    counts = keep.sum(1)
    solved = (counts > 0) & (counts <= (max_kept if max_kept is not None else keep.shape[1]))
    weights = start.double().clone()
    order = torch.argsort(counts)  # similar sizes together: little padding
    order = order[solved[order]]
    widest = int(counts[order].max()) if len(order) else 0
    per_batch = max(1, SOLVE_ELEMENTS // max(1, widest * widest))
    for rows in order.split(per_batch) if len(order) else ():
        width = int(counts[rows].max())
        # each row's kept inputs first (stable: in input order), then padding
        index = torch.argsort((~keep[rows]).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = torch.arange(width).unsqueeze(0) < counts[rows].unsqueeze(1)
        pair = (valid.unsqueeze(2) & valid.unsqueeze(1)).to(gram.dtype)
        diagonal = torch.full(valid.shape, ridge, dtype=gram.dtype).masked_fill(~valid, 1.0)  # padding: identity
        system = gram[index.unsqueeze(2), index.unsqueeze(1)] * pair + torch.diag_embed(diagonal)
        anchor = weights[rows.unsqueeze(1), index] * valid
        rhs = (cross[index, rows.unsqueeze(1)] + ridge * anchor) * valid
        factor, info = torch.linalg.cholesky_ex(system)
        if bool((info != 0).any()):
            raise torch.linalg.LinAlgError("a per-output system is not positive definite")
        solution = torch.cholesky_solve(rhs.unsqueeze(2), factor).squeeze(2)
        weights[rows.unsqueeze(1).expand_as(index)[valid], index[valid]] = solution[valid]
    return weights, solved
