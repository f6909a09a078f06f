"""``report.md`` from a run directory, and benchmark tables written between markers into the docs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

from ..env.spaces import space_kind
from .formatting import format_accuracy, format_goal, format_number, format_ratio, format_si, jsonable
from .plots import (amounts_files, plot_amounts, plot_search, plot_tradeoff, record_labels, search_stats, target_text,
                    tradeoff_metric)
from .runfile import check_records, load_run

REPORT_FILE = "report.md"


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
            ("goal", format_goal(record)), ("achieved sparsity", format_number(record["sparsity"])),
            ("score (unpruned)",
             f"{format_number(record.get('score'))} ({format_number(record.get('baseline_score'))})")]
    if macs.get("before") is not None:
        rows.append(("MACs before -> after", f"{format_si(macs['before'])} -> {format_si(macs.get('after'))} "
                                             f"({format_ratio(macs['before'], macs.get('after'))})"))
    if params.get("before") is not None:
        rows.append(("params before -> after", f"{format_si(params['before'])} -> {format_si(params.get('after'))} "
                                               f"({format_ratio(params['before'], params.get('after'))})"))
        if params.get("nonzero") is not None:
            rows.append(("nonzero params", f"{format_si(params['nonzero'])} "
                                           f"({format_ratio(params['before'], params['nonzero'])})"))
    for key, value in (record.get("test_accuracy") or {}).items():
        rows.append((f"test accuracy ({key})", format_accuracy(value)))
    episode, forward = record.get("episode_seconds"), record.get("forward_seconds")
    rows += [("wall time", f"{format_number(record.get('wall_time'), '.1f')} s"),
             ("episode vs forward", f"{format_number(None if episode is None else episode * 1e3, '.0f')} ms vs "
                                    f"{format_number(None if forward is None else forward * 1e3, '.0f')} ms"),
             ("episodes", stats["episodes"]), ("best reward", format_number(stats["best"])),
             ("episodes to 99% of the final best", "-" if stats["episodes_to_99"] is None
              else stats["episodes_to_99"])]
    if "removed_blocks" in record:
        rows.append(("blocks removed", ", ".join(record["removed_blocks"]) or "none"))
    kind = space_kind(record["structure"])
    layer_rows = [(lay["name"], lay["kind"], lay["units"], lay["units"] - int(round(lay["amount"] * lay["units"])),
                   f"{lay['amount']:.1%}") for lay in record["layers"]]
    return ([f"## {_md(label)}", ""] + _table(("", ""), rows)
            + ["", f"![per-layer amounts: {_md(label)}]({image})", ""]
            + _table((kind.step_label, "kind", kind.size_label,
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
    records = check_records(jsonable(list(records)), "records")
    if not records:
        raise ValueError("write_report needs at least one record")
    run_dir.mkdir(parents=True, exist_ok=True)
    labels = record_labels(records)
    amounts = amounts_files(records)
    for record, name in zip(records, amounts):
        plot_amounts(record, run_dir / name)
    plot_search(records, run_dir / "search.png")
    several_targets = len({json.dumps(r.get("target")) for r in records}) > 1

    lines = ["# rl_prune report", ""]
    if extra:
        lines += _table(("run", ""), [(k, v if isinstance(v, (str, int, float)) else json.dumps(v))
                                      for k, v in extra.items()]) + [""]
    if len(records) > 1:
        name, ys, _ = tradeoff_metric(records)
        rows = []
        for r, label, y in zip(records, labels, ys):
            macs = r.get("macs") or {}
            rows.append((label, target_text(r), format_number(r["sparsity"]), format_number(y),
                         format_ratio(macs.get("before"), macs.get("after")), search_stats(r)["episodes"]))
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
