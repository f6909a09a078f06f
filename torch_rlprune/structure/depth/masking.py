"""Soft removal of blocks (their branches masked through torch.nn.utils.prune, undone exactly) and
hard removal (fully masked blocks replaced by an Identity)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..methods import BranchMask
from ..snapshot import ModelSnapshot
from .blocks import (DEPTH_MASK_TAG, MaskRecord, RemovableBlock, RemovedBlock, ResidualBranch, effective_tensor,
                     has_branch_mask, record_intact)


def _branch_indices(block: RemovableBlock, branches) -> List[int]:
    if branches is None:
        return list(range(len(block.branches)))
    if isinstance(branches, int):
        branches = [branches]
    out = []
    for b in branches:
        if isinstance(b, bool) or not isinstance(b, int) or not -len(block.branches) <= b < len(block.branches):
            raise IndexError(f"block {block.name!r} has {len(block.branches)} branches; got branch {b!r}")
        out.append(b % len(block.branches))
    return sorted(set(out))


def mask_block(block: RemovableBlock, branches=None) -> RemovableBlock:
    """Mask the block's residual branches so they contribute exactly zero (soft removal).

    Every tensor of each branch's end layers (weight and bias of the last Conv/Linear, the
    norm's weight and bias, a layer scale) gets a :class:`BranchMask`, so ``name_orig``,
    ``name_mask`` and the forward-pre-hook exist and ``prune.remove`` works; with all
    branches masked the model computes what it computes with the block replaced by
    ``nn.Identity()``. Tensors pruned before (e.g. channel masks) keep their masks inside a
    ``PruningContainer``. Masking an already masked branch does nothing.

    Args:
        block: a block from :func:`find_removable_blocks`.
        branches: indices into ``block.branches`` (default: all). A ViT block's branches are
            ``0`` (attention) and ``1`` (MLP).

    Returns:
        the block.
    """
    if not isinstance(block, RemovableBlock):
        raise TypeError(f"mask_block takes a RemovableBlock (from find_removable_blocks), got {type(block).__name__}")
    indices = _branch_indices(block, branches)
    record = getattr(block.module, DEPTH_MASK_TAG, None)
    if record is not None and not record_intact(block.module, record):
        record = None  # prune.remove made the previous masks permanent; start over from there
    if record is None:
        record = MaskRecord(branches=block.branches)
    todo = [i for i in indices if i not in record.masked]
    targets = [(block.module.get_submodule(rel), name) for i in todo for rel, name in block.branches[i].tensors]
    for module, name in targets:  # validation before anything changes
        if has_branch_mask(module, name):
            raise ValueError(f"{block.name}: a tensor of this block is already masked by a BranchMask "
                             f"that mask_block did not record")
    with torch.no_grad():
        for module, name in targets:
            if id(module) not in record.saved:
                record.saved[id(module)] = ModelSnapshot(module, recurse=False)
            BranchMask.apply(module, name)
    record.masked.update(todo)
    setattr(block.module, DEPTH_MASK_TAG, record)
    return block


def unmask_block(block: RemovableBlock) -> RemovableBlock:
    """Undo :func:`mask_block` bit for bit: the same Parameter objects with the values they had,
    earlier masks and hooks as they were, state_dict keys in the same order.

    Raises ``ValueError`` when the block is not masked, or when ``prune.remove`` was called on
    its masks since (the zeros are then part of the weights and nothing is left to undo).
    """
    if not isinstance(block, RemovableBlock):
        raise TypeError(f"unmask_block takes a RemovableBlock, got {type(block).__name__}")
    record = getattr(block.module, DEPTH_MASK_TAG, None)
    if record is None or not record.masked:
        raise ValueError(f"block {block.name!r} is not masked")
    if not record_intact(block.module, record):
        raise ValueError(f"block {block.name!r}: prune.remove was called on its masks, the zeros are permanent")
    for snapshot in record.saved.values():
        snapshot.restore()
    block.module.__dict__.pop(DEPTH_MASK_TAG, None)  # gone already when the block owns a masked tensor
    return block


def _all_zero(block_module: nn.Module, branches: Sequence[ResidualBranch]) -> bool:
    for branch in branches:
        for rel, name in branch.tensors:
            try:
                module = block_module.get_submodule(rel)
                value = effective_tensor(module, name)
            except (AttributeError, KeyError):
                return False
            if bool(value.any()):
                return False
    return True


def remove_masked_blocks(model: nn.Module, blocks: Optional[Sequence[RemovableBlock]] = None) -> List[str]:
    """Replace every fully masked removable block of ``model`` by a :class:`RemovedBlock` (hard removal).

    A block qualifies when every tensor of every branch is zero as the forward sees it
    (masked by :func:`mask_block`, also after ``prune.remove`` baked the zeros in). Without
    ``blocks`` the model is scanned for blocks :func:`mask_block` masked; with ``blocks``
    (from :func:`find_removable_blocks`) those are checked too, however they were zeroed. The
    output is unchanged; the removed blocks' MACs and parameters are gone. Replacement is
    ``setattr`` on the parent, so ``nn.Sequential``/``nn.ModuleList`` children work.

    Returns:
        the qualified names of the removed blocks, in module order. ``RemovableBlock``
        lists found before are stale afterwards for the removed blocks.
    """
    names = {id(m): n for n, m in model.named_modules()}
    todo: Dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        record = getattr(module, DEPTH_MASK_TAG, None)
        if name and record is not None and len(record.masked) == len(record.branches) \
                and _all_zero(module, record.branches):
            todo[name] = module
    for block in blocks or ():
        name = names.get(id(block.module))
        if name and name not in todo and _all_zero(block.module, block.branches):
            todo[name] = block.module
    removed = []
    order = {n: i for i, n in enumerate(names.values())}
    for name in sorted(todo, key=lambda n: order[n]):
        if any(name.startswith(r + ".") for r in removed):
            continue  # inside a block removed already
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, RemovedBlock(name))
        removed.append(name)
    return removed
