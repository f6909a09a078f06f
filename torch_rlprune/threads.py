"""Thread counts for the two kinds of work in a search.

Scoring a plan is a forward pass of the user's model over the calibration set: it should
use every intra-op thread the user gave torch. The agent's own work (acting, and updating
networks of a few hundred units on batches of 64) is dominated by per-operation overhead,
which more threads only multiply. Measured on 2 cores (one DDPG update of AMC's 300-300
actor and critic sizes, Adam): 1.1 ms on 1 thread; on 2 threads 4.6-6 ms, and 61-86 ms
while another process loads the machine with OpenMP's default busy-waiting. So a search
runs its agent on one thread and switches back to the caller's count for every scoring pass.
AMC's learner thread (``AMCConfig.overlap_updates``) updates on one thread too, while the search's
thread scores the next episode.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterator

import torch

__all__ = ["intra_op_threads", "agent_threads", "one_search_at_a_time"]


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.get_num_threads() == count``, then put the previous count back."""
    previous = torch.get_num_threads()
    if count == previous:
        yield
        return
    torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def agent_threads() -> contextlib.AbstractContextManager:
    """The agent's side of a search: one intra-op thread."""
    return intra_op_threads(1)


_SEARCH = threading.Lock()


def one_search_at_a_time(fn: Callable) -> Callable:
    """Refuse a second search while one runs in this process (another Python thread).

    A search sets process-wide state: torch's intra-op thread count (above), torch's global RNG
    while it scores (forked and put back), and torch-pruning's index mapping, which channel
    pruning patches for the duration (``structure/channel/graph.py``). Two searches in two threads see
    each other's state (an audit found 5 of 18 paired runs returning plans other than their
    sequential twins, and one leaving the caller's RNG changed), so the second call gets a clear
    error at once.
    """
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        if not _SEARCH.acquire(blocking=False):
            raise RuntimeError(f"{fn.__name__}: another search is running in this process; searches change "
                               "process-wide torch state (threads, RNG, torch-pruning patches), so run them one "
                               "after the other, or in separate processes")
        try:
            return fn(*args, **kwargs)
        finally:
            _SEARCH.release()
    return guarded
