"""Latency budgets measured after compact: torch eager and onnxruntime, batch 1 and 16, five timm models.

    python benchmarks/latency_targets.py          # ~30 min on 2 cores; writes benchmarks/results/latency_targets.{json,md}
    python benchmarks/latency_targets.py --quick  # one model, one target

For each model (timm, pretrained=False, 10 classes, 64x64 inputs as in ``benchmarks/channel_models.py``),
runtime, batch and latency target 0.3/0.5/0.7: ``rl_prune(model, target, structure="channel",
agent="prior", budget=Latency(batch=, runtime=))`` on 64 seeded Gaussian images (the plan's quality is not
the point here: every agent's plan goes through the same measured closing step). Where widths alone
cannot reach the target, ``rl_prune`` refuses and says that ``agent="n2n"`` also removes residual blocks;
the run then does what the message says (``agent="n2n"``, 30 episodes), and the row names the agent. Recorded: what the
latency table alone predicted for the returned plan, the first measurement of the plan the search
returned (calibrated on two measured uniform plans), the measurement after the rescaling rounds, and an
independent check: the pruned model compacted again and timed against the unpruned one in a fresh
interleaved run (no cache, blocks until its median settles, as rl_prune's own), with the MACs
ratio beside it. A target no plan can reach (at most 80% of any
group removed, every removable block gone) is refused by ``rl_prune`` before the model changes; the table says so.
Measurement cache: a fresh directory per run (``$TORCH_RLPRUNE_CACHE``), so every number is measured here.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import re
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from channel_models import build_model, images  # noqa: E402
from study import study_main  # noqa: E402
from torch_rlprune import Latency, compact, rl_prune  # noqa: E402
from torch_rlprune.structure.channel import count_macs_params  # noqa: E402
from torch_rlprune.structure.channel.measured import CompactedTimer  # noqa: E402

MODELS = ["resnet18", "mobilenetv3_small_100", "efficientnet_b0", "regnetx_002", "deit_tiny_patch16_224"]
TARGETS = (0.3, 0.5, 0.7)
BATCHES = (1, 16)
RUNTIMES = ("eager", "onnxruntime")
WITHIN = 0.05  # the acceptance: measured within 5 percentage points of the target
DEPTH_EPISODES = 30


def one_run(name: str, runtime: str, batch: int, target: float) -> dict:
    model, size = build_model(name)
    dense = copy.deepcopy(model)
    x = images(64, size, seed=1)
    row = {"model": name, "runtime": runtime, "batch": batch, "target": target, "size": size}
    spec = Latency(batch=batch, runtime=runtime)
    tick = time.perf_counter()
    search = dict(agent="prior")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while True:
            try:
                result = rl_prune(model, target, data=x, structure="channel", budget=spec, verbose=False, **search)
                break
            except ValueError as error:  # an unreachable target, refused before the model changed
                if search["agent"] == "prior" and "agent='n2n'" in str(error):
                    search = dict(agent="n2n", episodes=DEPTH_EPISODES)  # what the refusal suggests
                    continue
                row["refused"] = f"{search['agent']}: {str(error)[:160]}"
                return row
    row["agent"] = search["agent"]
    row["removed_blocks"] = len(result.plan.metadata.get("removed_blocks", ()))
    row["seconds"] = time.perf_counter() - tick
    row["warned"] = [str(w.message)[:200] for w in caught if "measured after compact" in str(w.message)]
    record = result.plan.metadata["latency"]["measured"]
    first, last = record["rounds"][0], record["rounds"][record["chosen"]]
    row.update(table_predicted=last["table"], first_measured=first["measured"], chosen_reading=last["measured"],
               measured=record["measured_fraction"], confirmed="confirmed" in last,
               rereadings=last.get("rereadings", []),
               rounds=len(record["rounds"]), measurements=record["measurements"])
    # independent check: compact what rl_prune returned and time it against the unpruned model afresh
    example = x[:batch] if batch <= len(x) else torch.cat([x] * (batch // len(x) + 1))[:batch]
    pruned = copy.deepcopy(result.model)
    compact(pruned, x[:2])
    timer = CompactedTimer(dense, example, spec)
    row["check"] = timer.settled_fraction(timer.reference, pruned)  # as many blocks as rl_prune's own measurement
    row["dense_ms"] = timer.paired_seconds(timer.reference, timer.reference)[0] * 1e3
    row["macs_ratio"] = count_macs_params(dense, x[:1])[0] / count_macs_params(pruned, x[:1])[0]
    timer.close()
    return row


def run(quick: bool) -> dict:
    import onnxruntime

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCH_RLPRUNE_CACHE"] = cache
        for name in MODELS[:1] if quick else MODELS:
            for runtime in RUNTIMES:
                for batch in BATCHES[:1] if quick else BATCHES:
                    for target in TARGETS[1:2] if quick else TARGETS:
                        try:
                            rows.append(one_run(name, runtime, batch, target))
                        except Exception as error:  # noqa: BLE001 - a failure is a row, not the end of the run
                            traceback.print_exc()
                            rows.append({"model": name, "runtime": runtime, "batch": batch, "target": target,
                                         "error": f"{type(error).__name__}: {str(error)[:160]}"})
                        print(json.dumps(rows[-1]), flush=True)
    meta = {"minutes": (time.perf_counter() - started) / 60, "threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "load_avg_end": os.getloadavg()[0]}
    return {"meta": meta, "rows": rows}


def _most(row) -> str:
    """The refusal's own bound: ``(at most 0.1103)`` -> ``; at most 11.0%``."""
    match = re.search(r"at most (0\.\d+)\)", row["refused"])
    return f"; at most {100 * float(match.group(1)):.1f}%" if match else ""


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def model_verdicts(rows) -> dict:
    """Per (model, runtime): "met" when it accepted a target and measured every accepted one (both
    batches) within 5 points on the check; "refused" when no plan could reach any target; else "missed"."""
    verdict = {}
    for r in rows:
        key = (r["model"], r["runtime"])
        state = verdict.setdefault(key, {"accepted": 0, "ok": True})
        if "refused" in r:
            continue
        state["accepted"] += 1
        state["ok"] = state["ok"] and "check" in r and abs(r["check"] - r["target"]) <= WITHIN
    return {key: ("refused" if not v["accepted"] else "met" if v["ok"] else "missed") for key, v in verdict.items()}


