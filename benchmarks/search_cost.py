"""What a search costs: forward passes per plan scored, per agent, and the no-data one-liner's wall time.

    python benchmarks/search_cost.py [--quick]

Issue 18's "before" figures, measured the way its done-means reads them:

1. Per agent, on the bench's trained timm resnet18 (1x28x28 Fashion-MNIST, 1000 calibration images,
   target 90% of the weights): plans scored, the search's wall time, and that time in forward passes
   of the unpruned model per plan scored (``search_seconds / (plans * forward_seconds)``: 1.0 would be
   a search that does nothing but score each plan once; the agent's own work and the repeated priors
   and held-out choice are what lies above it). Episodes to 99% of the final best and their seconds.
2. ``rl_prune(model, target=0.8)`` with no data and no other argument on timm models up to resnet18's
   size: its wall time, the episodes it ran and why it stopped, the sparsity reached; and on the
   bench's trained resnet18, the plan's test accuracy against LAMP's on the same tensors. The "before"
   figures (224x224, the default episodes extrapolated from 2) are kept as ``one_liner_before``.

3. Multi-fidelity scoring (``screen``, rewards/screening.py): each agent with every plan scored in full
   (``screen=0``, the "before" protocol) and with the default screening, test accuracy of the plan
   (no fine-tune) beside the cost; the agent's share of the search's wall time (search seconds not
   spent scoring). Random search proposes the same plans with or without screening, so running it
   both ways on several seeds measures how often screening changes the chosen plan.
4. Prefix caching (``cache_mb``, structure/prefix_cache.py): each agent with and without it (with
   and without screening): the same plans and scores (exact), the cost per plan, the forwards that
   replayed a prefix and the share of module calls replayed, the memory peak.

Timings are of this machine (2 shared cores): compare them as ratios within one run.
``SEARCH_COST_PARTS=agents`` (or ``choice``, ``one_liner``, comma-separated) runs those parts and keeps
the others' rows from the last results JSON, each part stamped with the commit and date it was measured at.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
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
from torch_rlprune.env.priors import lamp_unstructured  # noqa: E402
from torch_rlprune.demo.training import evaluate_accuracy  # noqa: E402
from torch_rlprune.report import publish_section  # noqa: E402
from torch_rlprune.rewards import screening  # noqa: E402

AGENTS = ("amc", "purl", "crl", "random")
AGENT_EPISODES = {"amc": 100, "purl": 8, "crl": 40, "random": 40}   # AMC: its default; a PuRL episode scores a plan per layer
CALIBRATION = 1000
ONE_LINER_MODELS = ("resnet18", "mobilenetv3_small_050", "mobilenetv3_large_100", "efficientnet_b0", "regnetx_002")
CHOICE_SEEDS = (0, 1, 2, 3, 4)    # random search with and without screening: the same plans proposed
CHOICE_EPISODES = 40
RULES = (1.0, 0.0)                # the paired bound's width (screening.PROMOTION_Z), the default first;
# z=2 was measured in the pilot run kept in results/search_cost_pilot.json (the same plan in 5 of 5 seeds)


def episodes_to_99(history) -> int:
    final = history[-1]["best_reward"]
    threshold = final - 0.01 * abs(final)
    return next(i + 1 for i, h in enumerate(history) if h["best_reward"] >= threshold)


def agent_cost(suite: Suite, agent: str, episodes: int, screen=None, seed: int = 0, z: float = RULES[0],
               cache_mb=0) -> dict:
    data = (suite.x_cal[:CALIBRATION], suite.y_cal[:CALIBRATION])
    default_z, screening.PROMOTION_Z = screening.PROMOTION_Z, z
    try:
        result = rl_prune(suite.fresh(), 0.9, data=data, agent=agent, episodes=episodes, seed=seed, verbose=False,
                          calibration_samples=CALIBRATION, screen=screen, cache_mb=cache_mb)
    finally:
        screening.PROMOTION_Z = default_z
    history = result.history
    plans = history[-1]["evaluations"]
    reached = episodes_to_99(history)
    return {"agent": agent, "screen": screen, "z": z if screen != 0 else None, "seed": seed,
            "episodes": len(history), "plans_scored": plans,
            "search_seconds": result.search_seconds, "forward_seconds": result.forward_seconds,
            "passes_per_plan": result.search_seconds / (plans * result.forward_seconds),
            "agent_share": 1.0 - result.scoring_seconds / result.search_seconds,
            "episodes_to_99": reached, "seconds_to_99": sum(h["seconds"] for h in history[:reached]),
            "wall_seconds": result.wall_time, "score": result.plan.score,
            "test_accuracy": evaluate_accuracy(result.model, suite.x_test, suite.y_test),
            "screening": result.plan.metadata.get("screening"), "amounts": result.plan.amounts,
            "prefix_cache": result.plan.metadata.get("prefix_cache"), "history_scores": [h["score"] for h in history]}


def chosen_plan_changes(suite: Suite, seeds, rules) -> list:
    """Random search, with and without screening: the same plans are proposed (the agent ignores
    the scores), so any difference in the returned plan is the screening's doing."""
    rows = []
    for seed in seeds:
        full = agent_cost(suite, "random", CHOICE_EPISODES, screen=0, seed=seed)
        for z in rules:
            screened = agent_cost(suite, "random", CHOICE_EPISODES, seed=seed, z=z)
            rows.append({"seed": seed, "z": z, "same_plan": full["amounts"] == screened["amounts"],
                         "full": {k: full[k] for k in ("score", "test_accuracy", "passes_per_plan")},
                         "screened": {k: screened[k] for k in ("score", "test_accuracy", "passes_per_plan",
                                                               "screening")}})
            print(rows[-1], flush=True)
    return rows


