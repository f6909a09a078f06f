"""Run records, the summary table, plots and ``report.md`` for :func:`~torch_rlprune.rl_prune` results.

A *run record* (:func:`summarize`) is a plain JSON-able dict describing one :class:`PruneResult`:
its plan, per-layer amounts, MACs/params before and after, scores, timings and episode history.
``result.summary()`` and the CLI print :func:`format_summary` of it; :func:`save_run` /
:func:`load_run` keep records in ``run.json``; :func:`write_report` turns them into ``report.md``
with PNG plots.

matplotlib is imported only inside the plotting functions, through its object-oriented API
(``Figure`` drawn by the Agg canvas): pyplot is never imported, so the caller's backend and
open figures are left alone and nothing stays registered once a plot is saved.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .plan import PlanError, PruningPlan
from .results import PruneResult

__all__ = ["write_marked_section", "publish_section", "RUN_FILE", "RUN_FORMAT_VERSION", "summarize", "format_summary", "count_dense", "plot_amounts", "plot_search",
           "plot_tradeoff", "save_run", "load_run", "write_report", "search_stats"]

RUN_FILE = "run.json"
RUN_FORMAT_VERSION = 1
REPORT_FILE = "report.md"

# The keys every record has (what summarize writes and load_run requires).
RECORD_KEYS = ("agent", "structure", "budget", "reward", "seed", "target", "sparsity", "score", "baseline_score",
               "wall_time", "forward_seconds", "episode_seconds", "episodes", "layers", "macs", "params",
               "test_accuracy", "history", "plan")


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
        every mask ignored; "after" is the mask-aware count (:func:`~torch_rlprune.channel.count_macs_params`,
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
            if value is not None and not _is_number(value):
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
    return _jsonable(record)


def _jsonable(obj):
    """Plain JSON types: numpy/torch scalars to Python numbers, tuples to lists, NaN/inf to None."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy arrays and scalars
        return _jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return str(obj)


# --------------------------------------------------------------------------- counting
def _count(result) -> Tuple[Optional[dict], Optional[dict]]:
    """``(macs, params)`` dicts for :func:`summarize` (see there for what before/after mean)."""
    from .channel import count_macs_params

    model, plan, example = result.model, result.plan, result.example_inputs
    if example is None or not _architecture_matches(model, plan):
        return None, None
    dense = count_dense(model, example)
    macs = {"before": dense[0], "after": None}
    params = {"before": dense[1], "after": None, "nonzero": None}
    if _carries_plan(model, plan):
        blocks = plan.metadata.get("removed_blocks") or []
        if blocks:  # a masked block still runs: count the model without it
            from .depth_search import count_macs_params_removed
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
    from .channel import count_macs_params

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
    if plan.structure == "unstructured":
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
    if plan.structure == "unstructured":
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
        from .depth_search import masked_block_names
        if not set(blocks) <= set(masked_block_names(model)):
            return False
    return True


# --------------------------------------------------------------------------- the table
def _si(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:g}"


def _ratio(before, after) -> str:
    return f"x{before / after:.2f}" if before and after else "x-"


