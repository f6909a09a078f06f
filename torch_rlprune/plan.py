"""A pruning plan: the portable result of a search, and how to apply it to any model."""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch
from torch.nn.utils import prune
from torch import nn

from .methods import PolicyUnstructured
from .safety import ModelSnapshot

__all__ = ["PruningPlan", "apply_plan", "PlanError"]

PLAN_FORMAT_VERSION = 1
PLAN_BUDGETS = ("params", "macs", "latency")
PLAN_STRUCTURES = ("unstructured", "channel")


class PlanError(ValueError):
    """A plan file or dict that is not a valid plan, or does not fit the model."""


@dataclass
class PruningPlan:
    """Per-tensor amounts found by a search.

    Attributes:
        amounts: qualified parameter name (``"layer1.0.conv1.weight"``) -> fraction of that
            tensor's entries removed, counting entries an earlier mask already removed.
        numels: entries per tensor, to check that a model the plan is applied to matches.
        target: the fraction of the budget's cost the plan was searched for.
        sparsity: the fraction it achieves (of the budget's cost; for ``budget="latency"`` of
            the latency measured after compact, see ``metadata["latency"]["measured"]``; a
            multi-target search's plans carry the calibrated prediction).
        budget, structure, agent, reward, seed: how it was searched.
        score: the best reward, and ``baseline_score`` the unpruned model's.
    """

    amounts: Dict[str, float]
    numels: Dict[str, int]
    target: float
    sparsity: float
    budget: str = "params"
    structure: str = "unstructured"
    agent: str = "amc"
    reward: str = "fidelity"
    seed: Optional[int] = None
    score: Optional[float] = None
    baseline_score: Optional[float] = None
    episodes: Optional[int] = None
    metadata: dict = field(default_factory=dict)
    version: int = PLAN_FORMAT_VERSION

    def counts(self) -> Dict[str, int]:
        """Exact number of entries removed per tensor."""
        return {name: int(round(a * self.numels[name])) for name, a in self.amounts.items()}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data) -> "PruningPlan":
        """Build a plan from untrusted data, checking every field's type and range."""
        if not isinstance(data, dict):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
        required = {"amounts", "numels", "target", "sparsity"}
        missing = required - set(data)
        if missing:
            raise PlanError(f"plan is missing field(s) {sorted(missing)}")
        allowed = set(cls.__dataclass_fields__)
        unknown = set(data) - allowed
        if unknown:
            raise PlanError(f"plan has unknown field(s) {sorted(unknown)}")
        if data.get("version", PLAN_FORMAT_VERSION) != PLAN_FORMAT_VERSION:
            raise PlanError(f"plan format version {data.get('version')!r} is not supported "
                            f"(this library reads version {PLAN_FORMAT_VERSION})")
        amounts, numels = data["amounts"], data["numels"]
        if not isinstance(amounts, dict) or not isinstance(numels, dict) or set(amounts) != set(numels):
            raise PlanError("plan 'amounts' and 'numels' must be objects with the same keys")
        for name, a in amounts.items():
            if not isinstance(name, str) or isinstance(a, bool) or not isinstance(a, numbers.Real) \
                    or not math.isfinite(a) or not 0.0 <= a <= 1.0:
                raise PlanError(f"plan amount for {name!r} must be a number in [0, 1], got {a!r}")
        for name, n in numels.items():
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise PlanError(f"plan numel for {name!r} must be a positive integer, got {n!r}")
        for key in ("target", "sparsity"):
            v = data[key]
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v <= 1.0:
                raise PlanError(f"plan {key!r} must be a number in [0, 1], got {v!r}")
        for key in ("budget", "structure", "agent", "reward"):
            if key in data and not isinstance(data[key], str):
                raise PlanError(f"plan {key!r} must be a string")
        if data.get("budget", "params") not in PLAN_BUDGETS:
            raise PlanError(f"plan 'budget' must be one of {PLAN_BUDGETS}, got {data['budget']!r}")
        if data.get("structure", "unstructured") not in PLAN_STRUCTURES:
            raise PlanError(f"plan 'structure' must be one of {PLAN_STRUCTURES}, got {data['structure']!r}")
        if data.get("budget") == "latency" and data.get("structure") != "channel":
            raise PlanError("plan 'budget' 'latency' comes from channel searches only (structure 'channel')")
        for key in ("seed", "episodes"):
            v = data.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise PlanError(f"plan {key!r} must be an integer or null, got {v!r}")
        for key in ("score", "baseline_score"):
            v = data.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)):
                raise PlanError(f"plan {key!r} must be a finite number or null, got {v!r}")
        if "metadata" in data and not isinstance(data["metadata"], dict):
            raise PlanError("plan 'metadata' must be an object")
        return cls(**{k: data[k] for k in data})

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path) -> "PruningPlan":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PlanError(f"{path}: not a valid JSON plan ({err})") from None
        except RecursionError:
            raise PlanError(f"{path}: not a valid JSON plan (nested too deeply)") from None
        except FileNotFoundError:
            raise PlanError(f"{path}: no such plan file") from None
        except IsADirectoryError:
            raise PlanError(f"{path}: a directory, not a plan file") from None
        return cls.from_dict(data)


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


