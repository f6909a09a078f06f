"""Compacted channel-pruned models exported to ONNX and run in onnxruntime: equality and batch-1 speed.

    python benchmarks/export_models.py          # ~10 min on 2 cores; writes benchmarks/results/export_models.{json,md}
    python benchmarks/export_models.py --quick  # two models

The 13 models of ``benchmarks/channel_models.py`` at the same input sizes: the best channel prior at 50% of
the MACs (``rl_prune(agent="prior", structure="channel")``: the structure compacted is what matters here, not
the plan's quality), with any width per group and with ``round_to=8``, ``compact``, then
``torch_rlprune.export`` to ONNX at batch 1 for the unpruned and both compacted models. Measured: the largest |onnxruntime - torch| output difference (export raises above 1e-4),
the MACs ratio, and onnxruntime batch-1 latency of both files, runs interleaved (medians of 50 runs after 5;
ratios are what to trust on a shared machine, the load average is recorded).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from channel_models import MODELS, build_model, images  # noqa: E402
from study import study_main  # noqa: E402
from torch_rlprune import compact, export, rl_prune  # noqa: E402
from torch_rlprune.structure.channel import count_macs_params  # noqa: E402
from torch_rlprune.structure.deploy import onnx_latency_ms  # noqa: E402

TARGET = 0.5
RUNS = 50


ROUNDINGS = (None, 8)  # round_to: any width, or what remains of a group a multiple of 8


def _pruned(name: str, x, round_to, path: Path) -> dict:
    model, _ = build_model(name)
    one = x[:1]
    dense_macs = count_macs_params(model, one)[0]
    rl_prune(model, TARGET, data=x, structure="channel", agent="prior", verbose=False, round_to=round_to)
    compact(model, x[:2])
    report = export(model, one, path)
    return {"macs_ratio": dense_macs / count_macs_params(model, one)[0], "max_abs_diff": report["max_abs_diff"],
            "mb": report["bytes"] / 2 ** 20}


def measure(name: str, folder: Path) -> dict:
    started = time.perf_counter()
    model, size = build_model(name)
    x = images(32, size, seed=1)
    dense_path = folder / f"{name}_dense.onnx"
    dense = export(model, x[:1], dense_path)
    paths = {rt: folder / f"{name}_pruned_{rt}.onnx" for rt in ROUNDINGS}
    pruned = {rt: _pruned(name, x, rt, path) for rt, path in paths.items()}
    times = onnx_latency_ms([dense_path, *paths.values()], x[:1], repeats=RUNS)
    row = {"model": name, "size": size, "dense_ms": times[0], "dense_mb": dense["bytes"] / 2 ** 20,
           "max_abs_diff": max([dense["max_abs_diff"]] + [p["max_abs_diff"] for p in pruned.values()]),
           "load_avg": round(os.getloadavg()[0], 2), "seconds": None}
    for (rt, p), ms in zip(pruned.items(), times[1:]):
        key = f"round_to_{rt}" if rt else "any_width"
        row[key] = {**p, "ms": ms, "speedup": times[0] / ms}
    row["seconds"] = time.perf_counter() - started
    return row


def to_markdown(report: dict, command: str) -> str:
    rows, meta = report["rows"], report["meta"]
    ok = [r for r in rows if "error" not in r]
    lines = [f"Reproduce: `{command}` ({meta['minutes']:.0f} min, {meta['threads']} threads, "
             f"onnxruntime {meta['onnxruntime']}). The best channel prior at 50% of the MACs, `compact`, then `export` "
             "to ONNX at batch 1, once with any width per group and once with `round_to=8`; max diff: onnxruntime "
             "against torch on the example, worst of the three files (the export refuses above 1e-4); latency: "
             f"onnxruntime batch 1, medians of {RUNS} interleaved runs (load average at the end of each row: on a "
             f"shared machine read the ratios). **{len(ok)} of {len(rows)} exported and within 1e-4.**", "",
             "| model | input | MACs ratio | max diff | unpruned ms | pruned, any width: ms (speed-up) "
             "| pruned, round_to=8: ms (speed-up, MACs ratio) | load |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | — | — | — | — | failed: {r['error']} | — | — |")
            continue
        anyw, r8 = r["any_width"], r["round_to_8"]
        lines.append(f"| {r['model']} | {r['size']}px | x{anyw['macs_ratio']:.2f} | {r['max_abs_diff']:.1e} | "
                     f"{r['dense_ms']:.2f} | {anyw['ms']:.2f} (x{anyw['speedup']:.2f}) | "
                     f"{r8['ms']:.2f} (x{r8['speedup']:.2f}, x{r8['macs_ratio']:.2f}) | {r['load_avg']} |")
    return "\n".join(lines) + "\n"


def run(quick: bool) -> dict:
    import onnxruntime

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS[:2] if quick else MODELS:
            try:
                rows.append(measure(name, Path(tmp)))
            except Exception as error:  # noqa: BLE001 - a failure is a row of the table, not the end of the run
                traceback.print_exc()
                rows.append({"model": name, "error": f"{type(error).__name__}: {str(error)[:120]}"})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"minutes": (time.perf_counter() - started) / 60, "threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "python": platform.python_version()}
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    study_main("export_models", __doc__.splitlines()[0], run, to_markdown)
