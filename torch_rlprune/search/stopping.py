"""When a search stops before its episodes are spent: a wall-time budget, or no better plan for a while.

Both end the agent's loop at the end of an episode, so everything the search recorded stays
consistent: the best plans, the history, a checkpoint. The plan then says why it stopped
(``metadata["stopped"]``). ``patience`` keeps a seeded search reproducible; a time budget does not
(how many episodes fit depends on the machine).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from ..agents.base import LoopEnded

__all__ = ["SearchStopped", "StopRule"]


class SearchStopped(LoopEnded):
    """Raised at the end of an episode to end the agent's loop; never leaves the search."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class StopRule:
    """``time_budget``: seconds of episodes (preparation and the final application come on top);
    ``patience``: episodes in a row without a better plan for their target."""

    time_budget: Optional[float] = None
    patience: Optional[int] = None
    clock: Callable[[], float] = time.perf_counter
    stops: Dict[Optional[float], dict] = field(default_factory=dict)   # target -> why and when it stopped
    _deadline: float = math.inf
    _best: Dict[Optional[float], float] = field(default_factory=dict)
    _since_better: int = 0
    _episodes: int = 0

    @property
    def active(self) -> bool:
        return self.time_budget is not None or self.patience is not None

    def forecast(self, episodes: int, forward_seconds: float) -> str:
        """What a progress bar says before the first episode: the time budget, or a rough ETA (an
        episode costs about two forward passes: BatchNorm re-estimation and the score)."""
        guess = episodes * 2.0 * forward_seconds
        if self.time_budget is not None and self.time_budget < guess:
            return f"stops within {self.time_budget:.0f}s"
        return f"eta~{guess:.0f}s"

    def remaining(self) -> Dict[str, str]:
        """The time budget left, for a progress bar (nothing without a budget)."""
        if self.time_budget is None or self._deadline == math.inf:
            return {}
        return {"left": f"{max(0.0, self._deadline - self.clock()):.0f}s"}

    def start(self, share: float = 1.0) -> None:
        """A new agent loop with ``share`` of the time budget."""
        self._deadline = math.inf if self.time_budget is None else self.clock() + self.time_budget * share
        self._best.clear()
        self._since_better = self._episodes = 0

    def after_episode(self, record) -> None:
        """The environment's episode callback."""
        self._episodes += 1
        best, held = record.best_reward, self._best.get(record.target, -math.inf)
        # a best below the one held: the results were chosen again among fewer plans (N2N's
        # architecture choice), so patience counts from that new best, not from a plan now excluded;
        # a NaN best (no plan yet) is neither
        if best > held or best < held:
            self._best[record.target] = best
            self._since_better = 0
        else:
            self._since_better += 1
        if self.clock() >= self._deadline:
            raise SearchStopped("time_budget")
        if self.patience is not None and self._since_better >= self.patience:
            raise SearchStopped("patience")

    def run(self, agent, env, episodes: int, targets, share: float = 1.0) -> None:
        """``agent.search(env, episodes)``, ended early when the rule says so."""
        self.start(share)
        try:
            agent.search(env, episodes)
        except SearchStopped as stop:
            for target in targets:
                self.stops[target] = {"reason": stop.reason, "episodes": self._episodes, "of": int(episodes)}
