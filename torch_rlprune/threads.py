"""Thread counts for the two kinds of work in a search.

Scoring a plan is a forward pass of the user's model over the calibration set: it should
use every intra-op thread the user gave torch. The agent's own work (acting, and updating
networks of a few hundred units on batches of 64) is dominated by per-operation overhead,
which more threads only multiply. Measured on 2 cores (one DDPG update of AMC's 300-300
actor and critic sizes, Adam): 1.1 ms on 1 thread; on 2 threads 4.6-6 ms, and 61-86 ms
while another process loads the machine with OpenMP's default busy-waiting. So a search
runs its agent on one thread and switches back to the caller's count for every scoring pass.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["intra_op_threads", "agent_threads"]


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
