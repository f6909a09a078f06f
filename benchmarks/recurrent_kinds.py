"""GRU and tanh RNN layers, pruned as the LSTM example prunes its LSTM: the heuristics against the searches.

    python benchmarks/recurrent_kinds.py            # ~10 min on 2 cores, the two models trained included
    python benchmarks/recurrent_kinds.py --quick    # a smoke run

``examples/lstm_sequential_mnist.py`` measures LSTM layers only. This study swaps them for two ``nn.GRU``
or two ``nn.RNN`` (tanh) layers, same sizes (Linear 28 -> 64, two recurrent layers of 128, Linear 10 on
the last step), trains each model the same way (2 epochs of row-wise sequential MNIST, cached in
checkpoints/) and prunes 80% and 90% of the recurrent weight matrices, no fine-tune:

* the one-liners (global magnitude, LAMP) and LAMP refitted by least squares;
* ``rl_prune`` with ``agent="prior"`` (the best of LAMP / global magnitude, repaired, no search), ``"amc"``
  and ``"random"`` (as many episodes as AMC), seeds 0-2;
* ``"amc"`` with its held-out choice made on the candidates as searched (unrefitted), as it was before
  the refitted choice (``search/as_returned.held_out_as_returned``): what that choice is worth here.

Writes benchmarks/results/recurrent_kinds.{json,md} and the section between the ``recurrent_kinds``
markers of docs/rnn.md.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(HERE))
from study import study_main  # noqa: E402
from lstm_sequential_mnist import (accuracy_cell, compare_unstructured, grouped, method_label,  # noqa: E402
                                   trained_model)

from torch_rlprune import rl_prune  # noqa: E402
from torch_rlprune.demo.data import mnist, sequential, tensor_subset  # noqa: E402
from torch_rlprune.demo.training import evaluate_accuracy  # noqa: E402
from torch_rlprune.search import selection  # noqa: E402

KINDS = {"GRU": nn.GRU, "RNN": nn.RNN}
TARGETS = (0.8, 0.9)
UNREFITTED_CHOICE = "amc, chosen unrefitted"


class RowRecurrent(nn.Module):
    """rows (28 features) -> Linear 64 -> ``kind`` 128 -> ``kind`` 128 -> Linear 10 on the last step."""

    def __init__(self, kind, hidden: int = 128):
        super().__init__()
        self.proj = nn.Linear(28, 64)
        self.rnn1 = kind(64, hidden, batch_first=True)
        self.rnn2 = kind(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, rows):
        h, _ = self.rnn1(torch.relu(self.proj(rows)))
        h, _ = self.rnn2(h)
        return self.head(h[:, -1])


def trained(kind: str, x, y, epochs: float) -> nn.Module:
    """Trained on the default threads (the cached weights depend on them), or loaded from checkpoints/."""
    cache = ROOT / "checkpoints" / f"row{kind.lower()}_mnist_e{epochs:g}.pt"
    return trained_model(x, y, epochs, cache, build=lambda: RowRecurrent(KINDS[kind]), name=f"the {kind} model")


def chosen_unrefitted(model, data, test, seeds, episodes) -> list:
    """AMC with the held-out choice of the candidates as searched (no refitted comparison)."""
    rows = []
    with mock.patch.object(selection, "held_out_as_returned", lambda *args: None):
        for seed in seeds:
            for target in TARGETS:
                pruned = copy.deepcopy(model)
                tick = time.perf_counter()
                rl_prune(pruned, target, data=data, agent="amc", seed=seed, verbose=False, episodes=episodes)
                rows.append({"method": UNREFITTED_CHOICE, "target": target, "seed": seed, "removed": None,
                             "test_acc": evaluate_accuracy(pruned, *test), "seconds": time.perf_counter() - tick})
    return rows


def run(quick: bool) -> dict:
    seeds, episodes = ([0], 10) if quick else ([0, 1, 2], None)
    train_set, test_set = mnist(ROOT / "data", train=True), mnist(ROOT / "data", train=False)
    x_all, y_all = tensor_subset(train_set, len(train_set), seed=0)
    x_all = sequential(x_all)
    x_test, y_test = tensor_subset(test_set, 2000 if quick else len(test_set), seed=0)
    x_test = sequential(x_test)
    calibration = (x_all[-512:], y_all[-512:])   # held out of training, as in the LSTM example
    report = {"config": {"seeds": seeds, "targets": list(TARGETS), "calibration": 512, "test": len(x_test),
                         "episodes": episodes}, "kinds": {}}
    started = time.perf_counter()
    for kind in KINDS:
        model = trained(kind, x_all[:-512], y_all[:-512], 0.1 if quick else 2.0)
        rows = compare_unstructured(model, calibration, (x_test, y_test), list(TARGETS), ["amc", "random"], seeds,
                                    episodes, verbose=False)
        rows += chosen_unrefitted(model, calibration, (x_test, y_test), seeds, episodes)
        report["kinds"][kind] = {"dense_acc": evaluate_accuracy(model, x_test, y_test), "rows": rows}
    report["wall_s"] = time.perf_counter() - started
    return report


def to_markdown(report: dict, command: str) -> str:
    c = report["config"]
    lines = [f"Reproduce: `{command}` ({report['wall_s'] / 60:.0f} min, 2 threads). Row-wise sequential MNIST, "
             f"{c['test']} test sequences, {c['calibration']} calibration sequences held out of training, no "
             f"fine-tune; the LSTM example's model with its two LSTM layers swapped for `nn.GRU` or `nn.RNN` "
             f"(tanh); searches with rl_prune's defaults, seeds {c['seeds']} (mean, min–max); every row prunes the "
             f"same matrices (the input projection and the head stay dense). *{UNREFITTED_CHOICE}*: AMC with its "
             "held-out choice made on its candidates as searched, not refitted (as before that choice existed).",
             "", "| layers | target | method | test acc | search s |", "|---|---|---|---|---|"]
    for kind, data in report["kinds"].items():
        lines.append(f"| {kind} | — | unpruned | {data['dense_acc']:.2%} | — |")
        for (target, method), group in grouped(data["rows"]):
            seconds = statistics.fmean(r["seconds"] for r in group)
            lines.append(f"| {kind} | {target:.0%} of weights | {method_label(method, (UNREFITTED_CHOICE,))} | "
                         f"{accuracy_cell(group)} | {f'{seconds:.0f}' if seconds else '—'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    study_main("recurrent_kinds", __doc__.splitlines()[0], run, to_markdown)
