"""The main job on an embedded default: prune a Fashion-MNIST timm resnet18 to 80% sparsity.

    make demo                     # or: python examples/demo.py [--target 0.8] [--agent amc]

Trains timm's resnet18 (pretrained=False, in_chans=1, num_classes=10) for a short fixed
budget on real Fashion-MNIST (the checkpoint is cached in checkpoints/), runs ``rl_prune``
with calibration images carved from the training split, and prints test accuracy before
and after, next to the two standard one-liners at the same sparsity (uniform per-layer
L1 and global magnitude) and random search at the same number of evaluations.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn.utils import prune

from torch_rlprune import rl_prune
from torch_rlprune.data import fashion_mnist, tensor_subset
from torch_rlprune.structure import find_prunable
from torch_rlprune.training import evaluate_accuracy, train_classifier

ROOT = Path(__file__).resolve().parent.parent


def trained_resnet18(x, y, epochs: float, cache: Path) -> nn.Module:
    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10)
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        print(f"loaded cached checkpoint {cache}")
    else:
        print(f"training resnet18 on {len(x)} Fashion-MNIST images for {epochs} epoch(s) ...")
        tick = time.perf_counter()
        train_classifier(model, x, y, epochs=epochs, batch_size=256, lr=0.05, seed=0)
        print(f"  trained in {time.perf_counter() - tick:.0f}s")
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    return model.eval()


def prunable_params(model):
    return [(layer.module, layer.param_name) for layer in find_prunable(model)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--agent", default="amc")
    parser.add_argument("--episodes", type=int, default=None)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
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

    def fidelity(m: nn.Module) -> str:
        """The search's default reward: top-1 agreement with the unpruned model on the calibration images."""
        with torch.inference_mode():
            return f"{float((m(x_cal).argmax(1) == dense_pred).float().mean()):.4f}"
    uniform, global_mag, random_model = (copy.deepcopy(model) for _ in range(3))

    tick = time.perf_counter()
    result = rl_prune(model, target=args.target, data=(x_cal, y_cal), agent=args.agent,
                      episodes=args.episodes, seed=args.seed)
    rl_time = time.perf_counter() - tick
    random_result = rl_prune(random_model, target=args.target, data=(x_cal, y_cal), agent="random",
                             episodes=len(result.history), seed=args.seed, verbose=False)

    tick = time.perf_counter()
    for module, name in prunable_params(uniform):
        prune.l1_unstructured(module, name, amount=args.target)
    uniform_time = time.perf_counter() - tick
    tick = time.perf_counter()
    prune.global_unstructured(prunable_params(global_mag), prune.L1Unstructured, amount=args.target)
    global_time = time.perf_counter() - tick

    print()
    print(result.summary())
    rows = [("unpruned", 0.0, dense_acc, "1.0000", 0.0),
            (f"rl_prune agent={args.agent}", result.sparsity, evaluate_accuracy(model, x_test, y_test),
             fidelity(model), rl_time),
            ("random search (same episodes)", random_result.sparsity,
             evaluate_accuracy(random_model, x_test, y_test), fidelity(random_model), random_result.wall_time),
            ("uniform per-layer L1", args.target, evaluate_accuracy(uniform, x_test, y_test), fidelity(uniform),
             uniform_time),
            ("global magnitude", args.target, evaluate_accuracy(global_mag, x_test, y_test), fidelity(global_mag),
             global_time)]
    print(f"\nFashion-MNIST test accuracy, timm resnet18, {len(x_test)} images, no fine-tuning")
    print(f"| {'method':<32} | {'sparsity':>8} | {'test acc':>8} | {'fidelity':>8} | {'wall s':>7} |")
    print(f"|{'-' * 34}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 9}|")
    for name, sparsity, acc, score, seconds in rows:
        print(f"| {name:<32} | {sparsity:>8.3f} | {acc:>8.2%} | {score:>8} | {seconds:>7.1f} |")
    print(f"\nepisodes: {len(result.history)}; one episode {result.episode_seconds * 1e3:.0f} ms vs one forward "
          f"pass over the {args.calibration} calibration images {result.forward_seconds * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
