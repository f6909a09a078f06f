"""Numbers as the summary table and report.md print them, and the value checks records share."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch


# --------------------------------------------------------------------------- the table
def format_si(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:g}"


def format_ratio(before, after) -> str:
    return f"x{before / after:.2f}" if before and after else "x-"


def format_number(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def format_accuracy(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2%}" if 0.0 <= value <= 1.0 else f"{value:.4g}"


def format_goal(record: dict) -> str:
    if record.get("target") is None:
        drop = record.get("max_drop")
        return "accuracy-guaranteed" + (f" (max_drop {drop:g})" if drop is not None else "") + ": smallest plan found"
    return f"target {record['target']:.4f}"


# --------------------------------------------------------------------------- run.json
def is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def jsonable(obj):
    """Plain JSON types: numpy/torch scalars to Python numbers, tuples to lists, NaN/inf to None."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy arrays and scalars
        return jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return str(obj)
