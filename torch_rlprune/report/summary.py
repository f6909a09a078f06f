"""A run record (:func:`summarize`): one :class:`PruneResult` as plain JSON-able data, and the table
``result.summary()`` and the CLI print (:func:`format_summary`)."""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..env.depth_width import count_macs_params_removed, masked_block_names
from ..env.spaces import space_kind
from ..plan import PruningPlan
from ..results import PruneResult
from ..structure.channel.counting import count_macs_params
from .formatting import format_accuracy, format_goal, format_number, format_ratio, format_si, is_number, jsonable


# --------------------------------------------------------------------------- records
def summarize(result, *, test_accuracy: Optional[dict] = None, count: bool = True) -> dict:
    """The run record of one :class:`~torch_rlprune.PruneResult`: a dict of JSON types only.

    Args:
        result: a ``PruneResult`` (for a ``MultiTargetResult``, summarize each member:
            ``[summarize(r) for r in multi.values()]``).
        test_accuracy: optional ``{"before": float, "after": float, ...}``, copied as is
            (callers add keys such as ``"after_finetune"``).
        count: count MACs and parameters (two forwards of ``result.example_inputs``, a 2-sample batch).

    Returns:
        ``{agent, structure, budget, reward, seed, target, sparsity, score, baseline_score, wall_time,
        forward_seconds, episode_seconds, episodes, max_drop, latency, layers, macs, params,
        test_accuracy, history, plan}`` and ``removed_blocks`` for depth plans. ``target`` is None for an
        accuracy-guaranteed search. ``layers`` is ``[{name, kind, units, amount}]`` in plan order.
        ``macs``/``params`` are ``{"before", "after"}`` (``params`` also ``"nonzero"``: entries the
        masks keep, what unstructured pruning reduces) or None. "before" is the model's architecture with
        every mask ignored; "after" is the mask-aware count (:func:`~torch_rlprune.structure.channel.count_macs_params`,
        removed blocks not counted) and is None unless the model currently carries this plan's masks
        (e.g. the members of a ``MultiTargetResult`` before ``apply``). Both are None when the model
        no longer has the architecture the plan was made for (after ``compact()``). Non-finite numbers
        become None.
    """
    if not isinstance(result, PruneResult):
        if hasattr(result, "plans") and hasattr(result, "apply"):
            raise TypeError("summarize takes one PruneResult; for a MultiTargetResult summarize each member: "
                            "[summarize(r) for r in result.values()]")
        raise TypeError(f"summarize takes a PruneResult, got {type(result).__name__}")
    if test_accuracy is not None:
        if not isinstance(test_accuracy, dict) or not all(isinstance(k, str) for k in test_accuracy):
            raise TypeError("test_accuracy must be a dict such as {'before': 0.91, 'after': 0.88}")
        for key, value in test_accuracy.items():
            if value is not None and not is_number(value):
                raise TypeError(f"test_accuracy[{key!r}] must be a number or None, got {type(value).__name__}")
    plan = result.plan
    meta = plan.metadata or {}
    guaranteed = meta.get("mode") == "accuracy-guaranteed"
    kinds = [lay.kind for lay in result.layers] if len(result.layers) == len(plan.amounts) \
        else [""] * len(plan.amounts)
    macs = params = None
    if count:
        try:
            macs, params = _count(result)
        except Exception as err:  # a summary must not fail on a model the counter cannot trace
            warnings.warn(f"summarize: MACs/params not counted ({type(err).__name__}: {err})", UserWarning,
                          stacklevel=2)
    record = {
        "agent": plan.agent, "structure": plan.structure, "budget": plan.budget, "reward": plan.reward,
        "seed": plan.seed, "target": None if guaranteed else plan.target, "sparsity": result.sparsity,
        "score": plan.score, "baseline_score": result.baseline_score, "wall_time": result.wall_time,
        "forward_seconds": result.forward_seconds, "episode_seconds": result.episode_seconds,
        "episodes": plan.episodes if plan.episodes is not None else len(result.history),
        "max_drop": meta.get("max_drop") if guaranteed else None,
        "latency": meta.get("latency") if isinstance(meta.get("latency"), dict) else None,
        "layers": [{"name": name, "kind": kind, "units": plan.numels[name], "amount": amount}
                   for (name, amount), kind in zip(plan.amounts.items(), kinds)],
        "macs": macs, "params": params,
        "test_accuracy": dict(test_accuracy) if test_accuracy is not None else None,
        "history": list(result.history), "plan": plan.to_dict(),
    }
    if "removed_blocks" in meta:
        record["removed_blocks"] = list(meta["removed_blocks"])
    return jsonable(record)


