"""Which reward ranks plans the way the test set does?

    python benchmarks/reward_ranking.py            # ~25 min on 2 cores
    python benchmarks/reward_ranking.py --quick    # a smoke run (minutes)

A search can only find what its reward rewards. For each case (a trained model, a structure, a
target) this draws feasible plans two ways -- uniformly random per-layer amounts (the random
agent without a prior) and random offsets around the heuristic prior (the random agent anchored
to it: the plans an anchored search compares) -- applies each to a copy of the model and scores
it on the calibration images with every candidate reward, each without and with BatchNorm
re-estimation on those images (EagleEye's adaptive BN), and on the test set. Reported per
reward: Spearman's rho and Kendall's tau between the reward and the test accuracy of the model
the search would return (with re-estimated statistics when the reward re-estimates them), and
the test accuracy of the plan the reward ranks first, against the best plan's.

Candidate rewards (label-free unless marked): top-1 agreement with the unpruned model; exp(-KL)
of the unpruned model's softmax to the pruned one's; 1 / (1 + relative squared logit error);
top-1 accuracy on the calibration labels (labelled).

Writes benchmarks/results/reward_ranking.{json,md}.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(HERE))
from study import study_main  # noqa: E402
from demo import trained_resnet18  # noqa: E402
from lstm_sequential_mnist import trained_model as trained_lstm  # noqa: E402

from torch_rlprune import PruningPlan, apply_plan, rl_prune  # noqa: E402
from torch_rlprune.demo.data import fashion_mnist, mnist, sequential, tensor_subset  # noqa: E402
from torch_rlprune.rewards.recalibration import BatchNormRecalibration  # noqa: E402

REWARDS = ("agreement", "kl", "logits", "accuracy")


# --------------------------------------------------------------------------- statistics
def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[order[j + 1]] == values[order[i]]:
            j += 1
        out[order[i:j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    return out


def spearman(a, b) -> float:
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def kendall(a, b) -> float:
    """Kendall's tau-b (ties in either variable discounted)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    da, db = np.sign(a[:, None] - a[None, :]), np.sign(b[:, None] - b[None, :])
    upper = np.triu_indices(len(a), 1)
    s, ta, tb = (da * db)[upper].sum(), (da[upper] != 0).sum(), (db[upper] != 0).sum()
    return float(s / np.sqrt(ta * tb)) if ta and tb else float("nan")


# --------------------------------------------------------------------------- scoring
@torch.inference_mode()
def outputs(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model(b).float() for b in x.split(batch)])


