"""``rl_prune``: search a per-layer pruning plan with an RL agent and apply it in place.

This module checks the arguments and hands a :class:`~torch_rlprune.search.engine.Search` the model;
what a search does lives in :mod:`torch_rlprune.search`, the MDP in :mod:`torch_rlprune.env`.
"""
from __future__ import annotations

import time
import warnings
from functools import partial
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .agents import Agent
from .options import STRUCTURES, PruneOptions
from .progress import progress
from .results import MultiTargetResult, PruneResult, pruned_fraction
from .search.checkpoint import check_checkpoint_path, load_checkpoint
from .search.distributed import DistributedSearch, all_ranks_succeed, distributed_context
from .search.engine import Search
from .structure.channel.measured import Latency
from .structure.compact import compact
from .structure.snapshot import ModelSnapshot
from .structure.tensors import find_prunable, left_out_weights
from .threads import one_search_at_a_time

__all__ = ["rl_prune", "global_rl_unstructured", "compact", "PruneResult", "MultiTargetResult", "STRUCTURES",
           "pruned_fraction"]


@one_search_at_a_time
def rl_prune(model: nn.Module, target: Union[float, Sequence[float], None] = 0.8, data=None, reward="fidelity",
             agent="amc",
             episodes: Optional[int] = None, budget: Union[str, Latency, None] = None, structure: str = "unstructured",
             exclude=None, example_inputs=None, seed: int = 0, verbose: bool = True,
             agent_config=None, calibration_samples: Optional[int] = None, max_amount: Optional[float] = None,
             importance_scores=None, parameters=None, importance=None, round_to: Optional[int] = None,
             bn_recalibration: Optional[int] = None, max_drop: Optional[float] = None,
             repair: Optional[str] = None, checkpoint=None, checkpoint_every: int = 10, resume=None,
             distributed: bool = False,
             prior: str = "best", selection: float = 0.25, select_top: int = 5, protect_first_last: bool = True,
             label=None, time_budget: Optional[float] = None, patience: Optional[int] = None,
             screen: Optional[int] = None, cache_mb: Optional[float] = None):
    """Search per-layer pruning amounts with an RL agent and prune ``model`` in place.

    Args:
        model: any ``nn.Module`` (timm models included). Pruned in place; the same object
            is returned in ``result.model``.
        target: fraction of the budget removed, in (0, 1): of the prunable weights
            (unstructured, ``budget="params"``), of their MACs (``"macs"``), of the whole
            model's MACs/params (``structure="channel"``), or of its predicted latency
            (``budget="latency"``). Met within 0.5 percentage points for unstructured pruning
            and 2 for channel pruning, always (for latency: as measured after compact, within
            ``Latency.tolerance``, or a warning says by how much it missed). A list of targets
            returns a :class:`MultiTargetResult` and leaves the model unpruned: ``agent="cacp"``
            runs one search conditioned on the target, other agents one search per target
            (``episodes`` each). ``None`` with ``max_drop=``: AMC's accuracy-guaranteed
            compression, the smallest plan found whose score stays within ``max_drop`` of the
            unpruned model's (reward ``-(1 - score) * log(remaining MACs or params)``).
        data: calibration data: a DataLoader, an iterable of batches (tensors,
            ``(inputs, labels)``, tuples of several inputs -- ``model(*batch)`` -- or dicts --
            ``model(**batch)``, transformers style), a Dataset, or a tensor. ``None`` synthesises
            Gaussian inputs (with a warning) of ``example_inputs``' shape, or of timm's
            ``pretrained_cfg`` image size scaled down to a 128-pixel side when the model runs on it
            (a third of a 224x224 pass; smaller sides ranked plans unlike 224x224 on some models,
            benchmarks/synthetic_inputs.py);
            128 of them, no BatchNorm re-estimation on them (``bn_recalibration=0``: noise
            statistics would replace the learnt ones), and with ``episodes=None`` the search
            stops after ``time_budget=30`` seconds or ``patience=20`` episodes without a better
            plan unless those are given.
        reward: ``"fidelity"`` (label-free agreement with the unpruned model),
            ``"accuracy"`` (needs labels) or ``callable(model) -> float``.
        agent: a registered name (``list_agents()``) or an :class:`Agent` instance.
            ``"n2n"`` (needs ``structure="channel"``, one target) also removes whole residual
            blocks (:mod:`torch_rlprune.env.depth_width`); the plan lists them in
            ``metadata["removed_blocks"]`` and :func:`compact` replaces them by identities.
        episodes: episodes to run; ``None`` takes the agent's default.
        time_budget: seconds the agent's episodes may take (preparing the search and applying
            its plan come on top); when they are spent the search stops after the current episode
            and returns the best plan so far. With one search per target each gets an equal share.
            The plan's ``metadata["stopped"]`` says why and after how many episodes. Not
            reproducible: how many episodes fit depends on the machine.
        patience: stop once this many episodes in a row found no better plan (reproducible).
        screen: multi-fidelity scoring (:mod:`torch_rlprune.rewards.screening`): every plan is scored
            first on this many calibration samples (BatchNorm on their own statistics) and in full
            only if a paired test on them, and then on a second slice three times larger, says it
            may beat the best plan so far; the others get an estimate no higher than the best's, so
            they never become results. ``None``: 64 samples
            when the search part holds at least 256 and the reward is built in; ``0``: every plan
            scored in full.
            ``metadata["screening"]`` counts the plans promoted and kept out.
        cache_mb: prefix caching (:mod:`torch_rlprune.structure.prefix_cache`, unstructured searches
            with a built-in reward): a plan that changes only layers from some point on replays what
            the layers before it computed for the plan scored before it. Exact: the same scores and
            plans. At most this many megabytes of activations are kept (``None``: 256; ``0``: off);
            ``metadata["prefix_cache"]`` reports the bound, the peak and the forwards replayed.
        budget: ``"params"``, ``"macs"``, ``"latency"`` or a :class:`Latency`; default ``"params"``
            for unstructured and ``"macs"`` for channel pruning. ``"latency"`` (AMC's
            latency-aware mode; ``structure="channel"`` only) is
            ``Latency()``: the wall time of one inference at ``Latency(batch=1)`` on
            ``runtime="eager"`` (or ``"onnxruntime"``) with ``threads`` intra-op threads (default
            ``torch.get_num_threads()``). A :class:`~torch_rlprune.structure.channel.latency.LatencyTable`
            predicts it (every Conv/Linear and LSTM/GRU/RNN timed alone at a few narrower widths,
            the rest scaled with the activations), calibrated on whole compacted candidates
            measured on the runtime before the search; after it, the returned plan is compacted
            and measured, and rescaled onto the target until it lands within
            ``Latency.tolerance`` (:mod:`~torch_rlprune.structure.channel.measured`). Timings are cached
            (``$TORCH_RLPRUNE_CACHE`` or ``~/.cache/torch_rlprune/latency``); the plan's
            ``metadata["latency"]`` holds the predictions, the calibration and every measured round
            (``["measured"]``); a plan still off target after ``Latency.rounds`` warns. With
            ``agent="n2n"`` whole residual blocks go too, each timed alone in the model
            (:mod:`~torch_rlprune.env.depth_latency`): on small models at batch 1 the per-call
            overhead, which only removing blocks cuts, is most of the latency.
        structure: ``"unstructured"`` (weights) or ``"channel"`` (torch-pruning dependency
            groups: whole channels, residual adds, concats and attention heads kept consistent).
        exclude: module names or modules to leave unpruned (with everything below them; for
            channels: their output channels stay).
        example_inputs: one input batch, used when ``data`` is None.
        seed: an integer >= 0; makes the search bit-for-bit reproducible.
        verbose: show a progress bar.
        agent_config: the agent's config dataclass or a dict of overrides.
        calibration_samples: inputs taken from ``data`` to score plans on (default 512; without
            data 128 synthetic ones).
        max_amount: largest fraction removable from any single tensor (default 0.98) or
            channel group (default 0.8, AMC's bound).
        importance_scores: unstructured only: ``{name or (module, name): tensor}`` ranking
            entries (smallest pruned first) instead of weight magnitude.
        parameters: unstructured only: ``[(module, name), ...]`` restricting the search.
        importance: unstructured: ``"magnitude"`` (default) or ``"activation"`` (Wanda). Channel: a
            torch-pruning importance instance (``tp.importance.*()``) choosing which channels go;
            ``None`` or ``"magnitude"``: group magnitude.
        round_to: channel only: what remains of each group is a multiple of this. Default
            ``None`` (any width), 8 with ``budget="latency"``: CPU conv kernels are much slower
            at odd widths than the timed grid predicts (resnet18 at a 0.3 latency target, batch 1:
            measured 4% slower than dense without rounding, 26% faster with 8).
        bn_recalibration: re-estimate BatchNorm running statistics on this many calibration
            batches before every score (0: off). The final model gets the statistics
            re-estimated for the plan applied, so it is the model that was scored. Default 4
            (EagleEye's adaptive BN; 4 batches of 128 against 1: +0.10 / -0.03 pp at 90 / 95% of
            weights with the refit, within noise, ``benchmarks/ablation.py``). Measured on Fashion-MNIST
            resnet18, no fine-tune (``make bench``): LAMP at 80/90/95% of the weights 87.4 -> 89.3%,
            63.6 -> 88.0%, 19.3 -> 83.0%; the plan the reward ranks first among 50 around the
            prior, 77.5 -> 87.8% at 90% (``benchmarks/reward_ranking.py``).
        repair: ``"lstsq"`` refits, after the search, every pruned layer's kept weights so that it
            reproduces the unpruned model's output on the calibration set (ridge least squares:
            :class:`~torch_rlprune.rewards.repair.LeastSquaresRefit`); only kept weights change, never a mask.
            Channel pruning refits the layers whose input lost channels (AMC's and ThiNet's
            reconstruction; Fashion-MNIST resnet18 at 50% of the MACs: the prior's plan 85.4 -> 88.2%
            test accuracy, no fine-tune); unstructured pruning refits every output of a masked layer
            on its own kept weights (OBC's and SparseGPT's; LAMP's plan at 95 / 90 / 80% of the
            weights: 84.9 -> 88.2%, 88.8 -> 89.3%, 89.6 -> 89.5%); LSTM / GRU / RNN gate matrices
            are refitted through time (sequential-MNIST LSTM, LAMP's plan at 80 / 90%: 83.9 -> 98.3%,
            45.6 -> 97.1%). ``"auto"`` (the unstructured default) refits from 90% of the weights
            removed, where it pays for its seconds, and recurrent layers at any sparsity; the
            channel default is ``"lstsq"``. A refit that scores clearly below the plan without it
            (held-out part: by two standard errors; else search part) is undone. ``"none"`` keeps
            the weights. The plan's ``metadata["repair"]`` lists the layers refitted and the scores
            measured after it.
        max_drop: with ``target=None``: the largest score drop allowed (absolute, in the
            reward's units: 0.01 = one point of fidelity or accuracy).
        checkpoint: a file the search is saved to every ``checkpoint_every`` episodes, when it
            ends, and when it is interrupted or fails (:mod:`torch_rlprune.search.checkpoint`).
        checkpoint_every: episodes between two checkpoints.
        resume: a checkpoint file (or a directory holding ``checkpoint.pt``) of an earlier call
            with the same arguments: the search continues from it and ends with the same plan as
            an uninterrupted run. Plans it already scored are not scored again. Unless
            ``checkpoint`` is given, the resumed search keeps saving to the same file.
        distributed: call on every rank under ``torchrun``: the calibration set is split over the
            processes (gloo on CPU, nccl on CUDA; the default process group is created from
            torchrun's environment if none exists), the agent runs on rank 0, and every rank ends
            with the same plan applied (:mod:`torch_rlprune.search.distributed`). Needs
            ``reward="fidelity"`` or ``"accuracy"`` and the same ``data`` on every rank; only rank 0
            shows progress and writes ``checkpoint``.
        label: which part of a ``data`` batch is the label. ``None`` (automatic): a tuple batch's
            inputs are as many elements as ``forward`` requires and the next one is the label
            (``(x, y)``, ``(src, tgt, y)``); for ``forward(*args)`` or all-optional arguments
            (transformers) the last element is the label when it is 1-D with one value per sample.
            A dict batch's label is its ``"labels"``/``"label"``/``"target"``/``"targets"``/``"y"``
            key and the rest are keyword inputs (a one-input model's ``"input"``/``"x"``/``"image"``
            is passed positionally, as before). Or a position in a tuple batch (``int``), a key of
            a dict batch (``str``), or ``False`` (no label: the whole batch is the input).

    Returns:
        :class:`PruneResult` (one target or ``target=None``) or :class:`MultiTargetResult`.

    The model is touched only after every argument has been checked; if anything fails
    or is interrupted (KeyboardInterrupt included), parameters, buffers, hooks and
    training flags are exactly as before the call.
    """
    started = time.perf_counter()
    # ---- validate everything before any weight is touched
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    options = PruneOptions(
        target=target, max_drop=max_drop, structure=structure, budget=budget, agent=agent, reward=reward,
        episodes=episodes, seed=seed, calibration_samples=calibration_samples, max_amount=max_amount,
        importance=importance, importance_scores=importance_scores, parameters=parameters, round_to=round_to,
        bn_recalibration=bn_recalibration, repair=repair, prior=prior, selection=selection, select_top=select_top,
        protect_first_last=protect_first_last, label=label, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
        resume=resume, distributed=distributed, time_budget=time_budget, patience=patience,
        screen=screen, cache_mb=cache_mb, synthetic_data=data is None).checked()
    coordinator = _coordinator(model) if distributed else None
    if coordinator is not None and not coordinator.leader:  # the agent, its progress and checkpoints: rank 0
        verbose, checkpoint, resume = False, None, None
    with all_ranks_succeed(coordinator, "reading the checkpoint"):  # rank 0 alone reads it
        resumed = load_checkpoint(resume) if resume is not None else None
    if resumed is not None and checkpoint is None:
        checkpoint = resumed["path"]
    with all_ranks_succeed(coordinator, "checking the checkpoint path"):
        existing = check_checkpoint_path(checkpoint, resumed) if checkpoint is not None else None
    # a registered name: one fresh agent per target when the agent searches one target at a time
    fresh_agent = None if isinstance(agent, Agent) else partial(options.agent_type, agent_config, seed=int(seed))
    agent_obj = agent if fresh_agent is None else fresh_agent()
    episodes = int(episodes if episodes is not None else agent_obj.config.episodes)
    layers, left_out = _candidate_layers(model, exclude, parameters)

    snapshot = ModelSnapshot(model)
    search = Search(model, options, agent_obj, episodes, coordinator, fresh_agent, left_out)
    try:
        with torch.random.fork_rng(devices=[]), progress(verbose and search.leader):
            torch.manual_seed(int(seed))
            search.prepare(layers, data, exclude, example_inputs)
            with all_ranks_succeed(coordinator, "checking the checkpoint"):
                if checkpoint is not None or resumed is not None:
                    search.record(checkpoint, checkpoint_every, resumed, existing)
            search.run(verbose)
            several = options.targets is not None and len(options.targets) > 1
            outcome = search.results(started) if several else search.apply(started)
    except BaseException:  # the search saved its checkpoint itself (run_search)
        try:
            search.undo()
        finally:  # the structure goes back even if putting the values back failed
            snapshot.restore()
        raise
    snapshot.restore_training()
    return outcome


