"""Final application of a channel plan through torch.nn.utils.prune, and physical compaction."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..inputs import record_example
from ..methods import ChannelMask
from ..snapshot import ModelSnapshot
from ._util import (ChannelPruningError, clear_attention_caches, describe_failure, primary_tensor, prune_hooks,
                    remove_prune_hooks, restore_training, run_model, training_flags)
from .counting import count_macs_params
from .groups import ChannelGroup
from .hard import classifier_in_features, hard_prune, sync_timm_metadata
from .norms import MaskedNormStatistics, remove_norm_hooks
from .structure import ChannelStructure

__all__ = ["apply_channel_plan", "ChannelPlanResult", "compact"]


@dataclass
class ChannelPlanResult:
    """What :func:`apply_channel_plan` did.

    Attributes:
        counts: ``{group key: units removed}`` as applied (after rounding/capping).
        channels: ``{group key: root-layer channel indices removed}``.
        tensors: qualified names of the tensors that received a :class:`ChannelMask`.
        excluded: ``{key: reason}`` of groups the structure left out.
        macs, params: ``(before, after)`` from the structure's arithmetic cost model.
        exact: False when an applied group's masks only approximate removal (LayerNorm...).
        structure: the :class:`ChannelStructure` used (reusable for :func:`compact` bookkeeping).
    """

    counts: Dict[str, int]
    channels: Dict[str, List[int]]
    tensors: List[str]
    excluded: Dict[str, str]
    macs: Tuple[int, int]
    params: Tuple[int, int]
    exact: bool
    structure: ChannelStructure = field(repr=False)


def _masks_for(groups_counts) -> Dict[Tuple[int, str], Tuple[nn.Module, str, str, Dict[int, set]]]:
    per_tensor: Dict[Tuple[int, str], Tuple[nn.Module, str, str, Dict[int, set]]] = {}
    for g, n in groups_counts:
        if n <= 0:
            continue
        for s in g.slices:
            pos = s.pos_by_rank[:s.ptr[n]].tolist()  # positions of the n first-ranked units
            if not pos:
                continue
            key = (id(s.module), s.tensor_name)
            entry = per_tensor.setdefault(key, (s.module, s.module_name, s.tensor_name, {}))
            entry[3].setdefault(s.dim, set()).update(pos)
    return per_tensor


def apply_channel_plan(model: nn.Module, plan: Mapping, example_inputs=None, *,
                       structure: Optional[ChannelStructure] = None, strict: bool = True,
                       exact_norms: Optional[bool] = None, **structure_kwargs) -> ChannelPlanResult:
    """Mask the channels a plan removes, through torch.nn.utils.prune (one :class:`ChannelMask` per tensor).

    Args:
        model: the model to prune in place.
        plan: ``{group key: n}`` -- ``n`` an int (units removed) or a float in [0, 1] (fraction
            of the group). Keys are :attr:`ChannelGroup.key` (``"layer1.0.conv1:out"``,
            ``"blocks.0.attn:heads"``) or the name of any output layer of a group. Which units
            go is re-derived deterministically from the importance ranking, so the same
            plan on the same weights always removes the same channels.
        example_inputs: needed unless ``structure`` is given.
        structure: a :class:`ChannelStructure` of this model (e.g. the one the search used);
            its in-place masks are restored first. Otherwise one is built with
            ``structure_kwargs`` (``importance``, ``exclude``, ``round_to``, ...).
        strict: unknown or excluded keys raise (``KeyError``); with False they are skipped and
            reported in ``excluded``.
        exact_norms: register a :class:`MaskedNormStatistics` forward hook on the LayerNorm /
            GroupNorm members of the applied groups (it reads their ``weight_mask``), so the
            masked model computes what the compacted one will. Defaults to the structure's
            setting. The hook is not part of the prune API; :func:`compact` removes it.

    Every tensor of every affected group is masked -- output rows and bias of the
    producers, norm weights and biases, the consumers' input columns, unwrapped parameters
    (cls tokens, position embeddings, layer scales) -- so the masked model computes what
    the compacted model computes (exactly for groups with ``exact=True``). A tensor masked
    along two dims by two groups gets one combined mask.
    """
    if structure is None:
        if example_inputs is None:
            raise ValueError("apply_channel_plan needs example_inputs (or a structure)")
        structure = ChannelStructure(model, example_inputs, **structure_kwargs)
    elif structure.model is not model:
        raise ValueError("structure was built for a different model")
    structure.restore()
    skipped: Dict[str, str] = {}
    if not strict:
        clean = {}
        for k, v in plan.items():
            try:
                structure.group(k)
                clean[k] = v
            except KeyError as e:
                skipped[str(k)] = str(e).strip('"')
        plan = clean
    counts = structure.resolve_plan(plan)
    before = structure.cost(np.zeros_like(counts))
    after = structure.cost(counts)
    todo = [(g, int(counts[g.index])) for g in structure.groups if counts[g.index] > 0]
    tensors = []
    with torch.no_grad():
        for module, mname, tname, dims in _masks_for(todo).values():
            ChannelMask.apply(module, tname, channels={d: sorted(p) for d, p in dims.items()})
            tensors.append(f"{mname}.{tname}" if mname else tname)
    if exact_norms is None:
        exact_norms = structure.exact_norms
    if exact_norms:
        for g, _ in todo:
            for _, module, kind in g._norms:
                if not any(isinstance(h, MaskedNormStatistics) for h in module._forward_hooks.values()):
                    module.register_forward_hook(MaskedNormStatistics(kind))
    if todo:  # compact(model) later needs no example: it was pruned with this one
        record_example(model, structure.example_inputs)
    excluded = {e.key: e.reason for e in structure.excluded}
    excluded.update(skipped)
    return ChannelPlanResult(counts={g.key: n for g, n in todo},
                             channels={g.key: g.removed_channels(n) for g, n in todo},
                             tensors=sorted(tensors), excluded=excluded, macs=(before[0], after[0]), params=(before[1], after[1]),
                             exact=all(g.exact and (exact_norms or not g._norms) for g, _ in todo),
                             structure=structure)


def _dead_units(group: ChannelGroup, masks: Dict[Tuple[int, str], torch.Tensor]) -> Tuple[List[int], int]:
    """Units whose every member slice is masked to zero; also how many units are only partly masked."""
    U = group.num_units
    dead = torch.ones(U, dtype=torch.bool)
    any_dead = torch.zeros(U, dtype=torch.bool)
    for s in group.slices:
        mask = masks.get((id(s.module), s.tensor_name))
        if mask is None:
            dead[:] = False
            continue
        other = [d for d in range(mask.dim()) if d != s.dim]
        zero = (mask.abs().sum(dim=other) == 0) if other else (mask == 0)
        pos_zero = zero[s.positions]
        per_unit_alive = torch.zeros(U, dtype=torch.long).index_add_(0, s.units, (~pos_zero).long())
        per_unit_dead = torch.zeros(U, dtype=torch.long).index_add_(0, s.units, pos_zero.long())
        dead &= per_unit_alive == 0
        any_dead |= per_unit_dead > 0
    partial = int((any_dead & ~dead).sum())
    units = dead.nonzero().flatten().tolist()
    if len(units) >= U:  # torch-pruning cannot remove every channel of a layer
        units = units[:U - 1]
    return units, partial


@torch.no_grad()
def _forward(model, example_inputs):
    return primary_tensor(run_model(model, example_inputs))


def compact(model: nn.Module, example_inputs, *, exclude=None, exclude_classifier: bool = True,
            heads: bool = True, timeout: Optional[float] = 60.0, group_timeout: Optional[float] = 20.0,
            check: bool = True, tolerance: float = 1e-4) -> dict:
    """Physically remove every channel a model's masks remove, in place (same model object).

    Works on models pruned by :func:`apply_channel_plan` and on models whose state_dict (with
    ``weight_orig``/``weight_mask``) was loaded into a model carrying the same prune hooks.
    Only prune masks count: the in-place zeros of a live :class:`ChannelStructure` are not
    masks (apply the plan first, or ``restore()``).

    Steps: record every prune mask, ``prune.remove`` all hooks (torch-pruning cannot prune a
    re-parametrised tensor), rebuild the channel groups, read each group's dead units from
    the masks (a unit is dead when *all* its slices are masked; units only partly masked
    stay, with their zeros), remove them with torch-pruning (heads with our own code,
    updating ``num_heads``/``attn_dim``), and compare with the masked model's output. If
    torch-pruning breaks the model, the model is put back (hook-free, masks baked in) and
    the offending groups are found by bisection and left unpruned; they are reported.

    Returns a dict: ``macs_before/params_before`` (mask-aware) and ``macs_after/params_after``,
    ``removed`` (``{group key: units}``), ``partial`` (groups with partly masked units),
    ``failed`` (``{key: reason}``), ``excluded`` (groups the structure left out),
    ``max_abs_diff`` (masked vs compacted output), ``exact`` and ``seconds``.
    """
    started = time.perf_counter()
    flags = training_flags(model)
    undo = ModelSnapshot(model)   # a compact that raises leaves the model as it found it, hooks and all
    model.eval()
    try:
        macs_before, params_before = count_macs_params(model, example_inputs)
        reference = _forward(model, example_inputs)
        reference = None if reference is None else reference.detach().clone()
        masks = remove_prune_hooks(model)
        hooked_norms, norm_hooks = _rehook_norms_on_zeros(model)
        classifier_features = classifier_in_features(model)
        structure = ChannelStructure(model, example_inputs, exclude=exclude, exclude_classifier=exclude_classifier,
                                     heads=heads, timeout=timeout, group_timeout=group_timeout,
                                     exact_norms=norm_hooks > 0, validate=False, _rank=False)
        plan, partial = _dead_units_per_group(structure, masks)
        failed: Dict[str, str] = {}
        removal = _Removal(model, structure, example_inputs, reference if check else None, tolerance, group_timeout)
        plan, diff = removal.remove(plan, failed)
        for module, _ in hooked_norms:  # keep the hook only where channels are still zeroed
            if not bool(_zeroed_channels(module)().any()):
                remove_norm_hooks(module)
        sync_timm_metadata(model, classifier_features)
        clear_attention_caches(model)
        macs_after, params_after = count_macs_params(model, example_inputs)
        leftover = prune_hooks(model)
        if leftover:
            raise ChannelPruningError(f"prune hooks left on {[n for n, _, _ in leftover][:5]}")
    except BaseException:
        undo.restore()
        raise
    finally:
        restore_training(flags)
    inexact = [g.key for g, _ in plan if not g.exact]
    if failed or inexact:  # exact or loud: never a silent partial result
        warnings.warn(f"compact: {len(failed)} group(s) could not be removed and stay masked at full size "
                      f"{sorted(failed)[:4]}; {len(inexact)} removed group(s) are not exact (masked != compacted) "
                      f"{inexact[:4]}; MACs after compaction {macs_after:,}, where the masks counted {macs_before:,}",
                      UserWarning, stacklevel=2)
    return {"macs_before": macs_before, "params_before": params_before,
            "macs_after": macs_after, "params_after": params_after,
            "removed": {g.key: len(u) for g, u in plan}, "partial": partial, "failed": failed,
            "excluded": {e.key: e.reason for e in structure.excluded},
            "max_abs_diff": diff, "exact": all(g.exact for g, _ in plan),
            "seconds": time.perf_counter() - started}


def _rehook_norms_on_zeros(model: nn.Module):
    """Norm hooks re-registered on the baked-in zeros: until a group is physically removed, its zeroed
    norm channels must stay out of the statistics, also when torch-pruning fails on the group and it
    stays masked; the dead channels are read from the zero weight and bias, which follow the layer's
    shape. Returns (the hooked norms with their kind, the number of hooks removed)."""
    hooked_norms = [(m, h.kind) for m in model.modules() for h in m._forward_hooks.values()
                    if isinstance(h, MaskedNormStatistics)]
    norm_hooks = remove_norm_hooks(model)
    for module, kind in hooked_norms:
        module.register_forward_hook(MaskedNormStatistics(kind, _zeroed_channels(module)))
    return hooked_norms, norm_hooks


def _dead_units_per_group(structure: ChannelStructure, masks) -> Tuple[List[Tuple[ChannelGroup, List[int]]],
                                                                         Dict[str, int]]:
    """(group, units every mask removes) for each group with some, and the partly masked units per group."""
    plan: List[Tuple[ChannelGroup, List[int]]] = []
    partial: Dict[str, int] = {}
    for g in structure.groups:
        units, n_partial = _dead_units(g, masks)
        if n_partial:
            partial[g.key] = n_partial
        if units:
            plan.append((g, units))
    return plan, partial


def _output_mismatch(out, reference: torch.Tensor, items, tolerance: float) -> Tuple[Optional[str], float]:
    """Why the compacted output is not the masked one (None when it is), and their largest difference."""
    if out is None or out.shape != reference.shape:
        return f"output shape changed to {None if out is None else tuple(out.shape)}", math.inf
    if not bool(torch.isfinite(out).all()):
        return "output is not finite", math.inf
    d = float((out.float() - reference.float()).abs().max()) if out.numel() else 0.0
    scale = max(1.0, float(reference.float().abs().max()))
    if all(g.exact for g, _ in items) and d > tolerance * scale:
        return f"compacted output differs from the masked one by {d:.3g}", math.inf
    return None, d


@dataclass
class _Removal:
    """Physical removal of channel groups, checked against the masked model's output (``reference``;
    ``None``: not checked) and undone when the check fails."""
    model: nn.Module
    structure: ChannelStructure
    example_inputs: object
    reference: Optional[torch.Tensor]
    tolerance: float
    group_timeout: Optional[float]

    def attempt(self, items, keep: bool = True) -> Tuple[bool, float, str]:
        """Remove ``items``; keep the result only if it checks out and ``keep``."""
        state = ModelSnapshot(self.model)
        try:
            dg = self.structure._fresh_graph()
            hard_prune(dg, items, group_timeout=self.group_timeout, model_name=type(self.model).__name__)
            clear_attention_caches(self.model)
            out = _forward(self.model, self.example_inputs)
        except Exception as e:
            state.restore()
            return False, math.inf, describe_failure(e)
        bad, diff = None, 0.0
        if self.reference is not None:
            bad, diff = _output_mismatch(out, self.reference, items, self.tolerance)
        if bad is not None or not keep:
            state.restore()
        return bad is None, diff, bad or ""

    def remove(self, plan, failed: Dict[str, str]):
        """Remove every group of ``plan`` that compacts cleanly (bisecting when some do not); the others
        go to ``failed``. Returns (what was removed, the largest output difference)."""
        ok, diff, why = self.attempt(plan) if plan else (True, 0.0, "")
        if ok:
            return plan, diff
        good = _find_good(plan, lambda items: self.attempt(items, keep=False), failed, why)
        ok, diff, why = self.attempt(good) if good else (True, 0.0, "")
        if not ok:  # should not happen: every part passed alone
            for g, _ in good:
                failed.setdefault(g.key, why)
            good = []
        return good, diff


def _zeroed_channels(module: nn.Module):
    """Dead channels of a norm whose masks were baked in: weight and bias both zero."""
    def dead():
        zero = module.weight == 0
        return zero & (module.bias == 0) if module.bias is not None else zero
    return dead


def _find_good(items, attempt, failed: Dict[str, str], why: str):
    """Bisect ``items`` into the groups that compact cleanly; record the others in ``failed``."""
    if len(items) == 1:
        failed[items[0][0].key] = why
        return []
    half = len(items) // 2
    good = []
    for part in (items[:half], items[half:]):
        ok, _, why_part = attempt(part)
        if ok:  # trials are undone; the final attempt redoes everything that passed
            good.extend(part)
        else:
            good.extend(_find_good(part, attempt, failed, why_part))
    return good