# --------------------------------------------------------------------------- counting
def _count(result) -> Tuple[Optional[dict], Optional[dict]]:
    """``(macs, params)`` dicts for :func:`summarize` (see there for what before/after mean)."""
    model, plan, example = result.model, result.plan, result.example_inputs
    if example is None or not _architecture_matches(model, plan):
        return None, None
    dense = count_dense(model, example)
    macs = {"before": dense[0], "after": None}
    params = {"before": dense[1], "after": None, "nonzero": None}
    if _carries_plan(model, plan):
        blocks = plan.metadata.get("removed_blocks") or []
        if blocks:  # a masked block still runs: count the model without it
            after = count_macs_params_removed(model, example)
        else:
            after = count_macs_params(model, example)
        macs["after"], params["after"] = after
        params["nonzero"] = _nonzero_params(model, blocks)
    return macs, params


def _masked_tensors(model: nn.Module) -> List[Tuple[nn.Module, str]]:
    """``(module, name)`` of every tensor with a prune mask (``name_orig`` + ``name_mask``)."""
    out = []
    for m in model.modules():
        for bname in list(m._buffers):
            name = bname[:-len("_mask")]
            if bname.endswith("_mask") and name + "_orig" in m._parameters:
                out.append((m, name))
    return out


@torch.no_grad()
def count_dense(model: nn.Module, example) -> Tuple[int, int]:
    """``count_macs_params`` with every mask treated as all-ones, without copying the model.

    The masks are swapped for ones during the count and put back, and so is the masked tensor
    attribute each forward-pre-hook recomputes (``module.weight``), so the model is left with the
    very same tensor objects it had.
    """
    swapped = []
    try:
        for m, name in _masked_tensors(model):
            mask = m._buffers[name + "_mask"]
            swapped.append((m, name, mask, m.__dict__.get(name, getattr(m, name, None))))
            m._buffers[name + "_mask"] = torch.ones_like(mask)
        return count_macs_params(model, example)
    finally:
        for m, name, mask, masked in reversed(swapped):
            m._buffers[name + "_mask"] = mask
            if masked is not None:
                setattr(m, name, masked)  # nn.RNNBase also refreshes its _flat_weights this way


def _nonzero_params(model: nn.Module, removed_blocks: Sequence[str] = ()) -> int:
    """Parameter entries the masks keep (every entry of an unmasked parameter), outside the
    removed blocks."""
    total, seen = 0, set()
    for name, m in model.named_modules():
        if any(name == b or name.startswith(b + ".") for b in removed_blocks):
            continue
        for pname, p in m._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            mask = m._buffers.get(pname[:-len("_orig")] + "_mask") if pname.endswith("_orig") else None
            total += int(mask.count_nonzero()) if mask is not None else p.numel()
    return total


def _tensor(model: nn.Module, module_name: str, param_name: str):
    """``(module, the tensor's full shape, its mask or None)``, or None when it does not exist."""
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return None
    tensor = module._parameters.get(param_name + "_orig")
    if tensor is None:
        tensor = getattr(module, param_name, None)
    if not isinstance(tensor, torch.Tensor):
        return None
    return module, tuple(tensor.shape), module._buffers.get(param_name + "_mask")


def _dead_slices(shape, mask, dim: int) -> int:
    if mask is None:
        return 0
    other = [d for d in range(len(shape)) if d != dim]
    alive = mask.abs().sum(dim=other) if other else mask.abs()
    return int((alive == 0).sum())