def _coordinator(model: nn.Module) -> DistributedSearch:
    rank, world = distributed_context(model)
    param = next(model.parameters(), None)
    return DistributedSearch(rank, world, param.device if param is not None and param.is_cuda else torch.device("cpu"))


def _candidate_layers(model: nn.Module, exclude, parameters):
    """The prunable tensors, and the weights left dense with the reason (a warning names them)."""
    layers = find_prunable(model, exclude, parameters)
    if not layers:
        raise ValueError("the model has no prunable layers (Conv/Linear weights) left after 'exclude'")
    left_out = left_out_weights(model, layers, exclude) if parameters is None else {}
    if left_out:
        warnings.warn("rl_prune: weight tensors that are not candidates stay dense: " + "; ".join(
            f"{reason}: {len(names)} ({', '.join(names[:2])}{', ...' if len(names) > 2 else ''})"
            for reason, names in left_out.items()), UserWarning, stacklevel=4)
    return layers, left_out


def global_rl_unstructured(parameters, target: float, importance_scores=None, *, model: nn.Module,
                           agent="amc", reward="fidelity", data=None, **kwargs) -> PruneResult:
    """RL counterpart of ``prune.global_unstructured``: one search over exactly ``parameters``.

    Args:
        parameters: iterable of ``(module, name)`` tuples, as for ``prune.global_unstructured``.
        target: fraction of these tensors' entries to remove overall, in (0, 1).
        importance_scores: optional ``{(module, name): tensor}``, as for ``global_unstructured``.
        model: the model the tensors belong to (needed to score plans).
        agent, reward, data, **kwargs: as for :func:`rl_prune` (``label=`` included).
    """
    if not isinstance(model, nn.Module):
        raise TypeError("global_rl_unstructured needs model= (the nn.Module the parameters belong to)")
    try:
        parameters = list(parameters)
    except TypeError:
        raise TypeError("parameters must be an iterable of (module, name) tuples") from None
    if not parameters:
        raise ValueError("parameters is empty: give at least one (module, name) tuple")
    return rl_prune(model, target, data=data, reward=reward, agent=agent, parameters=parameters,
                    importance_scores=importance_scores, **kwargs)
