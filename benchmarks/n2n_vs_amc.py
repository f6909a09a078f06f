"""N2N (depth + width) against AMC channel pruning (width only) on Fashion-MNIST resnet18.

    python benchmarks/n2n_vs_amc.py [--target 0.5] [--episodes 300] [--finetune-images 12000]

Both search 50% of the MACs (``structure="channel"``, fidelity reward on the demo's 512
calibration images, seed 0), are compacted, then fine-tuned identically (SGD, the same images,
one pass). Reported: test accuracy (10,000 images) before and after the fine-tune, MACs and
params after ``compact``, batch-1 CPU latency (1 thread, median of 30 runs, the two models
timed alternately), blocks removed, episodes and search wall time. Writes
benchmarks/results/n2n_vs_amc.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "examples"))
from demo import trained_resnet18  # noqa: E402

from torch_rlprune import compact, rl_prune  # noqa: E402
from torch_rlprune.structure.channel import count_macs_params  # noqa: E402
from torch_rlprune.demo.data import fashion_mnist, tensor_subset  # noqa: E402
from torch_rlprune.demo.training import evaluate_accuracy, train_classifier  # noqa: E402


def latency_ms(models, x, runs=30, warmup=5):
    times = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models.values():
                m(x)
        for _ in range(runs):
            for name, m in models.items():
                tick = time.perf_counter()
                m(x)
                times[name].append((time.perf_counter() - tick) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--finetune-images", type=int, default=12000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()

    train = fashion_mnist(ROOT / "data", train=True)
    test = fashion_mnist(ROOT / "data", train=False)
    x_all, y_all = tensor_subset(train, len(train), seed=0)
    x_train, y_train, x_cal, y_cal = x_all[:-512], y_all[:-512], x_all[-512:], y_all[-512:]
    x_test, y_test = tensor_subset(test, len(test), seed=0)
    dense = trained_resnet18(x_train, y_train, 2.0, ROOT / "checkpoints" / "resnet18_fmnist_e2.pt")
    example = x_cal[:2]
    dense_macs, dense_params = count_macs_params(dense, example)
    report = {"set_up": {"target_macs": args.target, "episodes": args.episodes, "seed": args.seed,
                         "finetune_images": args.finetune_images, "load_before": os.getloadavg()[0],
                         "dense_test_acc": round(evaluate_accuracy(dense, x_test, y_test), 4),
                         "dense_macs": dense_macs, "dense_params": dense_params}, "runs": {}}
    pruned = {}
    for agent in ("n2n", "amc"):
        model = copy.deepcopy(dense)
        tick = time.perf_counter()
        result = rl_prune(model, args.target, data=(x_cal, y_cal), structure="channel", agent=agent,
                          episodes=args.episodes, seed=args.seed, verbose=False)
        search_s = time.perf_counter() - tick
        info = compact(model, example)
        acc = evaluate_accuracy(model, x_test, y_test)
        macs, params = count_macs_params(model, example)
        train_classifier(model, x_train[:args.finetune_images], y_train[:args.finetune_images], epochs=1,
                         batch_size=128, lr=0.01, seed=args.seed)
        model.eval()
        report["runs"][agent] = {
            "episodes": len(result.history), "search_s": round(search_s, 1), "score": round(result.plan.score, 4),
            "blocks_removed": info.get("removed_blocks", []), "macs": macs, "params": params,
            "macs_removed": round(1 - macs / dense_macs, 4), "params_removed": round(1 - params / dense_params, 4),
            "test_acc": round(acc, 4), "test_acc_finetuned": round(evaluate_accuracy(model, x_test, y_test), 4)}
        pruned[agent] = model
        print(agent, report["runs"][agent], flush=True)
    torch.set_num_threads(1)
    lat = latency_ms({"dense": dense, **pruned}, x_test[:1])
    report["latency_b1_ms"] = {k: round(v, 2) for k, v in lat.items()}
    report["load_after"] = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "n2n_vs_amc.json").write_text(json.dumps(report, indent=1))
    md = to_markdown(report)
    (out / "n2n_vs_amc.md").write_text(md)
    print(md)


def to_markdown(r) -> str:
    s = r["set_up"]
    lines = [f"# N2N (depth + width) vs AMC (width only), Fashion-MNIST resnet18, {s['target_macs']:.0%} of the MACs",
             "", f"`python benchmarks/n2n_vs_amc.py` (seed {s['seed']}, {s['episodes']} episodes each, fidelity reward, "
             f"512 calibration images; fine-tune: one SGD pass over {s['finetune_images']} training images, lr 0.01, "
             f"batch 128, on the compacted model). Unpruned: {s['dense_test_acc']:.2%} test accuracy, "
             f"{s['dense_macs'] / 1e6:.0f}M MACs, latency {r['latency_b1_ms']['dense']} ms (batch 1, 1 thread). "
             f"Load average {s['load_before']:.1f} before, {r['load_after']:.1f} after: shared machine.", "",
             "| agent | blocks removed | MACs removed | params removed | test acc | after fine-tune | latency b1 ms | "
             "episodes | search s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, x in r["runs"].items():
        lines.append(f"| {name} | {len(x['blocks_removed'])} {', '.join(x['blocks_removed'])} | {x['macs_removed']:.1%} | "
                     f"{x['params_removed']:.1%} | {x['test_acc']:.2%} | {x['test_acc_finetuned']:.2%} | "
                     f"{r['latency_b1_ms'][name]} | {x['episodes']} | {x['search_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
