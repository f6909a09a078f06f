"""``rlprune apply``, ``compact``, ``report`` and ``agents``: the commands that run no search."""
from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..env.spaces import space_kind
from .errors import EXIT_OK, Console, bad_input, positive, usage
from .loading import check_model_spec, load_data, load_model, load_module_file, looks_like_path, masked, model_label


# ----------------------------------------------------------------------------- apply
def _output_path(out: Optional[str], default: Path, inputs: Sequence[Path], force: bool) -> Path:
    path = Path(out) if out is not None else default
    for given in inputs:
        if given.exists() and path.resolve() == given.resolve():
            raise usage(f"--out {path} is an input file: choose another --out (inputs are never overwritten)")
    if path.is_dir():
        raise usage(f"--out {path} is a directory: give a file name")
    if path.exists() and not force:
        raise usage(f"--out {path} exists: use --force to overwrite it, or another --out")
    return path


def cmd_apply(args) -> int:
    from ..plan import PlanError, PruningPlan, apply_plan

    console = Console()
    plan_path = Path(args.plan)
    model_path = Path(args.model)
    out = _output_path(args.out, Path(f"{model_label(args.model)}_pruned.pt"), [plan_path, model_path],
                       args.force)
    positive("--num-classes", args.num_classes)
    positive("--seed", args.seed, zero=True)  # as prune's --seed, which built the untrained model
    in_chans, num_classes = args.in_chans, args.num_classes
    if args.data is not None:
        data = load_data(args.data, args.data_root or "data", args.in_chans, args.image_size, splits=False)
        in_chans = in_chans if in_chans is not None else data.in_chans
        num_classes = num_classes if num_classes is not None else data.num_classes
    else:
        positive("--in-chans", in_chans)
    if not plan_path.is_file():
        raise bad_input(f"PLAN {plan_path}: no such file")
    check_model_spec(args.model)
    try:
        plan = PruningPlan.load(plan_path)
    except PlanError as err:
        raise bad_input(str(err) if str(plan_path) in str(err) else f"PLAN {plan_path}: {err}") from None
    except OSError as err:
        raise bad_input(f"PLAN {plan_path} could not be read: {err}") from None
    model = load_model(args.model, in_chans=in_chans, num_classes=num_classes, checkpoint=args.checkpoint,
                       seed=args.seed, console=console)
    if not model_path.is_file() and args.checkpoint is None:
        console.warn(f"applying the plan to an untrained {args.model} (no --checkpoint): masks follow its random "
                     f"weights (built with --seed {args.seed})")
    before = masked(model)
    zeros_before = {k: int((m == 0).sum()) for k, m in before.items()}
    try:
        apply_plan(model, plan)  # checks the whole plan against the model before any mask is set
    except PlanError as err:
        raise bad_input(f"PLAN {plan_path} does not fit MODEL {args.model}: {err}") from None
    masks = masked(model)
    changed = {k: m for k, m in masks.items() if int((m == 0).sum()) != zeros_before.get(k, 0) or k not in before}
    torch.save(model, out)
    print(f"applied {plan_path} ({plan.structure}, agent {plan.agent}, target {plan.target:.4f}, planned "
          f"{plan.sparsity:.4f}) to {args.model}")
    if not space_kind(plan.structure).removes_channels:
        names = list(plan.amounts)
        removed = sum(int((masks[n] == 0).sum()) for n in names if n in masks)
        total = sum(plan.numels[n] for n in names)
        print(f"{len(names)} tensors masked: {removed:,} of {total:,} entries removed ({removed / total:.2%})")
    else:
        units = sum(plan.counts().values())
        print(f"{len(plan.amounts)} channel groups: {units:,} of {sum(plan.numels.values()):,} units removed, "
              f"{len(changed)} tensors masked")
        blocks = plan.metadata.get("removed_blocks") or []
        if blocks:
            print(f"blocks masked to the identity: {', '.join(blocks)}")
    print(f"saved the masked model to {out}")
    batches = plan.metadata.get("bn_recalibration") if isinstance(plan.metadata, dict) else None
    if isinstance(batches, int) and batches > 0 and any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        console.warn(f"the plan was scored with BatchNorm statistics re-estimated on {batches} calibration "
                     "batch(es); this model keeps its old ones: re-estimate them (torch_rlprune.rewards.recalibration."
                     "BatchNormRecalibration(model, batches)()) or fine-tune before measuring it")
    repair = plan.metadata.get("repair") if isinstance(plan.metadata, dict) else None
    if isinstance(repair, dict) and repair.get("refitted") and repair.get("kept", True):
        console.warn(f"the search refitted {len(repair['refitted'])} layer(s) by least squares after masking; a plan "
                     "holds no weights, so this model has its old ones: refit them (torch_rlprune.rewards.repair."
                     "LeastSquaresRefit(model, batches), created before apply_plan, called after) or fine-tune")
    return EXIT_OK


