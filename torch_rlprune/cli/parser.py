"""The argparse parser of ``rlprune``: every command's flags, help texts and examples, and the message
for an unknown flag."""
from __future__ import annotations

import argparse
import difflib
import textwrap
from typing import Sequence

from ..structure.costs import budget_names
from .commands import cmd_agents, cmd_apply, cmd_compact, cmd_report
from .errors import PROG
from .loading import IMAGEFOLDER_DEFAULT_SIZE
from .prune_command import cmd_prune
from .prune_options import FINETUNE_LR, RESUME_ALLOWED, SEARCH_CHECKPOINT, TRAIN_BATCH

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


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)


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
    from .. import __version__

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
    _add_prune_command(sub)
    _add_apply_command(sub)
    _add_compact_command(sub)
    _add_report_command(sub)
    _add_agents_command(sub)
    return parser


def _add_prune_command(sub) -> None:
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
    _add_search_flags(p)
    _add_prune_input_flags(p)
    _add_prune_output_flags(p)
    _add_debug(p)
    p.set_defaults(func=cmd_prune)


def _add_search_flags(p: argparse.ArgumentParser) -> None:
    from ..agents import list_agents

    g = p.add_argument_group("search")
    g.add_argument("--target", type=float, nargs="+", metavar="T", default=None,
                   help="fraction of the budget removed, in (0, 1) (default: 0.8); several values: one plan per "
                        "target (one conditional search with --agent cacp)")
    g.add_argument("--structure", metavar="unstructured|channel", default=None,
                   help="unstructured weights (default) or whole channels")
    g.add_argument("--agent", metavar="|".join(list_agents()), default=None, help="the RL agent (default: amc)")
    g.add_argument("--budget", metavar="|".join(budget_names()), default=None,
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
    g.add_argument("--time-budget", type=float, metavar="SECONDS", default=None,
                   help="stop the search's episodes after SECONDS and keep the best plan so far (default: none)")
    g.add_argument("--patience", type=int, metavar="N", default=None,
                   help="stop once N episodes in a row found no better plan (default: none)")
    g.add_argument("--screen", type=int, metavar="N", default=None,
                   help="score each plan first on N calibration samples, in full only if it may beat the best "
                        "so far (default: 64 when the search part holds 256; 0: every plan in full)")
    g.add_argument("--cache-mb", type=float, metavar="MB", default=None,
                   help="keep at most MB megabytes of activations for prefix caching, which replays the layers "
                        "a plan shares with the one before it: same scores, sooner (default: 256; 0: off)")
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
    g.add_argument("--repair", metavar="lstsq|auto|none", default=None,
                   help="after the search, refit the pruned layers' kept weights by least squares (default: lstsq "
                        "for --structure channel; auto for unstructured: from 90%% of the weights removed, and "
                        "LSTM/GRU/RNN layers at any sparsity)")
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


def _add_prune_input_flags(p: argparse.ArgumentParser) -> None:
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


def _add_prune_output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", default=None,
                   help="output directory (default: runs/<model>-<agent>-<timestamp>)")
    g.add_argument("--force", action="store_true", help="write into a non-empty --out")
    g.add_argument("--checkpoint-every", type=int, metavar="N", default=None,
                   help=f"save the search to OUT/{SEARCH_CHECKPOINT} every N episodes (default: 10)")
    g.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the interrupted run in DIR (its options come from DIR/command.json)")
    g.add_argument("--quiet", action="store_true", default=None, help="no progress bar or notes")


def _add_apply_command(sub) -> None:
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
    p.set_defaults(func=cmd_apply)


def _add_compact_command(sub) -> None:
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
    p.set_defaults(func=cmd_compact)


def _add_report_command(sub) -> None:
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
    p.set_defaults(func=cmd_report)


def _add_agents_command(sub) -> None:
    p = sub.add_parser("agents", formatter_class=_Formatter, help="list the registered agents",
                       description="The agents --agent accepts, with their default episodes.",
                       epilog="examples:\n  rlprune agents\n\n" + EXIT_CODES_HELP)
    _add_debug(p)
    p.set_defaults(func=cmd_agents)


def reject_unknown(subparser: argparse.ArgumentParser, unknown: Sequence[str]) -> None:
    """Exit 2 with the subcommand's usage, naming the unknown arguments and the closest flags."""
    flags = [o for action in subparser._actions for o in action.option_strings]
    hints = [f"{word} (did you mean {', '.join(close)}?)" if (close := difflib.get_close_matches(word.split("=")[0],
             flags, n=2)) else word for word in unknown if word.startswith("-")]
    subparser.error("unrecognized arguments: " + " ".join(unknown) + (f"; {'; '.join(hints)}" if hints else ""))
