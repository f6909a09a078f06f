"""Least-squares refit: the layers that lost inputs or weights learn to do without them.

Removing a channel takes its contribution out of every layer that reads it. AMC (He et al.
2018, after He et al. 2017's channel pruning and ThiNet) refits each such layer by linear
regression: with the kept input channels, reproduce the output the unpruned model had on the
calibration data. No labels, no gradient steps, one small solve per layer:

    for each layer whose input lost channels, in execution order:
        X  = its input in the pruned model (layers before it already refitted), kept channels only
        Y  = its output in the model as it was before the plan (minus the bias, which stays)
        W  = argmin ||X W^T - Y||^2 + ridge * mean(diag(X^T X)) * ||W||^2

Rows are the layer's input positions (conv patches, tokens); at most ``positions`` of them per
sample, drawn with a seeded generator, keep the memory bounded on large feature maps. Only
values of kept weights change: every mask, and so the plan, stays exactly as it was, and
``torch.nn.utils.prune.remove`` / ``compact`` see ordinary weights.

After unstructured pruning every output of a layer keeps its own subset of weights, so each output
is its own regression over its kept inputs (OBC's and SparseGPT's layer-wise reconstruction, solved
exactly per output rather than by SparseGPT's column sweep), regularised towards the weights it had
rather than towards zero, so directions the calibration data never excites keep their values:

    W_i[K_i] = argmin ||X[:, K_i] w - Y_i||^2 + ridge * mean(diag(X^T X)) * ||w - W_i[K_i]||^2

Measured on the Fashion-MNIST resnet18 (LAMP's plan with BatchNorm repair, seed 0, no fine-tune; 512
calibration images): 95% of the weights 84.9% -> 88.2% test accuracy, 90% 88.8% -> 89.3%, 80% 89.6%
-> 89.5% (and 50 s instead of 16 s at 95%: the solves grow with the kept weights), hence
``repair="auto"``, the unstructured default: refit from ``AUTO_REFIT_FROM`` of the weights removed.
Regularised towards zero instead: 88.1 / 87.9% at ridge 1e-3 / 1e-2 (95%).

Measured by ``make bench`` (timm resnet18 on Fashion-MNIST at 50% of the MACs, 512 calibration
images, BatchNorm re-estimated afterwards): the best channel prior's plan 85.4% -> 88.2% test
accuracy, every agent 88.3-88.6%. The design choices were measured on the same model and plan
(seed 0) while building it: the unpruned model's BatchNorm statistics during the refit, rather
than the pruned model's re-estimated ones, 88.1% vs 87.2%; ridge 1e-3 / 1e-2 / 3e-2 / 1e-1 (with
re-estimated statistics): 86.6 / 87.2 / 87.2 / 86.1%.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..structure.channel._util import restore_training, training_flags
from ..structure.inputs import run_model
from .recurrent_refit import RECURRENT, refit_recurrent, unsupported_reason
from .ridge import masked_ridge_solve

__all__ = ["REPAIRS", "AUTO_REFIT_FROM", "LeastSquaresRefit", "RefitReport", "refit_wanted", "refit_scope",
           "masked_ridge_solve", "keep_or_undo", "refit_kept", "score_with_error"]

REPAIRS = ("lstsq", "auto", "none")
"""What ``rl_prune(repair=...)`` takes: ``"lstsq"`` refits the layers that lost input channels
or weights, ``"auto"`` does so for channel plans and for unstructured plans removing at least
``AUTO_REFIT_FROM`` of the weights (each structure's ``auto_refit_from``), ``"none"`` leaves the
kept weights as they are. BatchNorm re-estimation is separate (``bn_recalibration``)."""

AUTO_REFIT_FROM = 0.9
"""``repair="auto"`` refits an unstructured plan removing at least this fraction of the weights.
Measured (module docstring): +3.3 pp at 95%, +0.5 pp at 90%, nothing at 80% for three times the
seconds of a 95% refit."""

MAX_FEATURES = 8192
"""A layer with more inputs per output than this (its Gram matrix over 512 MB) is left as it was."""


AUTO_SLACK = 0.005
"""A plan counts as at ``auto_from`` this close below it (the unstructured budget's tolerance): a plan
for a 90% target lands on it within the budget's rounding (0.8999983 on the sequential-MNIST LSTM's
four matrices), and was not refitted."""


def refit_wanted(repair: str, sparsity: float, auto_from: float) -> bool:
    """Whether ``repair`` refits every pruned layer of a plan removing ``sparsity`` of its budget
    (``auto_from``: where ``"auto"`` starts for the plan's structure)."""
    return repair == "lstsq" or (repair == "auto" and sparsity >= auto_from - AUTO_SLACK)


def refit_scope(repair: str, sparsity: float, auto_from: float, model: nn.Module,
                amounts: Optional[Dict[str, float]] = None) -> Optional[str]:
    """What ``repair`` refits in ``model`` after a plan removing ``sparsity``: ``"all"`` pruned
    layers, ``"recurrent"`` ones only, or nothing (None). Below ``auto_from``, ``"auto"`` still
    refits LSTM / GRU / RNN layers the plan prunes (``amounts``: the plan's, by tensor name; None:
    any recurrent layer): there the refit pays at any sparsity (the sequential-MNIST LSTM, LAMP's
    plan at 80%: 83.9% -> 98.3% test accuracy, in about two seconds; docs/rnn.md)."""
    if refit_wanted(repair, sparsity, auto_from):
        return "all"
    recurrent = {name for name, m in model.named_modules() if isinstance(m, RECURRENT)}
    pruned = recurrent if amounts is None else {k.rpartition(".")[0] for k, v in amounts.items() if v > 0}
    return "recurrent" if repair == "auto" and recurrent & pruned else None


def score_with_error(reward, model: nn.Module, resamples: int = 200) -> Tuple[float, Optional[float]]:
    """``reward(model)`` and its standard error over the reward's samples (a seeded bootstrap of
    the per-sample gains; None for a reward without them)."""
    if not hasattr(reward, "sample_gains"):
        return float(reward(model)), None
    gains = reward.sample_gains(model)
    generator = torch.Generator().manual_seed(0)
    draws = torch.randint(len(gains), (resamples, len(gains)), generator=generator)
    scores = torch.tensor([reward.score_of_gains(gains[d]) for d in draws], dtype=torch.float64)
    return float(reward.score_of_gains(gains)), float(scores.std())


def refit_kept(after: float, before: float, allowed: float = 0.0) -> bool:
    """Whether a refit that scores ``after`` stays, against ``before`` without it: not lower by more
    than ``allowed`` (a refit that scores NaN goes)."""
    return after >= before - allowed


def keep_or_undo(record: dict, plan, undo: Callable[[], None]) -> dict:
    """A refit stays unless the model scores clearly lower with it than the plan without it.

    On the held-out selection part when both scores are there: lower by more than two standard
    errors of a paired difference (``sqrt(2)`` times the refitted model's, ``selection_error``).
    The score without it is the one the held-out choice picked the plan by, the best of several
    noisy scores on the same few samples, so a plain comparison undid refits worth +3 pp on the
    test set (resnet18 at 95%, 128 held-out images: 0.922 against 0.930). Else on the search part
    (``plan.score``), where the refit was fitted: lower there at all is lower. ``undo()`` puts the
    weights back (and BatchNorm statistics with them). Returns ``record`` with ``kept`` and, when
    undone, ``score_without``.
    """
    selection = (plan.metadata.get("selection") or {}).get("selection_score")
    margin = 2.0 * math.sqrt(2.0) * (record.get("selection_error") or 0.0)
    pairs = [(record.get("selection_score"), selection, margin), (record.get("search_score"), plan.score, 0.0)]
    after, before, allowed = next(((a, b, m) for a, b, m in pairs if a is not None and b is not None),
                                  (None, None, 0.0))
    record["kept"] = after is None or refit_kept(after, before, allowed)
    if not record["kept"]:
        record["score_without"] = before
        undo()
    return record


MIN_ROWS_PER_WEIGHT = 1
"""A layer is refitted only with at least this many regression rows per weight of an output (an
overdetermined fit); with fewer, the solution fits the calibration samples rather than the
layer. Measured: on a small CNN whose classifier had 1078 kept inputs and 192 samples, refitting
it doubled the output error against the unpruned model; on resnet18 (seed-0 prior plan at 50% of
the MACs) at least 2 / 1 / 0 rows per weight: 88.2 / 88.4 / 88.4% test accuracy."""


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward is not needed."""


@dataclass
class RefitReport:
    """What a refit changed: the layers it refitted and those it left, with why."""

    refitted: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    notes: Dict[str, str] = field(default_factory=dict)   # refitted, with a limit (name -> what it was)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        """What a plan records (no timing: a plan is the same on every rank and every rerun)."""
        record = {"method": "lstsq", "refitted": list(self.refitted), "skipped": dict(self.skipped)}
        return {**record, "notes": dict(self.notes)} if self.notes else record


def _is_refittable(module: nn.Module) -> bool:
    return (isinstance(module, (nn.Linear, *RECURRENT))
            or (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1
                and module.padding_mode == "zeros" and not isinstance(module.padding, str)))


def _kept_inputs(module: nn.Module) -> Optional[torch.Tensor]:
    """Boolean mask of the input channels still read, when the layer lost some but not all
    and its mask is channel-shaped (whole rows and columns); else None."""
    mask = getattr(module, "weight_mask", None)
    if mask is None:
        return None
    flat = mask.reshape(mask.shape[0], mask.shape[1], -1) != 0
    kept_cols = flat.any(2).any(0)
    kept_rows = flat.any(2).any(1)
    if bool(kept_cols.all()) or not bool(kept_cols.any()) or not bool(kept_rows.any()):
        return None
    inside = flat[kept_rows][:, kept_cols]
    return kept_cols if bool(inside.all()) else None


def _is_pruned_recurrent(module: nn.Module) -> bool:
    """An LSTM / GRU / RNN with a weight its masks remove entries of."""
    return any(not bool(getattr(module, f"{n}_mask").all()) for n in module._flat_weights_names
               if n.startswith("weight_") and hasattr(module, f"{n}_mask"))


def _masked(module: nn.Module, tensor: str) -> torch.Tensor:
    """``tensor``'s value as prune's hook computes it: its ``_orig`` times its mask."""
    return getattr(module, f"{tensor}_orig") * getattr(module, f"{tensor}_mask")


def _apply_mask(module: nn.Module, tensor: str) -> None:
    """``tensor`` recomputed from its ``_orig`` and mask, as prune's hook does in a forward (nn.RNNBase
    also refreshes its _flat_weights this way)."""
    setattr(module, tensor, _masked(module, tensor))


def _refresh_masked(model: nn.Module) -> None:
    """Every pruned tensor recomputed: a forward of the model as it was leaves the unpruned values
    in them until the next forward."""
    for module in model.modules():
        for name in [n[:-len("_mask")] for n in module._buffers if n.endswith("_mask")]:
            if hasattr(module, f"{name}_orig"):
                _apply_mask(module, name)


def _effective(module: nn.Module) -> Dict[str, torch.Tensor]:
    """A recurrent module's weights and biases as its forward uses them (masks applied)."""
    out = {}
    for n in module._flat_weights_names:
        if hasattr(module, f"{n}_orig"):
            out[n] = _masked(module, n).detach().cpu()
        elif getattr(module, n, None) is not None:
            out[n] = getattr(module, n).detach().cpu()
    return out


def _detached(hx):
    if isinstance(hx, torch.Tensor):
        return hx.detach().clone()
    if isinstance(hx, (tuple, list)):
        return tuple(_detached(h) for h in hx)
    return hx


def _is_unstructured(module: nn.Module) -> bool:
    """The layer's mask removes weights that are not whole rows or columns."""
    mask = getattr(module, "weight_mask", None)
    if mask is None:
        return False
    flat = mask.reshape(mask.shape[0], mask.shape[1], -1) != 0
    kept_rows, kept_cols = flat.any(2).any(1), flat.any(2).any(0)
    return not bool(flat[kept_rows][:, kept_cols].all())


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The regression rows of input ``x``: [samples, positions, features]."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation, padding, stride = ((1, module.kernel_size[0]), (1, module.dilation[0]),
                                             (0, module.padding[0]), (1, module.stride[0]))
    else:
        kernel, dilation, padding, stride = module.kernel_size, module.dilation, module.padding, module.stride
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)


