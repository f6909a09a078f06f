"""Channel groups from torch-pruning's dependency graph: :func:`discover_groups` enumerates every
prunable layer's group, adds the attention head groups, drops clashes and ranks what remains."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from ..tensors import is_transposed_linear
from ._util import ChannelTimeoutError, Deadline, time_limit
from .attention import countable_attention, find_attention_blocks, head_spec
from .enumeration import enumerate_group
from .graph import RNN_TYPES, build_graph
from .groups import ChannelGroup, ExcludedGroup, Reject
from .ranking import rank_units
from .trace import LayerTrace, trace_layers
from .units import build_group

__all__ = ["GroupDiscovery", "discover_groups", "classifier_names"]

_ROOTS = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding) + RNN_TYPES


@dataclass
class GroupDiscovery:
    """Everything :func:`discover_groups` found."""

    DG: Any
    groups: List[ChannelGroup]
    excluded: List[ExcludedGroup]
    traces: Dict[str, LayerTrace]
    attention: Dict[str, nn.Module]
    seconds: Dict[str, float]


def classifier_names(model: nn.Module) -> List[str]:
    """Module names of the classifier, from timm's ``get_classifier()`` when the model has it."""
    getter = getattr(model, "get_classifier", None)
    if not callable(getter):
        return []
    try:
        head = getter()
    except Exception:  # a model whose get_classifier() needs arguments or fails
        return []
    heads = head if isinstance(head, (tuple, list)) else [head]
    ids = {id(h) for h in heads if isinstance(h, nn.Module)}
    return [n for n, m in model.named_modules() if id(m) in ids and not isinstance(m, nn.Identity)]


