"""The JSON cache of :class:`~.latency.LatencyTable` timings: where it lives, the key of a model /
input / machine configuration, and reading and writing it safely."""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["CACHE_ENV", "default_cache_dir", "parameter_shapes", "input_signature", "read_cache", "cached_table",
           "write_cache"]

CACHE_ENV = "TORCH_RLPRUNE_CACHE"


def default_cache_dir() -> Path:
    """``$TORCH_RLPRUNE_CACHE`` when set, else ``~/.cache/torch_rlprune/latency``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "torch_rlprune" / "latency"


def parameter_shapes(model: nn.Module) -> List[list]:
    # "weight_orig" and "weight" are the same tensor before and after torch pruning: one key.
    return [[name[:-len("_orig")] if name.endswith("_orig") else name, list(p.shape)]
            for name, p in model.named_parameters()]


def input_signature(example_inputs) -> list:
    if isinstance(example_inputs, dict):
        values = [example_inputs[k] for k in sorted(example_inputs)]
    elif isinstance(example_inputs, (tuple, list)):
        values = list(example_inputs)
    else:
        values = [example_inputs]
    return [[list(v.shape), str(v.dtype)] if isinstance(v, torch.Tensor) else type(v).__name__ for v in values]


def read_cache(path: Path, key: dict) -> Optional[dict]:
    """The cached timings for ``key``, or None when the file is missing, unreadable, not this
    key's or not shaped as written (it is then measured again and rewritten). Plain JSON:
    reading it never runs anything."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("layers"), dict):
        return None
    dense = data.get("dense_seconds")
    if not _is_seconds(dense):
        return None
    return data


def _is_seconds(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def cached_table(cached: Optional[dict], signature: str, widths) -> Optional[np.ndarray]:
    entry = (cached or {}).get("layers", {}).get(signature)
    if not isinstance(entry, dict) or entry.get("widths") != [list(w) for w in widths]:
        return None
    rows = entry.get("seconds")
    if not (isinstance(rows, list) and len(rows) == len(widths[0])
            and all(isinstance(r, list) and len(r) == len(widths[1]) and all(_is_seconds(v) for v in r)
                    for r in rows)):
        return None
    return np.array(rows, dtype=np.float64)


def write_cache(path: Path, key: dict, dense_seconds: float, layers: Dict[str, dict]) -> None:
    """Write atomically (a reader never sees half a file); a cache that cannot be written only warns."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key, "dense_seconds": dense_seconds, "layers": layers}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"LatencyTable: could not write the timing cache {path}: {err}", RuntimeWarning, stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
