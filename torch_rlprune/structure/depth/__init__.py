"""Depth reduction: residual blocks that can be removed whole, found without architecture names.

A residual block computes ``x + f(x)`` (timm adds drop-path, layer scale, a ``shortcut``
that is an ``Identity``, or a ReLU after the add); when ``f`` contributes exactly zero the
block *is* the identity and can be cut out of the network. That is the action of an N2N
style layer-removal agent. Three steps, each usable on its own:

* :func:`find_removable_blocks` -- which blocks qualify, decided numerically on one traced
  forward, so the same code serves ResNet, MobileNet/EfficientNet, ConvNeXt and ViT/DeiT.
* :func:`mask_block` / :func:`unmask_block` -- the soft removal, through
  torch.nn.utils.prune (:class:`BranchMask`): the last layer of every residual branch (and
  the norm / layer scale after it) is masked to zero, so the masked model computes what
  the model without the block computes; undone bit for bit.
* :func:`remove_masked_blocks` -- the hard removal: every fully masked block becomes a
  :class:`RemovedBlock` (an ``nn.Identity``), which is where MACs and parameters go down.

How detection works (no names of layers or block classes are used):

1. One forward with hooks records, per module, its call count, a copy of its input and
   whether its output has the input's shape, and the execution order of every module that
   owns parameters (a *holder*: a conv, a norm, a ``LayerScale``, or a block owning a
   ``gamma`` like ConvNeXt's, which counts as running last inside that block).
2. A candidate is a non-root module with children, called once with one tensor, returning
   a tensor of the same shape. Its holders, in execution order, are cut into *windows*: a
   Conv/Linear plus the holders that run after it up to the next Conv/Linear (resnet
   ``conv2 + bn2``, mobilenet ``conv_pwl + bn3``, convnext ``mlp.fc2 + gamma``, ViT
   ``mlp.fc2 + ls2``). Zeroing a window's weights and biases makes its output exactly zero
   (a Conv/Linear with zero weight and bias outputs 0; a BatchNorm/LayerNorm with zero
   weight and bias outputs 0 whatever its statistics; so does a zero layer scale).
3. Windows are tried from the end of the block backwards. The candidate is re-run on its
   recorded input with the window zeroed: if the output equals the input, the window ends
   the only (remaining) residual branch. If instead the output equals the *input of an
   earlier holder* (ViT: zeroing ``mlp.fc2`` leaves ``x + attn(x)``, which is exactly what
   ``norm2`` received), the window ends the *last* branch and the search continues on the
   part before that holder -- this finds both branches of a ViT block (attention and MLP)
   and works for any number of stacked branches. A window whose zeroing gives neither is
   not the end of a branch (e.g. an SE gate after ``bn3``: ``sigmoid(0) = 0.5`` rescales
   instead of zeroing); then everything from that window's Conv/Linear to the branch end is
   tried (GhostNet's branch ends in ``cat([bn(conv(x)), bn(dwconv(...))])``: both convs and
   norms must be zeroed), then the previous window (up to ``_MAX_TRIES`` per branch).
4. A candidate that is only a stack of removable blocks (a timm stage ``layer1``, a ViT's
   ``blocks`` Sequential, a ConvNeXt stage without downsampling) is not reported: zeroing
   the branches of its removable descendants already makes it the identity, so removing it
   is removing them. A genuinely nested residual (an outer skip around inner blocks) is
   kept because one of its branches is not a descendant's.

The check is numerical and data-dependent on purpose: timm's ResNet blocks apply a ReLU
*after* the add, so the block without its branch is ``relu(x)``, which is the identity only
because the block's input is itself a ReLU output. A block is reported only when the
numbers on the example input say it is an identity once masked.

Granularity: a ViT block exposes its two branches (attention, MLP) as
:attr:`RemovableBlock.branches`; :func:`mask_block` can mask a subset of them (an
attention-only or MLP-only removal, exact as well), but only a block with *all* branches
masked is replaced by :func:`remove_masked_blocks` -- a single branch cannot be replaced by
an Identity without rewriting the block's forward.

Not handled (a block is simply not reported): blocks called more than once (weight
sharing) or with several tensor inputs; leaf modules that add a residual inside their own
``forward``; branches that do not end in a Conv/Linear followed only by parameterised
layers that map zero to zero (a BatchNorm without affine parameters after the last conv, a
``x * s + f(x)`` skip with ``s != 1``); residuals whose skip path has parameters (a
downsample/projection shortcut changes the shape or the values, so the block is not an
identity without its branch: resnet blocks with ``downsample``, mobilenet blocks without
``has_skip``).
"""
from ..methods import BranchMask, branch_mask
from .blocks import DEPTH_MASK_TAG, RemovableBlock, RemovedBlock, ResidualBranch, is_inside
from .discovery import find_removable_blocks
from .masking import mask_block, remove_masked_blocks, unmask_block

__all__ = ["ResidualBranch", "RemovableBlock", "BranchMask", "branch_mask", "RemovedBlock",
           "find_removable_blocks", "mask_block", "unmask_block", "remove_masked_blocks", "is_inside",
           "DEPTH_MASK_TAG"]
