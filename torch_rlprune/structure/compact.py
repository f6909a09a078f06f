"""``compact``: a channel-pruned model made physically smaller, blocks first, then channels."""
from __future__ import annotations

import torch
from torch import nn

from .channel import compact as _compact
from .depth import remove_masked_blocks
from .inputs import infer_input_shape, recorded_example
from .snapshot import ModelSnapshot

__all__ = ["compact"]


def compact(model: nn.Module, example_inputs=None) -> dict:
    """Physically remove every channel the model's masks remove (same model object, no prune
    hooks left) with torch-pruning; returns MACs/params before and after.

    Residual blocks masked whole (:func:`~torch_rlprune.structure.depth.mask_block`, e.g. by
    ``agent="n2n"``) are replaced by identities first (listed in ``removed_blocks``; the MACs and
    params "before" are counted after that), then the channels of the remaining model go.

    Args:
        model: a model pruned with ``structure="channel"`` (by :func:`rl_prune` or
            :func:`apply_plan`), or one whose masked state_dict was loaded back.
        example_inputs: one input batch; default: shaped like the one the model was pruned with
            (recorded by :func:`rl_prune` / :func:`apply_plan`), else from timm's ``pretrained_cfg``.

    If anything fails or is interrupted, the model is left exactly as it was: blocks, masks and hooks.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        example_inputs = recorded_example(model)  # the one rl_prune / apply_plan pruned it with
    if example_inputs is None:
        example_inputs = torch.randn(2, *infer_input_shape(model), generator=torch.Generator().manual_seed(0))
    # The channel compaction undoes its own changes on failure, but the blocks go before it starts:
    # this snapshot puts them back too.
    snapshot = ModelSnapshot(model)
    try:
        removed = remove_masked_blocks(model)  # blocks first: the channel graph is built on what remains
        info = _compact(model, example_inputs)
    except BaseException:
        snapshot.restore()
        raise
    info["removed_blocks"] = removed
    return info
