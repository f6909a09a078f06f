"""Random search: the honest baseline every learned agent has to beat.

Each episode draws every layer's amount uniformly from [0, 1]; the environment clips
it into the feasible range exactly as it does for the learned agents, so the plans are
the same kind (always on budget) and the evaluation budget (episodes) is the same.
This is also what AMC does during its warm-up episodes.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import register_agent
from .base import Agent


@dataclass
class RandomSearchConfig:
    episodes: int = 300
    """Plans scored; defaults to AMC's number so the two compare at equal cost."""


@register_agent
class RandomSearchAgent(Agent):
    name = "random"
    Config = RandomSearchConfig
    supports_guarantee = True

    def search(self, env, episodes: int) -> None:
        env.phase = "random"
        for _ in range(episodes):
            env.reset()
            done = False
            while not done:
                _, _, done, _ = env.step(float(self.rng.uniform(0.0, 1.0)))
