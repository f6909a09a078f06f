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
This module holds it; the parser is in :mod:`.parser`, the commands in :mod:`.prune_command` and
:mod:`.commands`.
"""
from __future__ import annotations

import sys
import traceback
from typing import Optional, Sequence

from .errors import EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, PROG, CLIError
from .parser import build_parser, reject_unknown

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_USAGE", "EXIT_INPUT", "EXIT_FAILED", "EXIT_INTERRUPTED"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``rlprune`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    from ..plan import PlanError
    from ..search.checkpoint import CheckpointError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # argparse would blame the top-level parser and print its usage, not the subcommand's
            reject_unknown(args.subcommands[args.command], unknown)
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