def _prefix_matcher(names: Set[str]) -> Callable[[str], bool]:
    def excluded(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") or e == "" for e in names)
    return excluded


@dataclass
class _Walk:
    """What the steps of one :func:`discover_groups` call share."""

    model: nn.Module
    DG: Any
    names: Dict[int, str]
    excluded_out: Callable[[str], bool]
    traces: Dict[str, LayerTrace]
    output_nodes: Set[int]
    deadline: Deadline
    timeout: Optional[float]
    group_timeout: Optional[float]
    exact_norms: bool
    visited: Set[int] = field(default_factory=set)
    excluded: List[ExcludedGroup] = field(default_factory=list)
    stuck_at: Optional[str] = None  # the first layer the overall time budget ran out on


def discover_groups(model: nn.Module, example_inputs, *, importance=None, exclude_out: Sequence[str] = (),
                    heads: bool = True, timeout: Optional[float] = 60.0, group_timeout: Optional[float] = 20.0,
                    rank: bool = True, round_to: Optional[int] = None, exact_norms: bool = True) -> GroupDiscovery:
    """Trace ``model``, build torch-pruning's dependency graph and turn its groups into
    :class:`ChannelGroup` s (see the module docstring of :mod:`.groups`). ``exclude_out`` names modules whose
    output channels must stay (the classifier, user exclusions)."""
    names = {id(m): n for n, m in model.named_modules()}
    excluded_out = _prefix_matcher(set(exclude_out))
    deadline = Deadline(timeout)
    seconds: Dict[str, float] = {}
    attention = find_attention_blocks(model, excluded_out) if heads else {}

    t0 = time.perf_counter()
    traces = trace_layers(model, example_inputs, countable_attention(model))
    seconds["trace"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    DG, output_fns = build_graph(model, example_inputs, deadline.left())
    seconds["graph"] = time.perf_counter() - t0
    # nodes that produce a model output: a group may not change their channels
    output_nodes = {id(n) for n in DG.module2node.values() if n.grad_fn in output_fns}
    walk = _Walk(model, DG, names, excluded_out, traces, output_nodes, deadline, timeout, group_timeout, exact_norms)

    t0 = time.perf_counter()
    # every timm attention block's qkv output is ours: head groups, or left alone with a reason
    # (torch-pruning's qkv grouping does not respect the head layout and breaks the reshape)
    head_qkv = {id(a.qkv) for a in countable_attention(model).values()}
    walk.excluded += _attention_left_alone(model, attention, heads, excluded_out)
    specs = _channel_specs(walk, head_qkv)
    seconds["groups"] = time.perf_counter() - t0
    if walk.stuck_at is not None and not specs:
        raise ChannelTimeoutError(f"{type(model).__name__}: grouping did not finish within {timeout:.3g} s "
                                  f"(stuck at layer '{walk.stuck_at}')")
    specs += _head_specs(walk, attention)
    kept = _without_clashes(walk, specs)

    t0 = time.perf_counter()
    groups = _make_groups(walk, kept, importance, rank, round_to)
    seconds["importance"] = time.perf_counter() - t0
    walk.excluded += _never_grouped(DG, traces, walk.visited | head_qkv, set(attention))
    return GroupDiscovery(DG, groups, walk.excluded, traces, attention, seconds)


def _attention_left_alone(model: nn.Module, attention: Dict[str, nn.Module], heads: bool,
                          excluded_out: Callable[[str], bool]) -> List[ExcludedGroup]:
    out = []
    for name, a in countable_attention(model).items():
        if name in attention or excluded_out(f"{name}.qkv"):
            continue
        why = ("heads=False" if not heads else
               f"{type(a).__name__} layout not prunable by whole heads (num_heads={a.num_heads})")
        out.append(ExcludedGroup(f"{name}:heads", f"attention heads left alone: {why}", [f"{name}.qkv"]))
    return out


def _channel_specs(walk: _Walk, head_qkv: Set[int]) -> List[dict]:
    """torch-pruning's get_all_groups, enumerated ourselves with time limits and reasons: the spec of
    every group rooted at a layer no earlier group reached."""
    specs: List[dict] = []
    for m in list(walk.DG.module2node.keys()):
        if not isinstance(m, _ROOTS) or id(m) in walk.visited or id(m) in head_qkv:
            continue
        pruner = walk.DG.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        found = _enumerate_root(walk, m, pruner)
        if found is None:
            continue
        g, roots_of = found
        outs = _reached_outputs(walk, g)
        if any(id(o) in head_qkv for o in outs):
            continue  # a qkv projection's output: handled by the head group
        spec = _root_spec(walk, m, pruner, g, roots_of, outs)
        if spec is not None:
            specs.append(spec)
    return specs


def _enumerate_root(walk: _Walk, m: nn.Module, pruner) -> Optional[Tuple[Any, dict]]:
    """The torch-pruning group of all of ``m``'s output channels, or None (the reason goes to
    ``walk.excluded``) when the time budget is spent or the enumeration fails."""
    name = walk.names.get(id(m), type(m).__name__)
    C = pruner.get_out_channels(m)
    left = walk.deadline.left(walk.group_timeout)
    if left is not None and left <= 0:
        # The overall budget is spent: keep the groups found so far, leave the rest out
        # (with the reason), and fail only if nothing at all could be grouped in time.
        walk.stuck_at = walk.stuck_at or name
        walk.visited.add(id(m))
        walk.excluded.append(ExcludedGroup(f"{name}:out", f"grouping time budget of {walk.timeout:.3g} s was spent "
                                                          f"before this layer", [name]))
        return None
    try:
        with time_limit(left, f"torch-pruning grouping of '{name}' in {type(walk.model).__name__}"):
            return enumerate_group(walk.DG, m, pruner.prune_out_channels, list(range(C)))
    except Reject as r:
        reason = str(r)
    except ChannelTimeoutError:
        overall = walk.deadline.left() is not None and walk.deadline.left() <= 0
        if overall:
            walk.stuck_at = walk.stuck_at or name
        reason = (f"torch-pruning group enumeration did not finish within {left:.3g} s"
                  + (" (the overall time budget)" if overall else ""))
    except Exception as e:
        reason = f"torch-pruning grouping failed: {type(e).__name__}: {str(e)[:160]}"
    walk.visited.add(id(m))
    walk.excluded.append(ExcludedGroup(f"{name}:out", reason, [name]))
    return None


def _reached_outputs(walk: _Walk, tp_group) -> List[nn.Module]:
    """The layers whose output channels the group removes; none of them roots a group of its own."""
    outs = []
    for item in tp_group:
        if walk.DG.is_out_channel_pruning_fn(item.dep.handler) and isinstance(item.dep.target.module, nn.Module):
            walk.visited.add(id(item.dep.target.module))
            if isinstance(item.dep.target.module, _ROOTS):
                outs.append(item.dep.target.module)
    return outs


def _root_spec(walk: _Walk, m: nn.Module, pruner, tp_group, roots_of, outs: List[nn.Module]) -> Optional[dict]:
    name = walk.names.get(id(m), type(m).__name__)
    try:
        spec = build_group(walk.DG, tp_group, roots_of, walk.model, walk.names, name, walk.excluded_out,
                           walk.exact_norms, walk.output_nodes)
    except Reject as r:
        key_name = _first_executed([walk.names.get(id(o), "?") for o in outs] or [name], walk.traces)
        walk.excluded.append(ExcludedGroup(f"{key_name}:out", str(r),
                                           sorted({walk.names.get(id(o), "?") for o in outs})))
        return None
    # torch-pruning's importances skip recurrent tensors: rank hidden units by their own magnitude
    spec["tp_group"] = None if isinstance(m, RNN_TYPES) else tp_group
    spec["root_module"] = m
    spec["root_handler"] = pruner.prune_out_channels
    spec["root_name"] = name
    return spec


def _head_specs(walk: _Walk, attention: Dict[str, nn.Module]) -> List[dict]:
    """One spec per prunable attention block (whole heads)."""
    specs = []
    for name, attn in attention.items():
        try:
            spec = head_spec(name, attn, walk.exact_norms)
        except Reject as r:
            walk.excluded.append(ExcludedGroup(f"{name}:heads", str(r), [name]))
            continue
        spec.update(kind="heads", attention=attn, root_name=f"{name}.qkv", attn_name=name)
        specs.append(spec)
    return specs


def _without_clashes(walk: _Walk, specs: List[dict]) -> List[dict]:
    """The specs, keyed, less those sharing a position of a tensor with an earlier one: no two groups
    may own the same position."""
    owner: Dict[Tuple[int, str, int], Tuple[Set[int], str]] = {}
    kept_specs = []
    for spec in specs:
        key = _spec_key(spec, walk.traces)
        clash = None
        for s in spec["slices"]:
            k = (id(s.module), s.tensor_name, s.dim)
            if k in owner and owner[k][0] & set(s.positions.tolist()):
                clash = (s.qualified_name, owner[k][1])
                break
        if clash:
            walk.excluded.append(ExcludedGroup(key, f"shares channels of '{clash[0]}' with group {clash[1]!r}",
                                               [n for n, _ in spec["layers"]]))
            continue
        for s in spec["slices"]:
            k = (id(s.module), s.tensor_name, s.dim)
            owner.setdefault(k, (set(), key))[0].update(s.positions.tolist())
        spec["key"] = key
        kept_specs.append(spec)
    return kept_specs


def _make_groups(walk: _Walk, specs: List[dict], importance, rank: bool, round_to: Optional[int]
                 ) -> List[ChannelGroup]:
    """The groups in execution order, their units ranked."""
    specs.sort(key=lambda s: (_spec_first_call(s, walk.traces), s["key"]))
    groups: List[ChannelGroup] = []
    for i, spec in enumerate(specs):
        grp = _channel_group(i, spec, walk.traces, round_to)
        rank_units(grp, spec, importance, walk.DG, walk.group_timeout, rank)
        groups.append(grp)
    return groups


def _channel_group(index: int, spec: dict, traces: Dict[str, LayerTrace], round_to: Optional[int]) -> ChannelGroup:
    kind = spec.get("kind", "channels")
    U = spec["num_units"]
    sizes = torch.bincount(spec["root_unit"], minlength=U)
    cpu_ = int(sizes[0]) if bool((sizes == sizes[0]).all()) else 0
    return ChannelGroup(index=index, key=spec["key"], kind=kind, root=spec["root_name"],
                        num_channels=spec["num_channels"], num_units=U, channels_per_unit=cpu_,
                        slices=spec["slices"], root_unit=spec["root_unit"], exact=not spec["inexact"],
                        inexact_reasons=list(dict.fromkeys(spec["inexact"])), layers=spec["layers"],
                        first_call=_spec_first_call(spec, traces), round_to=round_to,
                        _root_module=spec.get("root_module"), _root_handler=spec.get("root_handler"),
                        _attention=spec.get("attention"), _norms=list(spec.get("norms", ())),
                        _aliases=tuple(spec.get("out_layers", ())) + ((spec["attn_name"],) if kind == "heads" else ()))


def _never_grouped(DG, traces: Dict[str, LayerTrace], visited: Set[int], attention: Set[str]) -> List[ExcludedGroup]:
    """Layers that ran but that no group starts from or reaches, each with why: otherwise a
    refusal would name only the groups that exist (a packed LSTM's model says just 'fc:out')."""
    out = []
    for name, tr in traces.items():
        m = tr.module
        if (tr.calls == 0 or id(m) in visited or name in attention
                or isinstance(m, (nn.Embedding, nn.MultiheadAttention))):
            continue
        if is_transposed_linear(m):
            why = "is a transformers Conv1D (a Linear stored (in, out)), which torch-pruning cannot prune"
        elif m not in DG.module2node:
            why = ("is fed a PackedSequence (pack_padded_sequence), which torch-pruning's graph cannot follow; "
                   "feed it padded tensors, or use structure='unstructured'") if tr.packed else \
                "is not in torch-pruning's dependency graph (no traced op links its output to the model's)"
        elif DG.get_pruner_of_module(m) is None:
            why = f"torch-pruning has no pruner for {type(m).__name__}"
        else:
            continue
        out.append(ExcludedGroup(f"{name}:out", f"'{name}' {why}", [name]))
    return out


def _first_executed(layer_names: Sequence[str], traces: Dict[str, LayerTrace]) -> str:
    def order(n):
        tr = traces.get(n)
        return (tr.first_call if tr is not None and tr.first_call >= 0 else 1 << 30, n)
    return min(layer_names, key=order)


def _spec_key(spec: dict, traces) -> str:
    if spec.get("kind") == "heads":
        return f"{spec['attn_name']}:heads"
    outs = spec.get("out_layers") or [spec["root_name"]]
    return f"{_first_executed(outs, traces)}:out"


def _spec_first_call(spec: dict, traces) -> int:
    if spec.get("kind") == "heads":
        tr = traces.get(spec["attn_name"])
    else:
        tr = traces.get(_first_executed(spec.get("out_layers") or [spec["root_name"]], traces))
    return tr.first_call if tr is not None and tr.first_call >= 0 else 1 << 30
