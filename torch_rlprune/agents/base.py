"""What every agent is: a named search procedure over a :class:`LayerwisePruningEnv`."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import numpy as np

__all__ = ["Agent", "LoopEnded"]


class LoopEnded(Exception):
    """Raised from the environment (an episode callback) to end an agent's loop on purpose, not as a
    failure: the search's stop rule (``search/stopping.py``) raises a subclass."""


class Agent:
    """Base class. A subclass sets ``name``, ``Config`` (a dataclass whose fields are the
    hyper-parameters, with ``episodes`` among them) and implements :meth:`search`.

    Agents only call ``env.reset()``, ``env.step(amount)`` and read ``env.action_bounds()``,
    ``env.observation_dim`` and ``env.num_steps``: they never touch the model.
    """

    name = "agent"
    Config: Any = None
    supports_guarantee = False
    """Can run ``rl_prune(target=None, max_drop=...)``: its search only maximises the reward
    (the environment switches to AMC's accuracy-guaranteed reward and no clipping)."""
    multi_target = False
    """One search serves every target in ``env.targets`` (it calls ``env.set_target``)."""
    needs_prior = False
    """Returns nothing but what the prior offers (``rl_prune(prior="none")`` is refused)."""
    transient = ()
    """Attributes that are not part of what the agent learned (threads): left out of snapshots."""

    def __init__(self, config: Optional[Any] = None, seed: int = 0, **overrides):
        if config is None:
            config = self.Config()
        elif isinstance(config, dict):
            overrides = {**config, **overrides}
            config = self.Config()
        if not isinstance(config, self.Config):
            raise TypeError(f"agent_config for {self.name!r} must be a {self.Config.__name__} or a dict")
        known = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"agent_config: unknown option(s) {unknown} for agent {self.name!r}; "
                             f"allowed: {sorted(known)}")
        self.config = dataclasses.replace(config, **overrides)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def search(self, env, episodes: int) -> None:
        raise NotImplementedError

    def settle(self) -> None:
        """Finish any work in flight (AMC's learner thread), so the agent's state is what a
        sequential run holds at this point of the search. Agents that work on one thread: nothing."""

    def hyperparameters(self) -> Dict[str, Any]:
        return dataclasses.asdict(self.config)
