"""Least-squares refit of recurrent layers: ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``.

A pruned gate matrix is refitted as a pruned ``nn.Linear`` is (:mod:`.repair`), one regression
per output row on its kept weights, with the time steps as the regression's rows. What the rows
regress on is the recurrent part: every gate's pre-activation is linear in the step's input and
the previous hidden state,

    g_t = W_ih x_t + W_hh h_{t-1} (+ biases, which stay),

so each layer and direction is refitted on ``[x_t, h_{t-1}]`` to reproduce the unpruned model's
pre-activations, per output row on its kept weights (OBC / SparseGPT's layer-wise reconstruction
through time), regularised towards the weights it had. ``x_t`` is the layer's input in the pruned
model (layers before it already refitted). ``h_{t-1}`` is first the unpruned model's hidden state
(teacher forcing: the state the layer should reach), then, ``OWN_STATE_PASSES`` times, the state the
refitted layer produces itself (what it will read once deployed; the regression is solved again on it).
Measured on the sequential-MNIST LSTM (two LSTMs of 128 units, LAMP's plan on their four matrices,
512 calibration sequences, test accuracy; 79.1% / 43.9% before the refit):

    passes on its own states       0        1        2        3
    80% of the weights         98.13%   98.19%   98.20%   98.22%
    90% of the weights         94.87%   96.28%   96.30%   96.46%
    seconds (90%)                 1.2      1.7      2.1      2.8

and on random two-layer LSTM / GRU / RNN models at 80%, uni- and bidirectional, the output error
after two passes is 0.26-0.54 of the error before the refit, against 0.37-0.62 with none. A pass is
kept only while it brings the layer's outputs on the calibration sequences closer to the unpruned
ones (the first pass against the layer as pruned): on the same task with two tanh ``nn.RNN`` layers
(97.1% unpruned), the own-state passes moved them away (LAMP's plan at 80 / 90%: 73.0 / 25.3% before
the refit, 64.5 / 18.4% with both passes kept), teacher forcing alone gives 96.4 / 91.1%, and that
is what the guard keeps. Two GRU layers there (98.7% unpruned): 79.1 / 41.5% -> 98.5 / 96.8%.

GRU's candidate gate reads ``r * (W_hn h + b_hn)``, not a sum: its two halves are refitted apart
(``W_in`` on ``x_t``, ``W_hn`` on ``h_{t-1}``, each against its own unpruned half); its reset and
update gates are refitted on ``[x_t, h_{t-1}]`` like every other gate.

The recurrences are run here in float64 from the module's weights (PyTorch's gate orders: LSTM
i, f, g, o; GRU r, z, n), not by the module: cuDNN and the fused CPU kernels expose neither the
gates nor the inner layers of a stacked module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from .ridge import masked_ridge_solve

__all__ = ["RECURRENT", "unsupported_reason", "layer_names", "LayerCall", "run_layer", "states_before",
           "regression_blocks", "RecurrentRefit", "refit_recurrent", "MAX_SEQUENCE_BYTES"]

RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)

Call = Tuple[torch.Tensor, object]
"""A module call as captured: its input and its ``hx`` (None when not given)."""

OWN_STATE_PASSES = 2
"""Refits of each layer on the states it produces itself, after the first on the unpruned states."""

MAX_SEQUENCE_BYTES = 2 << 30
"""What the float64 sequences a layer's refit holds may take: its input in the pruned and in the
unpruned model, and its outputs in the unpruned model, as refitted so far and as refitted anew (five
sequences as long as the calls', as wide as the layer). Past it the refit reads only the first
calibration sequences that fit. 512 sequences of 784 steps (pixel MNIST) through 128 units take 2.05
GB, all of them (3.4 GB at the process's peak, measured); through 512 units, the first 133 fit.
Unbounded, a wider layer or a larger calibration set would run out of memory."""


def unsupported_reason(module: nn.Module, x) -> Optional[str]:
    """Why ``module`` called on ``x`` is not refitted (None when it is)."""
    if getattr(module, "proj_size", 0):
        return "an LSTM with proj_size (its projection is not refitted)"
    for name in module._flat_weights_names:   # a value written into a weight recomputed on access is lost
        if parametrize.is_parametrized(module, name) or (name not in module._parameters
                                                         and not hasattr(module, f"{name}_orig")):
            return f"{name} is computed (weight_norm or another parametrization), not a parameter it can write"
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return "called on a PackedSequence (padding would enter the fit)"
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        return "its input is not a [batch, time, features] tensor"
    return None


def layer_names(module: nn.RNNBase, layer: int, direction: int) -> Tuple[str, str, str, str]:
    """The names of ``weight_ih``, ``weight_hh``, ``bias_ih`` and ``bias_hh`` of one layer and direction."""
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    return f"weight_ih{suffix}", f"weight_hh{suffix}", f"bias_ih{suffix}", f"bias_hh{suffix}"


# --------------------------------------------------------------------------- the recurrence
@dataclass
class LayerCall:
    """One layer and direction of a recurrent module in float64: its weights and initial state."""
    mode: str                       # "LSTM", "GRU", "RNN_TANH" or "RNN_RELU"
    w_ih: torch.Tensor
    w_hh: torch.Tensor
    b_ih: Optional[torch.Tensor]
    b_hh: Optional[torch.Tensor]
    h0: torch.Tensor                # [N, H]
    c0: Optional[torch.Tensor]      # [N, H], LSTM only
    reverse: bool


def _step(call: LayerCall, x_t: torch.Tensor, h: torch.Tensor, c: Optional[torch.Tensor]):
    gi = x_t @ call.w_ih.T + (call.b_ih if call.b_ih is not None else 0.0)
    gh = h @ call.w_hh.T + (call.b_hh if call.b_hh is not None else 0.0)
    if call.mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if call.mode == "GRU":
        ir, iz, in_ = gi.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, None
    return (torch.tanh if call.mode == "RNN_TANH" else torch.relu)(gi + gh), None


def run_layer(call: LayerCall, x: torch.Tensor) -> torch.Tensor:
    """One layer and direction over ``x`` [N, T, F]: its outputs [N, T, H], in time order (also for
    the reverse direction). Written into one tensor: on long sequences (784 steps of pixel MNIST)
    a list of steps and its stacked copy would hold the outputs twice."""
    outputs = x.new_empty(x.shape[0], x.shape[1], call.w_hh.shape[1])
    h, c = call.h0, call.c0
    for t in (range(x.shape[1] - 1, -1, -1) if call.reverse else range(x.shape[1])):
        h, c = _step(call, x[:, t], h, c)
        outputs[:, t] = h
    return outputs


def states_before(call: LayerCall, outputs: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``h_{t-1}`` [N, len(steps), H]: the state each of ``steps`` starts from, read off the layer's
    outputs (a step's output is the state the next one reads; the first step in the recurrence's
    direction reads ``h0``). Nothing else of the states is kept."""
    source = steps + (1 if call.reverse else -1)
    first = (source < 0) | (source >= outputs.shape[1])
    kept = outputs[:, source.clamp(0, outputs.shape[1] - 1)]
    return torch.where(first[None, :, None], call.h0[:, None], kept)


def as_batch_time(module: nn.RNNBase, x: torch.Tensor, count: Optional[int] = None) -> torch.Tensor:
    """The module's input as float64 [N, T, F], its first ``count`` sequences only when given (cut
    before the copy: a sequence left out is never held in float64)."""
    x = x.detach()
    if x.dim() == 2:   # unbatched: [T, F]
        x = x.unsqueeze(0)
    elif not module.batch_first:
        x = x.transpose(0, 1)
    return x[:count].double().cpu()


def _initial_state(hx, index: int, batch: int, hidden: int, mode: str):
    """(h0, c0) of layer-and-direction ``index`` from a module call's ``hx`` (zeros when none)."""
    def pick(state):
        if state is None:
            return torch.zeros(batch, hidden, dtype=torch.float64)
        state = state.detach().double().cpu()
        return state[index] if state.dim() == 3 else state[index].unsqueeze(0)

    if mode == "LSTM":
        h, c = hx if hx is not None else (None, None)
        return pick(h), pick(c)
    return pick(hx), None


def layer_call(module: nn.RNNBase, weights: Dict[str, torch.Tensor], layer: int, direction: int, hx,
               batch: int) -> LayerCall:
    """Layer ``layer``, direction ``direction`` of ``module`` with ``weights`` (name -> tensor) and the call's state."""
    directions = 2 if module.bidirectional else 1
    w_ih, w_hh, b_ih, b_hh = layer_names(module, layer, direction)
    h0, c0 = _initial_state(hx, layer * directions + direction, batch, module.hidden_size, module.mode)
    bias = {n: weights[n].double() if weights.get(n) is not None else None for n in (b_ih, b_hh)}
    return LayerCall(module.mode, weights[w_ih].double(), weights[w_hh].double(), bias[b_ih], bias[b_hh],
                     h0, c0, bool(direction))


# --------------------------------------------------------------------------- the regressions
def regression_blocks(mode: str, hidden: int) -> List[Tuple[Optional[slice], Optional[slice]]]:
    """The independent regressions of one layer: (rows of ``weight_ih``, rows of ``weight_hh``);
    a block reads ``x_t`` when it has ``weight_ih`` rows and ``h_{t-1}`` when it has ``weight_hh``
    rows. Every gate is one sum, refitted on ``[x_t, h_{t-1}]``, except GRU's candidate gate, whose
    halves are refitted apart."""
    if mode != "GRU":
        rows = slice(0, (4 if mode == "LSTM" else 1) * hidden)
        return [(rows, rows)]
    gates, candidate = slice(0, 2 * hidden), slice(2 * hidden, 3 * hidden)
    return [(gates, gates), (candidate, None), (None, candidate)]


class _Systems:
    """The normal equations of one layer and direction's blocks, summed over the calibration batches."""

    def __init__(self, blocks):
        self.blocks = blocks
        self.gram: List[Optional[torch.Tensor]] = [None] * len(blocks)
        self.cross: List[Optional[torch.Tensor]] = [None] * len(blocks)
        self.rows = 0

    def add(self, x: torch.Tensor, h_previous: torch.Tensor, target_ih: torch.Tensor, target_hh: torch.Tensor):
        """Rows of one batch at the picked steps: ``x`` / ``h_previous`` [N, S, .] and the unpruned
        pre-activations ``target_ih`` / ``target_hh`` [N, S, gates]."""
        self.rows += x.shape[0] * x.shape[1]
        for i, (rows_ih, rows_hh) in enumerate(self.blocks):
            parts = ([x] if rows_ih is not None else []) + ([h_previous] if rows_hh is not None else [])
            features = torch.cat(parts, 2).flatten(0, 1)
            target = sum(t[..., rows] for t, rows in ((target_ih, rows_ih), (target_hh, rows_hh)) if rows is not None)
            gram, cross = features.T @ features, features.T @ target.flatten(0, 1)
            self.gram[i] = gram if self.gram[i] is None else self.gram[i] + gram
            self.cross[i] = cross if self.cross[i] is None else self.cross[i] + cross


def _solve_blocks(systems: _Systems, new: Tuple[torch.Tensor, torch.Tensor], anchor: Tuple[torch.Tensor, torch.Tensor],
                  keep: Tuple[torch.Tensor, torch.Tensor], ridge: float, min_rows: int) -> int:
    """Each block's rows refitted on their kept weights (regularised towards ``anchor``), written
    into ``new`` (``weight_ih``, ``weight_hh``); returns how many rows were solved."""
    solved_rows = 0
    for block, gram, cross in zip(systems.blocks, systems.gram, systems.cross):
        parts = [(part, rows) for part, rows in enumerate(block) if rows is not None]
        start = torch.cat([anchor[part][rows] for part, rows in parts], 1)
        kept = torch.cat([keep[part][rows] for part, rows in parts], 1)
        scale = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
        weights, solved = masked_ridge_solve(gram, cross, kept, start, scale, max_kept=systems.rows // min_rows)
        solved_rows += int(solved.sum())
        column = 0
        for part, rows in parts:
            width = new[part].shape[1]
            new[part][rows] = weights[:, column:column + width]
            column += width
    return solved_rows


@dataclass
class _Layer:
    """One layer and direction being refitted, and what it needs of the module and the calls."""
    module: nn.RNNBase
    layer: int
    direction: int
    pruned_calls: Sequence[Call]
    current: Dict[str, torch.Tensor]
    new: Dict[str, torch.Tensor]
    keep: Dict[str, torch.Tensor]

    @property
    def names(self) -> Tuple[str, str]:
        return layer_names(self.module, self.layer, self.direction)[:2]

    def run_pruned(self, x_pruned: Sequence[torch.Tensor]) -> List[Tuple[LayerCall, torch.Tensor]]:
        """The layer as refitted so far over every batch's input in the pruned model: each batch's
        call and outputs."""
        w_ih, w_hh = self.names
        effective = {**self.current, w_ih: self.new[w_ih] * self.keep[w_ih], w_hh: self.new[w_hh] * self.keep[w_hh]}
        calls = [layer_call(self.module, effective, self.layer, self.direction, hx, len(x))
                 for x, (_, hx) in zip(x_pruned, self.pruned_calls)]
        return [(call, run_layer(call, x)) for call, x in zip(calls, x_pruned)]


def _output_error(runs, reference_out) -> float:
    return sum(float((out - ref).pow(2).sum()) for (_, out), ref in zip(runs, reference_out))


def _refit_layer(at: _Layer, x_pruned, x_reference, reference_calls, reference, *, ridge: float, positions: int,
                 generator: torch.Generator, min_rows: int, passes: int):
    """Refit one layer and direction: first on the unpruned states (teacher forcing), then up to
    ``passes`` times on the states the refitted layer itself produces. A pass is kept only while it
    brings the layer's outputs on the calibration sequences closer to the unpruned ones (the first
    against the layer as pruned); else it is undone and the passes stop. Returns the layer's outputs
    in the pruned and in the unpruned model (per batch) and the rows solved in the passes kept."""
    w_ih, w_hh = at.names
    blocks = regression_blocks(at.module.mode, at.module.hidden_size)
    picks, targets, reference_out = [], [], []
    for x, (_, hx) in zip(x_reference, reference_calls):
        call = layer_call(at.module, reference, at.layer, at.direction, hx, len(x))
        reference_out.append(run_layer(call, x))
        picks.append(torch.randperm(x.shape[1], generator=generator)[:positions].sort().values)
        h = states_before(call, reference_out[-1], picks[-1])
        targets.append((x[:, picks[-1]] @ call.w_ih.T, h @ call.w_hh.T, h))
    anchor, keep = (at.new[w_ih].clone(), at.new[w_hh].clone()), (at.keep[w_ih], at.keep[w_hh])
    runs = at.run_pruned(x_pruned)
    best = (_output_error(runs, reference_out), anchor, runs, 0)
    for pass_ in range(1 + passes):
        states = [t[2] for t in targets] if pass_ == 0 else \
            [states_before(call, out, pick) for (call, out), pick in zip(best[2], picks)]
        systems = _Systems(blocks)
        for x, pick, (target_ih, target_hh, _), h in zip(x_pruned, picks, targets, states):
            systems.add(x[:, pick], h, target_ih, target_hh)
        solved = _solve_blocks(systems, (at.new[w_ih], at.new[w_hh]), anchor, keep, ridge, min_rows)
        runs = at.run_pruned(x_pruned)
        error = _output_error(runs, reference_out)
        if not error < best[0]:   # NaN included
            break
        best = (error, (at.new[w_ih].clone(), at.new[w_hh].clone()), runs, solved)
    at.new[w_ih].copy_(best[1][0])
    at.new[w_hh].copy_(best[1][1])
    return [out for _, out in best[2]], reference_out, best[3]


def _batch_and_steps(module: nn.RNNBase, x: torch.Tensor) -> Tuple[int, int]:
    """How many sequences a call's input holds, and how many steps each."""
    if x.dim() == 2:   # unbatched
        return 1, x.shape[0]
    return (x.shape[0], x.shape[1]) if module.batch_first else (x.shape[1], x.shape[0])


def _sequences_within(module: nn.RNNBase, calls: Sequence[Call], max_bytes: int) -> List[int]:
    """How many sequences of each call the refit reads: the first ones whose five float64 copies
    (:data:`MAX_SEQUENCE_BYTES`) fit in ``max_bytes``; at least one."""
    width = module.hidden_size * (2 if module.bidirectional else 1)
    counts, left = [], max_bytes
    for x, _ in calls:
        batch, steps = _batch_and_steps(module, x)
        per_sequence = 8 * steps * (2 * max(x.shape[-1], width) + 3 * width)
        counts.append(min(batch, max(left // per_sequence, 0 if counts else 1)))
        left -= counts[-1] * per_sequence
    return counts


def _first(module: nn.RNNBase, calls: Sequence[Call], counts: List[int]) -> List[Call]:
    """The calls with a sequence in ``counts``, each as [N, T, F] float64 of its first ``count``
    sequences with its ``hx`` cut alike (a 3-D state is [layers x directions, N, H] whatever the layout)."""
    def state(hx, n):
        if isinstance(hx, tuple):
            return tuple(state(h, n) for h in hx)
        return hx[:, :n] if isinstance(hx, torch.Tensor) and hx.dim() == 3 else hx

    return [(as_batch_time(module, x, n), state(hx, n)) for n, (x, hx) in zip(counts, calls) if n]


@dataclass
class RecurrentRefit:
    """What :func:`refit_recurrent` returns."""
    weights: Dict[str, torch.Tensor]    # the new gate matrices (name -> float64, zero where masked)
    solved_rows: int                    # gate rows solved in the passes kept
    sequences: int                      # calibration sequences it read
    offered: int                        # calibration sequences it was given


def refit_recurrent(module: nn.RNNBase, pruned_calls: Sequence[Call], reference_calls: Sequence[Call],
                    current: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor],
                    keep: Dict[str, torch.Tensor], *, ridge: float, positions: int, generator: torch.Generator,
                    min_rows: int, passes: Optional[int] = None,
                    max_bytes: Optional[int] = None) -> RecurrentRefit:
    """New values of ``module``'s gate matrices, layer by layer, from its calls in the pruned model
    and in the model as it was (``pruned_calls`` / ``reference_calls``, one per calibration batch).

    ``current``: the weights and biases as the pruned forward uses them, ``reference``: those of the
    model as it was, ``keep``: per gate matrix which weights the plan keeps. At most ``positions``
    time steps per sequence enter the regressions, and only the sequences that fit in ``max_bytes``
    (default :data:`MAX_SEQUENCE_BYTES`)."""
    passes = OWN_STATE_PASSES if passes is None else passes
    max_bytes = MAX_SEQUENCE_BYTES if max_bytes is None else max_bytes
    offered = sum(_batch_and_steps(module, x)[0] for x, _ in pruned_calls)
    counts = _sequences_within(module, pruned_calls, max_bytes)
    pruned_calls, reference_calls = _first(module, pruned_calls, counts), _first(module, reference_calls, counts)
    x_pruned, x_reference = [x for x, _ in pruned_calls], [x for x, _ in reference_calls]
    new = {n: t.detach().double().clone() for n, t in current.items() if n.startswith("weight_")}
    solved = 0
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(2 if module.bidirectional else 1):
            at = _Layer(module, layer, direction, pruned_calls, current, new, keep)
            outputs.append(_refit_layer(at, x_pruned, x_reference, reference_calls, reference, ridge=ridge,
                                        positions=positions, generator=generator, min_rows=min_rows, passes=passes))
            solved += outputs[-1][2]
        x_pruned = [torch.cat(outs, 2) for outs in zip(*(o[0] for o in outputs))]
        x_reference = [torch.cat(outs, 2) for outs in zip(*(o[1] for o in outputs))]
    return RecurrentRefit(new, solved, sum(counts), offered)
