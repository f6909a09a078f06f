"""What every agent is: a named search procedure over a :class:`LayerwisePruningEnv`."""
from __future__ import annotations

import dataclasses
import numbers
import types
from typing import Any, Dict, Optional, Union, get_args, get_origin, get_type_hints

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
        _check_config(self.name, self.config, self.Config)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def search(self, env, episodes: int) -> None:
        raise NotImplementedError

    def settle(self) -> None:
        """Finish any work in flight (AMC's learner thread), so the agent's state is what a
        sequential run holds at this point of the search. Agents that work on one thread: nothing."""

    def hyperparameters(self) -> Dict[str, Any]:
        return dataclasses.asdict(self.config)


# what a Config field's annotation checks: the class a value must be an instance of, and its name in messages
_FIELD_KINDS = {int: (numbers.Integral, "an integer"), float: (numbers.Real, "a number"), bool: (bool, "True or False")}


def _check_config(agent: str, config, config_class) -> None:
    """``episodes`` as rl_prune's ``episodes=`` (0 where the agent's own default is 0), and every int, float
    and bool field (``Optional`` ones: or None) of the right type. Other annotations: the agent's business."""
    default = {f.name: f.default for f in dataclasses.fields(config_class)}.get("episodes")
    episodes = getattr(config, "episodes", 1)
    least = 0 if default == 0 else 1
    if isinstance(episodes, bool) or not isinstance(episodes, numbers.Integral) or episodes < least:
        what = "a positive integer" if least else "an integer >= 0"
        raise ValueError(f"agent_config['episodes'] for agent {agent!r} must be {what} (as episodes=), "
                         f"got {episodes!r}")
    try:
        hints = get_type_hints(config_class)
    except Exception:  # annotations that cannot be resolved here: nothing to check them against
        return
    for f in dataclasses.fields(config_class):
        hint, value = hints.get(f.name), getattr(config, f.name)
        optional = get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint)
        if optional:
            if value is None:
                continue
            rest = [a for a in get_args(hint) if a is not type(None)]
            hint = rest[0] if len(rest) == 1 else None
        kind = _FIELD_KINDS.get(hint)
        if kind is not None and (not isinstance(value, kind[0]) or (isinstance(value, bool) and hint is not bool)):
            raise TypeError(f"agent_config[{f.name!r}] for agent {agent!r} must be {kind[1]}"
                            f"{' or None' if optional else ''}, got {type(value).__name__}")
