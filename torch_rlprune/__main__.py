"""``python -m torch_rlprune``: the ``rlprune`` command line (see :mod:`torch_rlprune.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
