"""PNG plots of run records.

matplotlib is imported only inside the plotting functions, through its object-oriented API
(``Figure`` drawn by the Agg canvas): pyplot is never imported, so the caller's backend and
open figures are left alone and nothing stays registered once a plot is saved.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..env.spaces import space_kind
from .formatting import format_goal, format_number


# --------------------------------------------------------------------------- labels and search statistics
def _distinct(records: Sequence[dict], key: str) -> bool:
    return len({json.dumps(r.get(key)) for r in records}) > 1


def target_text(record: dict) -> str:
    t = record.get("target")
    return "guaranteed" if t is None else f"{t:g}"


def record_labels(records: Sequence[dict]) -> List[str]:
    """A short unique label per record: the agent, plus whatever else tells records apart."""
    parts = [[str(r.get("agent"))] for r in records]
    for key, fmt in (("target", lambda r: f"target {target_text(r)}"), ("structure", lambda r: r["structure"]),
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


def amounts_files(records: Sequence[dict]) -> List[str]:
    if len(records) == 1:
        return ["amounts.png"]
    names = []
    for i, r in enumerate(records):
        parts = [target_text(r)]
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
    unit = "units" if space_kind(record.get("structure", "unstructured")).removes_channels else "entries"
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
    ax.set_title(f"{record.get('agent')} ({record.get('structure')}): {format_goal(record)}, "
                 f"achieved {format_number(record.get('sparsity'))}", fontsize=10)
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
    for i, (record, label) in enumerate(zip(records, record_labels(records))):
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


def tradeoff_metric(records: Sequence[dict]) -> Tuple[str, List[Optional[float]], Optional[float]]:
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
    name, ys, unpruned = tradeoff_metric(records)
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
