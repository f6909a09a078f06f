"""An environment with the agents' interface and no model: the reward is a known function of the
actions, so what an agent learns can be checked exactly (and that it needs nothing but the MDP)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np


class ScriptedEnv:
    """``num_steps`` steps per episode; the state is the one-hot step index (plus nothing else); the
    episode's reward is ``1 - 4 * mean((applied_t - best_t)^2)``. Actions above ``ceiling`` are
    clipped the way the budget clips them, and ``info["action"]`` is the applied one."""

    def __init__(self, best: Sequence[float] = (0.2, 0.8, 0.5), ceiling: float = 1.0,
                 targets: Optional[List[float]] = None):
        self.best = np.asarray(best, np.float32)
        self.ceiling = ceiling
        self.num_steps = len(self.best)
        self.observation_dim = self.num_steps
        self.targets = targets
        self.target = targets[0] if targets else 0.5
        self.targets_seen: List[float] = []
        self.rewards: List[float] = []
        self.phase = "search"

    def best_amounts(self) -> np.ndarray:
        return self.best

    def set_target(self, target: float) -> None:
        self.target = target

    def _state(self) -> np.ndarray:
        state = np.zeros(self.num_steps, np.float32)
        state[min(self.t, self.num_steps - 1)] = 1.0
        return state

    def reset(self) -> np.ndarray:
        self.t, self.applied = 0, []
        self.targets_seen.append(self.target)
        return self._state()

    def step(self, action: float):
        applied = float(min(action, self.ceiling))
        self.applied.append(applied)
        self.t += 1
        done = self.t == self.num_steps
        reward = 0.0
        if done:
            reward = 1.0 - 4.0 * float(np.mean((np.asarray(self.applied) - self.best_amounts()) ** 2))
            self.rewards.append(reward)
        return self._state(), reward, done, {"action": applied, "amount": applied}


class TargetFollowingEnv(ScriptedEnv):
    """The best amount of every step is the current target: a conditional policy can learn it, one
    blind to the target cannot."""

    def best_amounts(self) -> np.ndarray:
        return np.full(self.num_steps, self.target, np.float32)
