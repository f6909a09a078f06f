"""The ``rlprune`` console script: sets the process's OpenMP defaults, then runs the command line.

OpenMP reads ``OMP_WAIT_POLICY`` once, when torch loads it, so this must happen before anything
imports torch; ``torch_rlprune/__init__.py`` does, so the script's entry point lives outside the
package. PASSIVE: idle OpenMP threads sleep instead of spinning; on 2 shared cores spinning threads
made torch ~6x slower under load (the Makefile's measurement). A value already set is kept.
"""
import os
import sys


def main() -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from torch_rlprune.cli.main import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
