"""The heuristic alone: the prior's plan, scored, repaired and selected like a search's result.

``rl_prune(model, 0.9, agent="prior")`` runs no episode: the environment scores the prior plans
before any agent acts (:mod:`torch_rlprune.search.selection`), so what this agent returns is LAMP or
global magnitude (``prior=`` chooses; ``"best"`` keeps the better on the calibration score) with
everything else a search gets: the budget met on params, MACs or latency, BatchNorm statistics
re-estimated for the plan, the held-out choice between the candidates, the prune API's hooks and
a :class:`~torch_rlprune.plan.PruningPlan`. It is the bar an agent's search has to clear.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import register_agent
from .base import Agent


@dataclass
class PriorConfig:
    episodes: int = 0
    """Episodes run after the prior plans are scored: none (any given are played as the prior)."""


@register_agent
class PriorAgent(Agent):
    """Plays the prior's plan: 0.5, the prior's own amount, at every step of every episode."""

    name = "prior"
    Config = PriorConfig
    multi_target = True
    needs_prior = True

    def search(self, env, episodes: int) -> None:
        env.phase = "prior"
        for _ in range(episodes):
            env.reset()
            done = False
            while not done:
                _, _, done, _ = env.step(0.5)
