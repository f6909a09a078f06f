"""Channels at 50% of the MACs: does any agent beat random search given the same plans? Ten paired seeds.

    python benchmarks/channel_vs_random.py            # ~45 min on 2 cores
    python benchmarks/channel_vs_random.py --quick    # a smoke run

The bench's channel rule asks every agent to end above random search at equal plans, and its three
seeds cannot tell: after the refit, channel plans differ by about 0.23 pp of test accuracy
(``refit_landscape``). This study runs what the bench runs (the bench's model, calibration set and
agent budgets; no fine-tune) on ten seeds and the whole 10,000-image test set. For every seed and
agent it runs the agent, then random search with exactly as many plans scored and the same seed (so
the same calibration split and the same prior), and records both plans' test accuracy and the best
search reward each found. Per agent it reports the mean paired difference (agent minus random), its
standard error over seeds and a 95% interval (Student's t), and the seeds won and lost: on test
accuracy (what the rule asks) and on the search reward (whether the agent optimises its own objective
better than random draws do).

Writes benchmarks/results/channel_vs_random.{json,md}; a full run updates docs/BENCHMARKS.md.
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import FULL, QUICK, Suite, best_so_far  # noqa: E402
from study import study_main  # noqa: E402

from torch_rlprune.demo.training import evaluate_accuracy  # noqa: E402

TARGET = 0.5
OWN_REWARD = {"n2n": "score ratio x C(2 - C)"}   # agents whose best reward is not on random search's scale
# Student's t at 97.5% for n - 1 degrees of freedom (n = 2..10): the interval needs no scipy
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def one_search(suite: Suite, agent: str, seed: int, episodes=None) -> dict:
    model, result, seconds = suite.search(agent, TARGET, "channel", seed, episodes=episodes)
    return {"test_acc": evaluate_accuracy(model, suite.x_test, suite.y_test),
            "reward": best_so_far(result.history)[-1], "plans": result.history[-1]["evaluations"],
            "seconds": seconds, "removed_blocks": result.plan.metadata.get("removed_blocks", [])}


def run(quick: bool) -> dict:
    cfg = copy.deepcopy(QUICK if quick else FULL)
    cfg.seeds = [0] if quick else list(range(10))
    cfg.test_images = 2000 if quick else 10_000
    suite = Suite(cfg, log=lambda s: print(s, flush=True))
    started, pairs = time.perf_counter(), []
    for seed in cfg.seeds:
        for agent in cfg.channel_agents:
            searched = one_search(suite, agent, seed)
            drawn = one_search(suite, "random", seed, episodes=searched["plans"])
            pairs.append({"seed": seed, "agent": agent, "agent_run": searched, "random_run": drawn})
            print(json.dumps(pairs[-1]), flush=True)   # a stopped run keeps what it measured
    return {"config": {"seeds": cfg.seeds, "target": TARGET, "calibration": cfg.calibration,
                       "test_images": len(suite.x_test), "agents": cfg.channel_agents,
                       "agent_config": cfg.agent_config},
            "dense_test_acc": suite.dense_acc, "pairs": pairs, "wall_s": time.perf_counter() - started}


def paired(differences: list) -> dict:
    """Mean, standard error over seeds, 95% interval and the sign count of agent-minus-random."""
    n = len(differences)
    mean = statistics.fmean(differences)
    se = statistics.stdev(differences) / n ** 0.5 if n > 1 else float("nan")
    half = T_975.get(n - 1, 1.96) * se
    return {"n": n, "mean": mean, "se": se, "low": mean - half, "high": mean + half,
            "won": sum(d > 0 for d in differences), "lost": sum(d < 0 for d in differences)}


def verdict(test: dict) -> str:
    if test["n"] < 2:
        return "one seed: no verdict"
    if test["low"] > 0:
        return "above random"
    if test["high"] < 0:
        return "below random"
    return "not distinguishable"


def to_markdown(report: dict, command: str) -> str:
    cfg = report["config"]
    lines = [f"Reproduce: `{command}` ({report['wall_s'] / 60:.0f} min, 2 threads). The bench's resnet18 / "
             f"Fashion-MNIST model (unpruned {report['dense_test_acc']:.2%} on {cfg['test_images']} test images), "
             f"channels at {cfg['target']:.0%} of the MACs, {cfg['calibration']} calibration images, the bench's "
             f"agent budgets, no fine-tune; seeds {cfg['seeds'][0]}-{cfg['seeds'][-1]}. Each agent against random "
             "search with as many plans scored and the same seed (same split, same prior). Differences are agent "
             "minus random, in percentage points of test accuracy (reward: best top-1 agreement on the search "
             "part, in points); SE over seeds; 95% interval by Student's t.", "",
             "| agent | plans | agent test acc | random test acc | difference (SE) | 95% interval | seeds won / lost "
             "| verdict | best reward difference (SE) | reward seeds won / lost |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for agent in cfg["agents"]:
        rows = [p for p in report["pairs"] if p["agent"] == agent]
        if not rows:
            continue
        ours = [p["agent_run"]["test_acc"] for p in rows]
        theirs = [p["random_run"]["test_acc"] for p in rows]
        test = paired([100 * (a - b) for a, b in zip(ours, theirs)])
        reward = None if agent in OWN_REWARD else \
            paired([100 * (p["agent_run"]["reward"] - p["random_run"]["reward"]) for p in rows])
        plans = statistics.fmean(p["agent_run"]["plans"] for p in rows)
        lines.append(f"| {agent} | {plans:.0f} | {statistics.fmean(ours):.2%} | {statistics.fmean(theirs):.2%} "
                     f"| {test['mean']:+.2f} ({test['se']:.2f}) | {test['low']:+.2f} to {test['high']:+.2f} "
                     f"| {test['won']} / {test['lost']} | {verdict(test)} | " +
                     (f"{reward['mean']:+.2f} ({reward['se']:.2f}) | {reward['won']} / {reward['lost']} |" if reward
                      else f"— (its reward: {OWN_REWARD[agent]}) | — |"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    study_main("channel_vs_random", __doc__.splitlines()[0], run, to_markdown)