# ----------------------------------------------------------------------------- compact
def cmd_compact(args) -> int:
    from .. import compact
    from ..structure.inputs import recorded_example

    console = Console()
    path = Path(args.model)
    if not path.is_file():
        if path.exists() or looks_like_path(args.model):
            raise bad_input(f"MODEL file {args.model}: no such file")
        raise usage(f"MODEL must be a saved pruned model file (e.g. OUT/model.pt from `rlprune prune "
                    f"--structure channel`), got {args.model!r}")
    out = _output_path(args.out, path.with_name(f"{path.stem}_compact.pt"), [path], args.force)
    if args.input_shape is not None and any(d <= 0 for d in args.input_shape):
        raise usage(f"--input-shape must be three positive integers C H W, got {' '.join(map(str, args.input_shape))}")
    model = load_module_file(path, console).eval()
    if not masked(model):
        raise bad_input(f"MODEL file {path} carries no prune masks (weight_mask buffers): nothing to compact")
    if args.input_shape is not None:
        shape = tuple(args.input_shape)
        example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    else:  # the inputs it was pruned with, recorded on the model; never a guess
        example = recorded_example(model)
        if example is None:
            raise usage(f"--input-shape C H W is needed: {path} records no input shape (pruned before this "
                        "version, or not by rl_prune / apply_plan)")
        shape = tuple(example.shape[1:]) if isinstance(example, torch.Tensor) else "as recorded"
    try:
        from ..report import count_dense

        dense = count_dense(model, example)  # the architecture as saved, masks ignored
    except Exception as err:
        raise usage(f"MODEL {path} does not run on inputs of shape {shape}: {type(err).__name__}: {err} "
                    f"(see --input-shape)") from None
    info = compact(model, example)
    torch.save(model, out)
    print(f"compacted {path} (input {' x '.join(map(str, shape)) if isinstance(shape, tuple) else shape})")
    for what, before, after in (("MACs", dense[0], info["macs_after"]), ("params", dense[1], info["params_after"])):
        print(f"{what:<6} {before:>14,} -> {after:>14,}  (x{before / max(1, after):.2f})")
    if info.get("removed_blocks"):
        print(f"blocks replaced by identities: {', '.join(info['removed_blocks'])}")
    if info["macs_after"] == dense[0] and info["params_after"] == dense[1]:
        console.warn("no channel was removed: the masks remove no whole channel (unstructured pruning?); the "
                     "prune hooks are gone and the zeros are kept in the weights")
    if info.get("failed"):
        console.warn(f"groups left unpruned (torch-pruning could not remove them): {info['failed']}")
    if info.get("max_abs_diff") is not None:
        print(f"max |masked - compacted| output difference: {info['max_abs_diff']:.3g}")
    print(f"saved the compacted model to {out}")
    return EXIT_OK


# ----------------------------------------------------------------------------- report
def cmd_report(args) -> int:
    from ..report import load_run, write_report

    runs = [Path(r) for r in args.runs]
    loaded = []
    for run in runs:
        if not run.is_dir():
            raise bad_input(f"RUN_DIR {run}: no such directory")
        try:
            loaded.append(load_run(run))
        except ValueError as err:
            raise bad_input(str(err)) from None
    out = Path(args.out) if args.out is not None else runs[0]
    if len(runs) == 1 and out.resolve() == runs[0].resolve():
        path = write_report(out)
    else:
        path = write_report(out, [r for data in loaded for r in data["records"]])
    images = sorted(p.name for p in path.parent.glob("*.png"))
    print(f"wrote {path}" + (f" and {', '.join(images)}" if images else ""))
    return EXIT_OK


# ----------------------------------------------------------------------------- agents
def cmd_agents(args) -> int:
    from ..agents import get_agent_class, list_agents

    rows = []
    for name in list_agents():
        cls = get_agent_class(name)
        doc = inspect.getdoc(sys.modules[cls.__module__]) or inspect.getdoc(cls) or ""
        first = " ".join(doc.split("\n\n")[0].split())  # the first paragraph (PuRL's title spans two lines)
        try:
            episodes = str(cls.Config().episodes)
        except Exception:  # an agent registered without a default
            episodes = "-"
        notes = []
        if getattr(cls, "multi_target", False):
            notes.append("several targets in one search")
        if getattr(cls, "needs_depth", False):
            notes.append("--structure channel only")
        rows.append((name, episodes, first + (f" [{'; '.join(notes)}]" if notes else "")))
    width = max(len("agent"), *(len(r[0]) for r in rows))
    print(f"{'agent':<{width}}  {'episodes':>8}  description")
    for name, episodes, text in rows:
        print(f"{name:<{width}}  {episodes:>8}  {text}")
    return EXIT_OK

