"""``rlprune``: the command line of torch_rlprune (also ``python -m torch_rlprune``).

Commands::

    rlprune prune MODEL --target 0.8 [--structure channel] [--agent amc] [--data fashion-mnist] [--out DIR]
    rlprune prune --resume DIR          continue an interrupted search to the same result
    rlprune apply PLAN MODEL            prune a model as a saved plan says
    rlprune compact MODEL               physically remove the channels a pruned model masks
    rlprune report RUN_DIR [RUN_DIR...] regenerate report.md and its plots from run.json
    rlprune agents                      the registered agents

MODEL is a timm model name (built with ``pretrained=False``; weights from ``--checkpoint``) or a
file holding a whole pickled ``nn.Module`` (``torch.save(model)``). Model files are pickles:
loading one runs code from it, so load only files you trust. ``--checkpoint`` state_dicts and
search checkpoints are read with ``weights_only=True`` (plain tensors, no code).

Exit codes:
    0    success
    2    usage error: a bad flag or value (the message names the flag and the allowed values)
    3    an input file or directory is missing, unreadable or invalid (model file, plan file,
         --checkpoint, run directory, data directory), or an output could not be written
    4    the search or the pruning failed (the library's message; ``--debug`` adds the traceback)
    130  interrupted (Ctrl-C); ``prune`` says how to resume

Only :func:`main` ends the process (it returns the exit code; the console script exits with it).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import inspect
import json
import math
import os
import re
import sys
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .options import PruneOptions, Spelling

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_USAGE", "EXIT_INPUT", "EXIT_FAILED", "EXIT_INTERRUPTED"]

EXIT_OK, EXIT_USAGE, EXIT_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 4, 130

PROG = "rlprune"
COMMAND_FILE = "command.json"
SEARCH_CHECKPOINT = "checkpoint.pt"
COMMAND_FORMAT_VERSION = 1
BUILTIN_DATA = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}  # 1 x 28 x 28, 10 classes
IMAGEFOLDER_DEFAULT_SIZE = 64
TRAIN_BATCH = 128  # train_classifier's default batch size: --train-steps N uses N * 128 images
FINETUNE_LR = 0.01  # the benchmark's fine-tune learning rate (docs/BENCHMARKS.md, `make bench`)

EXIT_CODES_HELP = """\
exit codes:
  0    success
  2    usage error: a bad flag or value (the message names the flag and the allowed values)
  3    an input file or directory is missing, unreadable or invalid (model file, plan
       file, --checkpoint, run directory, data directory), or an output could not be written
  4    the search or the pruning failed (the message says why; --debug shows the traceback)
  130  interrupted (Ctrl-C); prune prints how to resume: rlprune prune --resume DIR"""

PICKLE_HELP = ("MODEL is a timm model name (built with pretrained=False) or a file holding a whole pickled "
               "nn.Module saved with torch.save(model). Model files are pickles: loading one runs code from "
               "it, so load only files you trust.")


def _fill(*paragraphs: str) -> str:
    """Paragraphs wrapped for RawDescriptionHelpFormatter (which keeps our line breaks as they are)."""
    return "\n\n".join(textwrap.fill(p, 100) for p in paragraphs)


# ----------------------------------------------------------------------------- errors
class CLIError(Exception):
    """An error main() prints as ``rlprune: error: ...`` and turns into its exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _usage(message: str) -> CLIError:
    return CLIError(message, EXIT_USAGE)


def _bad_input(message: str) -> CLIError:
    return CLIError(message, EXIT_INPUT)


def _one_of(flag: str, allowed: Sequence[str], got) -> CLIError:
    return _usage(f"{flag} must be one of {', '.join(allowed)}, got {got!r}")


class _Console:
    """Notes go to stderr (silenced by --quiet); warnings too (silenced only on the non-leading
    processes of a --distributed run, which would repeat rank 0's); errors always do."""

    def __init__(self, quiet: bool = False, silent: bool = False):
        self.quiet, self.silent = quiet or silent, silent
        self._noted: set = set()

    def note(self, message: str) -> None:
        if not self.quiet:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        if not self.silent:
            print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)

    def pickle_note(self, path: Path) -> None:
        """Once per file, --quiet or not: the one thing to know before loading a file someone sent you."""
        if not self.silent and path not in self._noted:
            self._noted.add(path)
            print(f"{PROG}: note: loading {path}: model files are pickles and run code when loaded; load only "
                  f"files you trust", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the parser
class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)


# Every option of `prune` that command.json keeps, with its default. The parser's defaults are
# all None, so that after parsing we know which flags were given explicitly (--resume must not
# silently ignore them); the real defaults are filled in from here.
PRUNE_DEFAULTS: Dict[str, Any] = {
    "target": [0.8], "structure": "unstructured", "agent": "amc", "budget": None, "reward": "fidelity",
    "episodes": None, "seed": 0, "max_amount": None, "exclude": [], "data": "fashion-mnist", "data_root": "data",
    "in_chans": None, "image_size": None, "calibration": 512, "test_samples": 2000, "checkpoint": None,
    "train_steps": 0, "finetune_steps": 0, "compact": False, "checkpoint_every": 10, "distributed": False,
    "prior": "best", "selection": 0.25, "importance": None, "protect_first_last": True, "repair": None,
    "export": None, "latency_batch": None, "latency_threads": None, "latency_runtime": None,
}
# Options added after run directories were first written: an older command.json takes their defaults.
_LATER_OPTIONS = ("prior", "selection", "importance", "protect_first_last", "repair", "export", "latency_batch",
                  "latency_threads", "latency_runtime")
# What command.json must hold for each option: (types allowed, element type for lists).
_PRUNE_TYPES: Dict[str, tuple] = {
    "target": (list, float), "structure": (str,), "agent": (str,), "budget": (str, type(None)), "reward": (str,),
    "episodes": (int, type(None)), "seed": (int,), "max_amount": (float, type(None)), "exclude": (list, str),
    "data": (str,), "data_root": (str,), "in_chans": (int, type(None)), "image_size": (int, type(None)),
    "calibration": (int,), "test_samples": (int,), "checkpoint": (str, type(None)), "train_steps": (int,),
    "finetune_steps": (int,), "compact": (bool,), "checkpoint_every": (int,), "distributed": (bool,),
    "prior": (str,), "selection": (float,), "importance": (str, type(None)), "protect_first_last": (bool,),
    "repair": (str, type(None)), "export": (str, type(None)), "latency_batch": (int, type(None)),
    "latency_threads": (int, type(None)), "latency_runtime": (str, type(None)),
}
RESUME_ALLOWED = ("--quiet", "--debug")


def _add_debug(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's absent flag must not overwrite the top-level --debug.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback when something fails")


def _add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="a state_dict for MODEL (read with weights_only=True; a dict with a 'state_dict' or "
                        "'model' key works too)")


