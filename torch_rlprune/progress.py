"""Progress bars for the long loops inside a search (latency tables, measured calibration), shown
only when the caller asked for progress: ``rl_prune(verbose=True)`` turns them on for its own
duration, and everything built directly (a ``LatencyTable`` of your own) stays quiet."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

from tqdm.auto import tqdm

__all__ = ["progress", "progress_bar"]

_SHOWN = contextvars.ContextVar("torch_rlprune_progress", default=False)


@contextlib.contextmanager
def progress(shown: bool) -> Iterator[None]:
    """Within the block, :func:`progress_bar` shows its bars when ``shown``."""
    token = _SHOWN.set(bool(shown))
    try:
        yield
    finally:
        _SHOWN.reset(token)


def progress_bar(total: Optional[int] = None, desc: str = "", unit: str = "it") -> tqdm:
    """A tqdm bar that goes away when done, disabled unless inside ``progress(True)``."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not _SHOWN.get(), leave=False, dynamic_ncols=True)