def apply_plan(model: nn.Module, plan: PruningPlan, importance_scores: Optional[Dict[str, torch.Tensor]] = None,
               example_inputs: Optional[torch.Tensor] = None):
    """Prune ``model`` in place as ``plan`` says, through ``torch.nn.utils.prune``.

    Each tensor gets a :class:`PolicyUnstructured` hook removing its planned fraction of
    smallest-magnitude entries (or smallest ``importance_scores[name]``). Tensors that are
    already pruned keep their mask; the plan's fraction counts those entries. The whole
    plan is checked against the model before anything changes, and a failure part-way
    leaves the model as it was.

    A ``structure="channel"`` plan removes, per dependency group, its planned number of
    channels (the least important by group magnitude), masking every tensor of the group;
    ``example_inputs`` (default: shaped like the plan's ``metadata["input_shape"]``) trace
    the model to find the groups. The residual blocks listed in ``metadata["removed_blocks"]``
    (depth plans, ``agent="n2n"``) are masked to the identity with
    :func:`~torch_rlprune.depth.mask_block`; :func:`~torch_rlprune.compact` then removes them.

    Returns:
        the same ``model``.
    """
    if not isinstance(plan, PruningPlan):
        raise TypeError(f"plan must be a PruningPlan, got {type(plan).__name__}")
    if plan.structure == "channel":
        _apply_channel(model, plan, example_inputs)
        return model
    importance_scores = importance_scores or {}
    resolved, names_of = [], {}
    for name, amount in plan.amounts.items():
        module, param_name, tensor = _resolve(model, name)
        if id(tensor) in names_of:
            raise PlanError(f"the plan names {names_of[id(tensor)]!r} and {name!r}, which are one tied tensor in "
                            "this model; a shared weight takes one amount")
        names_of[id(tensor)] = name
        if tensor.numel() != plan.numels[name]:
            raise PlanError(f"{name!r} has {tensor.numel()} entries but the plan was made for "
                            f"{plan.numels[name]}")
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
    return model


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


def _apply_channel(model: nn.Module, plan: PruningPlan, example_inputs) -> None:
    from .channel import ChannelStructure, apply_channel_plan

    if example_inputs is None:
        shape = plan.metadata.get("input_shape")
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
            raise PlanError("a channel plan needs example_inputs= (the plan records no valid input_shape)")
        example_inputs = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    round_to = plan.metadata.get("round_to")
    removed_blocks = plan.metadata.get("removed_blocks") or []
    if not isinstance(removed_blocks, list) or not all(isinstance(n, str) for n in removed_blocks):
        raise PlanError("plan metadata 'removed_blocks' must be a list of module names")
    snapshot = ModelSnapshot(model)
    try:
        structure = ChannelStructure(model, example_inputs, round_to=round_to)
        keys = {g.key: g.num_units for g in structure.groups}
        for name, units in plan.numels.items():
            if name not in keys:
                raise PlanError(f"the plan names channel group {name!r} but the model has no such prunable group")
            if keys[name] != units:
                raise PlanError(f"group {name!r} has {keys[name]} units but the plan was made for {units}")
        blocks = {}
        if removed_blocks:  # depth (agent="n2n"): found on the unmasked model, masked after the channels
            from .depth import find_removable_blocks

            blocks = {b.name: b for b in find_removable_blocks(model, example_inputs)}
            missing = [n for n in removed_blocks if n not in blocks]
            if missing:
                raise PlanError(f"the plan removes block(s) {missing} but the model has no such removable block")
        apply_channel_plan(model, plan.counts(), structure=structure)
        if removed_blocks:
            from .depth import mask_block

            for name in removed_blocks:
                mask_block(blocks[name])
    except BaseException:
        snapshot.restore()
        raise
