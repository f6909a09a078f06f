"""Agents register by name, the way timm registers models.

>>> from torch_rlprune.agents import list_agents
>>> "amc" in list_agents()
True
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, List, Type

from .base import Agent

__all__ = ["Agent", "register_agent", "create_agent", "list_agents", "get_agent_class"]

_REGISTRY: Dict[str, Type[Agent]] = {}


def register_agent(cls: Type[Agent]) -> Type[Agent]:
    """Class decorator: make ``cls`` selectable as ``rl_prune(..., agent=cls.name)``."""
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise TypeError("register_agent expects an Agent subclass")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"an agent named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def list_agents() -> List[str]:
    """Names accepted by ``rl_prune(agent=...)``."""
    return sorted(_REGISTRY)


def get_agent_class(name: str) -> Type[Agent]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"agent must be one of {list_agents()}, got {name!r}")
    return _REGISTRY[name]


def create_agent(name: str, config=None, seed: int = 0, **overrides) -> Agent:
    return get_agent_class(name)(config, seed=seed, **overrides)


# Importing the modules registers them: a new agent is one new file in this folder.
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
