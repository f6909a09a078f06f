"""Small, dependable training and evaluation loops for classifiers held as tensors.

Used by the demo, the benchmarks and the tests; also a plain example of the "existing
training script" a pruned model goes back into: masks survive because the prune hooks
recompute ``weight = weight_orig * weight_mask`` before every forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["train_classifier", "evaluate_accuracy"]


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: float = 1.0,
                     batch_size: int = 128, lr: float = 0.05, weight_decay: float = 5e-4,
                     seed: int = 0, max_steps: Optional[int] = None, verbose: bool = False,
                     desc: str = "training") -> nn.Module:
    """SGD with momentum and a cosine schedule over ``epochs`` passes of ``(x, y)``; a progress
    bar (named ``desc``, with the running loss) when ``verbose``."""
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, len(x) // batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    if max_steps is not None:
        total = min(total, max_steps)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    model.train()
    step = 0
    bar = tqdm(total=total, desc=desc, unit="step", disable=not verbose, leave=False, dynamic_ncols=True)
    while step < total:
        order = torch.randperm(len(x), generator=generator)
        for i in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            step += 1
            bar.update(1)
            if verbose:  # .item() waits for the step: only when someone reads it
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    return model


@torch.inference_mode()
def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in eval mode (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / len(x)
