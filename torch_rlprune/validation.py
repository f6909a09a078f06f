"""Argument checks shared by the options and the search spaces (a leaf: imports nothing of ours)."""
from __future__ import annotations

import numbers

__all__ = ["check_count"]


def check_count(value, argument: str, name, zero: bool = False, or_none: bool = False) -> None:
    """A positive integer (``zero``: or 0; ``or_none``: or None); ``name`` spells the argument
    (:class:`~torch_rlprune.options.Spelling`)."""
    if value is None and or_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < (0 if zero else 1):
        what = "a number of batches >= 0" if zero else "a positive integer" + (" or None" if or_none else "")
        raise ValueError(f"{name(argument)} must be {what}, got {value!r}")
