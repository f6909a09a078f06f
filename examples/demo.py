"""The main job on an embedded default: prune a Fashion-MNIST timm resnet18 to 80% sparsity.

    make demo                     # or: python examples/demo.py [--target 0.8] [--agent amc]

Trains timm's resnet18 (pretrained=False, in_chans=1, num_classes=10) for a short fixed
budget on real Fashion-MNIST (the checkpoint is cached in checkpoints/), runs ``rl_prune``
with calibration images carved from the training split, and prints test accuracy before
and after, next to random search at the same number of episodes, the search's own prior alone
(the heuristic with the same BatchNorm repair and held-out choice) and the one-liners at the same
sparsity (uniform per-layer L1, global magnitude, LAMP). With the default arguments the table is
written into README.md between the demo markers, and to benchmarks/results/demo.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import timm
import torch
from torch import nn

from torch_rlprune import rl_prune
from torch_rlprune.demo.data import fashion_mnist, tensor_subset
from torch_rlprune.report import publish_section
from torch_rlprune.env.priors import global_magnitude_unstructured, lamp_unstructured, uniform_unstructured
from torch_rlprune.structure.tensors import find_prunable
from torch_rlprune.demo.training import evaluate_accuracy, train_classifier

ROOT = Path(__file__).resolve().parent.parent


def trained_resnet18(x, y, epochs: float, cache: Path, seed: int = 0) -> nn.Module:
    """resnet18 trained on ``(x, y)``, or loaded from ``cache``. Its initial weights are drawn from ``seed``,
    whoever calls: timm draws them from the global RNG, and the demo and the benchmarks share one cache file,
    so an unseeded caller used to train (and cache) another model than the demo's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10)
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        print(f"loaded cached checkpoint {cache}")
    else:
        print(f"training resnet18 on {len(x)} Fashion-MNIST images for {epochs} epoch(s) ...")
        tick = time.perf_counter()
        train_classifier(model, x, y, epochs=epochs, batch_size=256, lr=0.05, seed=0, verbose=True)
        print(f"  trained in {time.perf_counter() - tick:.0f}s")
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    return model.eval()


def prunable_params(model, skip=()):
    return [(layer.module, layer.param_name) for layer in find_prunable(model) if layer.name not in skip]


def agreement(model: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> float:
    """Top-1 agreement with the unpruned model's predictions on ``x``."""
    with torch.inference_mode():
        return float((model(x).argmax(1) == reference).float().mean())


def markdown_table(rows, target: float, test_images: int, calibration: int, command: str) -> str:
    lines = [f"`{command}`: timm resnet18 trained 2 epochs on Fashion-MNIST, {target:.0%} of the prunable weights "
             f"removed (the first conv and the classifier kept, as every row here), no fine-tuning, {test_images} "
             f"test images; agreement with the unpruned model on the {calibration} calibration images. Written by "
             "the demo run itself.", "",
             "| method | removed | test acc | agreement | wall s |", "|---|---|---|---|---|"]
    for name, sparsity, acc, score, seconds in rows:
        lines.append(f"| {name} | {sparsity:.3f} | {acc:.2%} | {score:.4f} | {seconds:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--agent", default=None, help="default: rl_prune's default agent")
    parser.add_argument("--episodes", type=int, default=None)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-readme", action="store_true", help="do not write the table into README.md")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    train = fashion_mnist(ROOT / "data", train=True)
    test = fashion_mnist(ROOT / "data", train=False)
    x_all, y_all = tensor_subset(train, len(train), seed=0)
    # The last images of the shuffled training split are held out as the calibration set.
    x_train, y_train = x_all[:-args.calibration], y_all[:-args.calibration]
    x_cal, y_cal = x_all[-args.calibration:], y_all[-args.calibration:]
    x_test, y_test = tensor_subset(test, len(test), seed=0)

    model = trained_resnet18(x_train, y_train, args.epochs,
                             ROOT / "checkpoints" / f"resnet18_fmnist_e{args.epochs:g}.pt")
    dense_acc = evaluate_accuracy(model, x_test, y_test)
    with torch.inference_mode():
        dense_pred = model(x_cal).argmax(1)
    heuristic, random_model, uniform, global_mag, lamp = (copy.deepcopy(model) for _ in range(5))
    search = dict(data=(x_cal, y_cal), seed=args.seed)
    if args.agent is not None:
        search["agent"] = args.agent

    tick = time.perf_counter()
    result = rl_prune(model, target=args.target, episodes=args.episodes, **search)
    rl_time = time.perf_counter() - tick
    protected = set(result.plan.metadata.get("protected", ()))
    plans_scored = result.history[-1]["evaluations"] if result.history else 0
    random_result = rl_prune(random_model, target=args.target, agent="random", verbose=True,
                             episodes=max(1, len(result.history)), data=(x_cal, y_cal), seed=args.seed)
    prior_result = rl_prune(heuristic, target=args.target, agent="prior", verbose=False, data=(x_cal, y_cal),
                            seed=args.seed)

    one_liners = []
    for name, fn, m in (("uniform per-layer L1 (`prune.l1_unstructured`)", uniform_unstructured, uniform),
                        ("global magnitude (`prune.global_unstructured`)", global_magnitude_unstructured, global_mag),
                        ("LAMP (`lamp_unstructured`)", lamp_unstructured, lamp)):
        tick = time.perf_counter()
        fn(prunable_params(m, protected), args.target)
        seconds = time.perf_counter() - tick   # the pruning alone, not the evaluation
        one_liners.append((name, args.target, evaluate_accuracy(m, x_test, y_test),
                           agreement(m, x_cal, dense_pred), seconds))

    print()
    print(result.summary())
    agent = result.plan.agent
    rows = [("unpruned", 0.0, dense_acc, 1.0, 0.0),
            (f"`rl_prune` ({agent}, {len(result.history)} episodes, {plans_scored} plans scored)", result.sparsity,
             evaluate_accuracy(model, x_test, y_test), agreement(model, x_cal, dense_pred), rl_time),
            (f"random search, same {len(random_result.history)} episodes", random_result.sparsity,
             evaluate_accuracy(random_model, x_test, y_test), agreement(random_model, x_cal, dense_pred),
             random_result.wall_time),
            (f"its prior alone (`agent=\"prior\"`: {prior_result.plan.metadata['prior']['method']}, same repair)",
             prior_result.sparsity, evaluate_accuracy(heuristic, x_test, y_test),
             agreement(heuristic, x_cal, dense_pred), prior_result.wall_time),
            *one_liners]
    command = "make demo"
    markdown = markdown_table(rows, args.target, len(x_test), args.calibration, command)
    print(f"\nFashion-MNIST test accuracy, timm resnet18, {len(x_test)} images, no fine-tuning\n")
    print(markdown)
    print(f"episodes: {len(result.history)}; one episode {result.episode_seconds * 1e3:.0f} ms vs one forward "
          f"pass over the {args.calibration} calibration images {result.forward_seconds * 1e3:.0f} ms")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.md").write_text(markdown)
    (out / "demo.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    defaults = args.target == 0.8 and args.agent is None and args.episodes is None and args.epochs == 2.0 \
        and args.calibration == 512 and args.seed == 0
    if defaults and not args.no_readme:
        for page in publish_section(ROOT, "demo", markdown):
            print(f"{page.relative_to(ROOT)} updated")


if __name__ == "__main__":
    main()
