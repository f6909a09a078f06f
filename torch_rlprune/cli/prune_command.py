"""``rlprune prune``: read the data and MODEL, run the search, and write the run directory (plans, pruned
models, their compacted and exported forms, the report)."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch
from torch import nn

from ..env.spaces import space_kind
from .errors import EXIT_INTERRUPTED, EXIT_OK, PROG, CLIError, Console, bad_input, usage
from .loading import BUILTIN_DATA, Data, check_model_spec, check_output, load_data, load_model
from .prune_options import (COMMAND_FILE, FINETUNE_LR, SEARCH_CHECKPOINT, TRAIN_BATCH, budget_spec, command_record,
                            default_out, prune_settings, resume_settings, validate_prune)


def cmd_prune(args) -> int:
    quiet = bool(args.quiet)
    if args.resume is not None:
        s, out = resume_settings(args)
        model_spec = s["model"]
    else:
        if args.model is None:
            raise usage("MODEL is required (a timm model name or a pickled nn.Module file), or --resume DIR")
        s = prune_settings(args)
        validate_prune(s)
        model_spec = args.model
        if s["distributed"] and args.out is None:
            raise usage("--distributed needs --out DIR: every process must write to the same run directory")
        out = Path(args.out) if args.out is not None else default_out(model_spec, s["agent"])
        if out.exists() and not out.is_dir():
            raise usage(f"--out {out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not args.force:
            hint = f"--resume {out}" if (out / COMMAND_FILE).is_file() else "another --out"
            raise usage(f"--out {out} is not empty: use {hint}, or --force to write into it")
        for flag, given in (("MODEL", model_spec), ("--checkpoint", s["checkpoint"])):
            if given is not None and Path(given).is_file() and out.resolve() in Path(given).resolve().parents:
                raise usage(f"--out {out} holds {flag} {given}: write the run elsewhere (inputs are never "
                            f"overwritten)")
    check_model_spec(model_spec)
    leader = not s["distributed"] or int(os.environ.get("RANK", "0")) == 0
    console = Console(quiet, silent=not leader)
    created = not out.exists()
    try:
        return _run_prune(args, s, model_spec, out, console, leader)
    except (ValueError, RuntimeError):
        # rl_prune refused the arguments (e.g. an unreachable target) before writing anything: a
        # run directory holding only command.json would just block the next --out
        if created and out.is_dir() and {p.name for p in out.iterdir()} <= {COMMAND_FILE}:
            (out / COMMAND_FILE).unlink(missing_ok=True)
            out.rmdir()
        raise
    except KeyboardInterrupt:
        if not (out / COMMAND_FILE).is_file():
            raise CLIError("interrupted before the search started; nothing to resume", EXIT_INTERRUPTED) from None
        state = out / SEARCH_CHECKPOINT
        saved = f"the search state is in {state}" if state.is_file() else \
            "no search state was saved yet (the search restarts from the beginning)"
        raise CLIError(f"interrupted; {saved}. Continue with: {PROG} prune --resume {out}", EXIT_INTERRUPTED) \
            from None


@dataclass
class _Run:
    """What the steps of one `prune` run share: its settings, where it writes, and the data and
    unpruned weights every target's model is built from."""

    args: Any
    s: dict
    model_spec: str
    out: Path
    console: Console
    leader: bool
    seed: int
    data: Optional[Data] = None
    calibration: int = 0
    cal: tuple = ()
    pool: tuple = ()
    test: Optional[tuple] = None
    accuracy: dict = field(default_factory=dict)
    unpruned: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        return load_model(self.model_spec, in_chans=self.data.in_chans, num_classes=self.data.num_classes,
                          checkpoint=self.s["checkpoint"], seed=self.seed, console=self.console)


@dataclass
class _Outputs:
    """What the targets' outputs add up to: their records and summaries, and the files beside them."""

    records: List[dict] = field(default_factory=list)
    texts: List[str] = field(default_factory=list)
    compacted: dict = field(default_factory=dict)
    sparse: dict = field(default_factory=dict)
    exported: dict = field(default_factory=dict)


def _run_prune(args, s: dict, model_spec: str, out: Path, console: Console, leader: bool) -> int:
    from ..results import PruneResult

    run = _Run(args, s, model_spec, out, console, leader, seed=int(s["seed"]))
    # data and model first, nothing written yet: their errors leave no run directory behind
    _read_data(run)
    model = _prepare_model(run)
    result = _search(run, model)
    if not leader:
        return EXIT_OK
    outputs = _Outputs()
    many = not isinstance(result, PruneResult)
    for t in (list(result) if many else [None]):
        _save_target(run, outputs, result, model, t)
    _finish(run, outputs)
    return EXIT_OK


