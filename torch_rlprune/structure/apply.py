"""A plan's numbers applied to a model through ``torch.nn.utils.prune``: a fraction per tensor, or a
number of channels per dependency group (and residual blocks masked to the identity).

Everything is checked against the model before a mask is set, and a failure part-way leaves the
model as it was. :func:`torch_rlprune.plan.apply_plan` chooses between the two by the plan's structure.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn.utils import prune

from .channel import ChannelStructure, apply_channel_plan
from .depth import find_removable_blocks, mask_block
from .methods import PolicyUnstructured
from .snapshot import ModelSnapshot

__all__ = ["PlanError", "apply_tensor_amounts", "apply_group_counts", "tie_shared_masks", "keep_inner_masks_live"]


class PlanError(ValueError):
    """A plan file or dict that is not a valid plan, or does not fit the model."""


def _resolve(model: nn.Module, qualified: str):
    module_name, _, param_name = qualified.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        raise PlanError(f"the plan names {qualified!r} but the model has no module {module_name!r}") from None
    tensor = getattr(module, param_name + "_orig", None)
    if tensor is None:
        tensor = getattr(module, param_name, None)
    if not isinstance(tensor, torch.Tensor):
        raise PlanError(f"the plan names {qualified!r} but {module_name!r} has no tensor {param_name!r}")
    return module, param_name, tensor


def apply_tensor_amounts(model: nn.Module, amounts: Dict[str, float], numels: Dict[str, int],
                         importance_scores: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Give each named tensor a :class:`PolicyUnstructured` hook removing its fraction of smallest-magnitude
    entries (or smallest ``importance_scores[name]``); existing masks count towards the fraction. Checked
    against the model before anything changes; a failure part-way leaves the model as it was."""
    importance_scores = importance_scores or {}
    resolved, names_of = [], {}
    for name, amount in amounts.items():
        module, param_name, tensor = _resolve(model, name)
        if id(tensor) in names_of:
            raise PlanError(f"the plan names {names_of[id(tensor)]!r} and {name!r}, which are one tied tensor in "
                            "this model; a shared weight takes one amount")
        names_of[id(tensor)] = name
        if tensor.numel() != numels[name]:
            raise PlanError(f"{name!r} has {tensor.numel()} entries but the plan was made for "
                            f"{numels[name]}")
        resolved.append((name, module, param_name, int(round(amount * tensor.numel()))))
    snapshot = ModelSnapshot(model)
    try:
        with torch.no_grad():
            for name, module, param_name, k_total in resolved:
                mask = getattr(module, param_name + "_mask", None)
                k_existing = 0 if mask is None else int((mask == 0).sum())
                PolicyUnstructured.apply(module, param_name, amount=max(k_total - k_existing, 0),
                                         importance_scores=importance_scores.get(name))
            tie_shared_masks(model)
            keep_inner_masks_live(model)
    except BaseException:
        snapshot.restore()
        raise


def tie_shared_masks(model: nn.Module) -> int:
    """Give every other holder of a pruned tensor the same mask, so a tied weight stays one tensor.

    ``torch.nn.utils.prune`` renames the pruned module's Parameter to ``<name>_orig``; a module
    that shares it (an LM head tied to its embedding) would keep computing with the unmasked
    values. Each such holder gets a prune hook whose ``<name>_mask`` buffer IS the owner's mask
    tensor, so the two compute the same weight now, after any later mask change and after
    ``prune.remove`` on both (the first writes the masked values into the shared Parameter, the
    second finds them already masked). Returns the number of holders tied.
    """
    masks = {}
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if pname.endswith("_orig") and p is not None and pname[:-5] + "_mask" in module._buffers:
                masks.setdefault(id(p), module._buffers[pname[:-5] + "_mask"])
    tied = 0
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is None or pname.endswith("_orig") or id(p) not in masks:
                continue
            mask = masks[id(p)]
            prune.custom_from_mask(module, pname, mask)
            module._buffers[pname + "_mask"] = mask   # the same tensor object: one mask for one weight
            tied += 1
    return tied


def _refresh_out_proj(attention: nn.MultiheadAttention, inputs) -> None:
    """Recompute a pruned ``out_proj``'s weight before the attention reads it: its prune hook
    would do so only when ``out_proj`` itself ran, which it never does, so without this a
    fine-tune would read the weight computed when the mask was applied."""
    out_proj = attention.out_proj
    for hook in out_proj._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):
            setattr(out_proj, hook._tensor_name, hook.apply_mask(out_proj))


def keep_inner_masks_live(model: nn.Module) -> int:
    """Give every ``nn.MultiheadAttention`` whose ``out_proj`` is pruned a forward pre-hook that
    keeps the masked weight current (once per attention). Returns the number of hooks added."""
    added = 0
    for attention in model.modules():
        if isinstance(attention, nn.MultiheadAttention) and prune.is_pruned(attention.out_proj) and \
                not any(h is _refresh_out_proj for h in attention._forward_pre_hooks.values()):
            attention.register_forward_pre_hook(_refresh_out_proj)
            added += 1
    return added


def apply_group_counts(model: nn.Module, numels: Dict[str, int], counts: Dict[str, int], metadata: dict,
                       example_inputs=None) -> None:
    """Remove ``counts[key]`` channels of every dependency group (its least important, by group magnitude)
    and mask the residual blocks ``metadata["removed_blocks"]`` names to the identity; ``example_inputs``
    (default: shaped like ``metadata["input_shape"]``) trace the model. Checked first, undone on failure."""
    if example_inputs is None:
        shape = metadata.get("input_shape")
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
            raise PlanError("a channel plan needs example_inputs= (the plan records no valid input_shape)")
        example_inputs = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    round_to = metadata.get("round_to")
    removed_blocks = metadata.get("removed_blocks") or []
    if not isinstance(removed_blocks, list) or not all(isinstance(n, str) for n in removed_blocks):
        raise PlanError("plan metadata 'removed_blocks' must be a list of module names")
    snapshot = ModelSnapshot(model)
    try:
        structure = ChannelStructure(model, example_inputs, round_to=round_to)
        keys = {g.key: g.num_units for g in structure.groups}
        for name, units in numels.items():
            if name not in keys:
                raise PlanError(f"the plan names channel group {name!r} but the model has no such prunable group")
            if keys[name] != units:
                raise PlanError(f"group {name!r} has {keys[name]} units but the plan was made for {units}")
        blocks = {}
        if removed_blocks:  # depth (agent="n2n"): found on the unmasked model, masked after the channels
            blocks = {b.name: b for b in find_removable_blocks(model, example_inputs)}
            missing = [n for n in removed_blocks if n not in blocks]
            if missing:
                raise PlanError(f"the plan removes block(s) {missing} but the model has no such removable block")
        apply_channel_plan(model, counts, structure=structure)
        if removed_blocks:
            for name in removed_blocks:
                mask_block(blocks[name])
    except BaseException:
        snapshot.restore()
        raise
