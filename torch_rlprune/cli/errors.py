"""How ``rlprune`` fails and talks: its exit codes, :class:`CLIError` and the helpers that raise it, and the
console its notes and warnings go to."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

EXIT_OK, EXIT_USAGE, EXIT_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 4, 130

PROG = "rlprune"


class CLIError(Exception):
    """An error main() prints as ``rlprune: error: ...`` and turns into its exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def usage(message: str) -> CLIError:
    return CLIError(message, EXIT_USAGE)


def bad_input(message: str) -> CLIError:
    return CLIError(message, EXIT_INPUT)


def one_of(flag: str, allowed: Sequence[str], got) -> CLIError:
    return usage(f"{flag} must be one of {', '.join(allowed)}, got {got!r}")


def positive(flag: str, value, *, zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not zero):
        raise usage(f"{flag} must be {'>= 0' if zero else 'a positive integer'}, got {value}")


class Console:
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
