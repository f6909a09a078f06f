"""CACP: Conditional Automated Channel Pruning (Liu et al., IEEE Signal Processing Letters 2021).

AMC searches one compression rate per run; CACP makes the rate an input of the policy, so
one search yields a plan for every rate asked for:

    for episode = 1..E:
        c = next target in the list (round-robin: every target gets the same share)
        s_t = (embedding of layer t, c)                      # the policy is conditioned on c
        a_t = AMC's actor(s_t) with truncated-normal exploration (random during warm-up)
        the environment clips a_t so that the budget of *c* is met
        R = score of the pruned model, minus a moving average of the rewards of target c
        (a baseline per target: a deeper cut scores lower whatever the policy does, and one
        baseline for all targets would teach the actor that high targets are always bad)
        stored for every step, DDPG update as in AMC
    the best plan of each target is kept separately

Everything else (networks, replay, reward baseline, exploration decay) is AMC's; see
``amc.py``. Called with a list of targets, ``rl_prune(..., agent="cacp")`` runs this once
and returns a plan per target; with one target it is AMC with the target in the state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import register_agent
from .amc import AMCAgent, AMCConfig


@dataclass
class CACPConfig(AMCConfig):
    episodes: int = 450
    """Total episodes over all targets. The paper trains one conditional agent instead of one
    per rate; here three targets share 450 episodes against AMC's 3 x 300 (``python
    benchmarks/agents_fmnist.py`` measures the two on targets 0.5/0.7/0.9)."""
    warmup: Optional[int] = None
    """Random episodes; ``None``: AMC's 1/6 share of the total (75 of 450: 25 per target for three)."""


@register_agent
class CACPAgent(AMCAgent):
    """AMC's DDPG with the target compression rate appended to every state."""

    name = "cacp"
    Config = CACPConfig
    multi_target = True
    supports_guarantee = False  # its policy is conditioned on a budget target

    def _targets(self, env):
        return list(getattr(env, "targets", None) or [env.target])

    def _state_dim(self, env) -> int:
        self.baseline_by_target = {}
        return env.observation_dim + 1

    def _stored_reward(self, env, reward: float) -> float:
        baseline = self.baseline_by_target.get(env.target, reward)
        self.baseline_by_target[env.target] = baseline + self.config.moving_alpha * (reward - baseline)
        return reward - baseline

    def _begin_episode(self, env, episode: int) -> None:
        targets = self._targets(env)
        env.set_target(targets[episode % len(targets)])

    def _state(self, env, observation: np.ndarray) -> np.ndarray:
        return np.append(observation, np.float32(env.target)).astype(np.float32)
