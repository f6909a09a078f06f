"""Should the no-data rule (return the prior unless the search's plan clearly beats it) apply to real data too?

    python benchmarks/prior_rule.py [--quick]

With ``data=None`` a search returns its held-out choice only if it beats the prior (LAMP or global magnitude)
on the selection part by ``PRIOR_MARGIN_Z`` standard errors of the paired difference, sample by sample
(``search/selection.py``); with real data the held-out choice is returned as it is. This study runs the
bench's AMC searches (trained resnet18 on Fashion-MNIST, 512 calibration images, 100 episodes, no fine-tune)
and, for each seed, measures on the test set both plans the rule decides between: the held-out choice and
the prior. Each seed runs the same seeded search twice; the second returns the prior in place of the choice,
through the same ``apply`` (BatchNorm re-estimation, and at 90% and above the least-squares refit with its
guard), so both plans are measured as ``rl_prune`` would return them. It records the paired bound the rule
would have applied (the rule off: what ``rl_prune`` returns; the rule on: what it would).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import FULL, QUICK, Suite  # noqa: E402
from study import study_main  # noqa: E402

from torch_rlprune import rl_prune  # noqa: E402
from torch_rlprune.demo.training import evaluate_accuracy  # noqa: E402
from torch_rlprune.search import selection  # noqa: E402
from torch_rlprune.search.selection import PRIOR_MARGIN_Z  # noqa: E402

TARGETS = (0.8, 0.9, 0.95)
SEEDS = (0, 1, 2)
EPISODES = 100


class BothPlansMeasured:
    """Wraps the engine's held-out choice: records the rule's paired bound between the choice and the
    prior; with ``return_prior`` set, hands the prior to ``apply`` in place of the choice (the prior was
    scored first, so its search score is on record)."""

    def __init__(self):
        self.choose, self.last, self.return_prior = selection.select_plans, None, False

    def __call__(self, env, keys, measure, priors=None, as_returned=None):
        chosen = self.choose(env, keys, measure, priors, as_returned)
        prepared = measure.__self__          # the bound score_selection_part of the search's PreparedSearch
        key = keys[0]
        best, prior = env.best_by_target[key], env.priors[key]
        difference = env.on_plan(best.k, prepared.selection_gains) - env.on_plan(prior, prepared.selection_gains)
        mean, error = float(difference.mean()), float(difference.std()) / len(difference) ** 0.5
        self.last = {"chosen_is_prior": bool(np.array_equal(best.k, prior)),
                     "mean_difference": mean, "standard_error": error, "samples": len(difference),
                     "rule_keeps_prior": not mean - PRIOR_MARGIN_Z * error > 0}
        if self.return_prior:
            score = env.evaluate(prior)
            best.reward, best.score, best.k = env.reward_of(score, prior), score, np.array(prior, dtype=np.int64)
        return chosen


def returned_test(suite: Suite, probe: BothPlansMeasured, target: float, seed: int, return_prior: bool) -> float:
    model = suite.fresh()
    probe.return_prior = return_prior
    rl_prune(model, target, data=(suite.x_cal, suite.y_cal), agent="amc", episodes=EPISODES, seed=seed, verbose=False)
    return evaluate_accuracy(model, suite.x_test, suite.y_test)


def one(suite: Suite, probe: BothPlansMeasured, target: float, seed: int) -> dict:
    returned = returned_test(suite, probe, target, seed, return_prior=False)
    decided = dict(probe.last)
    prior = returned_test(suite, probe, target, seed, return_prior=True)
    if probe.last != decided:
        raise RuntimeError(f"the second search of seed {seed} differs from the first: {decided} vs {probe.last}")
    row = {"target": target, "seed": seed, "returned_test": returned, "prior_test": prior, **decided}
    row["rule_test"] = row["prior_test"] if row["rule_keeps_prior"] else returned
    return row


def run(quick: bool) -> dict:
    torch.set_num_threads(2)
    suite = Suite(QUICK if quick else FULL)
    probe = BothPlansMeasured()
    selection.select_plans = probe
    rows = []
    try:
        for target in TARGETS[1:2] if quick else TARGETS:
            for seed in SEEDS[:1] if quick else SEEDS:
                rows.append(one(suite, probe, target, seed))
                print(rows[-1], flush=True)
    finally:
        selection.select_plans = probe.choose
    return {"episodes": EPISODES, "calibration": len(suite.x_cal), "z": PRIOR_MARGIN_Z,
            "dense_test": suite.dense_acc, "rows": rows}


def _mean_range(values) -> str:
    return f"{statistics.mean(values):.2%} ({min(values):.2%}-{max(values):.2%})"


def to_markdown(report: dict, command: str) -> str:
    lines = [f"Reproduce: `{command}`. AMC, {report['episodes']} episodes, {report['calibration']} calibration images "
             f"(a quarter held out for the choice), no fine-tune, unpruned {report['dense_test']:.2%}; test accuracy, "
             "mean (min-max) over the seeds. *Rule off* is what `rl_prune` returns with real data; *rule on* what it "
             f"would return if the prior were kept unless the choice beats it by {report['z']:g} standard errors on "
             "the held-out part.", "",
             "| target | held-out choice (rule off) | prior, same repair and refit | rule on "
             "| prior kept by the rule |",
             "|---|---|---|---|---|"]
    for target in sorted({r["target"] for r in report["rows"]}):
        rows = [r for r in report["rows"] if r["target"] == target]
        lines.append(f"| {target:.0%} | {_mean_range([r['returned_test'] for r in rows])} | "
                     f"{_mean_range([r['prior_test'] for r in rows])} | "
                     f"{_mean_range([r['rule_test'] for r in rows])} | "
                     f"{sum(r['rule_keeps_prior'] for r in rows)} of {len(rows)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    study_main("prior_rule", __doc__.splitlines()[0], run, to_markdown)
