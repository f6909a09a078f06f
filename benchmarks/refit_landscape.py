"""After the least-squares refit, does the choice of plan still matter?

    python benchmarks/refit_landscape.py            # ~15 min on 2 cores
    python benchmarks/refit_landscape.py --quick    # a smoke run

``rl_prune`` refits the kept weights of the plan it returns (channels: always; weights: from 90% on),
so a search is worth what its plan is worth *after* the refit. This study draws the plans a search
compares -- the random agent's draws around the prior, on the bench's model and calibration split --
and measures each before and after the refit, as ``rl_prune`` applies it (masks, refit on the search
part, BatchNorm re-estimated on it):

* how far apart the plans are on the test set before and after the refit (the room a search has),
* Spearman's rho between the reward the search ranks by (top-1 agreement on the search part, before
  the refit) and the test accuracy after it, and between the held-out agreement after the refit (what a
  refit-aware choice would rank by) and the test accuracy after it,
* the paired standard error of the test-accuracy difference between two plans (5000 images): the
  smallest gap the bench's rows can resolve.

Writes benchmarks/results/refit_landscape.{json,md}.
"""
from __future__ import annotations

import copy
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import FULL, QUICK, Suite  # noqa: E402
from reward_ranking import outputs, scored_plans, spearman  # noqa: E402
from study import study_main  # noqa: E402

from torch_rlprune import PruningPlan, apply_plan, rl_prune  # noqa: E402
from torch_rlprune.rewards.recalibration import BatchNormRecalibration  # noqa: E402
from torch_rlprune.rewards.repair import LeastSquaresRefit  # noqa: E402

CASES = (("channel", 0.5), ("unstructured", 0.95))
HELD_OUT = 128     # rl_prune's default selection part of 512 calibration images


def predictions(model, x: torch.Tensor) -> torch.Tensor:
    return outputs(model, x).argmax(1)


class Landscape:
    def __init__(self, suite: Suite):
        self.suite, self.dense = suite, suite.fresh().eval()
        self.x_search, self.x_held = suite.x_cal[:-HELD_OUT], suite.x_cal[-HELD_OUT:]
        self.y_search = suite.y_cal[:-HELD_OUT]
        self.batches = list(self.x_search.split(128))
        self.teacher_search, self.teacher_held = predictions(self.dense, self.x_search), predictions(self.dense,
                                                                                                      self.x_held)

    def search(self, structure: str, target: float, agent: str, episodes: int, seed: int):
        return rl_prune(copy.deepcopy(self.dense), target, data=(self.x_search, self.y_search), agent=agent,
                        structure=structure, episodes=episodes, seed=seed, verbose=False, selection=0.0,
                        calibration_samples=len(self.x_search), repair="none")

    def plans(self, structure: str, target: float, count: int, seed: int):
        """The prior's plan first, then ``count`` draws of the random agent around it."""
        prior = self.search(structure, target, "prior", 1, seed).plan
        return [prior] + scored_plans(self.search(structure, target, "random", count, seed))

    def pruned(self, plan: PruningPlan, refit: bool):
        model = copy.deepcopy(self.dense)
        fit = LeastSquaresRefit(model, self.batches, seed=0) if refit else None
        apply_plan(model, plan, example_inputs=self.x_search[:2])
        seconds = 0.0
        if fit is not None:
            tick = time.perf_counter()
            fit()
            seconds = time.perf_counter() - tick
        BatchNormRecalibration(model, self.batches)()
        return model.eval(), seconds

    def measure(self, plan: PruningPlan) -> tuple:
        row, correct = {}, {}
        for label, refit in (("before", False), ("after", True)):
            model, seconds = self.pruned(plan, refit)
            row[f"search_{label}"] = float((predictions(model, self.x_search) == self.teacher_search).float().mean())
            row[f"held_{label}"] = float((predictions(model, self.x_held) == self.teacher_held).float().mean())
            correct[label] = predictions(model, self.suite.x_test) == self.suite.y_test
            row[f"test_{label}"] = float(correct[label].float().mean())
            if refit:
                row["refit_s"] = seconds
        return row, correct["after"]


def paired_standard_error(correct) -> float:
    """Median over plan pairs of the standard error of their test-accuracy difference (paired by image)."""
    errors = [float((a.float() - b.float()).std()) / len(a) ** 0.5 for a, b in itertools.combinations(correct, 2)]
    return statistics.median(errors)


def run(quick: bool) -> dict:
    torch.set_num_threads(2)
    suite = Suite(QUICK if quick else FULL)
    landscape = Landscape(suite)
    count = 4 if quick else {"channel": 30, "unstructured": 20}
    report = {"dense_test": suite.dense_acc, "test_images": len(suite.x_test), "search_images": len(landscape.x_search),
              "held_out_images": HELD_OUT, "cases": []}
    for structure, target in CASES[:1] if quick else CASES:
        tick = time.perf_counter()
        n = count if quick else count[structure]
        rows, correct = [], []
        for plan in landscape.plans(structure, target, n, seed=0):
            row, right = landscape.measure(plan)
            rows.append(row)
            correct.append(right)
            print(structure, target, row, flush=True)
        report["cases"].append({"structure": structure, "target": target, "rows": rows,
                                "paired_se": paired_standard_error(correct), "seconds": time.perf_counter() - tick})
    return report


def _stats(case: dict) -> dict:
    prior, draws = case["rows"][0], case["rows"][1:]
    column = {k: np.array([r[k] for r in draws]) for k in draws[0]}
    after = column["test_after"]
    return {"prior": prior, "before": column["test_before"], "after": after,
            "rho_search": spearman(column["search_before"], after),
            "rho_held": spearman(column["held_after"], after),
            "top_search": after[int(np.argmax(column["search_before"]))],
            "refit_s": float(np.median(column["refit_s"]))}


def to_markdown(report: dict, command: str) -> str:
    lines = [f"Reproduce: `{command}`. timm resnet18 on Fashion-MNIST (the bench's checkpoint, unpruned "
             f"{report['dense_test']:.2%} on {report['test_images']} test images); the random agent's draws around "
             f"the prior on {report['search_images']} calibration images, each applied, refitted on them and BatchNorm "
             f"re-estimated as `rl_prune` returns it; agreement with the unpruned model on those images (the search's "
             f"reward) and on {report['held_out_images']} held-out ones. rho: Spearman, against the test accuracy "
             "after the refit. Paired SE: the median standard error of the test-accuracy difference of two "
             "plans.", "",
             "| target | plans | test acc before refit: min-max | after refit: mean (sd; min-max) "
             "| the prior after refit | rho, search reward before refit | rho, held-out agreement after refit "
             "| plan the reward ranks first "
             "| paired SE | refit s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case in report["cases"]:
        s = _stats(case)
        name = "MACs" if case["structure"] == "channel" else "weights"
        lines.append(f"| {case['structure']} {case['target']:.0%} {name} | {len(s['after'])} | "
                     f"{s['before'].min():.2%}-{s['before'].max():.2%} | {s['after'].mean():.2%} "
                     f"({s['after'].std(ddof=1) * 100:.2f} pp; {s['after'].min():.2%}-{s['after'].max():.2%}) | "
                     f"{s['prior']['test_after']:.2%} | {s['rho_search']:+.2f} | {s['rho_held']:+.2f} | "
                     f"{s['top_search']:.2%} | {case['paired_se'] * 100:.2f} pp | {s['refit_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    study_main("refit_landscape", __doc__.splitlines()[0], run, to_markdown)