def one_liner(name: str) -> dict:
    """``rl_prune(model, target=0.8)`` as written: no data, no other argument."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, in_chans=1, num_classes=10)
    started = time.perf_counter()
    result = rl_prune(model, 0.8, verbose=False)
    wall = time.perf_counter() - started
    stopped = result.plan.metadata.get("stopped")
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "wall_seconds": wall,
            "fixed_seconds": wall - sum(h["seconds"] for h in result.history), "episodes_run": len(result.history),
            "stopped": stopped["reason"] if stopped else "all episodes", "sparsity": result.sparsity,
            "target_met": abs(result.sparsity - 0.8) <= 0.005}


def one_liner_vs_lamp(suite: Suite) -> dict:
    """The one-liner on the bench's trained resnet18 (no data: it never sees Fashion-MNIST) against
    LAMP on the same tensors and the same number of weights, test accuracy without fine-tune."""
    model = suite.fresh()
    started = time.perf_counter()
    result = rl_prune(model, 0.8, verbose=False)
    wall = time.perf_counter() - started
    ours = evaluate_accuracy(model, suite.x_test, suite.y_test)
    lamp_model = suite.fresh()
    modules = dict(lamp_model.named_modules())
    pairs = [(modules[layer.module_name], layer.param_name) for layer in result.layers]
    removed = sum(int(round(result.plan.amounts[layer.name] * layer.numel)) for layer in result.layers)
    lamp_unstructured(pairs, amount=removed)
    return {"model": "resnet18 (bench, trained)", "wall_seconds": wall, "sparsity": result.sparsity,
            "one_liner_test_accuracy": ours, "lamp_test_accuracy": evaluate_accuracy(lamp_model, suite.x_test,
                                                                                    suite.y_test),
            "dense_test_accuracy": suite.dense_acc, "prior": result.plan.metadata.get("prior", {}).get("method"),
            "prior_test": result.plan.metadata.get("selection", {}).get("prior_test")}


def _stamp() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    return {"commit": commit.strip(), "date": time.strftime("%Y-%m-%d")}


CACHE_RUNS = ((0, 0), (0, None), (None, 0), (None, None))   # (screen, cache_mb): None is the default


def _agents_part(suite: Suite, quick: bool) -> dict:
    rows = []
    for agent in AGENTS[:1] if quick else AGENTS:
        episodes = 4 if quick else AGENT_EPISODES[agent]
        for screen, cache_mb in CACHE_RUNS:
            rows.append(agent_cost(suite, agent, episodes, screen=screen, cache_mb=cache_mb))
            print({k: v for k, v in rows[-1].items() if k not in ("amounts", "history_scores")}, flush=True)
    for row in rows:   # exactness: the cached run against the uncached run of the same protocol
        twin = next(r for r in rows if r["agent"] == row["agent"] and r["screen"] == row["screen"]
                    and r["prefix_cache"] is None)
        row["same_as_uncached"] = (row["amounts"] == twin["amounts"] and row["history_scores"] == twin["history_scores"])
    for row in rows:
        row.pop("amounts")
        row.pop("history_scores")
    return {"agents": rows, "measured": _stamp()}


def _choice_part(suite: Suite, quick: bool) -> dict:
    return {"choice": chosen_plan_changes(suite, CHOICE_SEEDS[:1] if quick else CHOICE_SEEDS, RULES),
            "measured": _stamp()}


def _one_liner_part(quick: bool) -> dict:
    liners = []
    for name in ONE_LINER_MODELS[:1] if quick else ONE_LINER_MODELS:
        liners.append(one_liner(name))
        print(liners[-1], flush=True)
    trained = one_liner_vs_lamp(Suite(QUICK if quick else FULL))
    print(trained, flush=True)
    return {"one_liner": liners, "trained": trained, "measured": _stamp()}


def run(quick: bool) -> dict:
    torch.set_num_threads(2)
    parts = os.environ.get("SEARCH_COST_PARTS", "agents,choice,one_liner").split(",")
    previous = HERE / "results" / ("search_cost_quick.json" if quick else "search_cost.json")
    report = json.loads(previous.read_text()) if previous.exists() else {}
    if "choice" in report.get("agents_part", {}):   # measured with the agents before the parts split
        report["choice_part"] = {"choice": report["agents_part"].pop("choice"),
                                 "measured": report["agents_part"]["measured"]}
    report.update(calibration=CALIBRATION, threads=torch.get_num_threads())
    suite = None
    if "agents" in parts or "choice" in parts:
        suite = Suite(QUICK if quick else dataclasses.replace(FULL, calibration=1024))   # 1000 of them scored
    if "agents" in parts:
        report["agents_part"] = _agents_part(suite, quick)
    if "choice" in parts:
        report["choice_part"] = _choice_part(suite, quick)
    if "one_liner" in parts:
        report["one_liner_part"] = _one_liner_part(quick)
    return report


def _agents_markdown(part: dict, calibration: int) -> list:
    lines = [f"Per agent (measured at {part['measured']['commit']}, {part['measured']['date']}): the bench's "
             f"trained resnet18, 1x28x28, {calibration} calibration images (a quarter held out for the choice), "
             "90% of the weights, seed 0. `screen 0` scores every plan in full (the protocol before multi-fidelity "
             "scoring); `64` screens each plan on 64 samples first (one forward, BatchNorm on the slice's own "
             "statistics), kept out when the paired bound of width z (standard errors) on the per-sample KL "
             "closeness to the unpruned model or on the per-sample agreement says it is worse than the "
             "search's best, and a plan not kept out is read on a second slice (three times larger) and "
             "tested again on both before its full score (second reads). `cache`: prefix caching at "
             "its default bound (256 MB), `-` off; replayed: the forwards that replayed a prefix / all eval and "
             "slice forwards, and the "
             "share of module calls replayed; exact: the same plan and history of scores as the run without the "
             "cache. Passes per plan scored: the search's wall time in forward passes of the unpruned model over "
             "the search part, per plan scored, one forward timed as the median of every run's own timing "
             f"({statistics.median(r['forward_seconds'] for r in part['agents']):.2f} s; a single run's varied "
             f"{min(r['forward_seconds'] for r in part['agents']):.2f}-"
             f"{max(r['forward_seconds'] for r in part['agents']):.2f} s on the shared cores). Agent share: the "
             "part of the search's wall time not spent scoring (the agent's actions and the updates it waits for, "
             "the environment's steps, the set-up; AMC's updates run on a learner thread while the next "
             "episode is scored, and count only where the search waits for them).",
             "", "| agent | screen | cache | plans scored | promoted / second reads / kept out / shaping | replayed (share) | "
             "peak MB | exact | search s | passes per plan scored | agent share | plan score | test acc (no FT) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    forward = statistics.median(r["forward_seconds"] for r in part["agents"])
    for r in part["agents"]:
        r = dict(r, passes_per_plan=r["search_seconds"] / (r["plans_scored"] * forward))
        s, c = r["screening"], r.get("prefix_cache")
        screened = (f"{s['promoted']} / {s.get('second_reads', '-')} / {s['kept_out']} / {s['shaping_estimates']}"
                    if s else "all in full")
        replayed = f"{c['reused']} / {c['forwards']} ({c['skipped_share']:.0%})" if c else "-"
        lines.append(f"| {r['agent']} | {s['samples'] if s else 0} | {'256 MB' if c else '-'} | {r['plans_scored']} | "
                     f"{screened} | {replayed} | {c['peak_mb']:.0f} | {'yes' if r.get('same_as_uncached') else 'NO'} | "
                     f"{r['search_seconds']:.1f} | {r['passes_per_plan']:.2f} | "
                     f"{r['agent_share']:.0%} | {r['score']:.4f} | {r['test_accuracy']:.2%} |" if c else
                     f"| {r['agent']} | {s['samples'] if s else 0} | - | {r['plans_scored']} | {screened} | - | - | - | "
                     f"{r['search_seconds']:.1f} | {r['passes_per_plan']:.2f} | "
                     f"{r['agent_share']:.0%} | {r['score']:.4f} | {r['test_accuracy']:.2%} |")
    return lines


def _choice_markdown(part: dict) -> list:
    choice = part["choice"]
    seeds = sorted({c["seed"] for c in choice})
    lines = [f"Does screening change the chosen plan? (measured at {part['measured']['commit']}, "
             f"{part['measured']['date']}) Random search ({CHOICE_EPISODES} episodes, seeds "
             f"{', '.join(map(str, seeds))}) proposes the same plans with and without it; per bound width, the "
             "seeds whose returned plan is the full search's, and the means over the seeds.", "",
             "| z | same plan | kept out / screened | passes per plan full / screened | score full / screened | "
             "test acc full / screened |", "|---|---|---|---|---|---|"]
    for z in sorted({c["z"] for c in choice}, reverse=True):
        rows = [c for c in choice if c["z"] == z]
        f = {k: statistics.mean(c["full"][k] for c in rows) for k in ("score", "test_accuracy", "passes_per_plan")}
        g = {k: statistics.mean(c["screened"][k] for c in rows) for k in ("score", "test_accuracy", "passes_per_plan")}
        kept = sum(c["screened"]["screening"]["kept_out"] for c in rows)
        screened = sum(c["screened"]["screening"]["screened"] for c in rows)
        lines.append(f"| {z:g} | {sum(c['same_plan'] for c in rows)} of {len(rows)} | {kept} / {screened} | "
                     f"{f['passes_per_plan']:.2f} / {g['passes_per_plan']:.2f} | {f['score']:.4f} / {g['score']:.4f} | "
                     f"{f['test_accuracy']:.2%} / {g['test_accuracy']:.2%} |")
    return lines


def _one_liner_markdown(part: dict, before: dict) -> list:
    lines = [f"`rl_prune(model, target=0.8)` as written, no data (measured at {part['measured']['commit']}, "
             f"{part['measured']['date']}): timm models with `pretrained=False, in_chans=1, num_classes=10`, "
             "the no-data defaults (128 synthetic inputs at a 128-pixel side, no BatchNorm re-estimation, episodes stopped after "
             "30 s or 20 without a better plan). Before: the default episodes at 224x224, extrapolated from 2 "
             f"(measured at {before['measured']['commit']}).", "",
             "| model | params | wall s | set-up, choice and apply s | episodes run | stopped by | sparsity | "
             "before: extrapolated wall s |", "|---|---|---|---|---|---|---|---|"]
    earlier = {r["model"]: r for r in before.get("one_liner", [])}
    for r in part["one_liner"]:
        old = earlier.get(r["model"])
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['wall_seconds']:.1f} | {r['fixed_seconds']:.1f} | "
                     f"{r['episodes_run']} | {r['stopped']} | {r['sparsity']:.4f} | "
                     f"{'%.0f' % old['extrapolated_seconds'] if old else '-'} |")
    t = part["trained"]
    lines += ["", f"On the bench's trained resnet18 (it never sees Fashion-MNIST here): the one-liner's plan "
              f"({t['wall_seconds']:.0f} s, prior {t['prior']}) {t['one_liner_test_accuracy']:.2%} test accuracy "
              f"without fine-tune, LAMP on the same tensors and number of weights {t['lamp_test_accuracy']:.2%} "
              f"(unpruned {t['dense_test_accuracy']:.2%})."
              + (f" The search's own best plan differed from the prior by {t['prior_test']['mean_difference']:+.3f} "
                 f"+- {t['prior_test']['standard_error']:.3f} on the {t['prior_test']['samples']} held-out synthetic "
                 f"inputs: {'the prior was returned' if t['prior_test']['prior_kept'] else 'it was returned'}."
                 if t.get("prior_test") else "")]
    return lines


def to_markdown(report: dict, command: str) -> str:
    lines = [f"Reproduce: `{command}`. Timings of one run on this machine ({report['threads']} threads); read "
             "them as ratios.", ""]
    if "agents_part" in report:
        lines += _agents_markdown(report["agents_part"], report["calibration"]) + [""]
    if "choice_part" in report:
        lines += _choice_markdown(report["choice_part"]) + [""]
    if "one_liner_part" in report:
        lines += _one_liner_markdown(report["one_liner_part"], report.get("one_liner_before", {}))
    return "\n".join(lines) + "\n"


def readme_one_liner(report: dict) -> str:
    """The README's short table: the no-data one-liner on the five timm models, and against LAMP."""
    part = report["one_liner_part"]
    t = part["trained"]
    lines = [f"`rl_prune(model, target=0.8)` with no data and no other argument, on 2 CPU cores (timm, "
             f"`pretrained=False, in_chans=1, num_classes=10`; `python benchmarks/search_cost.py` at "
             f"{part['measured']['commit']}). On a trained resnet18 (the bench's) its plan has "
             f"{t['one_liner_test_accuracy']:.2%} test accuracy without fine-tune, LAMP's {t['lamp_test_accuracy']:.2%}"
             + (" (the search did not beat its prior, LAMP, clearly on held-out synthetic inputs, so the prior "
                "was returned)." if (t.get("prior_test") or {}).get("prior_kept") else "."), "",
             "| model | " + " | ".join(r["model"] for r in part["one_liner"]) + " |",
             "|---|" + "---|" * len(part["one_liner"]),
             "| wall s | " + " | ".join(f"{r['wall_seconds']:.0f}" for r in part["one_liner"]) + " |",
             "| sparsity | " + " | ".join(f"{r['sparsity']:.4f}" for r in part["one_liner"]) + " |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    final = study_main("search_cost", __doc__.splitlines()[0], run, to_markdown)
    if "--quick" not in sys.argv and "--no-readme" not in sys.argv and "one_liner_part" in final:
        for page in publish_section(HERE.parent, "search_cost_one_liner", readme_one_liner(final)):
            print(f"{page.relative_to(HERE.parent)} updated")
