"""Channel-pruning coverage across the timm zoo: one smallest model per family.

    python benchmarks/zoo_sweep.py [--workers 2] [--timeout 240] [--only resnet vit ...]

Each model runs in its own subprocess with a timeout (a hang is a result, never a stuck
sweep). For each: build the model (pretrained=False, 10 classes) at the smallest input it
accepts among 64/96/128/its configured size; build our ChannelStructure (torch-pruning
groups, unsafe groups excluded and reported); remove 50% of every group through the
prune API; check the output shape, that the masked model equals the compacted one
(exactly where norms allow), that forward and backward work after ``compact`` and that
MACs fell by at least 30% (the bar TIMM-ZOO.md used for torch-pruning alone). Masked equals compacted when the max abs
difference is below 1e-4 times the output's largest magnitude (at least 1e-4). Writes
benchmarks/results/zoo.json and zoo.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from zoo_models import ZOO  # noqa: E402

SIZES = (64, 96, 128)


def run_one(name: str) -> dict:
    """Runs inside the subprocess."""
    import timm
    import torch

    from torch_rlprune.structure.channel import ChannelStructure, apply_channel_plan, compact, count_macs_params

    os.environ.setdefault("TIMM_FUSED_ATTN", "0")
    torch.manual_seed(0)
    out = {"model": name, "phase": "create"}
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    cfg_size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    out["phase"] = "baseline_forward"
    x, dense_out = None, None
    for size in list(SIZES) + [cfg_size[-1]]:
        try:
            candidate = torch.randn(2, cfg_size[0], size, size)
            with torch.no_grad():
                dense_out = model(candidate)
            x = candidate
            break
        except Exception:  # noqa: BLE001 - the model refuses this size; try the next
            continue
    if x is None:
        raise RuntimeError("the unpruned model runs at none of the sizes tried")
    out["input"] = list(x.shape[1:])
    out["phase"] = "structure"
    tick = time.perf_counter()
    structure = ChannelStructure(model, x, timeout=120)
    out["structure_s"] = round(time.perf_counter() - tick, 1)
    out["groups"], out["excluded"] = len(structure.groups), len(structure.excluded)
    out["excluded_reasons"] = sorted({e.reason.split(":")[0][:80] for e in structure.excluded})[:6]
    out["exact"] = structure.exact
    macs0, params0 = count_macs_params(model, x)
    out["phase"] = "apply"
    apply_channel_plan(model, {g.key: 0.5 for g in structure.groups}, structure=structure)
    with torch.no_grad():
        masked = model(x)
    out["shape_kept"] = tuple(masked.shape) == tuple(dense_out.shape)
    out["phase"] = "compact"
    info = compact(model, x)
    with torch.no_grad():
        compacted = model(x)
    out["max_abs_diff"] = float((compacted - masked).abs().max())
    out["output_scale"] = float(masked.abs().max())
    out["phase"] = "backward"
    model.train()
    model(x).sum().backward()
    macs1, params1 = count_macs_params(model.eval(), x)
    out.update(macs_before=macs0, macs_after=macs1, params_before=params0, params_after=params1,
               macs_removed=round(1 - macs1 / macs0, 3), compact_failed=len(info.get("failed", {})))
    out["phase"] = "done"
    # relative to the output's scale: float rounding grows with it (and with tiny BN variances)
    tolerance = 1e-4 * max(1.0, out["output_scale"]) if out["exact"] else float("inf")
    out["ok"] = bool(out["shape_kept"] and out["max_abs_diff"] <= tolerance and out["macs_removed"] >= 0.3)
    return out


def run_subprocess(family: str, name: str, baseline: str, timeout: float) -> dict:
    tick = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TIMM_FUSED_ATTN": "0"}
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=HERE.parent)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"model": name, "ok": False, "phase": "crash",
                                                      "error": proc.stderr.strip().splitlines()[-1:]}
    except subprocess.TimeoutExpired:
        result = {"model": name, "ok": False, "phase": "timeout", "error": f"no result in {timeout:.0f}s"}
    result.update(family=family, torch_pruning_alone=baseline, seconds=round(time.perf_counter() - tick, 1))
    return result


def markdown(results) -> str:
    ok = sum(r.get("ok", False) for r in results)
    lines = [f"**{ok} of {len(results)} families ok ({ok / len(results):.1%})**; torch-pruning 1.6 alone: "
             f"{sum(r['torch_pruning_alone'] == 'ok' for r in results)} of {len(results)}.", "",
             "| family | model | ok | input | groups (excluded) | exact | masked vs compacted | MACs removed | "
             "tp alone | where / error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        err = r.get("error", "")
        if isinstance(err, list):
            err = " ".join(err)
        lines.append(f"| {r['family']} | {r['model']} | {'ok' if r.get('ok') else 'no'} | "
                     f"{'x'.join(map(str, r.get('input', [])[1:]))} | {r.get('groups', '')} ({r.get('excluded', '')}) | "
                     f"{r.get('exact', '')} | {r.get('max_abs_diff', ''):.2g} | {r.get('macs_removed', '')} | "
                     f"{r['torch_pruning_alone']} | {r.get('phase', '') if not r.get('ok') else ''} {err[:90]} |"
                     if isinstance(r.get("max_abs_diff"), float) else
                     f"| {r['family']} | {r['model']} | no | | {r.get('groups', '')} | | | | "
                     f"{r['torch_pruning_alone']} | {r.get('phase', '')}: {err[:120]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=240)
    parser.add_argument("--only", nargs="*", help="families or model names to run")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    if args.one:
        try:
            result = run_one(args.one)
        except Exception as err:  # noqa: BLE001 - every failure is a result of the sweep
            result = {"model": args.one, "ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
        print(json.dumps(result))
        return
    todo = [z for z in ZOO if not args.only or z[0] in args.only or z[1] in args.only]
    with ThreadPoolExecutor(args.workers) as pool:
        results = list(tqdm(pool.map(lambda z: run_subprocess(*z, args.timeout), todo), total=len(todo),
                            desc="zoo sweep", unit="model", dynamic_ncols=True))
    for r in results:
        print(f"{r['family']:<28} {r['model']:<40} {'ok' if r.get('ok') else 'NO':<3} {r.get('phase', '')}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo.json").write_text(json.dumps(results, indent=1))
    (out / "zoo.md").write_text(markdown(results))
    print(markdown(results).splitlines()[0])


if __name__ == "__main__":
    main()
