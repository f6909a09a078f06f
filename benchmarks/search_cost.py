"""What a search costs: forward passes per plan scored, per agent, and the no-data one-liner's wall time.

    python benchmarks/search_cost.py [--quick]

Issue 18's "before" figures, measured the way its done-means reads them:

1. Per agent, on the bench's trained timm resnet18 (1x28x28 Fashion-MNIST, 1000 calibration images,
   target 90% of the weights): plans scored, the search's wall time, and that time in forward passes
   of the unpruned model per plan scored (``search_seconds / (plans * forward_seconds)``: 1.0 would be
   a search that does nothing but score each plan once; the agent's own work and the repeated priors
   and held-out choice are what lies above it). Episodes to 99% of the final best and their seconds.
2. ``rl_prune(model, target=0.8)`` with no data (synthetic 224x224 inputs) on timm models up to
   resnet18's size: the set-up, the median episode, and the call's wall time at the agent's default
   episodes, extrapolated from a few episodes (marked as such: running them all takes ~20 min a model).

Timings are of this machine (2 shared cores): compare them as ratios within one run.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import FULL, QUICK, Suite  # noqa: E402
from study import study_main  # noqa: E402

from torch_rlprune import rl_prune  # noqa: E402
from torch_rlprune.agents import create_agent  # noqa: E402

AGENTS = ("amc", "purl", "crl", "random")
AGENT_EPISODES = {"amc": 40, "purl": 8, "crl": 40, "random": 40}   # a PuRL episode scores a plan per layer
CALIBRATION = 1000
ONE_LINER_MODELS = ("resnet18", "mobilenetv3_small_050", "mobilenetv3_large_100", "efficientnet_b0", "regnetx_002")
ONE_LINER_EPISODES = 2


def episodes_to_99(history) -> int:
    final = history[-1]["best_reward"]
    threshold = final - 0.01 * abs(final)
    return next(i + 1 for i, h in enumerate(history) if h["best_reward"] >= threshold)


def agent_cost(suite: Suite, agent: str, episodes: int) -> dict:
    data = (suite.x_cal[:CALIBRATION], suite.y_cal[:CALIBRATION])
    result = rl_prune(suite.fresh(), 0.9, data=data, agent=agent, episodes=episodes, seed=0, verbose=False,
                      calibration_samples=CALIBRATION)
    history = result.history
    plans = history[-1]["evaluations"]
    reached = episodes_to_99(history)
    return {"agent": agent, "episodes": len(history), "plans_scored": plans,
            "search_seconds": result.search_seconds, "forward_seconds": result.forward_seconds,
            "passes_per_plan": result.search_seconds / (plans * result.forward_seconds),
            "episodes_to_99": reached, "seconds_to_99": sum(h["seconds"] for h in history[:reached]),
            "wall_seconds": result.wall_time}


def one_liner(name: str, episodes: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, in_chans=1, num_classes=10)
    started = time.perf_counter()
    result = rl_prune(model, 0.8, episodes=episodes, verbose=False)
    wall = time.perf_counter() - started
    episode = statistics.median(h["seconds"] for h in result.history)
    default_episodes = create_agent("amc").config.episodes
    fixed = wall - sum(h["seconds"] for h in result.history)   # set-up, priors, held-out choice, applying
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "episodes_run": episodes,
            "wall_seconds": wall, "fixed_seconds": fixed, "episode_seconds": episode,
            "default_episodes": default_episodes, "extrapolated_seconds": fixed + default_episodes * episode,
            "sparsity": result.sparsity}


def run(quick: bool) -> dict:
    torch.set_num_threads(2)
    suite = Suite(QUICK if quick else dataclasses.replace(FULL, calibration=1024))   # 1000 of them scored
    agents = [agent_cost(suite, a, 4 if quick else AGENT_EPISODES[a]) for a in (AGENTS[:1] if quick else AGENTS)]
    for row in agents:
        print(row, flush=True)
    models = ONE_LINER_MODELS[:1] if quick else ONE_LINER_MODELS
    liners = []
    for name in models:
        liners.append(one_liner(name, ONE_LINER_EPISODES))
        print(liners[-1], flush=True)
    return {"agents": agents, "one_liner": liners, "calibration": CALIBRATION, "threads": torch.get_num_threads()}


def to_markdown(report: dict, command: str) -> str:
    lines = [f"Reproduce: `{command}`. Timings of one run on this machine ({report['threads']} threads); read "
             "them as ratios.", "",
             f"Per agent: the bench's trained resnet18, 1x28x28, {report['calibration']} calibration images (a quarter "
             "held out for the choice), 90% "
             "of the weights.", "",
             "| agent | episodes | plans scored | search s | forward pass s | passes per plan scored | "
             "episodes to 99% of best | s to 99% |", "|---|---|---|---|---|---|---|---|"]
    for r in report["agents"]:
        lines.append(f"| {r['agent']} | {r['episodes']} | {r['plans_scored']} | {r['search_seconds']:.1f} | "
                     f"{r['forward_seconds']:.3f} | {r['passes_per_plan']:.2f} | {r['episodes_to_99']} | "
                     f"{r['seconds_to_99']:.1f} |")
    lines += ["", "`rl_prune(model, target=0.8)`, no data (synthetic 224x224 inputs), agent AMC: "
              f"{report['one_liner'][0]['episodes_run'] if report['one_liner'] else 0} episodes run, the default "
              "extrapolated (set-up + default episodes x median episode).", "",
              "| model | params | wall s (episodes run) | set-up and apply s | median episode s | default episodes | "
              "extrapolated wall s |", "|---|---|---|---|---|---|---|"]
    for r in report["one_liner"]:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['wall_seconds']:.1f} ({r['episodes_run']}) | "
                     f"{r['fixed_seconds']:.1f} | {r['episode_seconds']:.2f} | {r['default_episodes']} | "
                     f"{r['extrapolated_seconds']:.0f} (extrapolated) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    study_main("search_cost", __doc__.splitlines()[0], run, to_markdown)
