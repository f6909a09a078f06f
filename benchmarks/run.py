"""The benchmark suite: every agent against honest baselines at an equal evaluation budget.

    make bench                               # python benchmarks/run.py         (about 40 min on 2 cores)
    python benchmarks/run.py --only channel  # one structure again, its rows replaced in bench.json
    python benchmarks/run.py --only memory   # only the peak-memory probes again
    python benchmarks/run.py --quick         # one seed, one target each, small budgets (minutes)

Set-up: timm resnet18 (in_chans=1, 10 classes, pretrained=False) trained by the suite on
Fashion-MNIST with a fixed seed and cached in checkpoints/ (the demo's checkpoint); the
reward (calibration) set is carved from the training split (1024 images: the 512 never trained
on, then training images), accuracy is on the test split. Every search runs with rl_prune's
defaults (prior, BatchNorm repair, held-out choice of 256 of the 1024 images, first conv and
classifier kept dense); every unstructured baseline prunes the same tensors.

Measured, written to benchmarks/results/bench[_quick].{json,md} (and, for a full run, the
docs/BENCHMARKS.md section between the ``bench`` markers):

* quality -- unstructured targets 0.5/0.8/0.9/0.95 of the weights and channel target 0.5 of
  the MACs, over seeds (mean and min-max): test accuracy with no fine-tune and after the same
  fixed short fine-tune (masks kept) for the one-liners (uniform per-layer L1, global
  magnitude, LAMP), the same heuristics with the searches' BatchNorm repair (``agent="prior"``;
  LAMP also with the least-squares refit rl_prune adds from 90% of the weights),
  torch-pruning uniform and global channel pruning (group L2 magnitude, the channel ratio
  bisected onto the MACs target, the same BatchNorm re-estimation), the best channel prior
  with and without the least-squares refit (``repair``), random search with everything the
  agents have (weights: as many plans as the agent that scored the most; channels: one run per
  agent at exactly its plans scored), the unpruned model after the same fine-tune (the
  ceiling), and every agent; then the acceptance rules checked on the means;
* search efficiency -- best-so-far reward against episodes and against plans scored, and
  the episode at which it first reached 99% of its final value;
* cost against its floor -- wall time of one episode over the time of one forward pass of
  the unpruned model over the reward set (an episode that scores once cannot cost less);
* real speed -- CPU latency at batch 1 and 64 of every channel-pruned model before and
  after ``compact``, against its MACs ratio;
* peak memory -- the largest RSS increase during each search (sampled every 5 ms), against
  the model's parameters and one batch of its activations.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.nn.utils import prune

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "examples"))
from demo import trained_resnet18  # noqa: E402

import torch_pruning as tp  # noqa: E402
from torch_rlprune import PruningPlan, apply_plan, compact, rl_prune  # noqa: E402
from torch_rlprune.structure.channel import count_macs_params  # noqa: E402
from torch_rlprune.demo.data import fashion_mnist, tensor_subset  # noqa: E402
from torch_rlprune.env.depth_width import count_macs_params_removed  # noqa: E402
from torch_rlprune.env.priors import global_magnitude_unstructured, lamp_unstructured, uniform_unstructured  # noqa: E402
from torch_rlprune.rewards.recalibration import BatchNormRecalibration  # noqa: E402
from torch_rlprune.rewards.repair import AUTO_REFIT_FROM  # noqa: E402
from torch_rlprune.report import publish_section  # noqa: E402
from torch_rlprune.structure.tensors import find_prunable  # noqa: E402
from torch_rlprune.demo.training import evaluate_accuracy, train_classifier  # noqa: E402



@dataclass
class SuiteConfig:
    """Everything a run of the suite depends on (recorded in the JSON)."""

    seeds: List[int]
    unstructured_targets: List[float]
    channel_targets: List[float]
    unstructured_agents: List[str]
    channel_agents: List[str]
    multi_target_agent: str = "cacp"      # one search for all unstructured targets
    calibration: int = 1024               # reward set: the 512 training images never trained on, then trained ones
    test_images: int = 10_000
    finetune_steps: int = 40              # SGD steps, batch 64, lr 0.01, the same for every model
    train_epochs: float = 2.0
    latency_repeats: int = 30
    agent_config: Dict[str, dict] = field(default_factory=dict)   # per-agent overrides (episodes...)


# rl_prune's defaults (512 calibration images, AMC's 100 episodes); the other agents' budgets are cut
# to fit about two hours on 2 cores (their defaults: PuRL 60, CRL 200, CACP 450, N2N 300 episodes).
FULL = SuiteConfig(
    seeds=[0, 1, 2], unstructured_targets=[0.5, 0.8, 0.9, 0.95], channel_targets=[0.5], test_images=5000,
    finetune_steps=20, calibration=512,
    unstructured_agents=["amc", "purl", "crl"], channel_agents=["amc", "purl", "crl", "n2n"],
    agent_config={"amc": {"episodes": 100}, "purl": {"episodes": 4, "warmup": 1},
                  "crl": {"episodes": 64}, "cacp": {"episodes": 160}, "n2n": {"episodes": 60}})
QUICK = SuiteConfig(
    seeds=[0], unstructured_targets=[0.9], channel_targets=[0.5],
    unstructured_agents=["amc", "purl", "crl"], channel_agents=["amc", "purl", "crl", "n2n"],
    calibration=256, test_images=2000, finetune_steps=10, latency_repeats=10,
    agent_config={"amc": {"episodes": 40}, "purl": {"episodes": 4, "warmup": 1},
                  "crl": {"episodes": 32}, "cacp": {"episodes": 40}, "n2n": {"episodes": 30}})


# --------------------------------------------------------------------------- measurement helpers
class PeakRSS:
    """Largest resident set size (bytes) seen while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        return False

    @property
    def increase(self) -> int:
        return self.peak - self.start


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak since process start
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of every module output in one forward of ``x`` (what a training step would keep)."""
    total = [0]

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


@torch.inference_mode()
def paired_latency_ms(first: nn.Module, second: nn.Module, x: torch.Tensor, repeats: int) -> tuple:
    """Median wall time of each model, runs interleaved so that load changes hit both alike."""
    first.eval()
    second.eval()
    for _ in range(3):
        first(x)
        second(x)
    times = ([], [])
    for _ in range(repeats):
        for model, out in ((first, times[0]), (second, times[1])):
            tick = time.perf_counter()
            model(x)
            out.append(time.perf_counter() - tick)
    return 1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1])


def matrices(model: nn.Module, skip=()):
    return [(layer.module, layer.param_name) for layer in find_prunable(model) if layer.name not in skip]


def weight_sparsity(model: nn.Module, skip=()) -> float:
    """Fraction of the searched weights that are zero (what an unstructured target counts)."""
    zero = total = 0
    for module, name in matrices(model, skip):
        w = getattr(module, name)
        zero += int((w == 0).sum())
        total += w.numel()
    return zero / total


def best_so_far(history: List[dict]) -> List[float]:
    return [h["best_reward"] for h in history]


def episodes_to(curve: List[float], fraction: float = 0.99) -> Optional[int]:
    finite = [v for v in curve if v > -math.inf]
    if not finite:
        return None
    final = curve[-1]
    goal = fraction * final if final >= 0 else final / fraction
    return next(i + 1 for i, v in enumerate(curve) if v >= goal)


def _mean_or_dash(rows, key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{statistics.fmean(values):.2f}" if values else "—"


def summary(values: List[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


# --------------------------------------------------------------------------- the suite
class Suite:
    def __init__(self, cfg: SuiteConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        train = fashion_mnist(ROOT / "data", train=True)
        test = fashion_mnist(ROOT / "data", train=False)
        x_all, y_all = tensor_subset(train, len(train), seed=0)
        # the demo's split: the last 512 shuffled training images were never trained on; a larger
        # calibration set continues with training images (what a user calibrating on train data has)
        self.x_train, self.y_train = x_all[:-512], y_all[:-512]
        order = torch.cat([torch.arange(len(x_all) - 512, len(x_all)), torch.arange(len(x_all) - 512)])
        self.x_cal, self.y_cal = x_all[order[:cfg.calibration]], y_all[order[:cfg.calibration]]
        x_test, y_test = tensor_subset(test, len(test), seed=0)
        self.x_test, self.y_test = x_test[:cfg.test_images], y_test[:cfg.test_images]
        tick = time.perf_counter()
        self.dense = trained_resnet18(self.x_train, self.y_train, cfg.train_epochs,
                                      ROOT / "checkpoints" / f"resnet18_fmnist_e{cfg.train_epochs:g}.pt")
        self.train_seconds = time.perf_counter() - tick
        self.dense_acc = evaluate_accuracy(self.dense, self.x_test, self.y_test)
        self.dense_macs, self.dense_params = count_macs_params(self.dense, self.x_cal[:1])
        self.rows: List[dict] = []       # one per pruned model
        self.curves: Dict[str, List[float]] = {}
        self.refusals: List[dict] = []   # searches rl_prune refused on this machine, with its message

    # ------------------------------------------------------------------ model outcomes
    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.dense)

    def finish(self, model: nn.Module, row: dict, structure: str) -> dict:
        """Sparsity, test accuracy before/after the fixed fine-tune, and (channels) real speed."""
        if structure == "unstructured":
            row["removed"] = weight_sparsity(model, self.protected())
        else:
            # blocks N2N masked still run their first layers until compact removes them: count them gone
            row["removed"] = 1 - count_macs_params_removed(model, self.x_cal[:1])[0] / self.dense_macs
        row["test_acc"] = evaluate_accuracy(model, self.x_test, self.y_test)
        train_classifier(model, self.x_train, self.y_train, epochs=1.0, batch_size=64, lr=0.01,
                         seed=row.get("seed", 0), max_steps=self.cfg.finetune_steps)
        row["test_acc_finetuned"] = evaluate_accuracy(model, self.x_test, self.y_test)
        if structure == "channel" and row.get("seed") in (None, self.cfg.seeds[0]):
            row.update(self.speed(model))
        self.rows.append(row)
        self.log(f"  {row['method']:<28} {row['structure']:<12} target {row['target']:.2f} seed {row.get('seed', '-')}: "
                 f"removed {row['removed']:.3f}, acc {row['test_acc']:.2%} -> {row['test_acc_finetuned']:.2%}")
        return row

    def speed(self, model: nn.Module) -> dict:
        """Latency before/after compact (masked models compute at dense cost) and the MACs ratio."""
        if any(prune.is_pruned(m) for m in model.modules()):
            compact(model, self.x_cal[:2])
        out = {"macs_ratio": self.dense_macs / max(1, count_macs_params(model, self.x_cal[:1])[0])}
        for batch in (1, 64):
            dense, pruned = paired_latency_ms(self.dense, model, self.x_test[:batch], self.cfg.latency_repeats)
            out[f"latency_b{batch}_dense_ms"], out[f"latency_b{batch}_ms"] = dense, pruned
        return out

    # ------------------------------------------------------------------ searches
    def search(self, agent: str, target, structure: str, seed: int, episodes: Optional[int] = None,
               budget: Optional[str] = None, **options):
        model = self.fresh()
        config = dict(self.cfg.agent_config.get(agent, {}))
        if episodes is not None:
            config["episodes"] = episodes
        tick = time.perf_counter()
        result = rl_prune(model, target, data=(self.x_cal, self.y_cal), agent=agent, structure=structure,
                          seed=seed, verbose=False, calibration_samples=self.cfg.calibration,
                          agent_config=config or None, budget=budget, **options)
        return model, result, time.perf_counter() - tick

    def floor_seconds(self) -> float:
        """One forward pass of the unpruned model over the reward set (the search part of the
        calibration set), as a search scores it (batches of 128, inference mode, argmax): the
        median of 7, measured once per suite."""
        if getattr(self, "_floor", None) is None:
            search_part = self.x_cal[:len(self.x_cal) - round(0.25 * len(self.x_cal))]  # rl_prune's default split
            model, batches, times = self.fresh().eval(), list(search_part.split(128)), []
            with torch.inference_mode():
                for _ in range(8):
                    tick = time.perf_counter()
                    for x in batches:
                        model(x).argmax(1)
                    times.append(time.perf_counter() - tick)
            self._floor = statistics.median(times[1:])
        return self._floor

    def search_row(self, method, result, seconds, structure, target, seed, whole_search=None) -> dict:
        """Cost against the floor, split in two: an episode of the environment (masks, budget, the
        scoring forward: median over episodes) and the agent's own work between episodes (acting and
        learning: the search's wall time minus its episodes', per episode)."""
        history = result.history
        curve = best_so_far(history)
        evaluations = history[-1]["evaluations"] if history else 0
        floor = self.floor_seconds()
        search_s = result.search_seconds
        # a conditional search's seconds pay for every target's episodes, not just this target's
        everything = whole_search if whole_search is not None else history
        in_episodes = sum(h["seconds"] for h in everything)
        return {"method": method, "structure": structure, "target": target, "seed": seed,
                "episodes": len(history), "evaluations": evaluations, "wall_s": seconds,
                "reward": result.plan.score, "episodes_to_99pct": episodes_to(curve),
                "episode_ms": result.episode_seconds * 1e3, "forward_ms": floor * 1e3,
                "search_s": search_s,
                "episode_over_forward": result.episode_seconds / floor,
                "agent_over_forward": max(0.0, search_s - in_episodes) / max(1, len(everything)) / floor,
                "wall_episode_over_forward": search_s / max(1, len(everything)) / floor,
                "evaluation_over_forward": seconds / max(1, evaluations) / floor,
                **{k: result.plan.metadata[k] for k in ("removed_blocks", "architecture_choice")
                   if k in result.plan.metadata}}   # N2N: which blocks went, and why

    def random_matched(self, structure: str, target: float, seed: int, budgets: Dict[str, int],
                       label: str = "random search") -> None:
        """Random search with everything the agents have (the prior it draws around, the repair, the
        held-out choice) and as many plans as the agent that scored the most of ``budgets``."""
        episodes = max(budgets.values())
        self.log(f"{label} {structure} {target} seed {seed} ({episodes} episodes) ...")
        model, result, seconds = self.search("random", target, structure, seed, episodes=episodes)
        self.curves[f"{label}/{structure}/{target}/{seed}"] = best_so_far(result.history)
        row = self.search_row(label, result, seconds, structure, target, seed)
        self.finish(model, row, structure)

    def random_per_agent(self, structure: str, target: float, seed: int, budgets: Dict[str, int]) -> None:
        """The channel rule's comparison: for every agent, random search at exactly its plans scored."""
        for agent, plans in budgets.items():
            self.random_matched(structure, target, seed, {agent: plans}, label=random_label(agent))

    def run_agents(self, structure: str, agents: List[str], target: float, seed: int) -> Dict[str, int]:
        budgets = {}
        for agent in agents:
            self.log(f"{agent} {structure} {target} seed {seed} ...")
            model, result, seconds = self.search(agent, target, structure, seed)
            self.curves[f"{agent}/{structure}/{target}/{seed}"] = best_so_far(result.history)
            row = self.search_row(agent, result, seconds, structure, target, seed)
            budgets[agent] = row["evaluations"]
            self.finish(model, row, structure)
        return budgets

    def run_multi_target(self, seed: int) -> Dict[float, int]:
        """One conditional search for every unstructured target; returns the plans scored per target."""
        agent, targets = self.cfg.multi_target_agent, self.cfg.unstructured_targets
        self.log(f"{agent} one search for {targets} seed {seed} ...")
        host = self.fresh()
        config = self.cfg.agent_config.get(agent)
        tick = time.perf_counter()
        multi = rl_prune(host, targets if len(targets) > 1 else targets[0], data=(self.x_cal, self.y_cal),
                         agent=agent, seed=seed, verbose=False, calibration_samples=self.cfg.calibration,
                         agent_config=config)
        seconds = time.perf_counter() - tick
        results = {t: multi[t] for t in targets} if len(targets) > 1 else {targets[0]: multi}
        budgets = {}
        for t, result in results.items():
            model = self.fresh()
            if len(targets) > 1:   # the plan and the BatchNorm statistics it was scored with
                multi.apply(model, target=t)
            else:                  # one target: rl_prune pruned (and re-estimated) the host itself
                model = host
            self.curves[f"{agent}/unstructured/{t}/{seed}"] = best_so_far(result.history)
            row = self.search_row(f"{agent} (one search, {len(targets)} targets)", result, seconds,
                                  "unstructured", t, seed, whole_search=getattr(multi, "history", None))
            row["evaluations"] = budgets[t] = len(result.history)   # each clipped episode scores once
            self.finish(model, row, "unstructured")
        return budgets

    def run_latency_budget(self, target: float, seed: int) -> None:
        """AMC with ``budget="latency"``: the target is the fraction of batch-1 latency removed as measured
        after ``compact`` (rl_prune's closing step); checked again by the suite's own timing of the
        compacted model, beside what the latency table alone predicted."""
        self.log(f"amc channel budget=latency {target} seed {seed} ...")
        try:
            model, result, seconds = self.search("amc", target, "channel", seed, budget="latency")
        except ValueError as refusal:   # measured latency: a target this machine's per-call overhead puts out of reach
            self.log(f"  refused: {refusal}")
            self.refusals.append({"method": "amc, budget=latency", "structure": "channel", "target": target,
                                  "seed": seed, "refused": str(refusal)})
            return
        row = self.search_row("amc, budget=latency", result, seconds, "channel", target, seed)
        latency = result.plan.metadata.get("latency") or {}
        row["predicted_latency_removed"] = latency["measured"]["rounds"][latency["measured"]["chosen"]]["table"]
        row["search_measured_latency_removed"] = result.sparsity
        row["latency_table"] = latency
        self.curves[f"amc,/channel/{target}/{seed}"] = best_so_far(result.history)
        self.finish(model, row, "channel")

    # ------------------------------------------------------------------ baselines
    def unstructured_baselines(self, target: float) -> None:
        """The one-liners over the tensors the searches prune (first conv and classifier dense, as
        rl_prune's default), and the heuristics with the searches' BatchNorm repair and held-out
        choice (``agent="prior"``): the cheap bar, with and without what the search adds to it."""
        skip = self.protected()
        for label, fn in (("uniform per-layer L1", uniform_unstructured),
                          ("global magnitude", global_magnitude_unstructured), ("LAMP", lamp_unstructured)):
            model = self.fresh()
            fn(matrices(model, skip), target)
            self.finish(model, {"method": label, "structure": "unstructured", "target": target}, "unstructured")
        for prior, repair, label in (("global", "none", "global magnitude + BN repair"),
                                     ("lamp", "none", "LAMP + BN repair"),
                                     ("lamp", None, "LAMP + BN repair + refit (rl_prune's default)")):
            if repair is None and target < AUTO_REFIT_FROM:
                continue  # the default refits from AUTO_REFIT_FROM: below, the row above
            model, result, seconds = self.search("prior", target, "unstructured", 0, prior=prior, selection=0.0,
                                                 repair=repair)
            self.finish(model, {"method": label, "structure": "unstructured", "target": target,
                                "wall_s": seconds}, "unstructured")

    def protected(self) -> set:
        """The tensors rl_prune keeps dense on this model by default."""
        if getattr(self, "_protected", None) is None:
            _, result, _ = self.search("prior", 0.5, "unstructured", 0)
            self._protected = set(result.plan.metadata.get("protected", ()))
        return self._protected

    def torch_pruning(self, target: float, global_pruning: bool) -> nn.Module:
        """torch-pruning's BasePruner with group L2 magnitude, its channel ratio bisected so the
        pruned model loses ``target`` of its MACs (classifier kept), BatchNorm re-estimated on the
        same calibration batch the searches use."""
        def prune_at(ratio: float) -> nn.Module:
            model = self.fresh()
            pruner = tp.pruner.BasePruner(model, self.x_cal[:2], importance=tp.importance.GroupMagnitudeImportance(p=2),
                                          global_pruning=global_pruning, pruning_ratio=ratio, max_pruning_ratio=0.9,
                                          ignored_layers=[model.get_classifier()])
            pruner.step()
            return model

        def removed(model) -> float:
            return 1 - count_macs_params(model, self.x_cal[:1])[0] / self.dense_macs

        lo, hi = 0.0, 0.9
        for _ in range(10):
            mid = (lo + hi) / 2
            if removed(prune_at(mid)) >= target:
                hi = mid
            else:
                lo = mid
        model = prune_at(hi)
        BatchNormRecalibration(model, [self.x_cal])()
        return model

    def channel_baselines(self, target: float) -> None:
        for global_pruning, name in ((False, "torch-pruning uniform"), (True, "torch-pruning global")):
            model = self.torch_pruning(target, global_pruning)
            self.finish(model, {"method": name, "structure": "channel", "target": target}, "channel")
        for repair, label in (("none", "best channel prior + BN repair"),
                              ("lstsq", "best channel prior + BN repair + refit")):
            model, result, seconds = self.search("prior", target, "channel", 0, repair=repair)
            self.finish(model, {"method": label, "structure": "channel", "target": target, "wall_s": seconds},
                        "channel")

    def dense_finetuned(self) -> float:
        """The unpruned model after the same fine-tune every pruned model gets: the ceiling a
        fine-tuned pruned model is compared against."""
        model = self.fresh()
        train_classifier(model, self.x_train, self.y_train, epochs=1.0, batch_size=64, lr=0.01, seed=0,
                         max_steps=self.cfg.finetune_steps)
        return evaluate_accuracy(model, self.x_test, self.y_test)

    # ------------------------------------------------------------------ everything
    def run(self, parts=("unstructured", "channel"), memory: bool = True) -> dict:
        cfg = self.cfg
        started = time.perf_counter()
        unstructured, channel = "unstructured" in parts, "channel" in parts
        for target in cfg.unstructured_targets if unstructured else ():
            self.unstructured_baselines(target)
        for target in cfg.channel_targets if channel else ():
            self.channel_baselines(target)
        for seed in cfg.seeds:
            multi = self.run_multi_target(seed) if cfg.multi_target_agent and unstructured else {}
            for target in cfg.unstructured_targets if unstructured else ():
                budgets = self.run_agents("unstructured", cfg.unstructured_agents, target, seed)
                if target in multi:
                    budgets[cfg.multi_target_agent] = multi[target]
                self.random_matched("unstructured", target, seed, budgets)
            for target in cfg.channel_targets if channel else ():
                budgets = self.run_agents("channel", cfg.channel_agents, target, seed)
                self.random_per_agent("channel", target, seed, budgets)
                if seed == cfg.seeds[0]:
                    self.run_latency_budget(target, seed)
        probes = [(a, "unstructured", cfg.unstructured_targets[0])
                  for a in cfg.unstructured_agents + [cfg.multi_target_agent, "random"] if a]
        probes += [(a, "channel", cfg.channel_targets[0]) for a in cfg.channel_agents + ["random"]]
        memory_rows = []
        for agent, structure, target in probes if memory else ():
            self.log(f"memory of one {agent} {structure} search (separate process) ...")
            memory_rows.append(run_memory_probe(agent, structure, target, cfg.calibration))
        return {"config": asdict(cfg), "machine": {"threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                                                   "torch": torch.__version__, "python": platform.python_version(),
                                                   "load_average_end": os.getloadavg()[0]},
                "dense": {"test_acc": self.dense_acc, "macs": self.dense_macs, "params": self.dense_params,
                          "train_or_load_s": self.train_seconds, "test_acc_finetuned": self.dense_finetuned()},
                "memory": memory_rows, "rows": self.rows, "curves": self.curves, "refusals": self.refusals,
                "wall_s": time.perf_counter() - started}


