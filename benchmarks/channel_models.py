"""RL channel pruning (AMC agent, 50% of the MACs) across 13 common timm models: sizes, fidelity, speed.

    python benchmarks/channel_models.py [--quick] [--models resnet18 vit_tiny_patch16_224 ...]
                                        [--episodes 60] [--warmup 20] [--timeout 1800]

For each model (timm, pretrained=False, 10 classes, 64x64 inputs; ViT/DeiT/LeViT/Mixer are
built with ``img_size=64``):

1. count MACs/params of the unpruned model (``count_macs_params`` on one image);
2. ``rl_prune(model, 0.5, structure="channel", agent="amc", ...)`` on 64 seeded synthetic
   calibration images (3x64x64);
3. keep the masked model's output on a fixed batch, ``result.compact()``, compare outputs and
   count again;
4. time the unpruned model (a deep copy taken before step 2) against the compacted one at
   batch 1 and batch 16, single-threaded, interleaved run by run so that both see the same
   machine load; the load average is recorded next to every timing.

Each model runs in its own subprocess with a timeout, so a failure or a hang is a row of the
table, not a crash of the benchmark. The child prints its partial record after every phase;
on a timeout the last one tells how far it got. Models run one after the other: two at once
would time each other.

Writes benchmarks/results/channel_models.{json,md} (``--quick``: channel_models_quick.*).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent

MODELS = ["resnet18", "resnet50", "mobilenetv2_100", "mobilenetv3_small_100", "efficientnet_b0",
          "convnext_atto", "regnetx_002", "densenet121", "ghostnet_100", "vit_tiny_patch16_224",
          "deit_tiny_patch16_224", "levit_128s", "mixer_b16_224"]
# Models whose patch grid / position embeddings are sized at construction: they must be told
# the input size (img_size=), the CNNs just run on whatever arrives.
SIZED_AT_CONSTRUCTION = {"vit_tiny_patch16_224", "deit_tiny_patch16_224", "levit_128s", "mixer_b16_224"}
SIZE = 64
FALLBACK_SIZES = (96, 128, 160, 224)  # tried in order if a model refuses 64x64
CALIBRATION_IMAGES = 64
CHECK_BATCH = 8  # the fixed batch that compares masked and compacted outputs
TARGET = 0.5
DEFAULT = {"episodes": 60, "warmup": 20}
QUICK = {"episodes": 6, "warmup": 2}


# ----------------------------------------------------------------------------- child process

def images(n: int, size: int, seed: int):
    """Seeded Gaussian images: the same tensors on every run and machine."""
    import torch

    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build_model(name: str):
    """The model and the smallest input side it runs at (64 unless it refuses it)."""
    import timm
    import torch

    errors = []
    for size in (SIZE, *FALLBACK_SIZES):
        kwargs = {"img_size": size} if name in SIZED_AT_CONSTRUCTION else {}
        try:
            torch.manual_seed(0)  # timm initialises weights from the global RNG: same model every run
            model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
            with torch.inference_mode():
                model(images(1, size, seed=0))
            return model, size
        except Exception as err:  # noqa: BLE001 - this size is refused; try the next one
            errors.append(f"{size}: {type(err).__name__}: {str(err)[:80]}")
    raise RuntimeError(f"{name} runs at none of the sizes tried ({'; '.join(errors)})")


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def interleaved_latency(models: dict, x, runs: int, warmup_runs: int) -> dict:
    """Median ms per forward of each model on ``x``, timed alternately run by run.

    Alternating (rather than timing one model, then the other) means slow drifts of the
    shared machine's load hit both models alike, so their ratio is more trustworthy than
    either absolute number. Also returns the median of the per-run ratios and the 1-minute
    load average before and after the timing block.
    """
    import torch

    times = {k: [] for k in models}
    load_before = load_average()
    with torch.inference_mode():
        for i in range(warmup_runs + runs):
            for key, model in models.items():
                tick = time.perf_counter()
                model(x)
                elapsed = time.perf_counter() - tick
                if i >= warmup_runs:
                    times[key].append(elapsed * 1e3)
    out = {f"{k}_ms": round(statistics.median(v), 3) for k, v in times.items()}
    keys = list(models)
    if len(keys) == 2:  # before/after: how much faster is the second one, run by run
        out["median_pair_speedup"] = round(statistics.median(a / b for a, b in zip(times[keys[0]], times[keys[1]])), 3)
    out.update(runs=runs, warmup_runs=warmup_runs, batch=int(x.shape[0]),
               load_avg=[load_before, load_average()])
    return out


def max_abs_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def run_one(name: str, episodes: int, warmup: int, runs: int, warmup_runs: int, out: dict,
            report=lambda record: None) -> None:
    """Fill ``out`` phase by phase; ``report(out)`` after each so a timeout still tells something."""
    import torch

    import torch_rlprune
    from torch_rlprune.structure.channel import count_macs_params

    def phase(label: str):
        out["phase"] = label
        report(out)

    torch.set_num_threads(1)  # latency is quoted single-threaded; the search runs the same way
    out.update(model=name, ok=False, threads=torch.get_num_threads(), torch=torch.__version__)
    phase("create")
    model, size = build_model(name)
    out["input"] = [3, size, size]
    calib = images(CALIBRATION_IMAGES, size, seed=0)
    check = images(CHECK_BATCH, size, seed=1)
    macs0, params0 = count_macs_params(model, calib[:1])
    out.update(macs_before=macs0, params_before=params0)
    dense = copy.deepcopy(model)  # the unpruned reference for latency; taken before any hook exists

    phase("rl_prune")
    result = torch_rlprune.rl_prune(model, TARGET, structure="channel", data=calib, agent="amc",
                                    episodes=episodes, agent_config={"warmup": warmup}, seed=0,
                                    verbose=False)
    excluded = result.plan.metadata.get("excluded", {})
    out.update(groups=len(result.layers), excluded=len(excluded),
               excluded_reasons=sorted({str(r).split(":")[0][:80] for r in excluded.values()})[:6],
               achieved=round(result.sparsity, 4), score=round(result.score, 4),
               baseline_score=round(result.baseline_score, 4), search_s=round(result.wall_time, 2),
               episodes=len(result.history), episode_ms=round(result.episode_seconds * 1e3, 2),
               forward_ms=round(result.forward_seconds * 1e3, 2))
    out["episode_over_forward"] = round(result.episode_seconds / result.forward_seconds, 2)
    out["plan"] = {k: round(v, 4) for k, v in result.plan.amounts.items()}  # to compare runs

    phase("latency_masked")  # what a user gets before compact(): the prune hooks' cost, at batch 1
    out["latency_masked_b1"] = interleaved_latency({"dense": dense, "masked": model}, calib[:1], runs, warmup_runs)

    phase("compact")
    with torch.inference_mode():
        masked_out = model(check).clone()
    info = result.compact()
    with torch.inference_mode():
        compacted_out = model(check)
    out["masked_vs_compacted"] = max_abs_diff(masked_out, compacted_out)
    out["output_scale"] = float(masked_out.abs().max())
    out["compact"] = {k: info[k] for k in ("macs_before", "params_before", "macs_after", "params_after",
                                           "max_abs_diff", "exact", "seconds")}
    out["compact"].update(groups_removed=len(info["removed"]), partial=len(info["partial"]),
                          failed=info["failed"], excluded=len(info["excluded"]))
    macs1, params1 = count_macs_params(model, calib[:1])
    out.update(macs_after=macs1, params_after=params1, macs_removed=round(1 - macs1 / macs0, 4),
               params_removed=round(1 - params1 / params0, 4))

    phase("latency")
    for batch in (1, 16):
        timing = interleaved_latency({"before": dense, "after": model}, calib[:batch], runs, warmup_runs)
        timing["speedup"] = round(timing["before_ms"] / timing["after_ms"], 3)
        out[f"latency_b{batch}"] = timing
    out["ok"] = True
    phase("done")


def child_main(args) -> None:
    out = {"model": args.one}

    def report(record):  # one JSON line per phase; the parent keeps the last one
        print(json.dumps(record), flush=True)

    try:
        run_one(args.one, args.episodes, args.warmup, args.runs, args.warmup_runs, out, report)
    except Exception as err:  # noqa: BLE001 - every failure is a row of the table
        out["ok"] = False
        out["error"] = f"{type(err).__name__}: {err}"[:400]
        out["traceback"] = traceback.format_exc().splitlines()[-6:]
        report(out)


# ----------------------------------------------------------------------------- parent process

def _text(stream) -> str:
    # TimeoutExpired carries bytes even with text=True on POSIX
    return stream.decode(errors="replace") if isinstance(stream, bytes) else (stream or "")


def last_record(stdout: str):
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def run_subprocess(name: str, args) -> dict:
    """Run one model in a fresh interpreter; a crash or a timeout becomes a row."""
    cmd = [sys.executable, __file__, "--one", name, "--episodes", str(args.episodes), "--warmup",
           str(args.warmup), "--runs", str(args.runs), "--warmup-runs", str(args.warmup_runs)]
    # one thread everywhere: the machine is shared, and the latency comparison is single-threaded
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    tick = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=HERE.parent)
        record = last_record(proc.stdout)
        if record is None or (not record.get("ok") and "error" not in record):
            record = record or {"model": name}
            record.update(ok=False, error=f"crash (exit {proc.returncode}): "
                                          + " | ".join(proc.stderr.strip().splitlines()[-3:])[:400])
    except subprocess.TimeoutExpired as err:
        record = last_record(_text(err.stdout)) or {"model": name}
        record.update(ok=False, error=f"timeout: no result in {args.timeout:.0f}s "
                                      f"(stuck in phase {record.get('phase', 'start')!r})")
    record["seconds"] = round(time.perf_counter() - tick, 1)
    return record


def _count(n) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _arrow(r: dict, key: str) -> str:
    before, after = r.get(f"{key}_before"), r.get(f"{key}_after")
    if before is None:
        return ""
    if after is None:
        return f"{_count(before)} → ?"
    return f"{_count(before)} → {_count(after)} (−{1 - after / before:.0%})"


def _latency(t) -> str:
    if not t:
        return ""
    return f"{t['before_ms']:.2f} → {t['after_ms']:.2f} ms (x{t['speedup']:.2f})"


def _loads(r: dict) -> str:
    """Range of the 1-minute load averages taken around every timing block of the row."""
    values = [v for key in ("latency_masked_b1", "latency_b1", "latency_b16") if r.get(key)
              for v in r[key]["load_avg"]]
    return f"{min(values):.2f}–{max(values):.2f}" if values else ""


def row(r: dict) -> str:
    name = r["model"] + ("" if r.get("input", [0, SIZE])[-1] == SIZE else f" @{r['input'][-1]}")
    if not r.get("ok"):
        name += " **FAILED**"
    groups = f"{r['groups']} ({r['excluded']})" if "groups" in r else ""
    achieved = f"{r['achieved']:.1%}" if "achieved" in r else ""
    diff = f"{r['masked_vs_compacted']:.2g}" if "masked_vs_compacted" in r else ""
    search = f"{r['search_s']:.0f}" if "search_s" in r else ""
    ratio = (f"{r['episode_ms']:.0f} / {r['forward_ms']:.0f} ms (x{r['episode_over_forward']:.1f})"
             if "episode_ms" in r else "")
    cells = [name, groups, _arrow(r, "macs"), _arrow(r, "params"), achieved, diff, search, ratio,
             _latency(r.get("latency_b1")), _latency(r.get("latency_b16")), _loads(r)]
    line = "| " + " | ".join(cells) + " |"
    if not r.get("ok"):
        line += f"\n| ↳ {r.get('phase', '')}: {r.get('error', '')[:300]} |" + " |" * (len(cells) - 1)
    return line


def markdown(results: list, config: dict) -> str:
    ok = sum(r.get("ok", False) for r in results)
    head = [f"# RL channel pruning across timm models ({ok} of {len(results)} ok)", "",
            f"`rl_prune(model, {TARGET}, structure=\"channel\", agent=\"amc\", episodes={config['episodes']}, "
            f"agent_config={{\"warmup\": {config['warmup']}}}, seed=0)` on {CALIBRATION_IMAGES} seeded synthetic "
            f"3x{SIZE}x{SIZE} images; timm {config['timm']}, torch {config['torch']}, pretrained=False, 10 classes, "
            f"one thread. {config['note']}", "",
            "- **groups (excluded)**: channel groups the agent acts on (`len(result.layers)`) and groups left out "
            "(plan metadata `excluded`). **MACs/params**: `count_macs_params` on one image, unpruned vs after "
            "`compact()`. **achieved**: `result.sparsity` (fraction of MACs removed, target 50%).",
            f"- **masked vs compacted**: max abs difference of the outputs on a fixed batch of {CHECK_BATCH}. "
            "**episode/forward**: median wall time of one search episode vs one scoring pass of the "
            "unpruned model over the calibration set.",
            f"- **latency**: median ms of {config['runs']} runs after {config['warmup_runs']} warm-up runs "
            "(`torch.inference_mode`, `torch.set_num_threads(1)`), unpruned (a copy) vs compacted, timed "
            "alternately run by run; x = ratio of the medians. **load avg**: range of the 1-minute load "
            "average around the timings: the machine is shared, trust ratios over absolute numbers.", "",
            "| model | groups (excluded) | MACs before→after | params before→after | achieved | masked vs compacted "
            "| search s | episode/forward | latency b1 before→after (x speedup) | latency b16 before→after | load avg |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + [row(r) for r in results]) + "\n"


def write(results: list, config: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"config": config, "results": results}, indent=1))
    stem.with_suffix(".md").write_text(markdown(results, config))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", choices=MODELS, metavar="NAME", help=f"subset of {MODELS}")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    parser.add_argument("--episodes", type=int, help=f"default {DEFAULT['episodes']}")
    parser.add_argument("--warmup", type=int, help=f"AMC random warm-up episodes, default {DEFAULT['warmup']}")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per latency (>= 30 to quote)")
    parser.add_argument("--warmup-runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    parser.add_argument("--note", default="", help="free text for the markdown header (e.g. machine load)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULT
    args.episodes = preset["episodes"] if args.episodes is None else args.episodes
    args.warmup = preset["warmup"] if args.warmup is None else args.warmup
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        child_main(args)
        return
    import timm
    import torch

    config = {"episodes": args.episodes, "warmup": args.warmup, "runs": args.runs, "warmup_runs": args.warmup_runs,
              "timeout_s": args.timeout, "target": TARGET, "input": [3, SIZE, SIZE], "quick": args.quick,
              "timm": timm.__version__, "torch": torch.__version__, "nice": os.nice(0), "note": args.note,
              "load_avg_start": list(os.getloadavg())}
    stem = Path(args.out) / ("channel_models_quick" if args.quick else "channel_models")
    todo = [m for m in MODELS if not args.models or m in args.models]
    started, results = time.perf_counter(), []
    for name in todo:
        record = run_subprocess(name, args)
        results.append(record)
        print(f"{name:<26} {'ok' if record.get('ok') else 'FAILED':<7} {record['seconds']:>7.1f}s  "
              f"{record.get('error', '')[:150]}", flush=True)
        write(results, config, stem)  # after every model: an interrupted run still leaves a table
    config.update(total_s=round(time.perf_counter() - started, 1), load_avg_end=list(os.getloadavg()))
    write(results, config, stem)
    print(f"{sum(r.get('ok', False) for r in results)} of {len(results)} ok in {config['total_s']:.0f}s; "
          f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
