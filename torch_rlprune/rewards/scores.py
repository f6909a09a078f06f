"""How a masked model is scored. Higher is better; every score is computed in eval
mode under ``inference_mode`` on the fixed calibration batches."""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..structure.inputs import batch_tensors, describe_shape, run_model
from .calibration import CalibrationSet, primary_output

__all__ = ["Reward", "FidelityReward", "AccuracyReward", "CallableReward", "make_reward", "REWARDS"]

REWARDS = ("fidelity", "accuracy")


class Reward:
    """Scores ``model`` as it currently is. Subclasses set ``name``."""

    name = "reward"

    def prepare(self, model: nn.Module) -> None:
        """Called once on the unpruned model before the search starts."""

    def __call__(self, model: nn.Module) -> float:
        raise NotImplementedError


def _forward_all(model: nn.Module, inputs: List[torch.Tensor]):
    with torch.inference_mode():
        for x in inputs:
            yield primary_output(run_model(model, x))


def check_outputs(outs: List[Optional[torch.Tensor]], inputs: List[torch.Tensor]) -> None:
    """The unpruned model's outputs must be per-sample and finite, or every plan would score the
    same (an all-NaN output agrees with itself: a 50% plan applied "at score 1.0")."""
    for out, x in zip(outs, inputs):
        if out is None:
            raise ValueError("data: the model returned no tensor for the calibration inputs")
        first = batch_tensors(x)[0]
        batch_sizes = (first.shape[0], first.shape[1]) if first.dim() > 1 else (first.shape[0],)  # time-major: dim 1
        if out.dim() == 0 or out.shape[0] not in batch_sizes:
            raise ValueError(f"data: for a batch of {len(x)} calibration inputs of shape {describe_shape(x)} the model "
                             f"returned shape {tuple(out.shape)}; rewards need one output per input (batch first)")
        if out.is_floating_point() and not bool(torch.isfinite(out).all()):
            raise ValueError("data: the unpruned model's outputs on the calibration inputs are not finite "
                             "(NaN or inf); check the inputs and the model before pruning")