# --------------------------------------------------------------------------- memory, in a fresh process
PROBE_CONFIG = {"amc": {"episodes": 20, "warmup": 10}, "cacp": {"episodes": 20, "warmup": 10},
                "purl": {"episodes": 3, "warmup": 2}, "crl": {"episodes": 16}, "n2n": {"episodes": 20},
                "random": {"episodes": 20}}


def memory_probe(agent: str, structure: str, target: float, calibration: int) -> dict:
    """Peak RSS increase of one (short) search over the RSS after a forward over the reward set.

    Run in its own process: a process that already searched keeps its freed memory and would
    report almost nothing for the next search. Replay buffers grow by a few KB per episode, so
    a short search shows the peak of a long one."""
    train = fashion_mnist(ROOT / "data", train=True)
    x_all, y_all = tensor_subset(train, len(train), seed=0)
    x_cal, y_cal = x_all[-512:][:calibration], y_all[-512:][:calibration]
    del train, x_all, y_all
    model = timm_resnet18()
    model.load_state_dict(torch.load(ROOT / "checkpoints" / "resnet18_fmnist_e2.pt", weights_only=True))
    model.eval()
    with torch.inference_mode():
        model(x_cal)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    activations = activation_bytes(model, x_cal)
    with PeakRSS() as rss:
        rl_prune(model, target, data=(x_cal, y_cal), agent=agent, structure=structure, seed=0, verbose=False,
                 calibration_samples=calibration, agent_config=PROBE_CONFIG.get(agent))
    return {"agent": agent, "structure": structure, "peak_rss_increase_mb": rss.increase / 2 ** 20,
            "rss_before_mb": rss.start / 2 ** 20, "model_parameters_mb": params / 2 ** 20,
            "activations_mb": activations / 2 ** 20, "episodes": PROBE_CONFIG.get(agent, {}).get("episodes")}