def _group_tensor(model: nn.Module, key: str):
    """For a channel-plan key, ``(shape, mask, dims)``: the root tensor and the dims its units live on."""
    module_name, _, what = key.rpartition(":")
    if what == "heads":
        found = _tensor(model, f"{module_name}.qkv" if module_name else "qkv", "weight")
        return None if found is None else (found[1], found[2], (0,))
    for param_name in ("weight", "weight_ih_l0"):
        found = _tensor(model, module_name, param_name)
        if found is not None:
            module, shape, mask = found
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                return shape, mask, (1,)
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.RNNBase)):
                return shape, mask, (0,)
            return shape, mask, tuple(range(len(shape)))  # an embedding or other root: any dim
    return None


def _architecture_matches(model: nn.Module, plan: PruningPlan) -> bool:
    """Whether ``model`` still has the tensors (and channel counts) the plan was made for."""
    if not space_kind(plan.structure).removes_channels:
        for name, numel in plan.numels.items():
            found = _tensor(model, *name.rpartition(".")[::2])
            if found is None or math.prod(found[1]) != numel:
                return False
        return True
    checked = 0
    for key, units in plan.numels.items():
        found = _group_tensor(model, key)
        if found is None:
            continue  # a root we cannot read (e.g. a token): judged by the other groups
        shape, _, dims = found
        if not any(shape[d] >= units and shape[d] % units == 0 for d in dims):
            return False  # fewer channels than units: compacted, or another model
        checked += 1
    return checked > 0


def _carries_plan(model: nn.Module, plan: PruningPlan) -> bool:
    """Whether the model's masks remove exactly what the plan removes (entries, or root channels)."""
    counts = plan.counts()
    if not space_kind(plan.structure).removes_channels:
        for name, removed in counts.items():
            _, shape, mask = _tensor(model, *name.rpartition(".")[::2])
            if (0 if mask is None else int((mask == 0).sum())) != removed:
                return False
    else:
        for key, removed in counts.items():
            found = _group_tensor(model, key)
            if found is None:
                continue
            shape, mask, dims = found
            units = plan.numels[key]
            if not any(shape[d] % units == 0 and _dead_slices(shape, mask, d) == shape[d] // units * removed
                       for d in dims):
                return False
    blocks = plan.metadata.get("removed_blocks") or []
    if blocks:
        if not set(blocks) <= set(masked_block_names(model)):
            return False
    return True


def _cost_lines(record: dict) -> List[str]:
    """MACs/params before -> after, and test accuracy, as text fragments."""
    out = []
    macs, params = record.get("macs"), record.get("params")
    parts = []
    if macs and macs.get("before") is not None:
        parts.append(f"MACs {format_si(macs['before'])} -> {format_si(macs.get('after'))} "
                     f"({format_ratio(macs['before'], macs.get('after'))})")
    if params and params.get("before") is not None:
        text = f"params {format_si(params['before'])} -> {format_si(params.get('after'))} " \
               f"({format_ratio(params['before'], params.get('after'))})"
        nonzero = params.get("nonzero")
        if nonzero is not None and nonzero != params.get("after"):
            text += f", nonzero {format_si(nonzero)} ({format_ratio(params['before'], nonzero)})"
        parts.append(text)
    if parts:
        out.append("  ".join(parts) + ("" if (macs or {}).get("after") is not None else
                                       "  (after: the model does not carry this plan's masks)"))
    acc = record.get("test_accuracy")
    if acc:
        text = f"test accuracy {format_accuracy(acc.get('before'))} -> {format_accuracy(acc.get('after'))}"
        extra = [f"{k} {format_accuracy(v)}" for k, v in acc.items() if k not in ("before", "after")]
        out.append("  ".join([text] + extra))
    return out


