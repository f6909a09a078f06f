"""A plan's numbers applied to a model through ``torch.nn.utils.prune``: a fraction per tensor, or a
number of channels per dependency group (and residual blocks masked to the identity).

Everything is checked against the model before a mask is set, and a failure part-way leaves the
model as it was. :func:`torch_rlprune.plan.apply_plan` chooses between the two by the plan's structure.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import nn
from torch.nn.utils import prune

from .channel import ChannelStructure, apply_channel_plan
from .depth import find_removable_blocks, mask_block
from .methods import PolicyUnstructured
from .snapshot import ModelSnapshot

__all__ = ["PlanError", "apply_tensor_amounts", "apply_group_counts", "tie_shared_masks", "keep_inner_masks_live",
           "MAX_TRACE_ELEMENTS"]

# A channel plan without example_inputs= traces the model on two random samples shaped like its recorded
# ``input_shape``, an untrusted number that sets an allocation. Real inputs are far smaller than this cap
# (3x224x224 = 150,528 elements, 3x1024x1024 = 3.1M, a 256**3 volume = 16.8M); at 2**26 the two samples
# take 512 MiB in float32, where a hostile [3, 65536, 65536] would ask for about 100 GB.
MAX_TRACE_ELEMENTS = 2 ** 26


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
    resolved, names_of, shapes = [], {}, {}
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
        shapes[name] = tuple(tensor.shape)
    importance_scores = _check_importance_scores(importance_scores, shapes)
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


def _check_importance_scores(importance_scores, shapes: Dict[str, tuple]) -> Dict[str, torch.Tensor]:
    """``importance_scores`` as ``{name: tensor}``, every entry one the plan uses: a score that would be
    ignored (an unknown name, a ``(module, name)`` key) is an error, not a silent magnitude ranking."""
    if importance_scores is None:
        return {}
    if not isinstance(importance_scores, dict):
        raise ValueError(f"importance_scores must be a dict of parameter name -> tensor, "
                         f"got {type(importance_scores).__name__}")
    example = next(iter(shapes), "layer.weight")
    for key, scores in importance_scores.items():
        if not isinstance(key, str):
            form = "a (module, name) tuple" if isinstance(key, tuple) else f"a {type(key).__name__}"
            raise ValueError(f"importance_scores: keys are the plan's parameter names (e.g. {example!r}), "
                             f"got {form}")
        if key not in shapes:
            raise ValueError(f"importance_scores: {key!r} is not a tensor the plan prunes "
                             f"(it prunes {sorted(shapes)[:6]}{' ...' if len(shapes) > 6 else ''})")
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != shapes[key]:
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"importance_scores[{key!r}] must be a tensor of shape {shapes[key]}, got {got}")
    return importance_scores


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


def _check_channel_metadata(metadata, example_inputs=None) -> None:
    """Refuse the metadata of a channel plan (untrusted, like the file it came from) that applying it would
    misuse, with a :class:`PlanError` naming the field: ``input_shape`` (only read without
    ``example_inputs``), ``round_to`` and ``removed_blocks``."""
    if not isinstance(metadata, dict):
        raise PlanError(f"plan 'metadata' must be an object, got {type(metadata).__name__}")
    if example_inputs is None:
        shape = metadata.get("input_shape")
        if shape is None:
            raise PlanError("a channel plan needs example_inputs= (the plan records no input_shape)")
        if not (isinstance(shape, list) and shape and
                all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
            raise PlanError(f"plan metadata 'input_shape' must be a list of positive integers, got {shape!r}; "
                            "or pass example_inputs=")
        if math.prod(shape) > MAX_TRACE_ELEMENTS:
            raise PlanError(f"plan metadata 'input_shape' {shape} is {math.prod(shape):,} elements a sample, more "
                            f"than the {MAX_TRACE_ELEMENTS:,} a plan may ask to trace with; pass example_inputs=")
    round_to = metadata.get("round_to")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise PlanError(f"plan metadata 'round_to' must be null or a positive integer, got {round_to!r}")
    removed_blocks = metadata.get("removed_blocks") or []
    if not isinstance(removed_blocks, list) or not all(isinstance(n, str) for n in removed_blocks):
        raise PlanError("plan metadata 'removed_blocks' must be a list of module names")


def apply_group_counts(model: nn.Module, numels: Dict[str, int], counts: Dict[str, int], metadata: dict,
                       example_inputs=None) -> None:
    """Remove ``counts[key]`` channels of every dependency group (its least important, by group magnitude)
    and mask the residual blocks ``metadata["removed_blocks"]`` names to the identity; ``example_inputs``
    (default: shaped like ``metadata["input_shape"]``) trace the model. Checked first, undone on failure."""
    _check_channel_metadata(metadata, example_inputs)
    if example_inputs is None:
        example_inputs = torch.randn(2, *metadata["input_shape"], generator=torch.Generator().manual_seed(0))
    round_to = metadata.get("round_to")
    removed_blocks = metadata.get("removed_blocks") or []
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