def reward_values(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    log_t, log_s = teacher.log_softmax(1), student.log_softmax(1)
    kl = float((log_t.exp() * (log_t - log_s)).sum(1).mean())
    spread = float(((teacher - teacher.mean()) ** 2).sum()) or 1.0
    return {"agreement": float((student.argmax(1) == teacher.argmax(1)).float().mean()),
            "kl": float(np.exp(-kl)),
            "logits": 1.0 / (1.0 + float(((student - teacher) ** 2).sum()) / spread),
            "accuracy": float((student.argmax(1) == labels).float().mean())}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((outputs(model, x).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------- cases
def scored_plans(result) -> List[PruningPlan]:
    """Every plan a search scored, one per episode: the returned plan's layout with the episode's amounts."""
    base = result.plan.to_dict()
    return [PruningPlan.from_dict({**base, "amounts": dict(zip(result.plan.amounts, h["amounts"]))})
            for h in result.history]


class Case:
    def __init__(self, name: str, model: nn.Module, structure: str, target: float, x_cal, y_cal, x_test, y_test):
        self.name, self.model, self.structure, self.target = name, model.eval(), structure, target
        self.x_cal, self.y_cal, self.x_test, self.y_test = x_cal, y_cal, x_test, y_test
        self.teacher = outputs(self.model, x_cal)
        self.has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

    def plans(self, distribution: str, count: int, seed: int) -> List[PruningPlan]:
        """``count`` feasible plans from the random agent, with or without the prior."""
        host = copy.deepcopy(self.model)
        result = rl_prune(host, self.target, data=(self.x_cal, self.y_cal), agent="random", episodes=count,
                          structure=self.structure, seed=seed, verbose=False, calibration_samples=len(self.x_cal),
                          prior="best" if distribution == "around prior" else "none", selection=0.0,
                          bn_recalibration=0, protect_first_last=False)
        return scored_plans(result)

    def measure(self, plan: PruningPlan) -> dict:
        model = copy.deepcopy(self.model)
        apply_plan(model, plan, example_inputs=self.x_cal[:2])
        row = {f"{r}": v for r, v in reward_values(outputs(model, self.x_cal), self.teacher, self.y_cal).items()}
        row["test"] = accuracy(model, self.x_test, self.y_test)
        if self.has_bn:
            BatchNormRecalibration(model, list(self.x_cal.split(128)))()
            row.update({f"{r}+bn": v for r, v in
                        reward_values(outputs(model, self.x_cal), self.teacher, self.y_cal).items()})
            row["test+bn"] = accuracy(model, self.x_test, self.y_test)
        return row


def fmnist_resnet(calibration: int, test: int):
    train, test_set = fashion_mnist(ROOT / "data", train=True), fashion_mnist(ROOT / "data", train=False)
    x_all, y_all = tensor_subset(train, len(train), seed=0)
    model = trained_resnet18(x_all[:-512], y_all[:-512], 2.0, ROOT / "checkpoints" / "resnet18_fmnist_e2.pt")
    x_test, y_test = tensor_subset(test_set, len(test_set), seed=0)
    return model, x_all[-512:][:calibration], y_all[-512:][:calibration], x_test[:test], y_test[:test]


def mnist_lstm(calibration: int, test: int):
    train, test_set = mnist(ROOT / "data", train=True), mnist(ROOT / "data", train=False)
    x_all, y_all = tensor_subset(train, len(train), seed=0)
    x_all = sequential(x_all)
    model = trained_lstm(x_all[:-512], y_all[:-512], 2.0, ROOT / "checkpoints" / "rowlstm_mnist_e2.pt")
    x_test, y_test = tensor_subset(test_set, len(test_set), seed=0)
    return model, x_all[-512:][:calibration], y_all[-512:][:calibration], sequential(x_test)[:test], y_test[:test]


def summarise(rows: List[dict], rewards: List[str], accuracy_key: Callable[[str], str]) -> Dict[str, dict]:
    out = {}
    for reward in rewards:
        key = accuracy_key(reward)
        r, t = [row[reward] for row in rows], [row[key] for row in rows]
        top = int(np.argmax(r))
        out[reward] = {"spearman": spearman(r, t), "kendall": kendall(r, t), "test_of_top": t[top],
                       "best_test": max(t), "median_test": float(np.median(t))}
    return out


def run(quick: bool) -> dict:
    count = 12 if quick else 50
    calibration, test = (128, 1000) if quick else (256, 5000)
    cases = []
    model, *data = fmnist_resnet(calibration, test)
    cases.append(Case("resnet18 / Fashion-MNIST", model, "unstructured", 0.9, *data))
    cases.append(Case("resnet18 / Fashion-MNIST", model, "channel", 0.5, *data))
    model, *data = mnist_lstm(calibration, test)
    cases.append(Case("LSTM / sequential MNIST", model, "unstructured", 0.8, *data))
    cases.append(Case("LSTM / sequential MNIST", model, "channel", 0.5, *data))
    report = {"count": count, "calibration": calibration, "test": test, "cases": []}
    for case in cases:
        for distribution in ("random", "around prior"):
            tick = time.perf_counter()
            rows = [case.measure(p) for p in case.plans(distribution, count, seed=0)]
            rewards = list(REWARDS) + ([f"{r}+bn" for r in REWARDS] if case.has_bn else [])
            stats = summarise(rows, rewards, lambda r: "test+bn" if r.endswith("+bn") else "test")
            report["cases"].append({"model": case.name, "structure": case.structure, "target": case.target,
                                    "distribution": distribution, "rows": rows, "stats": stats,
                                    "seconds": time.perf_counter() - tick})
            print(f"{case.name} {case.structure} {case.target} {distribution}: " + ", ".join(
                f"{r} {s['spearman']:+.2f}" for r, s in stats.items()), flush=True)
    return report


def to_markdown(report: dict, command: str) -> str:
    lines = [f"Reproduce: `{command}`. {report['count']} feasible plans per row, scored on {report['calibration']} "
             f"calibration images; test accuracy on {report['test']} test images. rho: Spearman, tau: Kendall, "
             "between the reward and the test accuracy of the model as the search returns it (BatchNorm statistics "
             "re-estimated when the reward re-estimates them); 'top': test accuracy of the plan the reward ranks "
             "first / of the best plan.", "",
             "| model | structure | plans | reward | rho | tau | top / best |", "|---|---|---|---|---|---|---|"]
    for case in report["cases"]:
        for reward, s in case["stats"].items():
            lines.append(f"| {case['model']} | {case['structure']} {case['target']:.0%} | {case['distribution']} | "
                         f"{reward} | {s['spearman']:+.2f} | {s['kendall']:+.2f} | "
                         f"{s['test_of_top']:.2%} / {s['best_test']:.2%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    return study_main("reward_ranking", __doc__.splitlines()[0], run, to_markdown, argv)


if __name__ == "__main__":
    main()
