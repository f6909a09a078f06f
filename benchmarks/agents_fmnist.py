"""Every agent on the same search: Fashion-MNIST resnet18, 80% of the weights, fidelity reward.

    python benchmarks/agents_fmnist.py [--seed 0] [--only amc purl ...] [--skip-cacp]

Uses the demo's cached checkpoint (``make demo`` trains it) and its 512 calibration images
carved from the training split; test accuracy on the 10,000 test images, no fine-tuning.
For each agent: best reward (top-1 agreement with the unpruned model on the calibration
images) after 10/25/50/100/.../all episodes, plans scored, wall time, and the episode at which
the best-so-far first reached 99% of the final best. Then CACP's one search for targets
0.5/0.7/0.9 against three separate AMC searches. Writes benchmarks/results/agents_fmnist.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "examples"))
from demo import trained_resnet18  # noqa: E402

from torch_rlprune import rl_prune  # noqa: E402
from torch_rlprune.demo.data import fashion_mnist, tensor_subset  # noqa: E402
from torch_rlprune.demo.training import evaluate_accuracy  # noqa: E402

CHECKPOINTS = (10, 25, 50, 100, 150, 200, 300, 450)


def best_so_far(history):
    """The best result so far, as the environment keeps it: for free (unclipped) searches, the
    best plan projected onto the budget, not the raw score of an off-budget plan."""
    return [h["best_reward"] for h in history]


def describe(result, x_test, y_test, seconds):
    curve = best_so_far(result.history)
    final = curve[-1]
    reach = next(i + 1 for i, v in enumerate(curve) if v >= 0.99 * final)
    return {"episodes": len(result.history), "evaluations": result.history[-1].get("evaluations"),
            "wall_s": round(seconds, 1), "best_reward": round(result.plan.score, 4),
            "best_at": {n: (round(curve[n - 1], 4) if curve[n - 1] > float("-inf") else None)
                        for n in CHECKPOINTS if n <= len(curve)},
            "episodes_to_99pct": reach, "sparsity": round(result.sparsity, 4),
            "test_acc": round(evaluate_accuracy(result.model, x_test, y_test), 4),
            "episode_ms": round(result.episode_seconds * 1e3, 1), "forward_ms": round(result.forward_seconds * 1e3, 1),
            "max_abs_violation": round(max(abs(h.get("violation") or 0.0) for h in result.history), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--only", nargs="*", default=["amc", "purl", "crl", "cacp", "random"])
    parser.add_argument("--skip-cacp", action="store_true", help="skip CACP's three-target comparison")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))

    train = fashion_mnist(ROOT / "data", train=True)
    test = fashion_mnist(ROOT / "data", train=False)
    x_all, y_all = tensor_subset(train, len(train), seed=0)
    x_train, y_train, x_cal, y_cal = x_all[:-512], y_all[:-512], x_all[-512:], y_all[-512:]
    x_test, y_test = tensor_subset(test, len(test), seed=0)
    dense = trained_resnet18(x_train, y_train, 2.0, ROOT / "checkpoints" / "resnet18_fmnist_e2.pt")
    dense_acc = evaluate_accuracy(dense, x_test, y_test)
    report = {"set_up": {"model": "timm resnet18, in_chans=1, 2 epochs", "dense_test_acc": round(dense_acc, 4),
                         "target": args.target, "reward": "fidelity", "calibration": 512, "seed": args.seed,
                         "threads": torch.get_num_threads(), "load_before": os.getloadavg()[0]},
              "agents": {}, "cacp_vs_amc": {}}

    for agent in args.only:
        model = copy.deepcopy(dense)
        tick = time.perf_counter()
        result = rl_prune(model, args.target, data=(x_cal, y_cal), agent=agent, seed=args.seed, verbose=False)
        report["agents"][agent] = describe(result, x_test, y_test, time.perf_counter() - tick)
        print(agent, report["agents"][agent], flush=True)

    if not args.skip_cacp:
        targets = [0.5, 0.7, 0.9]
        tick = time.perf_counter()
        multi = rl_prune(copy.deepcopy(dense), targets, data=(x_cal, y_cal), agent="cacp", seed=args.seed,
                         verbose=False)
        cacp_s = time.perf_counter() - tick
        row = {"cacp": {"episodes": len(multi.history), "wall_s": round(cacp_s, 1), "plans": {}},
               "amc": {"episodes": 0, "wall_s": 0.0, "plans": {}}}
        for t in targets:
            m = copy.deepcopy(dense)
            multi.apply(m, target=t)
            row["cacp"]["plans"][t] = {"reward": round(multi[t].score, 4),
                                       "test_acc": round(evaluate_accuracy(m, x_test, y_test), 4)}
            m = copy.deepcopy(dense)
            tick = time.perf_counter()
            single = rl_prune(m, t, data=(x_cal, y_cal), agent="amc", seed=args.seed, verbose=False)
            row["amc"]["wall_s"] = round(row["amc"]["wall_s"] + time.perf_counter() - tick, 1)
            row["amc"]["episodes"] += len(single.history)
            row["amc"]["plans"][t] = {"reward": round(single.score, 4),
                                      "test_acc": round(evaluate_accuracy(m, x_test, y_test), 4)}
        report["cacp_vs_amc"] = row
        print(row, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "agents_fmnist.json").write_text(json.dumps(report, indent=1))
    (out / "agents_fmnist.md").write_text(to_markdown(report))
    print(to_markdown(report))


def to_markdown(report) -> str:
    s = report["set_up"]
    lines = [f"# Agents on Fashion-MNIST resnet18, {s['target']:.0%} of the weights (unstructured)", "",
             f"`python benchmarks/agents_fmnist.py --seed {s['seed']}`: fidelity reward on 512 calibration images, "
             f"test accuracy on 10,000 test images, no fine-tuning; unpruned test accuracy {s['dense_test_acc']:.2%}; "
             f"{s['threads']} threads, load average {s['load_before']:.1f} at the start. One seed.", "",
             "| agent | episodes | plans scored | wall s | episode ms (forward ms) | best@10 | best@50 | best@100 | "
             "best@300 | final best | episodes to 99% | test acc | max \\|violation\\| |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["agents"].items():
        at = r["best_at"]
        cell = lambda n: f"{at[n]:.4f}" if at.get(n) is not None else "—"  # noqa: E731
        at = {int(k): v for k, v in at.items()}
        lines.append(f"| {name} | {r['episodes']} | {r['evaluations']} | {r['wall_s']} | {r['episode_ms']} "
                     f"({r['forward_ms']}) | {cell(10)} | {cell(50)} | {cell(100)} | {cell(300)} | "
                     f"{r['best_reward']:.4f} | {r['episodes_to_99pct']} | {r['test_acc']:.2%} | "
                     f"{r['max_abs_violation']} |")
    c = report.get("cacp_vs_amc")
    if c:
        lines += ["", "## One CACP search for three targets vs three AMC searches", "",
                  "| | episodes | wall s | " + " | ".join(f"{t} reward / test acc" for t in c["cacp"]["plans"]) + " |",
                  "|---|---|---|" + "---|" * len(c["cacp"]["plans"])]
        for name in ("cacp", "amc"):
            r = c[name]
            lines.append(f"| {name} | {r['episodes']} | {r['wall_s']} | " + " | ".join(
                f"{p['reward']:.4f} / {p['test_acc']:.2%}" for p in r["plans"].values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