def timm_resnet18() -> nn.Module:
    import timm
    return timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10)


def run_memory_probe(agent: str, structure: str, target: float, calibration: int) -> dict:
    import subprocess
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", agent, "--structure", structure,
           "--target", str(target), "--calibration", str(calibration)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
    line = next(line for line in out.stdout.splitlines() if line.startswith("MEMORY "))
    return json.loads(line[len("MEMORY "):])


# --------------------------------------------------------------------------- report
def grouped(rows: List[dict]) -> Dict[tuple, List[dict]]:
    out: Dict[tuple, List[dict]] = {}
    for r in rows:
        out.setdefault((r["structure"], r["target"], r["method"]), []).append(r)
    return out


def _pct(s: dict) -> str:
    if s["mean"] is None:
        return "—"
    if s["n"] == 1:
        return f"{s['mean']:.2%}"
    return f"{s['mean']:.2%} ({s['min']:.2%}–{s['max']:.2%})"


def to_markdown(report: dict, command: str) -> str:
    cfg, dense = report["config"], report["dense"]
    lines = [f"Reproduce: `{command}` ({report['wall_s'] / 60:.0f} min on {report['machine']['threads']} threads). "
             f"timm resnet18 on Fashion-MNIST, unpruned {dense['test_acc']:.2%} on {cfg['test_images']} test images; "
             f"reward: agreement with the unpruned model on {cfg['calibration']} training images; seeds "
             f"{cfg['seeds']} (mean, min–max); fine-tune: {cfg['finetune_steps']} SGD steps (batch 64, lr 0.01), "
             f"masks kept, the same for every model"
             + (f"; the unpruned model after the same fine-tune: {dense['test_acc_finetuned']:.2%}"
                if dense.get("test_acc_finetuned") is not None else "") + "."
             + "".join(f" The {r['structure']} rows were re-run on {r['date']} at commit {r['commit']} "
                       f"({r['wall_s'] / 60:.0f} min, `python benchmarks/run.py --only {r['structure']}`)."
                       for r in {r["structure"]: r for r in report.get("reruns", [])}.values()), ""]  # the latest
    lines += ["| structure | target | method | removed | test acc | after fine-tune | plans scored | search s |",
              "|---|---|---|---|---|---|---|---|"]
    groups = grouped(report["rows"])
    for (structure, target, method), rows in sorted(groups.items(), key=lambda kv: (kv[0][0] != "unstructured",
                                                                                     kv[0][1], _order(kv[0][2]))):
        acc = summary([r["test_acc"] for r in rows])
        ft = summary([r["test_acc_finetuned"] for r in rows])
        removed = statistics.fmean(r["removed"] for r in rows)
        evals = rows[0].get("evaluations")
        wall = summary([r.get("wall_s") for r in rows])["mean"]
        what = "weights" if structure == "unstructured" else "MACs"
        lines.append(f"| {structure} | {target:.0%} {what} | {method} | {removed:.3f} | {_pct(acc)} | {_pct(ft)} | "
                     f"{evals if evals is not None else '—'} | {'—' if wall is None else f'{wall:.0f}'} |")
    floor_ms = statistics.median(r["forward_ms"] for r in report["rows"] if r.get("forward_ms"))
    lines += ["", "Search efficiency and cost (mean over seeds): best-so-far reward after 25 / 100 episodes and at "
              "the end, episodes to reach 99% of the final best, and the cost of an episode in units of its floor, "
              f"one forward pass of the unpruned model over the reward set ({floor_ms:.0f} ms): the environment's "
              "episode (masks, budget and the scoring pass; median episode), the agent's own work per episode "
              "(acting and learning between episodes), their sum (the search's wall time per episode) and the wall "
              "time per plan scored (cached repeats cost nothing). — : no plan within the budget during the "
              "search (CRL: the final plan is its best projected onto the budget).", "",
              "| structure | target | agent | best @25 | best @100 | final | episodes to 99% | env episode | "
              "agent work | wall per episode | wall per plan scored |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (structure, target, method), rows in sorted(groups.items(), key=lambda kv: (kv[0][0] != "unstructured",
                                                                                     kv[0][1], _order(kv[0][2]))):
        if "episode_over_forward" not in rows[0]:
            continue
        agent = method.split(" ")[0]
        curves = [report["curves"].get(f"{agent}/{structure}/{target}/{r['seed']}") for r in rows]
        curves = [c for c in curves if c]

        def at(n):
            vals = [c[min(n, len(c)) - 1] for c in curves if c and c[min(n, len(c)) - 1] > -math.inf]
            return f"{statistics.fmean(vals):.3f}" if vals else "—"

        reach = summary([r["episodes_to_99pct"] for r in rows])["mean"]
        final = f"{statistics.fmean(r['reward'] for r in rows):.3f}"
        lines.append(f"| {structure} | {target:.0%} | {method} | {at(25)} | {at(100)} | {final} | "
                     f"{'—' if reach is None else f'{reach:.0f}'} | "
                     f"{statistics.fmean(r['episode_over_forward'] for r in rows):.2f} | "
                     f"{_mean_or_dash(rows, 'agent_over_forward')} | {_mean_or_dash(rows, 'wall_episode_over_forward')} | "
                     f"{statistics.fmean(r['evaluation_over_forward'] for r in rows):.2f} |")
    memory = report["memory"]
    if memory:
        lines += ["", "Peak memory of a search (each in a fresh process; RSS increase over the process after one "
                  "forward pass over the reward set), against the model's parameters and the activations of one "
                  "forward pass over the reward set:", "",
                  "| structure | agent | peak RSS increase MB | parameters MB | activations MB |", "|---|---|---|---|---|"]
        for m in memory:
            lines.append(f"| {m['structure']} | {m['agent']} | {m['peak_rss_increase_mb']:.0f} | "
                         f"{m['model_parameters_mb']:.0f} | {m['activations_mb']:.0f} |")
        lines.append("")
    speed = [r for r in report["rows"] if "latency_b1_ms" in r]
    if speed:
        lines += ["Real speed after `compact` (first seed; median of "
                  f"{cfg['latency_repeats']} runs, {report['machine']['threads']} threads): latency at batch 1 and 64 "
                  "against the MACs ratio.", "",
                  "| method | MACs ratio | batch 1 ms (dense → pruned) | speed-up | batch 64 ms (dense → pruned) | "
                  "speed-up |", "|---|---|---|---|---|---|"]
        for r in sorted(speed, key=lambda r: _order(r["method"])):
            lines.append(f"| {r['method']} | x{r['macs_ratio']:.2f} | {r['latency_b1_dense_ms']:.2f} → "
                         f"{r['latency_b1_ms']:.2f} | x{r['latency_b1_dense_ms'] / r['latency_b1_ms']:.2f} | "
                         f"{r['latency_b64_dense_ms']:.1f} → {r['latency_b64_ms']:.1f} | "
                         f"x{r['latency_b64_dense_ms'] / r['latency_b64_ms']:.2f} |")
        for r in speed:
            if "predicted_latency_removed" in r:
                measured = 1 - r["latency_b1_ms"] / r["latency_b1_dense_ms"]
                searched = r.get("search_measured_latency_removed")
                lines += ["", f"`budget=\"latency\"` (AMC, seed {r['seed']}, target {r['target']:.0%} of the batch-1 "
                              f"latency): the latency table alone predicted {r['predicted_latency_removed']:.1%} removed"
                              + ("" if searched is None else f", rl_prune measured {searched:.1%} after `compact`")
                              + f"; this suite's timing after `compact`: {measured:.1%} (MACs x{r['macs_ratio']:.2f})."]
    for r in report.get("refusals", []):
        lines += ["", f"`{r['method']}` (seed {r['seed']}, target {r['target']:.0%}): refused by `rl_prune` on this "
                      f"machine, the model untouched: {r['refused']}"]
    lines += criteria(report)
    return "\n".join(lines) + "\n"