def _left_out_lines(meta: dict) -> List[str]:
    """What stayed dense without being chosen by the search: weights that are not candidates
    (by reason) and channel groups kept whole (by reason), one line each."""
    lines = []
    left_out = meta.get("left_out")
    if isinstance(left_out, dict) and left_out:
        lines.append("left dense: " + "; ".join(f"{reason} {len(names)}" for reason, names in left_out.items()))
    never_ran = meta.get("never_ran")
    if isinstance(never_ran, list) and never_ran:
        lines.append(f"never ran as modules, dense: {len(never_ran)} ({', '.join(map(str, never_ran[:3]))}"
                     f"{', ...' if len(never_ran) > 3 else ''})")
    excluded = meta.get("excluded")
    if isinstance(excluded, dict) and excluded:
        shown = "; ".join(f"{key}: {str(reason)[:60]}" for key, reason in list(excluded.items())[:3])
        more = f"; +{len(excluded) - 3} more" if len(excluded) > 3 else ""
        lines.append(f"channel groups kept whole: {len(excluded)} ({shown}{more})")
    return lines


def _quality_lines(record: dict) -> List[str]:
    """Where the plan came from: the prior it started at and the held-out choice."""
    meta = (record.get("plan") or {}).get("metadata", {}) or {}
    lines = []
    prior = meta.get("prior")
    if isinstance(prior, dict):
        candidates = ", ".join(f"{m} {format_number(v)}" for m, v in (prior.get("candidates") or {}).items())
        lines.append(f"prior {prior.get('method')} (scored {candidates}); protected: "
                     f"{', '.join(meta.get('protected') or []) or 'none'}")
    lines += _left_out_lines(meta)
    selection = meta.get("selection")
    if isinstance(selection, dict):
        lines.append(f"held-out selection: score {format_number(selection.get('selection_score'))} on "
                     f"{selection.get('samples')} samples the search never saw (search score "
                     f"{format_number(selection.get('search_score'))}; best of "
                     f"{len(selection.get('candidates') or [])} plans, "
                     f"#{int(selection.get('chosen', 0)) + 1} by search score"
                     + ("; chosen refitted, as returned, by how close their outputs come to the unpruned"
                        " model's there" if selection.get("returned_scores") else "") + ")")
        test = selection.get("prior_test")
        if isinstance(test, dict):
            lines.append(f"no data: {'the prior kept' if test.get('prior_kept') else 'the search beat the prior'} "
                         f"(held-out difference {format_number(test.get('mean_difference'))} +- "
                         f"{format_number(test.get('standard_error'))}, needed {format_number(test.get('z'))} standard errors)")
    repair = meta.get("repair")
    if isinstance(repair, dict):
        after = [f"{label} {format_number(repair[key])}" for key, label in (("selection_score", "held-out"),
                                                                   ("search_score", "search part"))
                 if is_number(repair.get(key))]
        undone = repair.get("kept") is False
        lines.append(f"least-squares refit of {len(repair.get('refitted') or [])} pruned layers"
                     + (f"; score after it: {', '.join(after)}" if after else "")
                     + (f"; {len(repair['skipped'])} left as they were" if repair.get("skipped") else "")
                     + "".join(f"; {name} {note}" for name, note in (repair.get("notes") or {}).items())
                     + (f"; undone: clearly below the plan's {format_number(repair.get('score_without'))} "
                        "without it" if undone else ""))
    return lines


def _score_meaning(record: dict) -> str:
    """One line saying what the score numbers are, for the reward the search used."""
    reward = record.get("reward")
    bn = ((record.get("plan") or {}).get("metadata") or {}).get("bn_recalibration")
    unpruned = ("unpruned: the model before pruning, its BatchNorm statistics re-estimated as for every plan"
                if bn else "unpruned: the model before pruning")
    if reward == "fidelity":
        what = "share of calibration inputs on which the model predicts the unpruned model's class"
    elif reward == "accuracy":
        what = "top-1 accuracy on the labelled calibration inputs"
    else:
        what = f"your reward {reward!r} on the calibration inputs"
    return f"  (score: {what}; {unpruned})"