def _read_data(run: _Run) -> None:
    """The calibration, training and test images of ``run``."""
    s, console = run.s, run.console
    console.note(f"data: {s['data']}" + ("" if s["data"] not in BUILTIN_DATA else f" (from {s['data_root']})"))
    data = load_data(s["data"], s["data_root"], s["in_chans"], s["image_size"])
    calibration = min(s["calibration"], len(data.train))
    if calibration < s["calibration"]:
        console.warn(f"--calibration {s['calibration']}: the training split has only {len(data.train)} images")
    pool = max(s["train_steps"], s["finetune_steps"]) * TRAIN_BATCH
    pool = min(pool, len(data.train) - calibration)
    if pool <= 0 and max(s["train_steps"], s["finetune_steps"]) > 0:
        raise bad_input(f"--data {s['data']}: no training images left after the {calibration} calibration images")
    # One seeded permutation: its first images calibrate, the next ones train (disjoint).
    x_all, y_all = data.tensors(data.train, calibration + max(pool, 0), run.seed)
    run.data, run.calibration = data, calibration
    run.cal = (x_all[:calibration], y_all[:calibration])
    run.pool = (x_all[calibration:], y_all[calibration:])
    if s["test_samples"] > 0 and data.test is not None:
        run.test = data.tensors(data.test, s["test_samples"], 0)  # seed 0: the same images for every run
    elif s["test_samples"] > 0:
        console.note(f"no test split in {s['data']} (a val/ or test/ subfolder): test accuracy skipped")


def _prepare_model(run: _Run) -> nn.Module:
    """MODEL built, checked against the data and --exclude, and trained when --train-steps asks."""
    s, console, data, model_spec = run.s, run.console, run.data, run.model_spec
    model = run.build()
    classes = check_output(model, run.cal[0], data, model_spec)
    if classes is not None and classes != data.num_classes:
        if s["reward"] == "accuracy":
            raise usage(f"--reward accuracy: MODEL predicts {classes} classes but --data {data.name} has "
                        f"{data.num_classes}")
        console.warn(f"MODEL predicts {classes} classes but --data {data.name} has {data.num_classes}: "
                     f"test accuracy skipped")
        run.test = None
    modules = dict(model.named_modules())
    for name in s["exclude"]:
        if name not in modules:
            close = difflib.get_close_matches(name, [m for m in modules if m], n=5)
            raise usage(f"--exclude: MODEL has no module {name!r}" +
                        (f"; close matches: {', '.join(close)}" if close else ""))
    is_timm_name = not Path(model_spec).is_file()
    if s["train_steps"] > 0:
        console.note(f"training {model_spec} for {s['train_steps']} steps on {len(run.pool[0])} images")
        _train(model, *run.pool, s["train_steps"], run.seed, lr=None, verbose=not console.quiet)
    elif is_timm_name and s["checkpoint"] is None:
        console.warn(f"pruning an untrained {model_spec} (no --checkpoint, --train-steps 0): its plan says "
                     f"nothing about a trained model")
    return model


def _search(run: _Run, model: nn.Module):
    """The run directory started, then rl_prune's search (resumed from its checkpoint with --resume)."""
    from .. import rl_prune
    from ..demo.training import evaluate_accuracy

    s, out, console = run.s, run.out, run.console
    # command.json first, so that an interrupted run can be resumed
    if run.leader:
        out.mkdir(parents=True, exist_ok=True)
        if run.args.resume is None:
            _write_json(out / COMMAND_FILE, command_record(run.args, s, run.model_spec))
    if run.test is not None:
        run.accuracy["before"] = evaluate_accuracy(model, *run.test)
    run.unpruned = {k: v.detach().clone() for k, v in model.state_dict().items()}

    kwargs = dict(target=s["target"][0] if len(s["target"]) == 1 else list(s["target"]),
                  data=run.cal, reward=s["reward"], agent=s["agent"], episodes=s["episodes"],
                  budget=budget_spec(s), structure=s["structure"], exclude=list(s["exclude"]) or None, seed=run.seed,
                  verbose=not console.quiet, calibration_samples=run.calibration, max_amount=s["max_amount"],
                  prior=s["prior"], selection=float(s["selection"]), importance=s["importance"],
                  protect_first_last=s["protect_first_last"], repair=s["repair"], time_budget=s["time_budget"],
                  patience=s["patience"], screen=s["screen"], cache_mb=s["cache_mb"])
    state = out / SEARCH_CHECKPOINT
    kwargs.update(checkpoint=state, checkpoint_every=s["checkpoint_every"])
    if run.args.resume is not None:
        if state.is_file():
            kwargs["resume"] = state
            console.note(f"resuming the search from {state}")
        else:
            console.warn(f"no {SEARCH_CHECKPOINT} in {out}: nothing to resume from, the search starts over")
    if s["distributed"]:
        kwargs["distributed"] = True
    console.note(f"searching: agent {s['agent']}, {s['structure']}, target {' '.join(f'{t:g}' for t in s['target'])}")
    return rl_prune(model, **kwargs)