def _within_10(rows, predicted: str, measured: str) -> int:
    """Runs whose predicted latency (1 - fraction removed) is within 10% of the measured one."""
    return sum(abs((1 - r[predicted]) - (1 - r[measured])) <= 0.1 * (1 - r[measured]) for r in rows)


def to_markdown(report: dict, command: str) -> str:
    rows, meta = report["rows"], report["meta"]
    verdict = model_verdicts(rows)
    models = len({r["model"] for r in rows})

    def tally(runtime: str) -> str:
        met = [m for (m, rt), v in verdict.items() if rt == runtime and v == "met"]
        refused = [m for (m, rt), v in verdict.items() if rt == runtime and v == "refused"]
        return (f"{runtime} {len(met)} of {models} models"
                + (f" ({', '.join(refused)}: every target refused, no plan reaches it)" if refused else ""))

    measured = [r for r in rows if "check" in r]
    lines = [f"Reproduce: `{command}` ({meta['minutes']:.0f} min, {meta['threads']} threads, onnxruntime "
             f"{meta['onnxruntime']}, load average at the end {meta['load_avg_end']:.1f}). "
             "`rl_prune(model, target, structure=\"channel\", agent=\"prior\", budget=Latency(batch=, runtime=))`, "
             "or `agent=\"n2n\"` (30 episodes; it also removes residual blocks) where rl_prune refuses the prior "
             "and says so; "
             "table: the latency table's own prediction for the returned plan; first: the search's plan measured "
             "after compact (the budget calibrated on two measured plans, uniform widths and for n2n the fewest blocks "
             "that reach the target, the table's share of fixed per-call overhead fitted to them); final: what rl_prune "
             "reports for the returned plan (the round closest to the target, of the measured rounds; chosen among "
             "several, that plan measured again, marked *: that reading, or the median of three when it disagreed "
             "with the first by more than the tolerance); "
             "check: the returned model compacted again and timed against the unpruned one afresh (median of "
             "interleaved blocks until it settles, as rl_prune's own), the number to trust. "
             f"**Within {WITHIN * 100:.0f} points on the check, every accepted target at both batches: "
             + "; ".join(tally(rt) for rt in RUNTIMES) + "**; "
             f"{sum(abs(r['check'] - r['target']) <= WITHIN for r in measured)} of {len(measured)} runs; "
             f"the table alone within 5 points: {sum(abs(r['table_predicted'] - r['check']) <= WITHIN for r in measured)}"
             f" of {len(measured)}. Latency predicted within 10% of the measured (nn-Meter's yardstick): the table "
             f"alone {_within_10(measured, 'table_predicted', 'check')} of {len(measured)}; the calibrated budget on "
             f"the search's plan, before any rescaling (it predicts the target) "
             f"{_within_10(measured, 'target', 'first_measured')}; the returned plan as rl_prune measured it against "
             f"the check {_within_10(measured, 'measured', 'check')}.", "",
             "| model | runtime | batch | target | agent (blocks removed) | table | first | final (rounds) | check | "
             "unpruned ms | MACs ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['model']} | {r['runtime']} | {r['batch']} | {_pct(r['target'])} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | | | | |")
        elif "refused" in r:
            lines.append(f"{head} refused ({r['refused'].split(' cannot')[0]} cannot be reached{_most(r)}) "
                         "| | | | | | |")
        else:
            agent = r.get("agent", "prior") + (f" ({r['removed_blocks']})" if r.get("agent") == "n2n" else "")
            final = _pct(r["measured"]) + ("*" if r.get("confirmed") else "")
            lines.append(f"{head} {agent} | {_pct(r['table_predicted'])} | {_pct(r['first_measured'])} | "
                         f"{final} ({r['rounds']}) | **{_pct(r['check'])}** | {r['dense_ms']:.2f} | "
                         f"x{r['macs_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    study_main("latency_targets", __doc__.splitlines()[0], run, to_markdown)
