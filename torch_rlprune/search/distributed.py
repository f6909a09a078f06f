"""One search over several processes: the calibration set is split, the agent stays on rank 0.

Under ``torchrun --nproc_per_node N``, ``rl_prune(..., distributed=True)`` runs on every rank:

* every rank builds the same calibration set from its ``data`` (checked: a rank whose batches
  differ is an error, not a silently different reward) and keeps its share of the batches;
* rank 0 runs the agent. Each time the environment scores a plan, rank 0 broadcasts the plan
  (its integer per-step counts, a few hundred bytes), every rank applies it to its own masks,
  scores its share, and the shares are summed with one ``all_reduce``: the reward is exactly
  the single-process reward (agreement and accuracy are counts; a non-classifier fidelity sums
  squared errors, equal up to the order of float additions, with a scale computed per batch, so
  exact only when the shares are whole batches: at least as many batches as processes);
* a rank that fails (rank 0 reading a checkpoint, any rank while scoring) makes every rank raise
  instead of leaving the others waiting in a collective;
* BatchNorm recalibration runs on the same batches on every rank, so the models stay equal;
* at the end rank 0 sends the best plans and the history, chooses the plan to return on the
  held-out part alone and sends that choice, and every rank applies the same plan.

Backends: gloo on CPU, nccl on CUDA (the process group is created from torchrun's environment
when none exists). Only rewards that are sums over samples can be split: ``"fidelity"`` and ``"accuracy"``;
a callable reward is opaque (it sees the whole model, not a share of the data) and is refused.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..env.layerwise import BestPlan
from ..rewards.calibration import CalibrationSet
from ..rewards.scores import AccuracyReward, FidelityReward, Reward
from ..structure.inputs import batch_tensors, concat

__all__ = ["DistributedSearch", "SplittableReward", "distributed_context", "all_ranks_succeed"]

_SCORE, _DONE, _ABORT = 1, 2, 3


def distributed_context(model: torch.nn.Module):
    """Join (or create from torchrun's environment) the default process group. Returns
    ``(rank, world_size)``; raises ValueError when there is no group to join."""
    if not dist.is_available():
        raise ValueError("distributed=True: this torch build has no torch.distributed")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"distributed=True needs an initialised process group or torchrun's environment "
                         f"(missing {', '.join(missing)}): run under `torchrun --nproc_per_node N`")
    param = next(model.parameters(), None)
    backend = "nccl" if param is not None and param.is_cuda else "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


class SplittableReward(Reward):
    """A reward summed over calibration samples, scored on this rank's share and all-reduced."""

    def __init__(self, inner: Reward, device: torch.device):
        if not isinstance(inner, (FidelityReward, AccuracyReward)):
            raise ValueError("distributed=True splits the calibration set, so the reward must be a sum over "
                             "samples: reward='fidelity' or 'accuracy' (a callable reward cannot be split)")
        self.inner, self.device, self.name = inner, device, inner.name
        self.reducing = False  # between a plan's announcement and its all_reduce (see DistributedSearch)
        self.peers_stopped = False  # a failure flag went through an all_reduce: every rank has left the loop

    def release(self) -> None:
        """A rank that failed while scoring completes the pending all_reduce with a failure flag,
        so the others learn of it instead of waiting in the collective."""
        if self.reducing:
            self.reducing = False
            dist.all_reduce(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=self.device))
            self.peers_stopped = True

    def prepare(self, model) -> None:
        self.inner.prepare(model)
        if isinstance(self.inner, FidelityReward) and not self.inner._classifier:
            scale = torch.tensor([self.inner._scale], dtype=torch.float64, device=self.device)
            dist.all_reduce(scale)
            self.inner._scale = float(scale) or 1.0

    def __call__(self, model) -> float:
        totals = torch.tensor([*self.inner.partial_sums(model), 0.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        self.reducing = False
        total, count, failed = totals.tolist()
        if failed:
            self.peers_stopped = True
            raise RuntimeError("distributed search: another rank failed while scoring a plan; see its error")
        return self.inner.from_sums(total, count)


@contextlib.contextmanager
def all_ranks_succeed(coordinator: Optional["DistributedSearch"], what: str) -> Iterator[None]:
    """Around a step some ranks take alone: if it fails anywhere, it fails everywhere (no-op without
    a coordinator)."""
    try:
        yield
    except Exception:
        if coordinator is not None:
            coordinator.agree(False, what)
        raise
    if coordinator is not None:
        coordinator.agree(True, what)


def shard(calibration: CalibrationSet, rank: int, world: int) -> CalibrationSet:
    """This rank's share: whole batches when there are enough (the same batches a single process
    scores, so the outputs are bit-identical), else an even split of the samples."""
    inputs, labels = calibration.inputs, calibration.labels
    total = calibration.num_samples
    if total < world:  # every rank raises, not only the one left without data
        raise ValueError(f"distributed=True: {total} calibration samples cannot be split over {world} processes; "
                         f"raise calibration_samples")
    if len(inputs) >= world:
        bounds = np.linspace(0, len(inputs), world + 1).round().astype(int)
        lo, hi = bounds[rank], bounds[rank + 1]
        return CalibrationSet(inputs[lo:hi], labels[lo:hi] if labels is not None else None, calibration.synthetic)
    x = concat(inputs)
    bounds = np.linspace(0, len(x), world + 1).round().astype(int)
    part = [x[bounds[rank]:bounds[rank + 1]]]  # total >= world: no share is empty
    y = [torch.cat(labels)[bounds[rank]:bounds[rank + 1]]] if labels is not None else None
    return CalibrationSet(part, y, calibration.synthetic)


def check_same_calibration(calibration: CalibrationSet, device: torch.device) -> None:
    """Every rank must have built the same calibration set (same data, same order)."""
    x = torch.cat([torch.cat([t.reshape(len(t), -1).double() for t in batch_tensors(batch)], 1)
                   for batch in calibration.inputs])
    digest = torch.stack([x.sum(), (x * torch.arange(1, len(x) + 1, dtype=torch.float64)[:, None]).sum(),
                          torch.tensor(float(len(x)), dtype=torch.float64)]).to(device)
    low, high = digest.clone(), digest.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise ValueError("distributed=True: the ranks built different calibration sets; give every rank the same "
                         "data in the same order (no per-rank shuffling or sampler)")


class DistributedSearch:
    """Keeps the ranks in step: rank 0 announces every plan it scores, the others follow."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.reward: Optional[SplittableReward] = None

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def agree(self, ok: bool, what: str) -> None:
        """A set-up step some ranks do alone (rank 0 reads the checkpoint): every rank learns whether
        all succeeded, and the ones that did raise too if another did not (nobody waits in a collective)."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if ok and not int(flag):
            raise RuntimeError(f"distributed search: another rank failed while {what}; see its error")

    def _send(self, command: int, key=()) -> None:
        header = torch.tensor([command, len(key)], dtype=torch.int64, device=self.device)
        dist.broadcast(header, 0)
        if len(key):
            dist.broadcast(torch.tensor(key, dtype=torch.int64, device=self.device), 0)

    def _receive(self):
        header = torch.empty(2, dtype=torch.int64, device=self.device)
        dist.broadcast(header, 0)
        command, length = (int(v) for v in header.tolist())
        key = torch.empty(length, dtype=torch.int64, device=self.device)
        if length:
            dist.broadcast(key, 0)
        return command, tuple(int(v) for v in key.tolist())

    def wrap_leader_score(self, env, score: Callable[[], float], reward: SplittableReward) -> Callable[[], float]:
        """Rank 0's score function: announce the plan the environment just applied, then score.
        If scoring fails here (an interrupt in the middle of a forward), the other ranks are
        already waiting in the plan's ``all_reduce``: rank 0 completes it with a dummy share
        before announcing the abort, so nobody is left blocked in a collective."""
        self.reward = reward

        def announced() -> float:
            self._send(_SCORE, env.scoring_key)
            reward.reducing = True
            try:
                return score()
            except BaseException:
                reward.release()
                raise
        return announced

    def serve(self, env, score: Callable[[], float], reward: SplittableReward) -> None:
        """The other ranks: apply and score every plan rank 0 announces, until it is done."""
        while True:
            command, key = self._receive()
            if command == _SCORE:
                reward.reducing = True
                try:
                    env.apply(np.asarray(key, dtype=np.int64))
                    score()
                except BaseException:
                    reward.release()
                    raise
            elif command == _DONE:
                return
            else:
                raise RuntimeError("distributed search: rank 0 failed; see its error")

    def finish(self, failed: bool = False) -> None:
        """Rank 0: release the other ranks (``failed``: they raise)."""
        if not failed:
            self._send(_DONE)
            return
        if self.reward is not None and self.reward.peers_stopped:
            return  # the failure flag already stopped every rank: nobody listens for the abort (gloo would block)
        try:
            self._send(_ABORT)
        except Exception:  # a rank that failed first may be gone: the original error matters, not this one
            pass

    def share(self, value):
        """Rank 0's ``value`` (plain data) on every rank."""
        payload = [value if self.leader else None]
        dist.broadcast_object_list(payload, src=0, device=self.device if self.device.type == "cuda" else None)
        return payload[0]

    def share_results(self, env, priors: dict) -> dict:
        """Rank 0's best plans (and runners-up), history and evaluation count, copied to every rank's
        environment; returns rank 0's ``priors`` (the prior chosen per target) on every rank."""
        data = self.share({"best": {key: _plain(b) for key, b in env.best_by_target.items()},
                           "top": {key: [_plain(b) for b in top] for key, top in env.top_by_target.items()},
                           "history": env.history, "evaluations": env.evaluations, "priors": priors,
                           "screening": None if env.screening is None else env.screening.stats,
                           "returned_scores": getattr(env, "returned_scores", None)} if self.leader else None)
        if not self.leader:
            env.best_by_target = {key: _best_plan(*b) for key, b in data["best"].items()}
            env.top_by_target = {key: [_best_plan(*b) for b in top] for key, top in data["top"].items()}
            env.history, env.evaluations = data["history"], data["evaluations"]
            if env.screening is not None:   # rank 0 screens (on the whole set it holds, as every rank does)
                env.screening.stats = data["screening"]
            if data["returned_scores"] is not None:   # N2N's architecture choice: rank 0 scored it alone
                env.returned_scores = data["returned_scores"]
        return data["priors"]

    def share_choice(self, env, selections: dict) -> dict:
        """Rank 0's held-out choice on every rank: the plan each target returns (written into every
        rank's ``best_by_target``) and how it was chosen (returned). Rank 0 chooses alone: a refitted
        candidate's score is continuous, and two ranks whose forwards round differently could part
        ways on a near-tie and end with different models."""
        data = self.share({"best": {key: _plain(b) for key, b in env.best_by_target.items()},
                           "selections": selections} if self.leader else None)
        if not self.leader:
            env.best_by_target = {key: _best_plan(*b) for key, b in data["best"].items()}
        return data["selections"]


def _plain(best: BestPlan) -> tuple:
    return best.reward, best.score, None if best.k is None else np.asarray(best.k).tolist()


def _best_plan(reward, score, k) -> BestPlan:
    return BestPlan(reward, score, None if k is None else np.asarray(k, dtype=np.int64))