def criteria(report: dict) -> List[str]:
    """The issue's acceptance rules, checked on the means: unstructured, every agent >= the best
    one-liner (global magnitude, LAMP) - 0.5 pp and the best agent >= it + 2 pp at 90/95%; channel,
    every agent >= torch-pruning's best + 3 pp and above random search. Also shown: the margin over
    the same heuristics with the searches' BatchNorm repair, the bar that is honest about repair."""
    groups = grouped(report["rows"])

    def mean(structure, target, method, key):
        rows = groups.get((structure, target, method), [])
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.fmean(values) if values else None

    agents = sorted({m for (st, _, m) in groups if st == "unstructured" and not m.startswith("random")
                     and m not in _BASELINES})
    lines = ["", "Acceptance (means over seeds; pp = percentage points of test accuracy):", "",
             "| structure | target | fine-tune | bar | bar with BN repair | agents (margin over the bar) | rule | met |",
             "|---|---|---|---|---|---|---|---|"]
    for key, label in (("test_acc", "no"), ("test_acc_finetuned", "20 steps")):
        ceiling = report["dense"].get(key)  # the unpruned model, fine-tuned alike for the second pass
        for target in sorted({t for (st, t, _) in groups if st == "unstructured"}):
            bar = max(v for v in (mean("unstructured", target, m, key) for m in ("global magnitude", "LAMP"))
                      if v is not None)
            repaired = [mean("unstructured", target, m, key) for m in ("global magnitude + BN repair",
                                                                        "LAMP + BN repair")]
            repaired = max(v for v in repaired if v is not None) if any(v is not None for v in repaired) else None
            margins = {a: mean("unstructured", target, a, key) - bar for a in agents
                       if mean("unstructured", target, a, key) is not None}
            need_best = target >= 0.9
            ok = all(m >= -0.005 for m in margins.values()) and (not need_best or max(margins.values()) >= 0.02)
            rule = "all >= bar - 0.5" + (", best >= bar + 2" if need_best else "")
            lines.append(f"| unstructured | {target:.0%} | {label} | {bar:.2%} | "
                         f"{'—' if repaired is None else f'{repaired:.2%}'} | "
                         + ", ".join(f"{a.split(' ')[0]} {100 * m:+.1f}" for a, m in margins.items())
                         + f" | {rule} | {_met(ok, bar + 0.02 if need_best else None, ceiling)} |")
        for target in sorted({t for (st, t, _) in groups if st == "channel"}):
            bar = max(v for v in (mean("channel", target, m, key) for m in ("torch-pruning uniform",
                                                                            "torch-pruning global")) if v is not None)
            chans = sorted({m for (st, t, m) in groups if st == "channel" and t == target and m not in _BASELINES
                            and not m.startswith("random") and "latency" not in m})
            # each agent against random search at its own number of plans (older runs: one random search)
            rand = {a: mean("channel", target, random_label(a), key) or mean("channel", target, "random search", key)
                    for a in chans}
            margins = {a: mean("channel", target, a, key) - bar for a in chans}
            ok = all(m >= 0.03 for m in margins.values()) and \
                all(rand[a] is not None and mean("channel", target, a, key) > rand[a] for a in chans)
            lines.append(f"| channel | {target:.0%} MACs | {label} | {bar:.2%} | random search at equal plans: "
                         + ", ".join(f"{a} {'—' if rand[a] is None else f'{rand[a]:.2%}'}" for a in chans) + " | "
                         + ", ".join(f"{a} {100 * m:+.1f}" for a, m in margins.items())
                         + f" | all >= bar + 3 and > random | {_met(ok, bar + 0.03, ceiling)} |")
    return lines