def _num(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _acc(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2%}" if 0.0 <= value <= 1.0 else f"{value:.4g}"


def _goal(record: dict) -> str:
    if record.get("target") is None:
        drop = record.get("max_drop")
        return "accuracy-guaranteed" + (f" (max_drop {drop:g})" if drop is not None else "") + ": smallest plan found"
    return f"target {record['target']:.4f}"


def _cost_lines(record: dict) -> List[str]:
    """MACs/params before -> after, and test accuracy, as text fragments."""
    out = []
    macs, params = record.get("macs"), record.get("params")
    parts = []
    if macs and macs.get("before") is not None:
        parts.append(f"MACs {_si(macs['before'])} -> {_si(macs.get('after'))} "
                     f"({_ratio(macs['before'], macs.get('after'))})")
    if params and params.get("before") is not None:
        text = f"params {_si(params['before'])} -> {_si(params.get('after'))} " \
               f"({_ratio(params['before'], params.get('after'))})"
        nonzero = params.get("nonzero")
        if nonzero is not None and nonzero != params.get("after"):
            text += f", nonzero {_si(nonzero)} ({_ratio(params['before'], nonzero)})"
        parts.append(text)
    if parts:
        out.append("  ".join(parts) + ("" if (macs or {}).get("after") is not None else
                                       "  (after: the model does not carry this plan's masks)"))
    acc = record.get("test_accuracy")
    if acc:
        text = f"test accuracy {_acc(acc.get('before'))} -> {_acc(acc.get('after'))}"
        extra = [f"{k} {_acc(v)}" for k, v in acc.items() if k not in ("before", "after")]
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
        candidates = ", ".join(f"{m} {_num(v)}" for m, v in (prior.get("candidates") or {}).items())
        lines.append(f"prior {prior.get('method')} (scored {candidates}); protected: "
                     f"{', '.join(meta.get('protected') or []) or 'none'}")
    lines += _left_out_lines(meta)
    selection = meta.get("selection")
    if isinstance(selection, dict):
        lines.append(f"held-out selection: score {_num(selection.get('selection_score'))} on "
                     f"{selection.get('samples')} samples the search never saw (search score "
                     f"{_num(selection.get('search_score'))}; best of {len(selection.get('candidates') or [])} "
                     f"plans, #{int(selection.get('chosen', 0)) + 1} by search score)")
    repair = meta.get("repair")
    if isinstance(repair, dict):
        after = [f"{label} {_num(repair[key])}" for key, label in (("selection_score", "held-out"),
                                                                   ("search_score", "search part"))
                 if _is_number(repair.get(key))]
        lines.append(f"least-squares refit of {len(repair.get('refitted') or [])} layers that lost input channels"
                     + (f"; score after it: {', '.join(after)}" if after else "")
                     + (f"; {len(repair['skipped'])} left as they were" if repair.get("skipped") else ""))
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


def format_summary(record: dict) -> str:
    """The table ``result.summary()`` and the CLI print: settings, target vs achieved, score,
    MACs/params, test accuracy and timings, then one row per layer (or channel group)."""
    episode = record.get("episode_seconds")
    forward = record.get("forward_seconds")
    lines = [f"rl_prune: agent={record['agent']} reward={record['reward']} budget={record['budget']} "
             f"structure={record['structure']} episodes={record.get('episodes')} seed={record.get('seed')}",
             f"{_goal(record)}  achieved {_num(record['sparsity'])}  score {_num(record.get('score'))} "
             f"(unpruned {_num(record.get('baseline_score'))})", _score_meaning(record)]
    lines += _quality_lines(record)
    lines += _cost_lines(record)
    lines.append(f"wall time {_num(record.get('wall_time'), '.1f')}s  "
                 f"episode {_num(None if episode is None else episode * 1e3, '.0f')} ms vs forward "
                 f"{_num(None if forward is None else forward * 1e3, '.0f')} ms")
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
                         f"{'' if measured.get('met') else ', target missed'})")
    if "removed_blocks" in record:
        removable = (record.get("plan") or {}).get("metadata", {}).get("removable_blocks", [])
        lines.append(f"blocks removed ({len(record['removed_blocks'])} of {len(removable)} removable): "
                     f"{', '.join(record['removed_blocks']) or 'none'}")
    unstructured = record["structure"] == "unstructured"
    width = max([40] + [len(lay["name"]) for lay in record["layers"]])
    lines.append(f"{'layer' if unstructured else 'channel group':<{width}} {'kind':<8} "
                 f"{'params' if unstructured else 'units':>10} {'pruned':>8}")
    for lay in record["layers"]:
        lines.append(f"{lay['name']:<{width}} {lay['kind']:<8} {lay['units']:>10} {lay['amount']:>8.1%}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- labels and search statistics
def _distinct(records: Sequence[dict], key: str) -> bool:
    return len({json.dumps(r.get(key)) for r in records}) > 1


def _target_text(record: dict) -> str:
    t = record.get("target")
    return "guaranteed" if t is None else f"{t:g}"


def _labels(records: Sequence[dict]) -> List[str]:
    """A short unique label per record: the agent, plus whatever else tells records apart."""
    parts = [[str(r.get("agent"))] for r in records]
    for key, fmt in (("target", lambda r: f"target {_target_text(r)}"), ("structure", lambda r: r["structure"]),
                     ("budget", lambda r: f"budget {r['budget']}"), ("seed", lambda r: f"seed {r.get('seed')}")):
        if _distinct(records, key):
            for p, r in zip(parts, records):
                p.append(fmt(r))
    labels = [", ".join(p) for p in parts]
    if len(set(labels)) < len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return labels


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_.") or "run"


def _amounts_files(records: Sequence[dict]) -> List[str]:
    if len(records) == 1:
        return ["amounts.png"]
    names = []
    for i, r in enumerate(records):
        parts = [_target_text(r)]
        if _distinct(records, "agent"):
            parts.append(str(r.get("agent")))
        names.append(_slug("_".join(parts)))
    if len(set(names)) < len(names):
        names = [f"{n}_{i + 1}" for i, n in enumerate(names)]
    return [f"amounts_{n}.png" for n in names]


def _series(record: dict) -> Tuple[List[Tuple[int, float]], List[Tuple[int, float]]]:
    """``(rewards, best_so_far)`` as (episode, value) pairs.

    Best-so-far is the search's own ``best_reward`` (the best eligible plan of this target, which
    free-constraint agents only offer near the budget); in an accuracy-guaranteed search that
    column holds the best sparsity, another unit, so the running maximum of the reward is drawn.
    """
    rewards, best = [], []
    running = None
    for i, h in enumerate(record.get("history") or []):
        ep = h.get("episode", i)
        if h.get("reward") is not None:
            rewards.append((ep, h["reward"]))
            running = h["reward"] if running is None else max(running, h["reward"])
        if record.get("target") is None:
            if running is not None:
                best.append((ep, running))
        elif h.get("best_reward") is not None:
            best.append((ep, h["best_reward"]))
    return rewards, best


def search_stats(record: dict) -> dict:
    """``{"episodes", "best", "episodes_to_99"}``: episodes run, the final best-so-far reward and
    how many episodes it took the best-so-far to reach 99% of it (``final - 1% of |final|``)."""
    _, best = _series(record)
    history = record.get("history") or []
    if not best:
        return {"episodes": len(history), "best": None, "episodes_to_99": None}
    final = best[-1][1]
    threshold = final - 0.01 * abs(final)
    episodes = [h.get("episode", i) for i, h in enumerate(history)]
    reached = next(ep for ep, value in best if value >= threshold)
    return {"episodes": len(history), "best": final, "episodes_to_99": episodes.index(reached) + 1}


# --------------------------------------------------------------------------- plots
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    fig.clear()  # nothing else references a pyplot-free figure: it goes with this frame
    return path


def plot_amounts(record: dict, path) -> Path:
    """Horizontal bars per layer: its units (entries or channels) and what the plan keeps, with the
    fraction pruned written beside each bar. The figure grows with the number of layers; a log
    scale is used when layer sizes span more than two orders of magnitude."""
    layers = record.get("layers") or []
    n = len(layers)
    fig = _figure(9.0, min(80.0, max(3.0, 1.6 + 0.22 * n)))
    ax = fig.add_subplot(1, 1, 1)
    unit = "entries" if record.get("structure") == "unstructured" else "units"
    if n:
        units = [lay["units"] for lay in layers]
        kept = [u - int(round(lay["amount"] * u)) for u, lay in zip(units, layers)]
        y = list(range(n))
        ax.barh(y, units, height=0.8, color="#d0d0d0", label=f"original {unit}")
        ax.barh(y, kept, height=0.5, color="#1f77b4", label=f"kept {unit}")
        for yi, u, lay in zip(y, units, layers):
            ax.text(u, yi, f" {lay['amount']:.0%}", va="center", fontsize=7)
        ax.set_yticks(y)
        ax.set_yticklabels([lay["name"] for lay in layers], fontsize=7 if n > 30 else 9)
        ax.margins(y=0.01)
        ax.invert_yaxis()  # execution order, top to bottom
        if max(units) > 100 * max(1, min(units)):
            ax.set_xscale("log")
        ax.set_xlim(right=max(units) * (3 if ax.get_xscale() == "log" else 1.12))
        fig.legend(loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no layers", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(unit)
    ax.set_title(f"{record.get('agent')} ({record.get('structure')}): {_goal(record)}, "
                 f"achieved {_num(record.get('sparsity'))}", fontsize=10)
    return _save(fig, path)


def _reward_axis(reward: Optional[str]) -> str:
    if reward == "fidelity":
        return "reward: agreement with the unpruned model"
    if reward == "accuracy":
        return "reward: calibration accuracy"
    return "reward" if reward is None else f"reward ({reward})"


def plot_search(records: Sequence[dict], path) -> Path:
    """Reward per episode (points) and best-so-far (line), one colour per record."""
    records = list(records)
    fig = _figure(8.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    drawn = False
    for i, (record, label) in enumerate(zip(records, _labels(records))):
        colour = f"C{i % 10}"
        rewards, best = _series(record)
        if rewards:
            ax.scatter([e for e, _ in rewards], [v for _, v in rewards], s=8, alpha=0.35, color=colour)
            drawn = True
        if best:
            ax.step([e for e, _ in best], [v for _, v in best], where="post", color=colour, label=label)
            drawn = True
        elif not rewards:
            ax.plot([], [], color=colour, label=f"{label} (no episodes)")
    if not drawn:
        ax.text(0.5, 0.5, "no episodes recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("episode")
    rewards = {str(r.get("reward")) for r in records}
    ax.set_ylabel(_reward_axis(rewards.pop() if len(rewards) == 1 else None))
    ax.set_title("Search: each plan's reward (dots), the best so far (line)", fontsize=10)
    if records:
        ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _tradeoff_metric(records: Sequence[dict]) -> Tuple[str, List[Optional[float]], Optional[float]]:
    """(axis name, y per record, unpruned y): test accuracy after pruning when every record has it,
    else the search score (mixing the two on one axis would compare different things)."""
    accs = [(r.get("test_accuracy") or {}) for r in records]
    if records and all(a.get("after") is not None for a in accs):
        before = {a.get("before") for a in accs}
        return "test accuracy", [a["after"] for a in accs], before.pop() if len(before) == 1 else None
    base = {r.get("baseline_score") for r in records}
    rewards = {str(r.get("reward")) for r in records}
    name = f"score ({rewards.pop()})" if len(rewards) == 1 else "score"
    return name, [r.get("score") for r in records], base.pop() if len(base) == 1 else None


def plot_tradeoff(records: Sequence[dict], path) -> Path:
    """Accuracy (``test_accuracy["after"]`` when every record has it, else the score) against
    achieved sparsity: one point per record, one line per agent, the unpruned value dashed."""
    records = list(records)
    name, ys, unpruned = _tradeoff_metric(records)
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    series: Dict[str, List[Tuple[float, float]]] = {}
    for record, y in zip(records, ys):
        if y is not None and record.get("sparsity") is not None:
            series.setdefault(str(record.get("agent")), []).append((record["sparsity"], y))
    for i, (agent, points) in enumerate(series.items()):
        points.sort()
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", color=f"C{i % 10}", label=agent)
    if unpruned is not None:
        ax.axhline(unpruned, color="grey", linestyle="--", linewidth=1, label="unpruned")
    if not series:
        ax.text(0.5, 0.5, "nothing to plot", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"achieved sparsity (fraction of {records[0]['budget'] if records else 'budget'} removed)")
    ax.set_ylabel(name)
    ax.set_title(f"{name.capitalize()} against the fraction removed, per target", fontsize=10)
    if series or unpruned is not None:
        ax.legend(fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------- run.json
def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {what}")


def _check_counts(value, where: str, field: str) -> None:
    if value is None:
        return
    _check(isinstance(value, dict), where, f"{field!r} must be an object or null, got {type(value).__name__}")
    for key in ("before", "after"):
        _check(key in value, where, f"{field!r} is missing {key!r}")
    for key, v in value.items():
        _check(v is None or (_is_int(v) and v >= 0), where, f"{field}.{key} must be a non-negative integer or null")


def _check_record(r, where: str) -> None:
    _check(isinstance(r, dict), where, f"a record must be an object, got {type(r).__name__}")
    missing = [k for k in RECORD_KEYS if k not in r]
    _check(not missing, where, f"record is missing key(s) {missing}")
    for key in ("agent", "structure", "budget", "reward"):
        _check(isinstance(r[key], str), where, f"{key!r} must be a string")
    for key in ("target", "score", "baseline_score", "wall_time", "forward_seconds", "episode_seconds", "max_drop"):
        _check(r.get(key) is None or _is_number(r[key]), where, f"{key!r} must be a finite number or null")
    _check(_is_number(r["sparsity"]) and 0 <= r["sparsity"] <= 1, where, "'sparsity' must be a number in [0, 1]")
    _check(r["target"] is None or 0 <= r["target"] <= 1, where, "'target' must be in [0, 1] or null")
    for key in ("seed", "episodes"):
        _check(r[key] is None or _is_int(r[key]), where, f"{key!r} must be an integer or null")
    _check(isinstance(r["layers"], list), where, f"'layers' must be a list, got {type(r['layers']).__name__}")
    for i, lay in enumerate(r["layers"]):
        at = f"layers[{i}]"
        _check(isinstance(lay, dict), where, f"{at} must be an object, got {type(lay).__name__}")
        _check(isinstance(lay.get("name"), str) and isinstance(lay.get("kind"), str), where,
               f"{at} needs string 'name' and 'kind'")
        _check(_is_int(lay.get("units")) and lay["units"] > 0, where, f"{at}.units must be a positive integer")
        _check(_is_number(lay.get("amount")) and 0 <= lay["amount"] <= 1, where, f"{at}.amount must be in [0, 1]")
    _check_counts(r["macs"], where, "macs")
    _check_counts(r["params"], where, "params")
    acc = r["test_accuracy"]
    _check(acc is None or isinstance(acc, dict), where, "'test_accuracy' must be an object or null")
    for key, v in (acc or {}).items():
        _check(v is None or _is_number(v), where, f"test_accuracy.{key} must be a finite number or null")
    _check(isinstance(r["history"], list), where, f"'history' must be a list, got {type(r['history']).__name__}")
    for i, h in enumerate(r["history"]):
        _check(isinstance(h, dict), where, f"history[{i}] must be an object, got {type(h).__name__}")
        _check(_is_int(h.get("episode", 0)), where, f"history[{i}].episode must be an integer")
        for key in ("reward", "best_reward", "score", "sparsity", "seconds"):
            _check(h.get(key) is None or _is_number(h[key]), where, f"history[{i}].{key} must be a number or null")
    if "removed_blocks" in r:
        _check(isinstance(r["removed_blocks"], list) and all(isinstance(b, str) for b in r["removed_blocks"]),
               where, "'removed_blocks' must be a list of strings")
    _check(r.get("latency") is None or isinstance(r["latency"], dict), where, "'latency' must be an object or null")
    try:
        PruningPlan.from_dict(r["plan"])
    except PlanError as err:
        raise ValueError(f"{where}: 'plan': {err}") from None


def _check_records(records, where: str) -> List[dict]:
    _check(isinstance(records, (list, tuple)), where, f"'records' must be a list, got {type(records).__name__}")
    for i, r in enumerate(records):
        _check_record(r, f"{where}: records[{i}]")
    return list(records)


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def save_run(run_dir, records: Sequence[dict], extra: Optional[dict] = None) -> Path:
    """Write ``run_dir/run.json``: ``{"version": 1, "records": [...], **extra}`` (strict JSON).

    ``extra`` holds anything else worth keeping (the command line, the model name...); it may
    not use the keys ``version`` or ``records``. Records are checked as :func:`load_run` checks them.
    """
    run_dir = Path(run_dir)
    extra = {} if extra is None else extra
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise TypeError("extra must be a dict with string keys")
    clash = {"version", "records"} & set(extra)
    if clash:
        raise ValueError(f"extra may not set {sorted(clash)}: save_run writes them")
    records = _check_records(_jsonable(list(records)), "records")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"version": RUN_FORMAT_VERSION, "records": records, **_jsonable(extra)},
                              indent=1, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def load_run(run_dir) -> dict:
    """Read ``run_dir/run.json`` (or the file itself when given its path) and check it.

    The file is parsed as data only (JSON, no code) and every record is checked field by field;
    anything malformed raises a ``ValueError`` naming the file and what is wrong.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / RUN_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no run file (write one with save_run)") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a JSON run file ({err})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as err:  # JSONDecodeError and the constants above
        raise ValueError(f"{path}: not a JSON run file ({err})") from None
    except RecursionError:
        raise ValueError(f"{path}: not a JSON run file (nested too deeply)") from None
    _check(isinstance(data, dict), str(path), f"a run file must be a JSON object, got {type(data).__name__}")
    _check(data.get("version") == RUN_FORMAT_VERSION, str(path),
           f"run format version {data.get('version')!r} is not supported (this library reads "
           f"version {RUN_FORMAT_VERSION})")
    _check("records" in data, str(path), "missing 'records'")
    _check_records(data["records"], str(path))
    return data


# --------------------------------------------------------------------------- report.md
def _md(value) -> str:
    """A markdown table cell: pipes, newlines and tags escaped (names come from the run file)."""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return text.replace("<", "&lt;")  # no HTML tags from the file's strings


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines


def _record_section(record: dict, label: str, image: str) -> List[str]:
    stats = search_stats(record)
    macs, params = record.get("macs") or {}, record.get("params") or {}
    rows = [("agent", record["agent"]), ("structure", record["structure"]), ("budget", record["budget"]),
            ("reward", record["reward"]), ("seed", record.get("seed")),
            ("goal", _goal(record)), ("achieved sparsity", _num(record["sparsity"])),
            ("score (unpruned)", f"{_num(record.get('score'))} ({_num(record.get('baseline_score'))})")]
    if macs.get("before") is not None:
        rows.append(("MACs before -> after", f"{_si(macs['before'])} -> {_si(macs.get('after'))} "
                                             f"({_ratio(macs['before'], macs.get('after'))})"))
    if params.get("before") is not None:
        rows.append(("params before -> after", f"{_si(params['before'])} -> {_si(params.get('after'))} "
                                               f"({_ratio(params['before'], params.get('after'))})"))
        if params.get("nonzero") is not None:
            rows.append(("nonzero params", f"{_si(params['nonzero'])} "
                                           f"({_ratio(params['before'], params['nonzero'])})"))
    for key, value in (record.get("test_accuracy") or {}).items():
        rows.append((f"test accuracy ({key})", _acc(value)))
    episode, forward = record.get("episode_seconds"), record.get("forward_seconds")
    rows += [("wall time", f"{_num(record.get('wall_time'), '.1f')} s"),
             ("episode vs forward", f"{_num(None if episode is None else episode * 1e3, '.0f')} ms vs "
                                    f"{_num(None if forward is None else forward * 1e3, '.0f')} ms"),
             ("episodes", stats["episodes"]), ("best reward", _num(stats["best"])),
             ("episodes to 99% of the final best", "-" if stats["episodes_to_99"] is None
              else stats["episodes_to_99"])]
    if "removed_blocks" in record:
        rows.append(("blocks removed", ", ".join(record["removed_blocks"]) or "none"))
    unstructured = record["structure"] == "unstructured"
    layer_rows = [(lay["name"], lay["kind"], lay["units"], lay["units"] - int(round(lay["amount"] * lay["units"])),
                   f"{lay['amount']:.1%}") for lay in record["layers"]]
    return ([f"## {_md(label)}", ""] + _table(("", ""), rows)
            + ["", f"![per-layer amounts: {_md(label)}]({image})", ""]
            + _table(("layer" if unstructured else "channel group", "kind", "params" if unstructured else "units",
                      "kept", "pruned"), layer_rows) + [""])


def write_report(run_dir, records: Optional[Sequence[dict]] = None) -> Path:
    """Write ``run_dir/report.md`` and its PNGs (``amounts.png`` or one ``amounts_<target>.png`` per
    record, ``search.png``, and ``tradeoff.png`` when several targets were searched).

    Args:
        run_dir: the run directory (created if needed).
        records: run records (:func:`summarize`); default: those of ``run_dir/run.json``.

    Returns:
        the path of ``report.md``.
    """
    run_dir = Path(run_dir)
    extra = {}
    if records is None:
        data = load_run(run_dir)
        records = data["records"]
        extra = {k: v for k, v in data.items() if k not in ("version", "records")}
    records = _check_records(_jsonable(list(records)), "records")
    if not records:
        raise ValueError("write_report needs at least one record")
    run_dir.mkdir(parents=True, exist_ok=True)
    labels = _labels(records)
    amounts = _amounts_files(records)
    for record, name in zip(records, amounts):
        plot_amounts(record, run_dir / name)
    plot_search(records, run_dir / "search.png")
    several_targets = len({json.dumps(r.get("target")) for r in records}) > 1

    lines = ["# rl_prune report", ""]
    if extra:
        lines += _table(("run", ""), [(k, v if isinstance(v, (str, int, float)) else json.dumps(v))
                                      for k, v in extra.items()]) + [""]
    if len(records) > 1:
        name, ys, _ = _tradeoff_metric(records)
        rows = []
        for r, label, y in zip(records, labels, ys):
            macs = r.get("macs") or {}
            rows.append((label, _target_text(r), _num(r["sparsity"]), _num(y),
                         _ratio(macs.get("before"), macs.get("after")), search_stats(r)["episodes"]))
        lines += _table(("run", "target", "achieved", name, "MACs ratio", "episodes"), rows) + [""]
    if several_targets:
        plot_tradeoff(records, run_dir / "tradeoff.png")
        lines += ["![accuracy vs sparsity](tradeoff.png)", ""]
    lines += ["![reward per episode and best so far](search.png)", ""]
    for record, label, image in zip(records, labels, amounts):
        lines += _record_section(record, label, image)
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def publish_section(root, name: str, markdown: str) -> List[Path]:
    """Write ``markdown`` between ``name``'s markers in ``root``/README.md and every ``root``/docs/*.md
    holding them (a table lives on one page; which page may change without touching its script).
    Returns the files written."""
    root = Path(root)
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return [page for page in pages if page.is_file() and write_marked_section(page, name, markdown)]


def write_marked_section(document, name: str, markdown: str) -> bool:
    """Replace what lies between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``document``.

    How a benchmark or an example writes its own table into a README, so the figures there are
    the run's, never typed. Returns False (and leaves the file alone) when a marker is missing.
    """
    path = Path(document)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{markdown.rstrip()}\n{end}{tail}")
    return True