class CalibrationReward(Reward):
    """A reward read from the model's outputs on fixed calibration batches (``self.calibration``)."""

    calibration: CalibrationSet

    def outputs(self, model: nn.Module, batches: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        """The model's outputs on the calibration batches (what ``gains_of_outputs`` reads), or on
        the batches at positions ``batches`` only."""
        inputs = self.calibration.inputs
        return list(_forward_all(model, inputs if batches is None else [inputs[i] for i in batches]))


class FidelityReward(CalibrationReward):
    """Label-free agreement of the pruned model with the original.

    For classifier outputs ``(N, C)`` the score is the top-1 agreement: the fraction of
    calibration inputs on which the pruned model predicts the class the original model
    predicts. (A probability-based "soft" agreement was measured first and rejected:
    zeroing weights shrinks logits, so the pruned model's softmax flattens and the soft
    score fell to 0.23 for a plan that still agreed on ~70% of inputs; the signal
    tracked confidence, not decisions.) For any other output, and with ``top1=False`` for
    classifiers too, the score is ``1 / (1 + relative squared error)`` of the raw outputs. The
    original outputs are computed once, in :meth:`prepare`.
    """

    name = "fidelity"

    def __init__(self, calibration: CalibrationSet, top1: bool = True):
        self.calibration, self.top1 = calibration, top1
        self._teacher: Optional[List[torch.Tensor]] = None
        self._classifier = False

    def prepare(self, model: nn.Module) -> None:
        outs = list(_forward_all(model, self.calibration.inputs))
        check_outputs(outs, self.calibration.inputs)
        self._classifier = self.top1 and all(o.dim() == 2 and o.shape[1] > 1 for o in outs)
        if self._classifier:
            self._teacher = [o.argmax(1) for o in outs]
        else:
            self._teacher = [o.float().clone() for o in outs]
            self._scale = sum(float(((o - o.mean()) ** 2).sum()) for o in self._teacher) or 1.0

    def partial_sums(self, model: nn.Module) -> Tuple[float, float]:
        """(agreements, samples) for classifiers, (squared error, 0) otherwise: sums over the
        calibration batches, so shares of the data add up (:mod:`torch_rlprune.search.distributed`)."""
        if self._teacher is None:
            raise RuntimeError("FidelityReward.prepare(model) must run on the unpruned model first")
        total, count = 0.0, 0
        for out, teacher in zip(_forward_all(model, self.calibration.inputs), self._teacher):
            if self._classifier:
                total += int((out.argmax(1) == teacher).sum())
                count += len(teacher)
            else:
                total += float(((out.float() - teacher) ** 2).sum())
        return total, count

    def from_sums(self, total: float, count: float) -> float:
        if self._classifier:
            return total / count
        return 1.0 / (1.0 + total / self._scale)

    def __call__(self, model: nn.Module) -> float:
        return self.from_sums(*self.partial_sums(model))

    def sample_gains(self, model: nn.Module) -> torch.Tensor:
        """One term per sample, higher better, that :meth:`score_of_gains` turns into the score:
        agreement (1/0) for classifiers, minus the squared error of each row of the output otherwise
        (what a paired comparison of two plans on the same samples compares, :mod:`.screening`)."""
        return self.gains_of_outputs(self.outputs(model))

    def gains_of_outputs(self, outputs: List[torch.Tensor]) -> torch.Tensor:
        if self._teacher is None:
            raise RuntimeError("FidelityReward.prepare(model) must run on the unpruned model first")
        gains = []
        for out, teacher in zip(outputs, self._teacher):
            if self._classifier:
                gains.append((out.argmax(1) == teacher).double())
            else:
                error = (out.float() - teacher) ** 2
                gains.append(-(error.flatten(1).sum(1) if error.dim() > 1 else error).double())
        return torch.cat(gains)

    def score_of_gains(self, gains: torch.Tensor) -> float:
        if self._classifier:
            return self.from_sums(float(gains.sum()), len(gains))
        return self.from_sums(-float(gains.sum()), 0)


class AccuracyReward(CalibrationReward):
    """Top-1 accuracy on the labelled calibration batches."""

    name = "accuracy"

    def __init__(self, calibration: CalibrationSet):
        if calibration.labels is None:
            raise ValueError("reward='accuracy' needs labelled batches: pass data yielding (inputs, labels)")
        self.calibration = calibration

    def prepare(self, model: nn.Module) -> None:
        outs = list(_forward_all(model, self.calibration.inputs))
        check_outputs(outs, self.calibration.inputs)
        out, labels = outs[0], self.calibration.labels[0]
        if out is None or out.dim() != 2:
            raise ValueError("reward='accuracy' needs a classifier whose output is (batch, classes)")
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or labels.dim() != 1:
            raise ValueError("data: reward='accuracy' needs integer class labels of shape (batch,)")
        if int(labels.max()) >= out.shape[1] or int(labels.min()) < 0:
            raise ValueError(f"data: labels range over [{int(labels.min())}, {int(labels.max())}] but the "
                             f"model has {out.shape[1]} classes")

    def partial_sums(self, model: nn.Module) -> Tuple[float, float]:
        """(correct, samples) over the calibration batches."""
        correct = 0
        for out, y in zip(_forward_all(model, self.calibration.inputs), self.calibration.labels):
            correct += int((out.argmax(1) == y).sum())
        return correct, self.calibration.num_samples

    def from_sums(self, correct: float, count: float) -> float:
        return correct / count

    def __call__(self, model: nn.Module) -> float:
        return self.from_sums(*self.partial_sums(model))

    def sample_gains(self, model: nn.Module) -> torch.Tensor:
        """1 for each sample classified correctly, 0 otherwise."""
        return self.gains_of_outputs(self.outputs(model))

    def gains_of_outputs(self, outputs: List[torch.Tensor]) -> torch.Tensor:
        return torch.cat([(out.argmax(1) == y).double() for out, y in zip(outputs, self.calibration.labels)])

    def score_of_gains(self, gains: torch.Tensor) -> float:
        return self.from_sums(float(gains.sum()), len(gains))


class CallableReward(Reward):
    """Any ``fn(model) -> float`` the user supplies (e.g. validation accuracy)."""

    def __init__(self, fn: Callable[[nn.Module], float]):
        self.fn = fn
        self.name = getattr(fn, "__name__", "callable")

    def __call__(self, model: nn.Module) -> float:
        value = self.fn(model)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"reward callable must return a float, got {type(value).__name__}") from None
        if not math.isfinite(value):
            raise ValueError(f"reward callable returned {value}; rewards must be finite")
        return value


def make_reward(reward, calibration: CalibrationSet) -> Reward:
    if isinstance(reward, Reward):
        return reward
    if callable(reward):
        return CallableReward(reward)
    if reward == "fidelity":
        return FidelityReward(calibration)
    if reward == "accuracy":
        return AccuracyReward(calibration)
    raise ValueError(f"reward must be one of {REWARDS} or a callable(model) -> float, got {reward!r}")
