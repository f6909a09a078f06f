"""One search over several processes: the calibration set split across ranks, the agent on rank 0.

    torchrun --standalone --nproc_per_node 2 examples/distributed_prune.py --checkpoint checkpoints/x.pt
    python examples/distributed_prune.py --single ...        # the same search in one process

Builds timm's ``--model`` for Fashion-MNIST (``pretrained=False``, 1 channel, 10 classes; load
trained weights with ``--checkpoint``, a state_dict), takes ``--calibration`` training images
(the same on every rank, in the same order), and runs ``rl_prune(..., distributed=True)``.
Every rank saves the plan it ends with as ``OUT/plan_rank<r>.json`` (they are identical);
rank 0 prints the summary and the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import timm
import torch

from torch_rlprune import rl_prune
from torch_rlprune.demo.data import fashion_mnist, tensor_subset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--checkpoint", default=None, help="state_dict of the timm model (weights_only load)")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--structure", default="unstructured", choices=["unstructured", "channel"])
    parser.add_argument("--agent", default="amc")
    parser.add_argument("--episodes", type=int, default=None)
    parser.add_argument("--agent-config", default=None, help="JSON object of agent hyper-parameters")
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--out", default="runs/distributed")
    parser.add_argument("--screen", type=int, default=None, help="rl_prune(screen=): samples each plan is screened on")
    parser.add_argument("--single", action="store_true", help="one process, distributed=False")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, in_chans=1, num_classes=10)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    x, y = tensor_subset(fashion_mnist(args.data_root, train=True), args.calibration, seed=args.seed)
    rank = int(os.environ.get("RANK", 0))
    tick = time.perf_counter()
    result = rl_prune(model, target=args.target, data=(x, y), agent=args.agent, structure=args.structure,
                      episodes=args.episodes, seed=args.seed, calibration_samples=args.calibration,
                      agent_config=json.loads(args.agent_config) if args.agent_config else None,
                      distributed=not args.single, verbose=rank == 0, screen=args.screen)
    seconds = time.perf_counter() - tick
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.plan.save(out / f"plan_rank{rank}.json")
    if rank == 0:
        world = int(os.environ.get("WORLD_SIZE", 1))
        print(result.summary())
        print(f"processes {1 if args.single else world}, threads per process {torch.get_num_threads()}, "
              f"search wall time {seconds:.1f}s, {len(result.history)} episodes")
        (out / "timing.json").write_text(json.dumps({"processes": 1 if args.single else world,
                                                     "threads": torch.get_num_threads(), "seconds": seconds,
                                                     "episodes": len(result.history),
                                                     "episode_seconds": result.episode_seconds}))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