def _add_data(p: argparse.ArgumentParser, *, with_root_default: bool = True) -> None:
    p.add_argument("--data", metavar="fashion-mnist|mnist|DIR", default=None,
                   help="fashion-mnist (default), mnist, or a directory of class subfolders (torchvision "
                        "ImageFolder; train/ and val/ or test/ subfolders are used when present)")
    p.add_argument("--data-root", metavar="DIR", default=None,
                   help="where fashion-mnist/mnist live (default: data; see `make data`)")
    p.add_argument("--in-chans", type=int, metavar="C", default=None,
                   help="input channels: 1 for fashion-mnist/mnist (3 repeats the gray channel), 3 for a "
                        "directory (1 converts to grayscale)")
    p.add_argument("--image-size", type=int, metavar="S", default=None,
                   help=f"images are resized to S x S (default: 28 for fashion-mnist/mnist, "
                        f"{IMAGEFOLDER_DEFAULT_SIZE} for a directory)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description=_fill("Prune PyTorch models with reinforcement-learning agents over torch.nn.utils.prune.",
                          PICKLE_HELP),
        epilog="examples:\n"
               "  rlprune prune resnet18 --checkpoint resnet18_fmnist.pt --target 0.8\n"
               "  rlprune prune test_resnet --train-steps 200 --structure channel --target 0.5 --compact\n"
               "  rlprune prune --resume runs/test_resnet-amc-20250101-120000\n"
               "  rlprune apply runs/RUN/plan.json resnet18 --checkpoint resnet18_fmnist.pt --data fashion-mnist\n"
               "  rlprune compact runs/RUN/model.pt\n"
               "  rlprune report runs/RUN_A runs/RUN_B --out runs/compare\n"
               "  rlprune agents\n\n"
               "Run `rlprune COMMAND --help` for each command's options.\n\n" + EXIT_CODES_HELP)
    parser.add_argument("--version", action="version", version=f"%(prog)s (torch_rlprune) {__version__}")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the full traceback when something fails")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    parser.set_defaults(subcommands=sub.choices)  # main() reports a bad flag with its subcommand's usage

    # ---- prune
    p = sub.add_parser(
        "prune", formatter_class=_Formatter, help="search a pruning plan with an RL agent and prune a model",
        description=_fill("Search per-layer (or per-channel-group) pruning amounts with an RL agent on "
                          "calibration images, prune the model in place through torch.nn.utils.prune, and write "
                          "into --out:") + "\n"
                    "  plan.json            the plan (PruningPlan.load / rlprune apply)\n"
                    "  model.pt             the pruned model with its prune masks (torch.save(model))\n"
                    "  state_dict.pt        its state_dict (weight_orig/weight_mask; weights_only=True)\n"
                    "  model_compact.pt     with --compact: the channels physically removed\n"
                    "  model_sparse.pt      unstructured: the weights as bitmask + values (load_sparse)\n"
                    "  summary.txt          the table printed on stdout\n"
                    "  run.json, report.md  the run record and its report, with PNG plots\n"
                    "  command.json         the options, for --resume\n"
                    "  checkpoint.pt        the search state (every --checkpoint-every episodes, on Ctrl-C)\n\n"
                    + _fill("With several --target values: plan_<t>.json, model_<t>.pt, state_dict_<t>.pt (and "
                            "model_compact_<t>.pt) per target, each plan applied to a fresh copy of the unpruned "
                            "model.",
                            PICKLE_HELP + " Without --checkpoint a timm model is untrained: train it first with "
                            "--train-steps N. Put MODEL before the options that take several values (--target, "
                            "--exclude)."),
        epilog="examples:\n"
               "  rlprune prune resnet18 --checkpoint resnet18_fmnist.pt --target 0.8\n"
               "  rlprune prune test_resnet --train-steps 200 --structure channel --target 0.5 --compact\n"
               "  rlprune prune my_model.pt --data mnist --target 0.5 0.7 0.9 --agent cacp\n"
               "  rlprune prune resnet18 --data ./images --image-size 64 --target 0.5 --reward accuracy\n"
               "  rlprune prune --resume runs/test_resnet-amc-20250101-120000\n\n"
               + _fill("--resume DIR takes MODEL and every option from DIR/command.json and continues the search "
                       "from DIR/checkpoint.pt to the result the uninterrupted run would have reached; only "
                       f"{' and '.join(RESUME_ALLOWED)} may be given with it.") + "\n\n" + EXIT_CODES_HELP)
    p.add_argument("model", nargs="?", metavar="MODEL", help="a timm model name or a pickled nn.Module file")
    g = p.add_argument_group("search")
    g.add_argument("--target", type=float, nargs="+", metavar="T", default=None,
                   help="fraction of the budget removed, in (0, 1) (default: 0.8); several values: one plan per "
                        "target (one conditional search with --agent cacp)")
    g.add_argument("--structure", metavar="unstructured|channel", default=None,
                   help="unstructured weights (default) or whole channels")
    from .agents import list_agents

    g.add_argument("--agent", metavar="|".join(list_agents()), default=None, help="the RL agent (default: amc)")
    g.add_argument("--budget", metavar="params|macs|latency", default=None,
                   help="what the target counts (default: params for unstructured, macs for channel; "
                        "latency: channel only)")
    g.add_argument("--latency-batch", type=int, metavar="N", default=None,
                   help="--budget latency: the batch size one inference runs at (default 1)")
    g.add_argument("--latency-threads", type=int, metavar="N", default=None,
                   help="--budget latency: the runtime's intra-op threads (default: torch's now)")
    g.add_argument("--latency-runtime", metavar="eager|onnxruntime", default=None,
                   help="--budget latency: where candidates and the result are measured after compact "
                        "(default eager; onnxruntime needs the deploy extra)")
    g.add_argument("--reward", metavar="fidelity|accuracy", default=None,
                   help="fidelity: agreement with the unpruned model (default); accuracy: on the labels")
    g.add_argument("--episodes", type=int, metavar="N", default=None,
                   help="episodes per search (default: the agent's, see `rlprune agents`)")
    g.add_argument("--seed", type=int, metavar="N", default=None,
                   help="seed of the search, of the calibration images and of an untrained model (default: 0)")
    g.add_argument("--max-amount", type=float, metavar="F", default=None,
                   help="largest fraction of one tensor (0.98) or channel group (0.8) removed, in (0, 1]")
    g.add_argument("--exclude", nargs="+", metavar="NAME", default=None,
                   help="module names left unpruned (and everything below them)")
    g.add_argument("--prior", metavar="best|lamp|global|uniform|none", default=None,
                   help="the heuristic the agents start from and act around (default: best of lamp and global "
                        "for weights, of global and uniform for channels)")
    g.add_argument("--selection", type=float, metavar="F", default=None,
                   help="fraction of the calibration images held out to choose the result (default 0.25; 0: off)")
    g.add_argument("--importance", metavar="magnitude|activation", default=None,
                   help="which weights go inside a layer (unstructured; default magnitude)")
    g.add_argument("--repair", metavar="lstsq|none", default=None,
                   help="after a channel search, refit the layers that lost input channels by least squares "
                        "(default lstsq for --structure channel; unstructured: none)")
    g.add_argument("--no-protect", dest="protect_first_last", action="store_const", const=False, default=None,
                   help="also prune the first layer and the classifier (unstructured; kept dense by default)")
    g.add_argument("--compact", action="store_true", default=None,
                   help="also save model_compact.pt with the masked channels removed (--structure channel)")
    g.add_argument("--export", metavar="onnx|pt2|pte", default=None,
                   help="with --compact: also write model_compact.onnx (or .pt2, or ExecuTorch .pte) for batch 1, "
                        "checked against torch in its runtime; for onnx, print the onnxruntime speed-up over the "
                        "unpruned model")
    g.add_argument("--distributed", action="store_true", default=None,
                   help="run under torchrun, the calibration set split over the processes (needs --out)")
    g = p.add_argument_group("model and data")
    _add_model_source(g)
    g.add_argument("--train-steps", type=int, metavar="N", default=None,
                   help=f"train MODEL for N SGD steps (batch {TRAIN_BATCH}) on the training split first "
                        "(default: 0)")
    g.add_argument("--finetune-steps", type=int, metavar="N", default=None,
                   help=f"fine-tune the pruned model for N steps (lr {FINETUNE_LR}), masks kept (default: 0)")
    _add_data(g)
    g.add_argument("--calibration", type=int, metavar="N", default=None,
                   help="calibration images carved from the training split, seeded (default: 512)")
    g.add_argument("--test-samples", type=int, metavar="N", default=None,
                   help="test images for accuracy before/after (default: 2000; 0 skips; a directory needs "
                        "a val/ or test/ subfolder)")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", default=None,
                   help="output directory (default: runs/<model>-<agent>-<timestamp>)")
    g.add_argument("--force", action="store_true", help="write into a non-empty --out")
    g.add_argument("--checkpoint-every", type=int, metavar="N", default=None,
                   help=f"save the search to OUT/{SEARCH_CHECKPOINT} every N episodes (default: 10)")
    g.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the interrupted run in DIR (its options come from DIR/command.json)")
    g.add_argument("--quiet", action="store_true", default=None, help="no progress bar or notes")
    _add_debug(p)
    p.set_defaults(func=_cmd_prune)

    # ---- apply
    p = sub.add_parser(
        "apply", formatter_class=_Formatter, help="prune a model as a saved plan says",
        description=_fill("Apply a saved plan (plan.json) to MODEL through torch.nn.utils.prune and save the "
                          "masked model (torch.save(model)). A timm MODEL is built from --in-chans/--num-classes or "
                          "from --data, with the weights of --checkpoint (untrained: built with --seed, as `prune` "
                          "builds it). Channel plans trace the model at the input shape the plan records.",
                          PICKLE_HELP),
        epilog="examples:\n"
               "  rlprune apply runs/RUN/plan.json resnet18 --checkpoint resnet18_fmnist.pt --data fashion-mnist\n"
               "  rlprune apply plan.json my_model.pt --out my_model_pruned.pt\n\n" + EXIT_CODES_HELP)
    p.add_argument("plan", metavar="PLAN", help="a plan file written by `rlprune prune` or PruningPlan.save")
    p.add_argument("model", metavar="MODEL", help="a timm model name or a pickled nn.Module file")
    _add_model_source(p)
    p.add_argument("--num-classes", type=int, metavar="K", default=None, help="classes of a timm MODEL")
    _add_data(p)
    p.add_argument("--seed", type=int, metavar="N", default=0, help="seed of an untrained timm model (default: 0)")
    p.add_argument("--out", metavar="FILE", default=None, help="where to save (default: <model>_pruned.pt here)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    _add_debug(p)
    p.set_defaults(func=_cmd_apply)

    # ---- compact
    p = sub.add_parser(
        "compact", formatter_class=_Formatter, help="physically remove the channels a pruned model masks",
        description=_fill("Load a model pruned with --structure channel (a pickled file, e.g. OUT/model.pt), "
                          "remove the masked channels with torch-pruning (torch_rlprune.compact), check that its "
                          "outputs are unchanged, save it and print MACs/params before and after.", PICKLE_HELP),
        epilog="examples:\n"
               "  rlprune compact runs/RUN/model.pt\n"
               "  rlprune compact pruned.pt --out small.pt --input-shape 3 224 224\n\n" + EXIT_CODES_HELP)
    p.add_argument("model", metavar="MODEL", help="a pickled, channel-pruned nn.Module file")
    p.add_argument("--input-shape", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                   help="one sample's input shape (default: the inputs MODEL was pruned with, recorded on it by "
                        "rlprune prune / apply; a model without that record needs this flag)")
    p.add_argument("--out", metavar="FILE", default=None,
                   help="where to save (default: <model>_compact.pt beside MODEL)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    _add_debug(p)
    p.set_defaults(func=_cmd_compact)

    # ---- report
    p = sub.add_parser(
        "report", formatter_class=_Formatter, help="regenerate report.md and plots from run.json",
        description=_fill("Read RUN_DIR/run.json (checked field by field, never executed) and write report.md "
                          "with its PNG plots. Several run directories: one report whose plots overlay their "
                          "records, written into the first directory or --out."),
        epilog="examples:\n"
               "  rlprune report runs/RUN\n"
               "  rlprune report runs/amc-run runs/purl-run --out runs/compare\n\n" + EXIT_CODES_HELP)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories holding run.json")
    p.add_argument("--out", metavar="DIR", default=None, help="where to write report.md (default: the first RUN_DIR)")
    _add_debug(p)
    p.set_defaults(func=_cmd_report)

    # ---- agents
    p = sub.add_parser("agents", formatter_class=_Formatter, help="list the registered agents",
                       description="The agents --agent accepts, with their default episodes.",
                       epilog="examples:\n  rlprune agents\n\n" + EXIT_CODES_HELP)
    _add_debug(p)
    p.set_defaults(func=_cmd_agents)
    return parser


# ----------------------------------------------------------------------------- entry point
def _reject_unknown(subparser: argparse.ArgumentParser, unknown: Sequence[str]) -> None:
    """Exit 2 with the subcommand's usage, naming the unknown arguments and the closest flags."""
    flags = [o for action in subparser._actions for o in action.option_strings]
    hints = [f"{word} (did you mean {', '.join(close)}?)" if (close := difflib.get_close_matches(word.split("=")[0],
             flags, n=2)) else word for word in unknown if word.startswith("-")]
    subparser.error("unrecognized arguments: " + " ".join(unknown) + (f"; {'; '.join(hints)}" if hints else ""))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``rlprune`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    from .checkpoint import CheckpointError
    from .plan import PlanError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # argparse would blame the top-level parser and print its usage, not the subcommand's
            _reject_unknown(args.subcommands[args.command], unknown)
    except SystemExit as done:  # argparse's own errors (2) and --help/--version (0)
        return done.code if isinstance(done.code, int) else (EXIT_OK if done.code is None else EXIT_USAGE)
    args.argv = argv
    debug = bool(getattr(args, "debug", False))

    def fail(message: str, code: int) -> int:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return code

    try:
        return args.func(args)
    except CLIError as err:
        return fail(str(err), err.code)
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    except (PlanError, CheckpointError) as err:
        return fail(str(err), EXIT_INPUT)
    except OSError as err:
        return fail(str(err), EXIT_INPUT)
    except (ValueError, RuntimeError) as err:
        return fail(str(err) or type(err).__name__, EXIT_FAILED)


# ----------------------------------------------------------------------------- data
@dataclass
class _Data:
    """A dataset as the commands need it: shapes, splits and how to turn items into tensors."""

    name: str
    in_chans: int
    num_classes: int
    image_size: int
    train: Any = None
    test: Any = None
    adapt: Callable[[torch.Tensor], torch.Tensor] = lambda x: x

    def tensors(self, dataset, n: int, seed: int):
        from .data import tensor_subset

        x, y = tensor_subset(dataset, min(n, len(dataset)), seed=seed)
        return self.adapt(x), y


def _positive(flag: str, value, *, zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not zero):
        raise _usage(f"{flag} must be {'>= 0' if zero else 'a positive integer'}, got {value}")


def _data_kind(value: str, flag: str = "--data") -> str:
    if value in BUILTIN_DATA:
        return value
    if Path(value).is_dir():
        return "dir"
    raise _usage(f"{flag} must be one of {', '.join(BUILTIN_DATA)} or an existing directory (class subfolders, "
                 f"torchvision ImageFolder), got {value!r}")


def _data_shape(data: str, in_chans: Optional[int], image_size: Optional[int]) -> tuple:
    """``(kind, in_chans, image_size)`` with the defaults of ``data`` filled in (no images read)."""
    kind = _data_kind(data)
    _positive("--in-chans", in_chans)
    _positive("--image-size", image_size)
    if kind == "dir":
        in_chans = 3 if in_chans is None else in_chans
        if in_chans not in (1, 3):
            raise _usage(f"--in-chans must be one of 1, 3 with a directory of images, got {in_chans}")
        return kind, in_chans, IMAGEFOLDER_DEFAULT_SIZE if image_size is None else image_size
    in_chans = 1 if in_chans is None else in_chans
    if in_chans not in (1, 3):
        raise _usage(f"--in-chans must be one of 1, 3 with --data {data} (3 repeats the gray channel), got {in_chans}")
    return kind, in_chans, 28 if image_size is None else image_size


def _class_dirs(root: Path) -> List[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _load_data(data: str, root: str, in_chans: Optional[int], image_size: Optional[int], *,
               splits: bool = True) -> _Data:
    """Open ``--data`` (with ``splits=False`` only its shapes and classes are worked out)."""
    kind, in_chans, image_size = _data_shape(data, in_chans, image_size)
    if kind != "dir":
        out = _Data(data, in_chans, 10, image_size)
        if in_chans != 1 or image_size != 28:
            def adapt(x, c=in_chans, s=image_size):
                if s != 28:
                    x = nn.functional.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
                return x.repeat(1, c, 1, 1) if c != 1 else x
            out.adapt = adapt
        if splits:
            from . import data as datasets

            loader = datasets.fashion_mnist if data == "fashion-mnist" else datasets.mnist
            try:
                out.train, out.test = loader(root, train=True), loader(root, train=False)
            except RuntimeError as err:  # not prepared and no download possible
                raise _bad_input(f"--data {data}: {err}") from None
        return out

    base = Path(data)
    train_dir = base / "train" if (base / "train").is_dir() else base
    test_dir = next((base / s for s in ("val", "test") if (base / s).is_dir()), None) if train_dir != base else None
    classes = _class_dirs(train_dir)
    if not classes:
        raise _bad_input(f"--data {data}: no class subfolders in {train_dir} (expected DIR/<class>/<image> or "
                         f"DIR/train/<class>/<image>)")
    out = _Data(str(base), in_chans, len(classes), image_size)
    if splits:
        from torchvision import datasets as tvd, transforms as T

        transform = T.Compose([T.Grayscale(1) if in_chans == 1 else T.Lambda(lambda im: im.convert("RGB")),
                               T.Resize((image_size, image_size)), T.ToTensor(),
                               T.Normalize([0.5] * in_chans, [0.5] * in_chans)])
        try:
            out.train = tvd.ImageFolder(str(train_dir), transform=transform)
            if test_dir is not None:
                out.test = tvd.ImageFolder(str(test_dir), transform=transform)
        except (FileNotFoundError, OSError) as err:
            raise _bad_input(f"--data {data}: {err}") from None
        if out.test is not None and out.test.class_to_idx != out.train.class_to_idx:
            raise _bad_input(f"--data {data}: {test_dir} has classes {sorted(out.test.class_to_idx)}, "
                             f"the training images {sorted(out.train.class_to_idx)}")
    return out


# ----------------------------------------------------------------------------- models
def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.endswith((".pt", ".pth", ".pkl", ".bin", ".safetensors"))


def _load_module_file(path: Path, console: _Console) -> nn.Module:
    console.pickle_note(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle, zip, missing classes: all mean "not a model file we can read"
        raise _bad_input(f"MODEL file {path} could not be loaded: {type(err).__name__}: {err}") from None
    if not isinstance(obj, nn.Module):
        hint = (" (a state_dict? pass a timm model name as MODEL and this file as --checkpoint)"
                if isinstance(obj, dict) else "")
        raise _bad_input(f"MODEL file {path} holds a {type(obj).__name__}, not an nn.Module{hint}")
    return obj


def _check_timm_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    close += [n for n in timm.list_models(f"*{name}*")[:5] if n not in close]
    hint = f"; close matches: {', '.join(close[:6])}" if close else "; see timm.list_models()"
    raise _usage(f"MODEL must be an existing model file or a timm model name, got {name!r} (no such file, "
                 f"unknown to timm{hint})")


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise _bad_input(f"--checkpoint {path}: no such file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise _bad_input(f"--checkpoint {path} could not be read as a state_dict ({type(err).__name__}): it must "
                         f"be a dict of tensors saved with torch.save (read with weights_only=True, which "
                         f"refuses anything else)") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in obj.items())):
        raise _bad_input(f"--checkpoint {path} is not a state_dict (a dict of tensors, or one under a "
                         f"'state_dict' or 'model' key)")
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _check_model_spec(spec: str) -> None:
    """Before anything is loaded: a missing file (exit 3) or an unknown timm name (exit 2)."""
    path = Path(spec)
    if path.is_file():
        return
    if path.exists():
        raise _bad_input(f"MODEL {spec} is not a file")
    if _looks_like_path(spec):
        raise _bad_input(f"MODEL file {spec}: no such file")
    _check_timm_name(spec)


def _load_model(spec: str, *, in_chans: Optional[int], num_classes: Optional[int], checkpoint: Optional[str],
                seed: int, console: _Console) -> nn.Module:
    """MODEL as a file (pickled module) or a timm name, with ``checkpoint``'s weights loaded."""
    path = Path(spec)
    _check_model_spec(spec)
    if path.is_file():
        model = _load_module_file(path, console)
    else:
        if in_chans is None or num_classes is None:
            raise _usage("a timm MODEL needs --in-chans and --num-classes (or --data) to be built")
        import timm

        with torch.random.fork_rng(devices=[]):  # the same untrained weights on every run with this seed
            torch.manual_seed(int(seed))
            try:
                model = timm.create_model(spec, pretrained=False, in_chans=in_chans, num_classes=num_classes)
            except Exception as err:
                raise CLIError(f"timm could not build {spec!r} (in_chans={in_chans}, num_classes={num_classes}): "
                               f"{type(err).__name__}: {err}", EXIT_FAILED) from None
    if checkpoint is not None:
        state = _read_state_dict(checkpoint)
        _check_fits(model, state, f"--checkpoint {checkpoint} does not fit MODEL {spec}")
        model.load_state_dict(state)
    return model.eval()


def _check_fits(model: nn.Module, state: Dict[str, torch.Tensor], what: str) -> None:
    """A short message (counts and a few names) instead of load_state_dict's wall of keys."""
    own = model.state_dict()

    def some(names) -> str:
        names = sorted(names)
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    problems = []
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    wrong = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing:
        problems.append(f"{len(missing)} missing key(s) ({some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) ({some(unexpected)})")
    if wrong:
        k = sorted(wrong)[0]
        problems.append(f"{len(wrong)} shape mismatch(es) ({k}: {tuple(state[k].shape)} in the file, "
                        f"{tuple(own[k].shape)} in the model)")
    if problems:
        hint = (" (a pruned model's state_dict, with weight_orig/weight_mask: load it into a model the plan was "
                "applied to, or use the pickled model.pt)" if any(k.endswith("_mask") for k in unexpected) else "")
        raise _bad_input(f"{what}: {'; '.join(problems)}{hint}")


def _model_label(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec).stem if Path(spec).is_file() else spec) or "model"


def _masked(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{qualified tensor name: mask}`` of every tensor carrying a prune mask."""
    out = {}
    for mname, m in model.named_modules():
        for bname, buf in m._buffers.items():
            if bname.endswith("_mask") and bname[:-5] + "_orig" in m._parameters:
                out[f"{mname}.{bname[:-5]}" if mname else bname[:-5]] = buf
    return out


def _check_output(model: nn.Module, x: torch.Tensor, data: _Data, spec: str) -> Optional[int]:
    """One forward on two samples: a clear usage error when MODEL cannot take the data's inputs;
    returns the number of classes it predicts (None when its output is not [N, K])."""
    try:
        with torch.no_grad():
            y = model(x[:2])
    except Exception as err:
        raise _usage(f"MODEL {spec} does not accept --data {data.name} inputs of shape {tuple(x.shape[1:])}: "
                     f"{type(err).__name__}: {err} (see --in-chans and --image-size)") from None
    return int(y.shape[-1]) if isinstance(y, torch.Tensor) and y.dim() == 2 else None


# ----------------------------------------------------------------------------- prune: arguments
def _prune_settings(args) -> dict:
    """The options of a `prune` command line, defaults filled in where a flag was not given."""
    return {k: (PRUNE_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k)) for k in PRUNE_DEFAULTS}


_LATENCY_FLAGS = {"latency_batch": "--latency-batch", "latency_threads": "--latency-threads",
                  "latency_runtime": "--latency-runtime"}


def _validate_latency(s: dict) -> None:
    given = [flag for key, flag in _LATENCY_FLAGS.items() if s.get(key) is not None]
    if given and s["budget"] != "latency":
        raise _usage(f"{', '.join(given)} need --budget latency")
    _positive("--latency-batch", s.get("latency_batch"))
    _positive("--latency-threads", s.get("latency_threads"))
    if s.get("latency_runtime") is not None:
        from .channel.measured import RUNTIMES

        if s["latency_runtime"] not in RUNTIMES:
            raise _one_of("--latency-runtime", RUNTIMES, s["latency_runtime"])
    if s["budget"] == "latency":
        try:
            _budget(s)
        except ImportError as error:  # onnxruntime without the deploy extra
            raise _usage(str(error)) from None


def _budget(s: dict):
    """rl_prune's budget=: the string, or a Latency spec built from the --latency-* flags."""
    if s["budget"] != "latency":
        return s["budget"]
    from .channel.measured import Latency

    return Latency(batch=s.get("latency_batch") or 1, threads=s.get("latency_threads"),
                   runtime=s.get("latency_runtime") or "eager")


class _Flags(Spelling):
    """``rlprune prune``'s spelling of rl_prune's arguments in the shared checks' messages."""

    RENAMED = {"calibration_samples": "--calibration", "protect_first_last": "--no-protect"}

    def __call__(self, argument: str) -> str:
        return self.RENAMED.get(argument, "--" + argument.replace("_", "-"))

    def allowed(self, values) -> str:
        return ", ".join(map(str, values))

    def given(self, argument: str, value) -> str:
        return f"{self(argument)} {value}"


def _validate_prune(s: dict) -> None:
    """Usage errors, before anything is read or written; message names the flag and allowed values.
    rl_prune's own checks (:class:`~torch_rlprune.options.PruneOptions`) first, then the flags that
    only the command line has."""
    if not s["target"]:
        raise _usage("--target needs at least one value in (0, 1)")
    try:
        PruneOptions(target=list(s["target"]), structure=s["structure"], agent=s["agent"], budget=s["budget"],
                     reward=s["reward"], episodes=s["episodes"], seed=s["seed"], max_amount=s["max_amount"],
                     calibration_samples=s["calibration"], checkpoint_every=s["checkpoint_every"],
                     prior=s["prior"], selection=s["selection"], importance=s["importance"], repair=s["repair"],
                     protect_first_last=s["protect_first_last"], distributed=s["distributed"]).checked(_Flags())
    except (ValueError, TypeError) as error:
        raise _usage(str(error)) from None
    _validate_latency(s)
    for flag, key in (("--test-samples", "test_samples"), ("--train-steps", "train_steps"),
                      ("--finetune-steps", "finetune_steps")):
        _positive(flag, s[key], zero=True)
    _data_shape(s["data"], s["in_chans"], s["image_size"])
    if s["compact"] and s["structure"] != "channel":
        raise _usage("--compact needs --structure channel (unstructured pruning keeps every shape; make its "
                     "zeros permanent with torch.nn.utils.prune.remove)")
    if s["export"] is not None:
        from .deploy import EXPORT_FORMATS

        if s["export"] not in EXPORT_FORMATS:
            raise _one_of("--export", EXPORT_FORMATS, s["export"])
        if not s["compact"]:
            raise _usage("--export needs --compact (--structure channel): a masked model runs at dense speed; an "
                         "unstructured model's gain is its size (model_sparse.pt)")


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")  # NaN/Infinity: no option takes them


def _check_command_file(run_dir: Path) -> dict:
    """Read and check ``run_dir/command.json``: every option present, of its type (data only)."""
    path = run_dir / COMMAND_FILE
    if not run_dir.is_dir():
        raise _bad_input(f"--resume {run_dir}: no such directory")
    if not path.is_file():
        raise _bad_input(f"--resume {run_dir}: not a run directory of `rlprune prune` (no {COMMAND_FILE})")

    def bad(what: str) -> CLIError:
        return _bad_input(f"{path}: {what}")

    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise bad(f"not a valid JSON command file ({err})") from None
    if not isinstance(data, dict):
        raise bad(f"must be a JSON object, got {type(data).__name__}")
    if data.get("version") != COMMAND_FORMAT_VERSION:
        raise bad(f"command file version {data.get('version')!r} is not supported (this rlprune reads "
                  f"{COMMAND_FORMAT_VERSION})")
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise bad("'model' must be a non-empty string")
    options = data.get("options")
    if not isinstance(options, dict):
        raise bad("'options' must be an object")
    missing, unknown = set(PRUNE_DEFAULTS) - set(options), set(options) - set(PRUNE_DEFAULTS)
    options = {**{k: PRUNE_DEFAULTS[k] for k in missing & set(_LATER_OPTIONS)}, **options}
    missing -= set(_LATER_OPTIONS)
    if missing or unknown:
        raise bad(f"'options' is missing {sorted(missing)} / has unknown {sorted(unknown)}")
    settings = {}
    for key, value in options.items():
        kinds = _PRUNE_TYPES[key]
        if kinds[0] is list:
            ok = isinstance(value, list) and all(
                isinstance(v, kinds[1]) or (kinds[1] is float and isinstance(v, int)) for v in value) and \
                not any(isinstance(v, bool) for v in value)
        else:
            ok = (isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)) or \
                 (float in kinds and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise bad(f"option {key!r} has the wrong type: {value!r}")
        settings[key] = value
    settings["target"] = [float(t) for t in settings["target"]]
    try:
        _validate_prune(settings)
    except CLIError as err:  # the file holds values the command line would refuse
        raise bad(str(err)) from None
    settings["model"] = data["model"]
    argv = data.get("argv")
    settings["_argv"] = argv if isinstance(argv, list) and all(isinstance(a, str) for a in argv) else None
    return settings


def _resume_settings(args) -> tuple:
    """``(settings, out_dir)`` for ``prune --resume DIR``."""
    run_dir = Path(args.resume)
    given = sorted(f"--{k.replace('_', '-')}" for k in PRUNE_DEFAULTS if getattr(args, k) is not None)
    if args.out is not None:
        given.append("--out")
    if args.force:
        given.append("--force")
    if given:
        raise _usage(f"--resume takes every option from {run_dir / COMMAND_FILE}; {', '.join(given)} cannot be "
                     f"given with it (allowed with --resume: {', '.join(RESUME_ALLOWED)})")
    settings = _check_command_file(run_dir)
    if args.model is not None and args.model != settings["model"] and \
            Path(args.model).resolve() != Path(settings["model"]).resolve():
        raise _usage(f"--resume {run_dir} prunes MODEL {settings['model']!r} (from {COMMAND_FILE}); "
                     f"got MODEL {args.model!r}: leave MODEL out")
    if (run_dir / "run.json").is_file():
        raise _usage(f"--resume {run_dir}: that run finished (run.json exists); nothing to resume")
    if args.model is None and Path(settings["model"]).exists():
        # a run directory is data from outside; a model file is a pickle, which runs code when loaded
        raise _usage(f"--resume {run_dir} prunes the model file {settings['model']!r} (from {COMMAND_FILE}); "
                     f"model files are pickles and run code when loaded, so rlprune loads one only when you name "
                     f"it yourself: {PROG} prune {settings['model']} --resume {run_dir}")
    return settings, run_dir


def _absolute(value: Optional[str]) -> Optional[str]:
    return None if value is None else str(Path(value).resolve())


def _default_out(model: str, agent: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{_model_label(model)}-{agent}-{stamp}"
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out


# ----------------------------------------------------------------------------- prune
def _cmd_prune(args) -> int:
    quiet = bool(args.quiet)
    if args.resume is not None:
        s, out = _resume_settings(args)
        model_spec = s["model"]
    else:
        if args.model is None:
            raise _usage("MODEL is required (a timm model name or a pickled nn.Module file), or --resume DIR")
        s = _prune_settings(args)
        _validate_prune(s)
        model_spec = args.model
        if s["distributed"] and args.out is None:
            raise _usage("--distributed needs --out DIR: every process must write to the same run directory")
        out = Path(args.out) if args.out is not None else _default_out(model_spec, s["agent"])
        if out.exists() and not out.is_dir():
            raise _usage(f"--out {out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not args.force:
            hint = f"--resume {out}" if (out / COMMAND_FILE).is_file() else "another --out"
            raise _usage(f"--out {out} is not empty: use {hint}, or --force to write into it")
        for flag, given in (("MODEL", model_spec), ("--checkpoint", s["checkpoint"])):
            if given is not None and Path(given).is_file() and out.resolve() in Path(given).resolve().parents:
                raise _usage(f"--out {out} holds {flag} {given}: write the run elsewhere (inputs are never "
                             f"overwritten)")
    _check_model_spec(model_spec)
    leader = not s["distributed"] or int(os.environ.get("RANK", "0")) == 0
    console = _Console(quiet, silent=not leader)
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


def _run_prune(args, s: dict, model_spec: str, out: Path, console: _Console, leader: bool) -> int:
    from . import rl_prune
    from .results import PruneResult
    from .training import evaluate_accuracy

    seed = int(s["seed"])
    # ---- data and model (nothing written yet: errors leave no run directory behind)
    console.note(f"data: {s['data']}" + ("" if s["data"] not in BUILTIN_DATA else f" (from {s['data_root']})"))
    data = _load_data(s["data"], s["data_root"], s["in_chans"], s["image_size"])
    calibration = min(s["calibration"], len(data.train))
    if calibration < s["calibration"]:
        console.warn(f"--calibration {s['calibration']}: the training split has only {len(data.train)} images")
    pool = max(s["train_steps"], s["finetune_steps"]) * TRAIN_BATCH
    pool = min(pool, len(data.train) - calibration)
    if pool <= 0 and max(s["train_steps"], s["finetune_steps"]) > 0:
        raise _bad_input(f"--data {s['data']}: no training images left after the {calibration} calibration images")
    # One seeded permutation: its first images calibrate, the next ones train (disjoint).
    x_all, y_all = data.tensors(data.train, calibration + max(pool, 0), seed)
    x_cal, y_cal = x_all[:calibration], y_all[:calibration]
    x_pool, y_pool = x_all[calibration:], y_all[calibration:]
    test = None
    if s["test_samples"] > 0 and data.test is not None:
        test = data.tensors(data.test, s["test_samples"], 0)  # seed 0: the same images for every run
    elif s["test_samples"] > 0:
        console.note(f"no test split in {s['data']} (a val/ or test/ subfolder): test accuracy skipped")

    def build() -> nn.Module:
        return _load_model(model_spec, in_chans=data.in_chans, num_classes=data.num_classes,
                           checkpoint=s["checkpoint"], seed=seed, console=console)

    model = build()
    classes = _check_output(model, x_cal, data, model_spec)
    if classes is not None and classes != data.num_classes:
        if s["reward"] == "accuracy":
            raise _usage(f"--reward accuracy: MODEL predicts {classes} classes but --data {data.name} has "
                         f"{data.num_classes}")
        console.warn(f"MODEL predicts {classes} classes but --data {data.name} has {data.num_classes}: "
                     f"test accuracy skipped")
        test = None
    modules = dict(model.named_modules())
    for name in s["exclude"]:
        if name not in modules:
            close = difflib.get_close_matches(name, [m for m in modules if m], n=5)
            raise _usage(f"--exclude: MODEL has no module {name!r}" +
                         (f"; close matches: {', '.join(close)}" if close else ""))
    is_timm_name = not Path(model_spec).is_file()
    if s["train_steps"] > 0:
        console.note(f"training {model_spec} for {s['train_steps']} steps on {len(x_pool)} images")
        _train(model, x_pool, y_pool, s["train_steps"], seed, lr=None, verbose=not console.quiet)
    elif is_timm_name and s["checkpoint"] is None:
        console.warn(f"pruning an untrained {model_spec} (no --checkpoint, --train-steps 0): its plan says "
                     f"nothing about a trained model")

    # ---- the run directory: command.json first, so that an interrupted run can be resumed
    if leader:
        out.mkdir(parents=True, exist_ok=True)
        if args.resume is None:
            _write_json(out / COMMAND_FILE, _command_record(args, s, model_spec))
    accuracy = {}
    if test is not None:
        accuracy["before"] = evaluate_accuracy(model, *test)
    unpruned = {k: v.detach().clone() for k, v in model.state_dict().items()}

    kwargs = dict(target=s["target"][0] if len(s["target"]) == 1 else list(s["target"]),
                  data=(x_cal, y_cal), reward=s["reward"], agent=s["agent"], episodes=s["episodes"],
                  budget=_budget(s), structure=s["structure"], exclude=list(s["exclude"]) or None, seed=seed,
                  verbose=not console.quiet, calibration_samples=calibration, max_amount=s["max_amount"],
                  prior=s["prior"], selection=float(s["selection"]), importance=s["importance"],
                  protect_first_last=s["protect_first_last"], repair=s["repair"])
    state = out / SEARCH_CHECKPOINT
    kwargs.update(checkpoint=state, checkpoint_every=s["checkpoint_every"])
    if args.resume is not None:
        if state.is_file():
            kwargs["resume"] = state
            console.note(f"resuming the search from {state}")
        else:
            console.warn(f"no {SEARCH_CHECKPOINT} in {out}: nothing to resume from, the search starts over")
    if s["distributed"]:
        kwargs["distributed"] = True
    console.note(f"searching: agent {s['agent']}, {s['structure']}, target {' '.join(f'{t:g}' for t in s['target'])}")
    result = rl_prune(model, **kwargs)
    if not leader:
        return EXIT_OK

    # ---- outputs
    many = not isinstance(result, PruneResult)
    records, texts, compacted, sparse, exported = [], [], {}, {}, {}
    for t in (list(result) if many else [None]):
        suffix = "" if t is None else f"_{t:g}"
        if t is None:
            one, pruned = result, model
        else:  # the model was left unpruned: prune a fresh copy per target (never deepcopy a pruned model)
            pruned = build()
            pruned.load_state_dict(unpruned)
            achieved = result.apply(pruned, target=t)
            one = dataclasses.replace(result[t], model=pruned, sparsity=achieved)
        one.plan.save(out / f"plan{suffix}.json")
        acc = dict(accuracy)
        if test is not None:
            acc["after"] = evaluate_accuracy(pruned, *test)
        if s["finetune_steps"] > 0:
            console.note(f"fine-tuning{'' if t is None else f' target {t:g}'} for {s['finetune_steps']} steps")
            _train(pruned, x_pool, y_pool, s["finetune_steps"], seed, lr=FINETUNE_LR, verbose=not console.quiet,
                   desc="fine-tuning")
            if test is not None:
                acc["after_finetune"] = evaluate_accuracy(pruned, *test)
        torch.save(pruned, out / f"model{suffix}.pt")
        torch.save(pruned.state_dict(), out / f"state_dict{suffix}.pt")
        if s["structure"] == "unstructured":  # the zeros' real gain: size (load_sparse gives them back)
            from .sparse_format import save_sparse

            sparse[out / f"model_sparse{suffix}.pt"] = save_sparse(pruned, out / f"model_sparse{suffix}.pt")
        record = _summarize(one, acc if test is not None else None)
        records.append(record)
        if s["compact"]:
            from . import compact

            info = compact(pruned, one.example_inputs)
            torch.save(pruned, out / f"model_compact{suffix}.pt")
            if s["export"] is not None:
                exported[out / f"model_compact{suffix}.{s['export']}"] = _export_compacted(
                    pruned, build, unpruned, one.example_inputs, out / f"model_compact{suffix}.{s['export']}",
                    (record.get("macs") or {}).get("before"), info["macs_after"], console)
            # compact()'s "before" counts are mask-aware (equal to "after" when all went well): the
            # record's "before" is the dense architecture, what the compacted model is compared with.
            compacted[f"{t:g}" if t is not None else "plan"] = {
                "macs_dense": (record.get("macs") or {}).get("before"), "macs_after": info["macs_after"],
                "params_dense": (record.get("params") or {}).get("before"), "params_after": info["params_after"],
                "max_abs_diff": info.get("max_abs_diff"), "failed": info.get("failed"),
                "removed_blocks": info.get("removed_blocks")}
        texts.append(_format(record))
    text = "\n\n".join(texts)
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    argv = (s.get("_argv") or args.argv) if args.resume is not None else args.argv  # resumed: the original
    extra = {"command": " ".join([PROG] + [_quote(a) for a in argv]), "model": model_spec, "data": data.name}
    if args.resume is not None:
        extra["resumed"] = True
    if compacted:
        extra["compact"] = compacted
    _save_report(out, records, extra)
    print(text)
    for key, info in compacted.items():
        print(f"compacted{'' if key == 'plan' else f' (target {key})'}: "
              f"MACs {_count_text(info['macs_dense'])} -> {_count_text(info['macs_after'])}, "
              f"params {_count_text(info['params_dense'])} -> {_count_text(info['params_after'])}, "
              f"max |masked - compacted| output {_count_text(info['max_abs_diff'])} "
              f"-> {out / f'model_compact{_suffix(key)}.pt'}")
    for path, report in exported.items():
        line = f"exported {path} ({report['runtime']}, max |exported - torch| {report['max_abs_diff']:.3g})"
        if "latency_ms" in report:
            dense_ms, pruned_ms = report["latency_ms"]
            line += (f"; onnxruntime batch 1: {dense_ms:.2f} ms unpruned -> {pruned_ms:.2f} ms (x{dense_ms / pruned_ms:.2f}, "
                     f"MACs x{report['macs_ratio']:.2f})")
        print(line)
    for path, sizes in sparse.items():
        print(f"sparse format: {path} holds the weights in {sizes['file_bytes'] / 2 ** 20:.2f} MB against "
              f"{sizes['dense_bytes'] / 2 ** 20:.2f} MB dense (x{sizes['dense_bytes'] / sizes['file_bytes']:.2f} "
              "smaller; torch_rlprune.sparse_format.load_sparse gives them back bit for bit)")
    print(f"outputs in {out}")
    return EXIT_OK


def _count_text(n) -> str:
    if n is None:
        return "-"
    return f"{n:,}" if isinstance(n, int) else f"{n:.3g}"


def _suffix(key: str) -> str:
    return "" if key == "plan" else f"_{key}"


def _train(model: nn.Module, x, y, steps: int, seed: int, lr: Optional[float], verbose: bool = False,
           desc: str = "training") -> None:
    from .training import train_classifier

    per_epoch = max(1, len(x) // TRAIN_BATCH)
    kwargs = {} if lr is None else {"lr": lr}
    with torch.random.fork_rng(devices=[]):  # dropout & co draw from a seeded stream: resumable runs rebuild it
        torch.manual_seed(seed)
        train_classifier(model, x, y, epochs=math.ceil(steps / per_epoch), batch_size=TRAIN_BATCH, seed=seed,
                         max_steps=steps, verbose=verbose, desc=desc, **kwargs)
    model.eval()


def _summarize(result, accuracy: Optional[dict]) -> dict:
    from .report import summarize

    return summarize(result, test_accuracy=accuracy)


def _format(record: dict) -> str:
    from .report import format_summary

    return format_summary(record)


def _save_report(out: Path, records: List[dict], extra: dict) -> None:
    from .report import save_run, write_report

    save_run(out, records, extra=extra)
    write_report(out)


def _command_record(args, s: dict, model_spec: str) -> dict:
    from . import __version__

    options = {k: s[k] for k in PRUNE_DEFAULTS}
    # Paths absolute, so that --resume works from any directory.
    options["data_root"] = _absolute(options["data_root"])
    options["checkpoint"] = _absolute(options["checkpoint"])
    if options["data"] not in BUILTIN_DATA:
        options["data"] = _absolute(options["data"])
    model = _absolute(model_spec) if Path(model_spec).is_file() else model_spec
    return {"version": COMMAND_FORMAT_VERSION, "torch_rlprune": __version__, "model": model, "options": options,
            "argv": list(args.argv)}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[A-Za-z0-9._/:=+-]+", arg) else json.dumps(arg)


# ----------------------------------------------------------------------------- apply
def _output_path(out: Optional[str], default: Path, inputs: Sequence[Path], force: bool) -> Path:
    path = Path(out) if out is not None else default
    for given in inputs:
        if given.exists() and path.resolve() == given.resolve():
            raise _usage(f"--out {path} is an input file: choose another --out (inputs are never overwritten)")
    if path.is_dir():
        raise _usage(f"--out {path} is a directory: give a file name")
    if path.exists() and not force:
        raise _usage(f"--out {path} exists: use --force to overwrite it, or another --out")
    return path


def _cmd_apply(args) -> int:
    from .plan import PlanError, PruningPlan, apply_plan

    console = _Console()
    plan_path = Path(args.plan)
    model_path = Path(args.model)
    out = _output_path(args.out, Path(f"{_model_label(args.model)}_pruned.pt"), [plan_path, model_path],
                       args.force)
    _positive("--num-classes", args.num_classes)
    in_chans, num_classes = args.in_chans, args.num_classes
    if args.data is not None:
        data = _load_data(args.data, args.data_root or "data", args.in_chans, args.image_size, splits=False)
        in_chans = in_chans if in_chans is not None else data.in_chans
        num_classes = num_classes if num_classes is not None else data.num_classes
    else:
        _positive("--in-chans", in_chans)
    if not plan_path.is_file():
        raise _bad_input(f"PLAN {plan_path}: no such file")
    _check_model_spec(args.model)
    try:
        plan = PruningPlan.load(plan_path)
    except PlanError as err:
        raise _bad_input(str(err) if str(plan_path) in str(err) else f"PLAN {plan_path}: {err}") from None
    except OSError as err:
        raise _bad_input(f"PLAN {plan_path} could not be read: {err}") from None
    model = _load_model(args.model, in_chans=in_chans, num_classes=num_classes, checkpoint=args.checkpoint,
                        seed=args.seed, console=console)
    if not model_path.is_file() and args.checkpoint is None:
        console.warn(f"applying the plan to an untrained {args.model} (no --checkpoint): masks follow its random "
                     f"weights (built with --seed {args.seed})")
    before = _masked(model)
    zeros_before = {k: int((m == 0).sum()) for k, m in before.items()}
    try:
        apply_plan(model, plan)  # checks the whole plan against the model before any mask is set
    except PlanError as err:
        raise _bad_input(f"PLAN {plan_path} does not fit MODEL {args.model}: {err}") from None
    masks = _masked(model)
    changed = {k: m for k, m in masks.items() if int((m == 0).sum()) != zeros_before.get(k, 0) or k not in before}
    torch.save(model, out)
    print(f"applied {plan_path} ({plan.structure}, agent {plan.agent}, target {plan.target:.4f}, planned "
          f"{plan.sparsity:.4f}) to {args.model}")
    if plan.structure == "unstructured":
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
                     "batch(es); this model keeps its old ones: re-estimate them (torch_rlprune.recalibration."
                     "BatchNormRecalibration(model, batches)()) or fine-tune before measuring it")
    repair = plan.metadata.get("repair") if isinstance(plan.metadata, dict) else None
    if isinstance(repair, dict) and repair.get("refitted"):
        console.warn(f"the search refitted {len(repair['refitted'])} layer(s) by least squares after masking; a plan "
                     "holds no weights, so this model has its old ones: refit them (torch_rlprune.repair."
                     "LeastSquaresRefit(model, batches), created before apply_plan, called after) or fine-tune")
    return EXIT_OK


def _export_compacted(pruned, build, unpruned, example, path: Path, dense_macs, macs_after, console) -> dict:
    """Export the compacted model (checked in its runtime); for ONNX also time it against the
    unpruned model exported alike, batch 1, runs interleaved."""
    import tempfile

    from .deploy import export, onnx_latency_ms

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


# ----------------------------------------------------------------------------- compact
def _cmd_compact(args) -> int:
    from . import compact
    from .inputs import recorded_example

    console = _Console()
    path = Path(args.model)
    if not path.is_file():
        if path.exists() or _looks_like_path(args.model):
            raise _bad_input(f"MODEL file {args.model}: no such file")
        raise _usage(f"MODEL must be a saved pruned model file (e.g. OUT/model.pt from `rlprune prune "
                     f"--structure channel`), got {args.model!r}")
    out = _output_path(args.out, path.with_name(f"{path.stem}_compact.pt"), [path], args.force)
    if args.input_shape is not None and any(d <= 0 for d in args.input_shape):
        raise _usage(f"--input-shape must be three positive integers C H W, got {' '.join(map(str, args.input_shape))}")
    model = _load_module_file(path, console).eval()
    if not _masked(model):
        raise _bad_input(f"MODEL file {path} carries no prune masks (weight_mask buffers): nothing to compact")
    if args.input_shape is not None:
        shape = tuple(args.input_shape)
        example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    else:  # the inputs it was pruned with, recorded on the model; never a guess
        example = recorded_example(model)
        if example is None:
            raise _usage(f"--input-shape C H W is needed: {path} records no input shape (pruned before this "
                         "version, or not by rl_prune / apply_plan)")
        shape = tuple(example.shape[1:]) if isinstance(example, torch.Tensor) else "as recorded"
    try:
        from .report import count_dense

        dense = count_dense(model, example)  # the architecture as saved, masks ignored
    except Exception as err:
        raise _usage(f"MODEL {path} does not run on inputs of shape {shape}: {type(err).__name__}: {err} "
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
def _cmd_report(args) -> int:
    from .report import load_run, write_report

    runs = [Path(r) for r in args.runs]
    loaded = []
    for run in runs:
        if not run.is_dir():
            raise _bad_input(f"RUN_DIR {run}: no such directory")
        try:
            loaded.append(load_run(run))
        except ValueError as err:
            raise _bad_input(str(err)) from None
    out = Path(args.out) if args.out is not None else runs[0]
    if len(runs) == 1 and out.resolve() == runs[0].resolve():
        path = write_report(out)
    else:
        path = write_report(out, [r for data in loaded for r in data["records"]])
    images = sorted(p.name for p in path.parent.glob("*.png"))
    print(f"wrote {path}" + (f" and {', '.join(images)}" if images else ""))
    return EXIT_OK


# ----------------------------------------------------------------------------- agents
def _cmd_agents(args) -> int:
    from .agents import get_agent_class, list_agents

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
