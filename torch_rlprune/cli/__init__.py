"""``rlprune``: the command line of torch_rlprune (also ``python -m torch_rlprune``)."""
from .main import main

__all__ = ["main"]