def _save_target(run: _Run, outputs: _Outputs, result, model: nn.Module, t: Optional[float]) -> None:
    """The plan and pruned model of target ``t`` (None: the one target) written, its record kept."""
    from ..demo.training import evaluate_accuracy

    s, out, test = run.s, run.out, run.test
    suffix = "" if t is None else f"_{t:g}"
    if t is None:
        one, pruned = result, model
    else:  # the model was left unpruned: prune a fresh copy per target (never deepcopy a pruned model)
        pruned = run.build()
        pruned.load_state_dict(run.unpruned)
        achieved = result.apply(pruned, target=t)
        one = dataclasses.replace(result[t], model=pruned, sparsity=achieved)
    one.plan.save(out / f"plan{suffix}.json")
    acc = dict(run.accuracy)
    if test is not None:
        acc["after"] = evaluate_accuracy(pruned, *test)
    if s["finetune_steps"] > 0:
        run.console.note(f"fine-tuning{'' if t is None else f' target {t:g}'} for {s['finetune_steps']} steps")
        _train(pruned, *run.pool, s["finetune_steps"], run.seed, lr=FINETUNE_LR, verbose=not run.console.quiet,
               desc="fine-tuning")
        if test is not None:
            acc["after_finetune"] = evaluate_accuracy(pruned, *test)
    torch.save(pruned, out / f"model{suffix}.pt")
    torch.save(pruned.state_dict(), out / f"state_dict{suffix}.pt")
    if not space_kind(s["structure"]).removes_channels:  # the zeros' real gain: size (load_sparse gives them back)
        from ..structure.sparse_format import save_sparse

        outputs.sparse[out / f"model_sparse{suffix}.pt"] = save_sparse(pruned, out / f"model_sparse{suffix}.pt")
    record = _summarize(one, acc if test is not None else None)
    outputs.records.append(record)
    if s["compact"]:
        _compact_target(run, outputs, one, pruned, record, t)
    outputs.texts.append(_format(record))


def _compact_target(run: _Run, outputs: _Outputs, one, pruned: nn.Module, record: dict, t: Optional[float]) -> None:
    """--compact (and --export): the masked channels of target ``t``'s model removed, and saved."""
    from .. import compact

    s, out = run.s, run.out
    suffix = "" if t is None else f"_{t:g}"
    info = compact(pruned, one.example_inputs)
    torch.save(pruned, out / f"model_compact{suffix}.pt")
    if s["export"] is not None:
        outputs.exported[out / f"model_compact{suffix}.{s['export']}"] = _export_compacted(
            pruned, run.build, run.unpruned, one.example_inputs, out / f"model_compact{suffix}.{s['export']}",
            (record.get("macs") or {}).get("before"), info["macs_after"], run.console)
    # compact()'s "before" counts are mask-aware (equal to "after" when all went well): the
    # record's "before" is the dense architecture, what the compacted model is compared with.
    outputs.compacted[f"{t:g}" if t is not None else "plan"] = {
        "macs_dense": (record.get("macs") or {}).get("before"), "macs_after": info["macs_after"],
        "params_dense": (record.get("params") or {}).get("before"), "params_after": info["params_after"],
        "max_abs_diff": info.get("max_abs_diff"), "failed": info.get("failed"),
        "removed_blocks": info.get("removed_blocks")}


