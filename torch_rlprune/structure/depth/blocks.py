"""Removable residual blocks as records, the prune method that masks a branch, and the Identity a
removed block becomes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Set, Tuple

import torch
from torch import nn
from torch.nn.utils import prune

from ..methods import BranchMask
from ..snapshot import ModelSnapshot

DEPTH_MASK_TAG = "_rlprune_depth_mask"  # attribute of a block module while mask_block's masks are on it


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class ResidualBranch:
    """The tensors whose zeroing makes one residual branch contribute exactly zero.

    Attributes:
        projection: qualified name of the Conv/Linear that starts the masked layers: the
            branch's last one (``layer1.0.conv2``), or an earlier one when the branch ends in
            several projections whose outputs are joined (GhostNet's concat).
        following: qualified names of the parameterised layers between it and the residual
            add (``layer1.0.bn2``; ViT ``blocks.0.ls1`` when layer scale is on; the block
            itself for ConvNeXt, whose layer scale ``gamma`` is the block's own parameter).
        tensors: ``(module path inside the block, tensor name)`` for every tensor
            :func:`mask_block` masks (``("conv2", "weight")``, ``("", "gamma")``).
    """

    projection: str
    following: Tuple[str, ...]
    tensors: Tuple[Tuple[str, str], ...]

    @property
    def layers(self) -> Tuple[str, ...]:
        return (self.projection,) + self.following


@dataclass
class RemovableBlock:
    """A residual block that is the identity once its branches are zeroed.

    Attributes:
        name: qualified module name in the model it was found in.
        module: the block itself.
        branches: its residual branches in execution order (one for CNN blocks, two for a
            ViT block: attention then MLP).
        macs: multiply-accumulates per sample the block performs (what removing it saves),
            counted like :func:`torch_rlprune.structure.channel.count_macs_params` (mask-aware).
        params: parameters the block holds (mask-aware, the same counter).
        shape: its input (= output) shape on the example input.
        order: position of its first call in the traced forward (blocks are listed in it).
    """

    name: str
    module: nn.Module = field(repr=False, compare=False)
    branches: Tuple[ResidualBranch, ...]
    macs: int
    params: int
    shape: Tuple[int, ...]
    order: int = 0

    @property
    def end_layers(self) -> Tuple[str, ...]:
        """Every layer that ends a branch, as :func:`mask_block` masks them."""
        return tuple(n for b in self.branches for n in b.layers)

    @property
    def masked_branches(self) -> Tuple[int, ...]:
        """Indices of the branches :func:`mask_block` currently masks."""
        record = getattr(self.module, DEPTH_MASK_TAG, None)
        return tuple(sorted(record.masked)) if record is not None and record_intact(self.module, record) else ()

    @property
    def masked(self) -> bool:
        """True when every branch is masked by :func:`mask_block`."""
        return len(self.masked_branches) == len(self.branches)


class RemovedBlock(nn.Identity):
    """What :func:`remove_masked_blocks` puts where a block was.

    An ``nn.Identity`` whose forward also accepts the extra arguments a parent may pass to
    its blocks (timm's ViT calls ``blk(x, attn_mask=..., is_causal=...)`` when given a mask;
    ``nn.Identity.forward`` takes one input only).
    """

    def __init__(self, name: str = ""):
        super().__init__()
        self.removed = name

    def forward(self, x, *args, **kwargs):  # noqa: D102 - identity
        return x

    def extra_repr(self) -> str:
        return f"removed={self.removed!r}" if self.removed else ""


def is_inside(name: str, block: str) -> bool:
    """Whether module ``name`` is the block ``block`` or one of its submodules."""
    return name == block or name.startswith(block + ".")


def tensor_source(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor to write to change what the forward sees (``name_orig`` for a pruned tensor,
    because the prune hook recomputes ``name`` from it on every call)."""
    orig = module._parameters.get(name + "_orig")
    return orig if orig is not None else module._parameters[name]


def effective_tensor(module: nn.Module, name: str) -> torch.Tensor:
    orig = module._parameters.get(name + "_orig")
    if orig is not None:
        return orig.detach() * module._buffers[name + "_mask"]
    return module._parameters[name].detach()


@dataclass
class MaskRecord:
    branches: Tuple[ResidualBranch, ...]
    masked: Set[int] = field(default_factory=set)
    saved: Dict[int, ModelSnapshot] = field(default_factory=dict)


def has_branch_mask(module: nn.Module, name: str) -> bool:
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and getattr(hook, "_tensor_name", None) == name:
            methods = hook._pruning_methods if isinstance(hook, prune.PruningContainer) else (hook,)
            return any(isinstance(m, BranchMask) for m in methods)
    return False


def record_intact(block_module: nn.Module, record: MaskRecord) -> bool:
    """False once someone called ``prune.remove`` on a masked tensor: the zeros are then permanent."""
    for i in record.masked:
        for rel, name in record.branches[i].tensors:
            if not has_branch_mask(block_module.get_submodule(rel), name):
                return False
    return True