def random_label(agent: str) -> str:
    return f"random search (as many plans as {agent})"


def _met(ok: bool, needed: Optional[float], ceiling: Optional[float]) -> str:
    """'yes', 'NO', or why not: a rule asking for more than the unpruned model has."""
    if ok:
        return "yes"
    if needed is not None and ceiling is not None and needed > ceiling:
        return f"NO: needs {needed:.2%}, above the unpruned model's {ceiling:.2%}"
    return "NO"


_BASELINES = ["uniform per-layer L1", "global magnitude", "LAMP", "global magnitude + BN repair", "LAMP + BN repair",
              "LAMP + BN repair + refit (rl_prune's default)",
              "torch-pruning uniform", "torch-pruning global", "best channel prior + BN repair",
              "best channel prior + BN repair + refit"]


def _order(method: str) -> tuple:
    baselines = _BASELINES
    if method in baselines:
        return (0, baselines.index(method), method)
    return (2, 0, method) if method.startswith("random") else (1, 0, method)


def merged_rerun(previous: dict, rerun: dict, structure: str) -> dict:
    """``previous`` with every row and curve of ``structure`` (or, for ``"memory"``, the memory probes)
    replaced by the re-run's, and the re-run recorded (commit, date, minutes) so the report can say which rows are newer."""
    import subprocess
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    merged = dict(previous)
    if structure == "memory":
        merged["memory"] = rerun["memory"]
    else:
        merged["rows"] = [r for r in previous["rows"] if r["structure"] != structure] + rerun["rows"]
        merged["refusals"] = [r for r in previous.get("refusals", []) if r["structure"] != structure] + \
            rerun.get("refusals", [])
        merged["curves"] = {k: v for k, v in previous["curves"].items() if f"/{structure}/" not in k}
        merged["curves"].update(rerun["curves"])
        merged["dense"] = {**previous["dense"], **rerun["dense"]}
    merged["reruns"] = previous.get("reruns", []) + [{
        "structure": structure, "commit": commit.strip() or None, "date": time.strftime("%Y-%m-%d"),
        "wall_s": rerun["wall_s"]}]
    return merged


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, one target per structure, small budgets")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--no-readme", action="store_true", help="do not update docs/BENCHMARKS.md (full runs do)")
    parser.add_argument("--report", metavar="JSON", help="only regenerate the markdown (and README) from a JSON")
    parser.add_argument("--only", choices=["unstructured", "channel", "memory"],
                        help="re-run one structure (no memory probes), or only the memory probes, and replace its "
                             "rows in the existing JSON; the report says which part was re-run when")
    parser.add_argument("--memory-probe", metavar="AGENT", help=argparse.SUPPRESS)
    parser.add_argument("--structure", default="unstructured", help=argparse.SUPPRESS)
    parser.add_argument("--target", type=float, default=0.8, help=argparse.SUPPRESS)
    parser.add_argument("--calibration", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        print("MEMORY " + json.dumps(memory_probe(args.memory_probe, args.structure, args.target, args.calibration)))
        return {}
    cfg = copy.deepcopy(QUICK if args.quick else FULL)
    if args.seeds:
        cfg.seeds = args.seeds
    name = "bench_quick" if args.quick else "bench"
    command = "python benchmarks/run.py --quick" if args.quick else "make bench"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        report = json.loads(Path(args.report).read_text())
    else:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        suite = Suite(cfg, log=lambda s: print(s, flush=True))
        try:
            report = suite.run() if not args.only else suite.run(
                parts=() if args.only == "memory" else (args.only,), memory=args.only == "memory")
        except BaseException:  # keep what an hour of measuring produced
            (out / f"{name}.partial.json").write_text(json.dumps({"rows": suite.rows, "curves": suite.curves,
                                                                   "refusals": suite.refusals}))
            raise
        if args.only:
            report = merged_rerun(json.loads((out / f"{name}.json").read_text()), report, args.only)
        (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    markdown = to_markdown(report, command)
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
    if not args.quick and not args.no_readme:
        for page in publish_section(ROOT, "bench", markdown):
            print(f"{page.relative_to(ROOT)} updated")
    return report


if __name__ == "__main__":
    main()