def _finish(run: _Run, outputs: _Outputs) -> None:
    """summary.txt, run.json and the report written; the summaries and the files printed."""
    args, s, out = run.args, run.s, run.out
    text = "\n\n".join(outputs.texts)
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    argv = (s.get("_argv") or args.argv) if args.resume is not None else args.argv  # resumed: the original
    extra = {"command": " ".join([PROG] + [_quote(a) for a in argv]), "model": run.model_spec, "data": run.data.name}
    if args.resume is not None:
        extra["resumed"] = True
    if outputs.compacted:
        extra["compact"] = outputs.compacted
    _save_report(out, outputs.records, extra)
    print(text)
    _print_files(out, outputs)


def _print_files(out: Path, outputs: _Outputs) -> None:
    for key, info in outputs.compacted.items():
        print(f"compacted{'' if key == 'plan' else f' (target {key})'}: "
              f"MACs {_count_text(info['macs_dense'])} -> {_count_text(info['macs_after'])}, "
              f"params {_count_text(info['params_dense'])} -> {_count_text(info['params_after'])}, "
              f"max |masked - compacted| output {_count_text(info['max_abs_diff'])} "
              f"-> {out / f'model_compact{_suffix(key)}.pt'}")
    for path, report in outputs.exported.items():
        line = f"exported {path} ({report['runtime']}, max |exported - torch| {report['max_abs_diff']:.3g})"
        if "latency_ms" in report:
            dense_ms, pruned_ms = report["latency_ms"]
            line += (f"; onnxruntime batch 1: {dense_ms:.2f} ms unpruned -> {pruned_ms:.2f} ms "
                     f"(x{dense_ms / pruned_ms:.2f}, MACs x{report['macs_ratio']:.2f})")
        print(line)
    for path, sizes in outputs.sparse.items():
        print(f"sparse format: {path} holds the weights in {sizes['file_bytes'] / 2 ** 20:.2f} MB against "
              f"{sizes['dense_bytes'] / 2 ** 20:.2f} MB dense (x{sizes['dense_bytes'] / sizes['file_bytes']:.2f} "
              "smaller; torch_rlprune.structure.sparse_format.load_sparse gives them back bit for bit)")
    print(f"outputs in {out}")


def _export_compacted(pruned, build, unpruned, example, path: Path, dense_macs, macs_after, console) -> dict:
    """Export the compacted model (checked in its runtime); for ONNX also time it against the
    unpruned model exported alike, batch 1, runs interleaved."""
    import tempfile

    from ..structure.deploy import export, onnx_latency_ms

    one = example[:1]  # the file takes batch 1, the small-device case (shapes are fixed at export)
    report = export(pruned, one, path)
    if report["format"] == "onnx":
        dense = build()
        dense.load_state_dict(unpruned)
        with tempfile.TemporaryDirectory() as tmp:
            export(dense, one, Path(tmp) / "unpruned.onnx")
            console.note("timing both ONNX models in onnxruntime (batch 1)")
            report["latency_ms"] = onnx_latency_ms([Path(tmp) / "unpruned.onnx", path], one)
        report["macs_ratio"] = dense_macs / max(1, macs_after) if dense_macs else float("nan")
    return report


def _count_text(n) -> str:
    if n is None:
        return "-"
    return f"{n:,}" if isinstance(n, int) else f"{n:.3g}"


def _suffix(key: str) -> str:
    return "" if key == "plan" else f"_{key}"


def _train(model: nn.Module, x, y, steps: int, seed: int, lr: Optional[float], verbose: bool = False,
           desc: str = "training") -> None:
    from ..demo.training import train_classifier

    per_epoch = max(1, len(x) // TRAIN_BATCH)
    kwargs = {} if lr is None else {"lr": lr}
    with torch.random.fork_rng(devices=[]):  # dropout & co draw from a seeded stream: resumable runs rebuild it
        torch.manual_seed(seed)
        train_classifier(model, x, y, epochs=math.ceil(steps / per_epoch), batch_size=TRAIN_BATCH, seed=seed,
                         max_steps=steps, verbose=verbose, desc=desc, **kwargs)
    model.eval()


def _summarize(result, accuracy: Optional[dict]) -> dict:
    from ..report import summarize

    return summarize(result, test_accuracy=accuracy)


def _format(record: dict) -> str:
    from ..report import format_summary

    return format_summary(record)


def _save_report(out: Path, records: List[dict], extra: dict) -> None:
    from ..report import save_run, write_report

    save_run(out, records, extra=extra)
    write_report(out)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[A-Za-z0-9._/:=+-]+", arg) else json.dumps(arg)