def _cache_note(measurements) -> str:
    """Readings timed in an earlier run come from the latency cache: say so, rather than call them this run's."""
    if measurements == 0:
        return ", every reading from the latency cache of an earlier run, none timed now"
    return f", {measurements} timed now" if isinstance(measurements, int) and measurements > 0 else ""


def _architecture_lines(choice) -> List[str]:
    """N2N's choice of the architecture it shrank: each candidate's score as searched and as returned
    (refit included), the one chosen marked (nothing for a record without one, or one that is not a
    list of such scores: run files are untrusted)."""
    def readable(c):
        return isinstance(c, dict) and isinstance(c.get("removed_blocks"), list) and all(
            isinstance(c.get(k), (int, float)) for k in ("search_score", "returned_score"))
    if not isinstance(choice, list) or not choice or not all(readable(c) for c in choice):
        return []
    parts = [f"{len(c['removed_blocks'])} blocks removed {c['search_score']:.4f} -> {c['returned_score']:.4f}"
             + (" (chosen)" if c.get("chosen") is True else "") for c in choice]
    return ["architecture shrunk, chosen by the score as returned (searched -> returned, refitted): " + "; ".join(parts)]


def format_summary(record: dict) -> str:
    """The table ``result.summary()`` and the CLI print: settings, target vs achieved, score,
    MACs/params, test accuracy and timings, then one row per layer (or channel group)."""
    episode = record.get("episode_seconds")
    forward = record.get("forward_seconds")
    lines = [f"rl_prune: agent={record['agent']} reward={record['reward']} budget={record['budget']} "
             f"structure={record['structure']} episodes={record.get('episodes')} seed={record.get('seed')}",
             f"{format_goal(record)}  achieved {format_number(record['sparsity'])}  "
             f"score {format_number(record.get('score'))} "
             f"(unpruned {format_number(record.get('baseline_score'))})", _score_meaning(record)]
    lines += _quality_lines(record)
    lines += _cost_lines(record)
    lines.append(f"wall time {format_number(record.get('wall_time'), '.1f')}s  "
                 f"episode {format_number(None if episode is None else episode * 1e3, '.0f')} ms vs forward "
                 f"{format_number(None if forward is None else forward * 1e3, '.0f')} ms")
    latency = record.get("latency")
    if isinstance(latency, dict) and "dense_ms" in latency:  # what the table predicts, not a measurement
        lines.append(f"predicted latency {latency['dense_ms']:.3f} ms -> {latency.get('planned_ms', 0):.3f} ms "
                     f"(batch {latency.get('batch')}, {latency.get('threads')} threads, {latency.get('device')})")
        measured = latency.get("measured")
        if isinstance(measured, dict) and isinstance(measured.get("measured_fraction"), (int, float)):
            spec = measured.get("spec") or {}
            lines.append(f"measured after compact on {spec.get('runtime')}: {measured['measured_fraction']:.1%} of the "
                         f"latency removed (batch {spec.get('batch')}, {spec.get('threads')} threads, "
                         f"{len(measured.get('rounds') or [])} measured round(s)"
                         f"{_cache_note(measured.get('measurements'))}"
                         f"{'' if measured.get('met') else ', target missed'})")
    if "removed_blocks" in record:
        removable = (record.get("plan") or {}).get("metadata", {}).get("removable_blocks", [])
        lines.append(f"blocks removed ({len(record['removed_blocks'])} of {len(removable)} removable): "
                     f"{', '.join(record['removed_blocks']) or 'none'}")
        lines += _architecture_lines((record.get("plan") or {}).get("metadata", {}).get("architecture_choice"))
    kind = space_kind(record["structure"])
    width = max([40] + [len(lay["name"]) for lay in record["layers"]])
    lines.append(f"{kind.step_label:<{width}} {'kind':<8} {kind.size_label:>10} {'pruned':>8}")
    for lay in record["layers"]:
        lines.append(f"{lay['name']:<{width}} {lay['kind']:<8} {lay['units']:>10} {lay['amount']:>8.1%}")
    return "\n".join(lines)
