"""Does multi-fidelity scoring keep the bench's quality? AMC with and without screening, 3 seeds.

    python benchmarks/screening_quality.py [--quick]

The bench's setting (``make bench``: trained resnet18 on Fashion-MNIST, 512 calibration images, AMC's
default 100 episodes, no fine-tune) at 90% of the weights, every plan scored in full
(``screen=0``) against the default screening: test accuracy of the plan, the search's seconds and its
plans kept out. Both runs of a seed start from the same model and seed.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import FULL, QUICK, Suite  # noqa: E402
from study import study_main  # noqa: E402

from torch_rlprune import rl_prune  # noqa: E402
from torch_rlprune.demo.training import evaluate_accuracy  # noqa: E402

TARGETS = (0.9, 0.95)
SEEDS = (0, 1, 2)
EPISODES = 100


def one(suite: Suite, target: float, seed: int, screen) -> dict:
    model = suite.fresh()
    result = rl_prune(model, target, data=(suite.x_cal, suite.y_cal), agent="amc", episodes=EPISODES, seed=seed,
                      verbose=False, screen=screen)
    stats = result.plan.metadata.get("screening")
    return {"target": target, "seed": seed, "screen": screen, "test_accuracy": evaluate_accuracy(model, suite.x_test,
                                                                                                 suite.y_test),
            "score": result.plan.score, "search_seconds": result.search_seconds,
            "kept_out": stats["kept_out"] if stats else 0, "screened": stats["screened"] if stats else 0}


def run(quick: bool) -> dict:
    torch.set_num_threads(2)
    suite = Suite(QUICK if quick else FULL)
    rows = []
    for target in TARGETS[:1] if quick else TARGETS:
        for seed in SEEDS[:1] if quick else SEEDS:
            for screen in (0, None):
                rows.append(one(suite, target, seed, screen))
                print(rows[-1], flush=True)
    return {"episodes": EPISODES, "calibration": len(suite.x_cal), "rows": rows}


def to_markdown(report: dict, command: str) -> str:
    lines = [f"Reproduce: `{command}`. AMC, {report['episodes']} episodes, {report['calibration']} calibration images, "
             "no fine-tune; mean and min-max over the seeds.", "",
             "| target | screen | test acc mean (min-max) | search s mean | plans kept out / screened |",
             "|---|---|---|---|---|"]
    for target in sorted({r["target"] for r in report["rows"]}):
        for screen in (0, None):
            rows = [r for r in report["rows"] if r["target"] == target and r["screen"] == screen]
            acc = [r["test_accuracy"] for r in rows]
            lines.append(f"| {target:.0%} | {'all in full' if screen == 0 else 'default'} | {statistics.mean(acc):.2%} "
                         f"({min(acc):.2%}-{max(acc):.2%}) | {statistics.mean(r['search_seconds'] for r in rows):.0f} | "
                         f"{sum(r['kept_out'] for r in rows)} / {sum(r['screened'] for r in rows)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    study_main("screening_quality", __doc__.splitlines()[0], run, to_markdown)
