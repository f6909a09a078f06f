"""``ChannelStructure``: the channel groups of a model, cheap undoable masks, and their cost.

This is what a structured-pruning search drives. One MDP step acts on one group
(``set_removed(group_index, n)``: the ``n`` least important units of that group are
zeroed in every member tensor, in place, touching only what changes), an episode ends
with ``restore()`` (every tensor back bit for bit), and the budget is arithmetic:
``cost(counts)`` gives the model's MACs and parameters for any vector of per-group
removed counts without a forward pass. No model copy is ever made.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..masks import SliceMask
from ..snapshot import ModelSnapshot
from ..tensors import resolve_exclude, tied_across_modules
from ._util import (clear_attention_caches, describe_failure, primary_tensor, remove_prune_hooks, restore_training,
                    run_model, training_flags)
from .cost import attention_terms, mac_terms, parameter_terms
from .discovery import classifier_names, discover_groups
from .graph import build_graph
from .groups import ChannelGroup, ExcludedGroup
from .hard import hard_prune
from .norms import MaskedNormStatistics, remove_norm_hooks

__all__ = ["ChannelStructure"]


def _sorted_exclude(model: nn.Module, exclude) -> List[str]:
    # The same rules (and messages) as unstructured pruning's `exclude`.
    return sorted(resolve_exclude(model, exclude))


def refuse_tied_weights(model: nn.Module) -> None:
    """Channel removal cannot keep a tie: the two holders of one weight sit in different dependency
    groups (an LM's embedding columns and its head's rows), so removing channels of one rewrites the
    other, and ``compact`` would give each its own tensor. Refused before anything is traced or touched."""
    tied = tied_across_modules(model)
    if tied:
        pairs = "; ".join(" = ".join(group) for group in tied[:3])
        raise ValueError(f"structure='channel': the model ties weights ({pairs}); removing channels would "
                         "untie them. Use structure='unstructured' (a tied weight is one unit there) or untie "
                         "them first")


class ChannelStructure:
    """The prunable channel groups of ``model`` and in-place, undoable masks over them.

    Building it traces the model once, builds torch-pruning's dependency graph, turns each
    group into tensor slices, ranks every group's units once by ``importance`` and
    precomputes the arithmetic cost model. Groups torch-pruning cannot handle are left out
    and listed in :attr:`excluded` with the reason; the rest stay usable.

    Args:
        model: the model (any ``nn.Module``; timm models get their classifier excluded
            automatically through ``get_classifier()``).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        importance: any torch-pruning importance (``tp.importance.*``); default
            ``GroupMagnitudeImportance()``. When it fails on a group, the group falls back to
            group L2 magnitude and says so in ``importance_note``.
        exclude: modules (names or objects) whose output channels must stay; their input
            channels still shrink with the layer feeding them (torch-pruning's ``ignored_layers``
            convention).
        exclude_classifier: exclude ``model.get_classifier()`` (default True).
        round_to: what remains of each group's root layer is a multiple of this many channels.
        heads: prune timm ``Attention`` blocks by whole heads (default True); with False their
            qkv projections are not pruned at all.
        timeout: seconds for graph building and group enumeration together (SIGALRM, main
            thread only); past it a :class:`ChannelTimeoutError` names the model and layer.
        group_timeout: seconds for one group; a group that takes longer is excluded.
        exact_norms: while channels are masked, LayerNorm/GroupNorm members recompute their
            statistics over the alive channels (:class:`MaskedNormStatistics` forward hooks,
            removed by :meth:`restore`), which makes their groups exact. With False those
            groups are ``exact=False`` (masked != compacted; measured up to 0.24 max abs diff).
        validate: after building, remove ``validate_fraction`` of every group for real on the
            model itself (undone exactly afterwards, no copy), compare with the masked model
            and exclude the groups that break (see :meth:`verify`); results in
            :attr:`validation`. Costs about as much as building.

    Attributes:
        groups: the :class:`ChannelGroup` s, in execution order of their first layer.
        excluded: :class:`ExcludedGroup` s (classifier, user exclusions, what torch-pruning
            cannot do, what failed validation), each with its reason.
        counts: units currently removed per group (what :meth:`set_removed` applied).
        dense_macs, dense_params: the unpruned cost (per sample), as :meth:`cost` counts it.
        validation: the :meth:`verify` report of construction (None with ``validate=False``).
        seconds: wall time of tracing, graph building, grouping, ranking, total.

    In a search, move between episodes with :meth:`set_counts` (only the units whose state
    changes are written); :meth:`restore` copies every touched tensor back, so call it once
    at the end (or before :func:`apply_channel_plan`, which does it itself). The structure
    describes the model as built: after :func:`compact` (or any change of shapes) build a
    new one.
    """

    def __init__(self, model: nn.Module, example_inputs, *, importance=None, exclude=None,
                 exclude_classifier: bool = True, round_to: Optional[int] = None, heads: bool = True,
                 timeout: Optional[float] = 60.0, group_timeout: Optional[float] = 20.0,
                 exact_norms: bool = True, validate: bool = True, validate_fraction: float = 0.5,
                 _rank: bool = True):
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to must be a positive int, got {round_to!r}")
        refuse_tied_weights(model)
        started = time.perf_counter()
        self.model = model
        self.example_inputs = example_inputs
        self.timeout, self.group_timeout = timeout, group_timeout
        user_exclude = _sorted_exclude(model, exclude)
        self.classifier = classifier_names(model) if exclude_classifier else []
        self.exclude = user_exclude
        if importance is None and _rank:
            import torch_pruning as tp
            importance = tp.importance.GroupMagnitudeImportance()
        self.importance = importance
        flags = training_flags(model)
        try:
            model.eval()
            with warnings.catch_warnings():
                # torch-pruning's concat shape inference warns this on deep graphs (Swin) and goes on
                # without a channel count: nothing the user can act on, so it does not reach them
                warnings.filterwarnings("ignore", message="Maximum recursive depth reached")
                found = discover_groups(model, example_inputs, importance=importance,
                                        exclude_out=self.classifier + user_exclude, heads=heads,
                                        timeout=timeout, group_timeout=group_timeout, rank=_rank,
                                        round_to=round_to, exact_norms=exact_norms)
        finally:
            restore_training(flags)
            clear_attention_caches(model)
        self._dg = found.DG
        self._dg_fresh = True
        self.groups: List[ChannelGroup] = found.groups
        self.excluded: List[ExcludedGroup] = found.excluded
        self.traces = found.traces
        self.attention = found.attention
        self.seconds = dict(found.seconds)
        self.exact_norms = exact_norms
        self._states: Dict[Tuple[int, str], SliceMask] = {}
        self._norm_hooks: Dict[int, object] = {}
        self.counts = np.zeros(len(self.groups), dtype=np.int64)
        self._build_cost_model()
        self.validation: Optional[dict] = None
        if validate:
            self.validation = self.verify(fraction=validate_fraction, exclude_failing=True)
        self.seconds["total"] = time.perf_counter() - started

    # ------------------------------------------------------------------ lookup
    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def exact(self) -> bool:
        """True when every group's masks compute exactly what removal computes."""
        return all(g.exact for g in self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)

    def __repr__(self) -> str:
        return (f"ChannelStructure({type(self.model).__name__}: {len(self.groups)} groups, "
                f"{len(self.excluded)} excluded, exact={self.exact})")

    def group(self, key: Union[int, str]) -> ChannelGroup:
        """A group by index, key (``"layer1.0.conv1:out"``), or the name of one of its output layers."""
        if isinstance(key, (int, np.integer)):
            return self.groups[int(key)]
        if not isinstance(key, str):
            raise TypeError(f"group keys are ints or strings, got {type(key).__name__}")
        index = self._key_index()
        if key in index:
            return self.groups[index[key]]
        for ex in self.excluded:
            if key == ex.key or key in ex.layers or f"{key}:out" == ex.key:
                raise KeyError(f"group {key!r} is excluded: {ex.reason}")
        import difflib
        close = difflib.get_close_matches(key, [g.key for g in self.groups], n=3)
        raise KeyError(f"no channel group {key!r}" + (f"; did you mean {close}?" if close else ""))

    def _key_index(self) -> Dict[str, int]:
        index = {}
        for g in self.groups:
            index[g.key] = g.index
            for alias in g._aliases:
                index.setdefault(alias, g.index)
                index.setdefault(f"{alias}:out", g.index)
        return index

    # ------------------------------------------------------------------ in-place masks
    def _state(self, module: nn.Module, name: str) -> SliceMask:
        key = (id(module), name)
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = SliceMask(module, name)
        return st

    @torch.no_grad()
    def set_removed(self, group_index: Union[int, str], n: int) -> int:
        """Zero the ``n`` least important units of one group in every member tensor, in place.

        Only the units between the previous and the new count are written. ``n`` is rounded
        (``round_to``) and capped so that at least one unit stays; returns the count applied.
        """
        g = self.group(group_index)
        n = g.effective(n)
        cur = int(self.counts[g.index])
        if n == cur:
            return n
        lo, hi = (cur, n) if n > cur else (n, cur)
        for s in g.slices:
            pos = s.pos_by_rank[s.ptr[lo]:s.ptr[hi]]
            if pos.numel() == 0:
                continue
            st = self._state(s.module, s.tensor_name)
            if n > cur:
                st.kill(s.dim, pos)
            else:
                st.revive(s.dim, pos)
        self.counts[g.index] = n
        if g._norms and n > 0:
            self._hook_norms(g)
        return n

    def _hook_norms(self, g: ChannelGroup) -> None:
        """Renormalise LayerNorm/GroupNorm members over alive channels while masks are active."""
        for _, module, kind in g._norms:
            if id(module) in self._norm_hooks or any(isinstance(h, MaskedNormStatistics)
                                                     for h in module._forward_hooks.values()):
                continue  # a persistent hook (apply_channel_plan) reads weight_mask, which we edit

            def dead(module=module):
                mask = module._buffers.get("weight_mask")
                if mask is not None:  # pruned through torch: our zeros are in the mask
                    return mask == 0
                st = self._states.get((id(module), "weight"))
                cnt = None if st is None else st.dead.get(0)
                return None if cnt is None else cnt > 0

            self._norm_hooks[id(module)] = module.register_forward_hook(MaskedNormStatistics(kind, dead))

    def set_fraction(self, group_index: Union[int, str], fraction: float) -> int:
        """``set_removed`` with ``round(fraction * num_units)``; returns the count applied."""
        g = self.group(group_index)
        return self.set_removed(g.index, g.units_for_fraction(fraction))

    def set_counts(self, counts: Union[Sequence[int], Mapping]) -> np.ndarray:
        """Set every group at once (a sequence in group order, or a plan mapping); returns what was applied."""
        target = self.resolve_plan(counts) if isinstance(counts, Mapping) else np.asarray(counts, dtype=np.int64)
        if target.shape != (len(self.groups),):
            raise ValueError(f"expected {len(self.groups)} counts, got shape {target.shape}")
        for i, n in enumerate(target):
            self.set_removed(i, int(n))
        return self.counts.copy()

    @torch.no_grad()
    def restore(self) -> None:
        """Put every touched tensor back exactly as it was (bit for bit)."""
        for st in self._states.values():
            st.restore()
        self._states.clear()
        for handle in self._norm_hooks.values():
            handle.remove()
        self._norm_hooks.clear()
        self.counts[:] = 0

    # ------------------------------------------------------------------ plans
    def resolve_plan(self, plan: Mapping) -> np.ndarray:
        """Per-group unit counts from ``{key: n or fraction}`` (ints are unit counts, floats in [0, 1]
        fractions of the group); keys are group keys or names of a group's output layers.
        Counts are rounded/capped as :meth:`set_removed` would."""
        if not isinstance(plan, Mapping):
            raise TypeError(f"a channel plan maps group keys to counts or fractions, got {type(plan).__name__}")
        counts = np.zeros(len(self.groups), dtype=np.int64)
        seen = {}
        for key, value in plan.items():
            g = self.group(key)
            if g.index in seen:
                raise ValueError(f"plan names group {g.key!r} twice ({seen[g.index]!r} and {key!r})")
            seen[g.index] = key
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"plan[{key!r}] must be an int (units) or a float fraction, got {value!r}")
            if isinstance(value, (float, np.floating)):
                n = g.units_for_fraction(float(value))
            else:
                n = int(value)
            counts[g.index] = g.effective(n)
        return counts

    def plan(self, counts: Optional[Sequence[int]] = None) -> Dict[str, int]:
        """``{group key: units removed}`` for the current (or given) counts, zeros omitted."""
        counts = self.counts if counts is None else np.asarray(counts)
        return {g.key: int(counts[g.index]) for g in self.groups if int(counts[g.index]) > 0}

    # ------------------------------------------------------------------ cost model
    def _build_cost_model(self) -> None:
        """Precompute MACs/params as arithmetic in alive counts per (tensor, dim).

        A Conv/Linear weight costs ``positions * kernel * alive(dim0) * alive(dim1)`` MACs per
        sample (summed over calls) and ``kernel * alive(dim0) * alive(dim1)`` parameters; any
        other tensor costs the product of its alive sizes. A timm attention block adds its
        score and value matmuls, ``2 * N^2 * head_dim * alive heads``; an ``nn.MultiheadAttention``
        adds its MACs as :func:`~.alive.multihead_attention_macs` counts them (a constant: no group
        reaches it). ``alive`` is the size minus the positions owned by the first ``n`` ranked
        units of each slice's group.
        """
        entries: Dict[Tuple[int, str, int], int] = {}
        sizes: List[int] = []

        def entry(module, name, dim, size) -> int:
            k = (id(module), name, dim)
            if k not in entries:
                entries[k] = len(sizes)
                sizes.append(int(size))
            return entries[k]

        sl_entry, sl_group, sl_ptr = [], [], []
        for g in self.groups:
            for s in g.slices:
                sl_entry.append(entry(s.module, s.tensor_name, s.dim, s.size))
                sl_group.append(g.index)
                sl_ptr.append(s.ptr)
        umax = max([g.num_units for g in self.groups], default=0)
        ptr = np.zeros((len(sl_ptr), umax + 1), dtype=np.int64)
        for i, p in enumerate(sl_ptr):
            ptr[i, :len(p)] = p
            ptr[i, len(p):] = p[-1]
        mac_coef, mac_e, mac_modules = mac_terms(self.traces, entry)
        att_coef, att_group, att_modules, att_const_terms = attention_terms(self.traces, self.groups)
        att_const = sum(v for _, v in att_const_terms)
        par_const, par_e, par_fixed = parameter_terms(self.model, entries)
        self._one = len(sizes)                    # a sentinel entry that is always 1
        self._sizes = np.array(sizes + [1], dtype=np.int64)
        self._sl_entry = np.array(sl_entry, dtype=np.int64)
        self._sl_group = np.array(sl_group, dtype=np.int64)
        self._ptr = ptr
        self._mac_coef = np.array(mac_coef, dtype=np.int64)
        self._mac_e = np.array(mac_e, dtype=np.int64).reshape(-1, 2)
        self._mac_modules, self._att_modules, self._att_const_terms = mac_modules, att_modules, att_const_terms
        self._entry_keys = set(entries)  # (id(module), tensor, dim) whose alive size the model tracks
        self._att_coef = np.array(att_coef, dtype=np.int64)
        self._att_group = np.array(att_group, dtype=np.int64)
        self._att_const = int(att_const)
        width = max([len(e) for e in par_e], default=1)
        self._par_const = np.array(par_const, dtype=np.int64)
        self._par_e = np.array([e + [self._one] * (width - len(e)) for e in par_e], dtype=np.int64).reshape(-1, width)
        self._par_fixed = int(par_fixed)
        self._units = np.array([g.num_units for g in self.groups], dtype=np.int64)
        self.dense_macs, self.dense_params = self._cost(np.zeros(len(self.groups), dtype=np.int64))
        for g in self.groups:
            c = np.zeros(len(self.groups), dtype=np.int64)
            c[g.index] = g.num_units
            m_, p_ = self._cost(c)
            g.macs, g.params = self.dense_macs - m_, self.dense_params - p_

    def _cost(self, counts: np.ndarray) -> Tuple[int, int]:
        alive = self._sizes.copy()
        if len(self._sl_entry):
            killed = self._ptr[np.arange(len(self._sl_entry)), counts[self._sl_group]]
            np.subtract.at(alive, self._sl_entry, killed)
        macs = 0
        if len(self._mac_coef):
            macs = int((self._mac_coef * alive[self._mac_e[:, 0]] * alive[self._mac_e[:, 1]]).sum())
        if len(self._att_coef):
            macs += int((self._att_coef * (self._units[self._att_group] - counts[self._att_group])).sum())
        macs += self._att_const
        params = self._par_fixed
        if len(self._par_const):
            params += int((self._par_const * np.prod(alive[self._par_e], axis=1)).sum())
        return macs, params

    def cost(self, counts: Optional[Union[Sequence[int], Mapping]] = None) -> Tuple[int, int]:
        """``(MACs per sample, parameters)`` of the model with ``counts`` units removed per group
        (default: the current counts), by arithmetic -- no forward pass. Counts are rounded and
        capped as :meth:`set_removed` would."""
        if counts is None:
            c = self.counts.copy()
        elif isinstance(counts, Mapping):
            c = self.resolve_plan(counts)
        else:
            c = np.asarray(counts, dtype=np.int64)
            if c.shape != (len(self.groups),):
                raise ValueError(f"expected {len(self.groups)} counts, got shape {c.shape}")
            c = np.array([g.effective(int(n)) for g, n in zip(self.groups, c)], dtype=np.int64)
        return self._cost(c)

    def group_costs(self) -> List[Dict[str, int]]:
        """Per group: ``macs``/``params`` it controls (removed with all its units) and its sizes."""
        return [{"key": g.key, "macs": g.macs, "params": g.params, "num_units": g.num_units,
                 "num_channels": g.num_channels} for g in self.groups]

    # ------------------------------------------------------------------ graph
    def _fresh_graph(self):
        """A dependency graph of the model as it is now (torch-pruning state is per model shape)."""
        if self._dg_fresh:
            self._dg_fresh = False
            return self._dg
        dg, _ = build_graph(self.model, self.example_inputs, self.timeout)
        clear_attention_caches(self.model)
        return dg

    # ------------------------------------------------------------------ validation
    def _soft_output(self, counts: np.ndarray) -> torch.Tensor:
        saved = self.counts.copy()
        self.restore()
        try:
            self.set_counts(counts)
            with torch.no_grad():
                return primary_tensor(run_model(self.model, self.example_inputs)).detach().clone()
        finally:
            self.restore()
            if saved.any():
                self.set_counts(saved)

    def _hard_output(self, counts: np.ndarray) -> torch.Tensor:
        """Remove the counted units for real, run the model, and undo everything."""
        state = ModelSnapshot(self.model)
        try:
            remove_prune_hooks(self.model)
            remove_norm_hooks(self.model)
            dg = self._fresh_graph()
            todo = [(g, g.removed_units(int(counts[g.index])).tolist()) for g in self.groups if counts[g.index] > 0]
            hard_prune(dg, todo, group_timeout=self.group_timeout, model_name=type(self.model).__name__)
            clear_attention_caches(self.model)
            with torch.no_grad():
                return primary_tensor(run_model(self.model, self.example_inputs)).detach().clone()
        finally:
            state.restore()
            clear_attention_caches(self.model)

    def _check(self, counts: np.ndarray, tolerance: float) -> Tuple[bool, float, str]:
        exact = all(self.groups[i].exact for i in np.nonzero(counts)[0])
        soft = self._soft_output(counts)
        try:
            hard = self._hard_output(counts)
        except Exception as e:
            return False, math.inf, describe_failure(e)
        if hard is None or soft is None or hard.shape != soft.shape:
            return False, math.inf, (f"compacted output shape {None if hard is None else tuple(hard.shape)} "
                                     f"!= {None if soft is None else tuple(soft.shape)}")
        if not bool(torch.isfinite(hard).all()):
            return False, math.inf, "compacted output is not finite"
        diff = float((soft.float() - hard.float()).abs().max()) if soft.numel() else 0.0
        scale = max(1.0, float(soft.float().abs().max())) if soft.numel() else 1.0
        if exact and diff > tolerance * scale:
            return False, diff, f"masked and compacted outputs differ by {diff:.3g}"
        return True, diff, ""

    def verify(self, fraction: float = 0.5, tolerance: float = 1e-4, exclude_failing: bool = False) -> dict:
        """Compare the masked model with the physically pruned one at about ``fraction`` of every
        group (rounded so that a prime number of units remains, see :func:`_awkward_removal`).

        The removal happens on the model itself and is undone exactly (no copy). When the
        comparison fails, groups are bisected to find the ones responsible. Exact groups must
        agree within ``tolerance`` (relative to the output scale); inexact groups only need a
        working forward with the right output shape.

        Returns ``{"ok", "max_abs_diff", "failed": {key: reason}, "seconds"}``; with
        ``exclude_failing`` the failing groups move to :attr:`excluded`.
        """
        started = time.perf_counter()
        self.restore()
        flags = training_flags(self.model)
        self.model.eval()
        try:
            full = np.array([_awkward_removal(g, fraction) for g in self.groups], dtype=np.int64)
            ok, diff, why = self._check(full, tolerance)
            failed: Dict[str, str] = {}
            if not ok:
                self._bisect([g.index for g in self.groups if full[g.index] > 0], full, tolerance, failed, why)
        finally:
            restore_training(flags)
        result = {"ok": ok, "max_abs_diff": diff, "failed": dict(failed), "seconds": time.perf_counter() - started}
        if failed and exclude_failing:
            keys = set(failed)
            for g in self.groups:
                if g.key in keys:
                    self.excluded.append(ExcludedGroup(g.key, f"failed validation: {failed[g.key]}",
                                                       [n for n, _ in g.layers]))
            self._drop_groups(keys)
            if self.groups:
                sub = np.array([_awkward_removal(g, fraction) for g in self.groups], dtype=np.int64)
                ok2, diff2, why2 = self._check(sub, tolerance)
                result["after_exclusion"] = {"ok": ok2, "max_abs_diff": diff2, "reason": why2}
        return result

    def _bisect(self, indices: List[int], full: np.ndarray, tolerance: float, failed: Dict[str, str],
                why: str) -> None:
        if len(indices) == 1:
            failed[self.groups[indices[0]].key] = why
            return
        half = len(indices) // 2
        for part in (indices[:half], indices[half:]):
            counts = np.zeros_like(full)
            counts[part] = full[part]
            ok, _, why_part = self._check(counts, tolerance)
            if not ok:
                self._bisect(part, full, tolerance, failed, why_part)

    def _drop_groups(self, keys) -> None:
        self.restore()
        self.groups = [g for g in self.groups if g.key not in keys]
        for i, g in enumerate(self.groups):
            g.index = i
        self.counts = np.zeros(len(self.groups), dtype=np.int64)
        self._build_cost_model()

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict:
        return {"model": type(self.model).__name__, "groups": len(self.groups), "excluded": len(self.excluded),
                "exact": self.exact, "dense_macs": self.dense_macs, "dense_params": self.dense_params,
                "excluded_reasons": {e.key: e.reason for e in self.excluded},
                "inexact_groups": [g.key for g in self.groups if not g.exact],
                "importance_fallbacks": {g.key: g.importance_note for g in self.groups if g.importance_note},
                "seconds": dict(self.seconds)}


def _largest_prime_at_most(n: int) -> int:
    for candidate in range(n, 1, -1):
        if all(candidate % d for d in range(2, math.isqrt(candidate) + 1)):
            return candidate
    return n


def _awkward_removal(group: ChannelGroup, fraction: float) -> int:
    """Units to remove when validating near ``fraction``: as many as leave a prime number of
    units. A search may leave any count, and a reshape that splits channels into fixed-size
    heads (``view(B, T, heads, head_dim)`` in BERT's attention) accepts only multiples of
    ``head_dim``: removing exactly half of 64 channels would pass it by luck."""
    remaining = group.num_units - group.units_for_fraction(fraction)
    return group.effective(group.num_units - _largest_prime_at_most(remaining))

