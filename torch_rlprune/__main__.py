"""``python -m torch_rlprune``: the ``rlprune`` command line (see :mod:`torch_rlprune.cli.main`).

The package (and torch with it) is imported before this runs, too late to set OpenMP's wait policy
(see ``torch_rlprune_console``): without one set, the command restarts itself once with PASSIVE."""
import os
import sys

if __name__ == "__main__":
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "torch_rlprune", *sys.argv[1:]])
    from .cli.main import main

    sys.exit(main())