def _out_rows(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The layer's output as [samples, positions, channels]."""
    if isinstance(module, nn.Linear):
        return y.reshape(y.shape[0], -1, y.shape[-1])
    return y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2)


class LeastSquaresRefit:
    """Refits, by ridge regression on ``batches``, every layer whose input channels a plan removed,
    every output of a layer an unstructured plan masked (on its own kept weights), and every gate
    matrix of a pruned LSTM / GRU / RNN through time (:mod:`.recurrent_refit`).

    Create it *before* the plan is applied: it records the masks the model has then, the
    reference it reproduces. Call it after; ``restore()`` puts every weight it changed back
    bit for bit (the caller's undo on failure).

    Args:
        model: the model, prune re-parametrised (``weight_orig`` / ``weight_mask``) after the plan.
        batches: calibration inputs (tensors or :class:`~torch_rlprune.structure.inputs.Inputs`).
        ridge: the regulariser, relative to the mean diagonal of the Gram matrix.
        positions: at most this many rows (positions, tokens or time steps) per sample and layer.
        seed: draws the positions.
        scope: ``"all"`` pruned layers, or ``"recurrent"`` ones only (LSTM / GRU / RNN: what
            ``repair="auto"`` refits below its threshold, :func:`refit_scope`).
    """

    def __init__(self, model: nn.Module, batches: Sequence, ridge: float = 1e-2, positions: int = 64, seed: int = 0,
                 scope: str = "all"):
        if scope not in ("all", "recurrent"):
            raise ValueError(f"scope must be 'all' or 'recurrent', got {scope!r}")
        self.model, self.batches, self.scope = model, list(batches), scope
        self.ridge, self.positions, self.seed = float(ridge), int(positions), int(seed)
        self.reference_masks = {(m, name): buf.clone() for m in model.modules()
                                for name, buf in m._buffers.items() if name.endswith("_mask") and buf is not None}
        self.saved: Dict[Tuple[nn.Module, str], torch.Tensor] = {}  # (layer, tensor written) -> its values before
        self._ones: Dict[Tuple[nn.Module, str], torch.Tensor] = {}  # reference of masks the plan added

    # ------------------------------------------------------------------ the reference model
    @contextlib.contextmanager
    def _reference_model(self):
        """The model as it was before the plan: every mask buffer gets its recorded value (ones
        where the plan added the mask) and every refitted weight its old values. Tensor data is
        exchanged, not copied, and exchanged back on exit."""
        pairs = {}  # by tensor: a mask held by several modules is exchanged once
        for m in self.model.modules():
            for name, buf in m._buffers.items():
                if name.endswith("_mask") and buf is not None and id(buf) not in pairs:
                    reference = self.reference_masks.get((m, name))
                    if reference is None:
                        reference = self._ones.setdefault((m, name), torch.ones_like(buf))
                    pairs[id(buf)] = (buf, reference)
        pairs.update({id(getattr(m, attr)): (getattr(m, attr), old) for (m, attr), old in self.saved.items()})
        for live, reference in pairs.values():
            live.data, reference.data = reference.data, live.data
        try:
            yield
        finally:
            for live, reference in pairs.values():
                live.data, reference.data = reference.data, live.data
            _refresh_masked(self.model)

    def _reference_outputs(self, module: nn.Module, picks: List[torch.Tensor]) -> List[torch.Tensor]:
        """The layer's output (minus its bias) at the picked rows, in the model as it was before the plan."""
        def reduce(output, batch):
            rows = _out_rows(module, output)[:, picks[batch]] - self._bias(module)
            return rows.flatten(0, 1).double()

        with self._reference_model():
            return self._capture(module, "output", reduce)

    @staticmethod
    def _bias(module: nn.Module):
        return 0.0 if module.bias is None else module.bias.detach()

    def _capture(self, module: nn.Module, what: str, reduce) -> List[torch.Tensor]:
        """``reduce(tensor, batch index)`` of the layer's input or output on every batch, each
        forward stopped right there (only the reduced rows are kept: bounded memory)."""
        captured = []

        def hook(_, inputs, output):
            captured.append(reduce((inputs[0] if what == "input" else output).detach(), len(captured)))
            raise _Stop

        self._run_to(module, hook)
        return captured

    def _run_to(self, module: nn.Module, hook, with_kwargs: bool = False) -> None:
        """Every batch through the model as far as ``module``, whose forward ``hook`` sees the call
        and raises ``_Stop``."""
        handle = module.register_forward_hook(hook, with_kwargs=with_kwargs)
        try:
            with torch.no_grad():
                for x in self.batches:
                    try:
                        run_model(self.model, x)
                    except _Stop:
                        pass
        finally:
            handle.remove()

    # ------------------------------------------------------------------ the refit
    def _called_once(self) -> Dict[nn.Module, int]:
        """Refittable layers in the order the forward runs them, with how often each ran."""
        calls: Dict[nn.Module, int] = {}
        handles = [m.register_forward_pre_hook(lambda mod, _: calls.__setitem__(mod, calls.get(mod, 0) + 1))
                   for m in self.model.modules() if _is_refittable(m)]
        try:
            with torch.no_grad():
                run_model(self.model, self.batches[0])
        finally:
            for h in handles:
                h.remove()
        return calls

    def _features(self, module: nn.Module, index: int, kept: Optional[torch.Tensor] = None):
        """The layer's regression rows in the pruned model (only the ``kept`` input channels when
        given) and the positions drawn per batch, which the reference outputs are read at."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        picks: List[torch.Tensor] = []

        def reduce(x, batch):
            rows = []
            for chunk in x.split(16):  # an unfolded feature map is k*k times the map: a few samples at a time
                unfolded = _rows(module, chunk)
                if batch == len(picks):
                    picks.append(torch.randperm(unfolded.shape[1], generator=generator)[:self.positions].sort().values)
                rows.append(unfolded[:, picks[batch]])
            rows = torch.cat(rows)
            if kept is not None:
                rows = rows[..., kept.repeat_interleave(rows.shape[2] // len(kept)).to(rows.device)]
            return rows.flatten(0, 1).double()

        return self._capture(module, "input", reduce), picks

    def _normal_equations(self, module: nn.Module, features: List[torch.Tensor], picks: List[torch.Tensor]):
        """``X^T X`` and ``X^T Y`` of the layer's regression: its rows in the pruned model against
        its output (minus the bias) at the same positions in the model as it was."""
        targets = self._reference_outputs(module, picks)
        return sum(a.T @ a for a in features), sum(a.T @ y for a, y in zip(features, targets))

    def _solve(self, module: nn.Module, kept: torch.Tensor, name: str, report: RefitReport, index: int) -> None:
        features, picks = self._features(module, index, kept)
        rows, width = sum(len(a) for a in features), features[0].shape[1]
        if rows < MIN_ROWS_PER_WEIGHT * width:
            report.skipped[name] = (f"{rows} calibration rows for {width} weights per output: a fit needs at least "
                                    f"{MIN_ROWS_PER_WEIGHT * width} (more calibration samples)")
            return
        gram, cross = self._normal_equations(module, features, picks)
        gram = gram + self.ridge * float(gram.diagonal().mean().clamp_min(1e-12)) * torch.eye(
            len(gram), dtype=gram.dtype, device=gram.device)
        try:
            solution = torch.linalg.solve(gram, cross).T
        except torch.linalg.LinAlgError as error:  # singular even with the ridge (an all-zero input)
            report.skipped[name] = f"no solution ({error})"
            return
        weight = module.weight_orig
        shape = (weight.shape[0], int(kept.sum()), *weight.shape[2:])
        new = weight.detach().clone()
        new[:, kept.to(weight.device)] = solution.reshape(shape).to(weight.dtype)
        self._write(module, new, name, report)

    def _solve_masked(self, module: nn.Module, name: str, report: RefitReport, index: int) -> None:
        """An unstructured mask: every output refitted on its own kept weights."""
        weight = module.weight_orig
        width = weight[0].numel()
        if width > MAX_FEATURES:
            report.skipped[name] = f"{width} inputs per output: its Gram matrix would exceed {MAX_FEATURES} squared"
            return
        features, picks = self._features(module, index)
        rows = sum(len(a) for a in features)
        gram, cross = self._normal_equations(module, features, picks)
        keep = (module.weight_mask.reshape(len(weight), -1) != 0).cpu()
        ridge = self.ridge * float(gram.diagonal().mean().clamp_min(1e-12))
        start = weight.detach().reshape(len(weight), -1).cpu()
        try:
            new, solved = masked_ridge_solve(gram.cpu(), cross.cpu(), keep, start, ridge,
                                             max_kept=rows // MIN_ROWS_PER_WEIGHT)
        except torch.linalg.LinAlgError as error:
            report.skipped[name] = f"no solution ({error})"
            return
        if not bool(solved.any()):
            report.skipped[name] = (f"{rows} calibration rows for at least {int(keep.sum(1).min())} kept weights per "
                                    f"output: a fit needs at least as many rows (more calibration samples)")
            return
        self._write(module, new.reshape(weight.shape).to(weight), name, report)

    def _write(self, module: nn.Module, new: torch.Tensor, name: str, report: RefitReport) -> None:
        """The refitted weights into ``weight_orig`` (the old ones saved for ``restore``)."""
        if not bool(torch.isfinite(new).all()):
            report.skipped[name] = "no finite solution"
            return
        self._write_tensor(module, "weight", new)
        report.refitted.append(name)

    def _write_tensor(self, module: nn.Module, tensor: str, new: torch.Tensor) -> None:
        """``new`` into the kept entries of ``module``'s ``tensor`` (its ``_orig`` when pruned; the
        old values saved for ``restore``), and the masked weight refreshed as prune's hook would."""
        attr = f"{tensor}_orig" if hasattr(module, f"{tensor}_orig") else tensor
        stored = getattr(module, attr)
        self.saved[(module, attr)] = stored.detach().clone()
        mask = getattr(module, f"{tensor}_mask", None)
        with torch.no_grad():
            stored.copy_(new.to(stored) if mask is None else torch.where(mask != 0, new.to(stored), stored))
        if mask is not None:
            _apply_mask(module, tensor)

    def _solve_recurrent(self, module: nn.Module, name: str, report: RefitReport, index: int) -> None:
        """An LSTM / GRU / RNN: every layer and direction refitted through time (:mod:`.recurrent_refit`)."""
        pruned = self._capture_calls(module)
        reason = unsupported_reason(module, pruned[0][0])
        if reason is not None:
            report.skipped[name] = reason
            return
        with self._reference_model():
            reference_calls, reference = self._capture_calls(module), _effective(module)
        weights = [n for n in module._flat_weights_names if n.startswith("weight_")]
        keep = {n: (getattr(module, f"{n}_mask") != 0).cpu() if hasattr(module, f"{n}_mask")
                else torch.ones(getattr(module, n).shape, dtype=torch.bool) for n in weights}
        try:
            fit = refit_recurrent(module, pruned, reference_calls, _effective(module), reference, keep,
                                  ridge=self.ridge, positions=self.positions, min_rows=MIN_ROWS_PER_WEIGHT,
                                  generator=torch.Generator().manual_seed(self.seed * 100_003 + index))
        except torch.linalg.LinAlgError as error:
            report.skipped[name] = f"no solution ({error})"
            return
        if not fit.solved_rows or not all(bool(torch.isfinite(w).all()) for w in fit.weights.values()):
            report.skipped[name] = ("no refit brought its outputs closer to the unpruned ones on the calibration "
                                    "sequences (or no gate row had rows enough: more sequences)") \
                if not fit.solved_rows else "no finite solution"
            return
        for tensor, values in fit.weights.items():
            self._write_tensor(module, tensor, values)
        report.refitted.append(name)
        if fit.sequences < fit.offered:
            report.notes[name] = (f"refitted on the first {fit.sequences} of {fit.offered} calibration sequences "
                                  "(more would not fit in its memory bound, recurrent_refit.MAX_SEQUENCE_BYTES)")

    def _capture_calls(self, module: nn.Module) -> List[Tuple[torch.Tensor, object]]:
        """The input and ``hx`` of every call of ``module`` on the batches (each forward stopped there)."""
        calls = []

        def hook(_, args, kwargs, output):
            x = args[0] if args else kwargs.get("input")
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            calls.append((x.detach().clone() if isinstance(x, torch.Tensor) else x, _detached(hx)))
            raise _Stop

        self._run_to(module, hook, with_kwargs=True)
        return calls

    def _solver(self, module: nn.Module) -> Optional[Callable[[str, RefitReport, int], None]]:
        """How this refit fits ``module`` (called with its name, the report and its index), or None
        when it leaves the module alone (nothing pruned, or outside the scope)."""
        if isinstance(module, RECURRENT):
            return functools.partial(self._solve_recurrent, module) if _is_pruned_recurrent(module) else None
        if self.scope == "recurrent" or not hasattr(module, "weight_orig"):
            return None
        kept = _kept_inputs(module)
        if kept is not None:
            return functools.partial(self._solve, module, kept)
        return functools.partial(self._solve_masked, module) if _is_unstructured(module) else None

    def __call__(self) -> RefitReport:
        """Refit every layer that lost input channels; returns what was refitted and skipped."""
        tick, report = time.perf_counter(), RefitReport()
        names = {m: n for n, m in self.model.named_modules()}
        flags = training_flags(self.model)
        self.model.eval()
        try:
            for index, (module, calls) in enumerate(self._called_once().items()):
                solve = self._solver(module)
                if solve is None:
                    continue
                if calls != 1:
                    report.skipped[names[module]] = f"runs {calls} times per forward (one refit cannot fit all)"
                else:
                    solve(names[module], report, index)
        except BaseException:
            self.restore()
            raise
        finally:
            restore_training(flags)
        report.seconds = time.perf_counter() - tick
        return report

    @torch.no_grad()
    def restore(self) -> None:
        """Every refitted weight back as it was."""
        for (module, attr), old in self.saved.items():
            getattr(module, attr).copy_(old)
            if attr.endswith("_orig"):
                _apply_mask(module, attr[:-len("_orig")])
        self.saved.clear()
