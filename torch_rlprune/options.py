"""The knobs of a search: per-structure defaults and the one validation that ``rl_prune``, the
command line and the gymnasium environment share.

Every check runs before a weight is touched and names the offending argument, and the values it
allows, the way its caller spells them (``max_amount must be ...`` for ``rl_prune``, ``--max-amount
must be ...`` for ``rlprune prune``): callers pass a :class:`Spelling`.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, replace
from typing import Any, List, Optional

from .agents import Agent, get_agent_class, list_agents
from .env.spaces import SPACES, STRUCTURES, StructureDefaults, space_kind
from .rewards.calibration import check_label
from .rewards.repair import REPAIRS
from .rewards.scores import REWARDS
from .structure.channel.measured import latency_spec
from .validation import check_count

__all__ = ["STRUCTURES", "StructureDefaults", "STRUCTURE_DEFAULTS", "SearchQuality", "PruneOptions", "Spelling",
           "check_targets", "check_fraction", "check_repair", "check_quality", "check_budget"]

STRUCTURE_DEFAULTS = {name: kind.defaults for name, kind in SPACES.items()}
"""Per-structure defaults, as registered with the search spaces (:mod:`torch_rlprune.env.spaces`)."""
REPAIR_NEEDS = {"lstsq": "refits pruned layers by least squares", "auto": "refits pruned layers by least squares"}


@dataclass(frozen=True)
class NoDataDefaults:
    """What ``data=None`` changes, so that ``rl_prune(model, target=0.8)`` takes about a minute on
    2 CPU cores (benchmarks/synthetic_inputs.py measured the inputs, benchmarks/search_cost.py the call)."""

    samples: int = 128           # synthetic inputs (with data: 512 taken from it)
    bn_recalibration: int = 0    # statistics of Gaussian noise would replace the ones the model learnt
    time_budget: float = 30.0    # seconds of episodes, when neither episodes nor time_budget is given
    patience: int = 20           # episodes without a better plan, likewise


NO_DATA = NoDataDefaults()
DEFAULT_CACHE_MB = 256.0
"""Bound on the activations prefix caching keeps (:mod:`torch_rlprune.structure.prefix_cache`)."""
DATA_SAMPLES = 512


class Spelling:
    """How a caller writes an argument's name and a list of allowed values in its messages: as
    Python does (``rl_prune``'s arguments, the values' repr); :class:`torch_rlprune.cli.prune_options.Flags` spells flags."""

    def __call__(self, argument: str) -> str:
        return argument

    def allowed(self, values) -> str:
        return repr(values)

    def given(self, argument: str, value) -> str:
        """An argument set to a value: ``structure='channel'``."""
        return f"{self(argument)}={value!r}"


PYTHON = Spelling()


@dataclass
class SearchQuality:
    """What makes a search beat the one-shot heuristics (measured: benchmarks/ablation.py).

    prior: the heuristic the agents act around, scored first (:data:`~torch_rlprune.env.priors.PRIOR_CHOICES`).
    selection: fraction of the calibration samples held out to choose the result (0: off).
    select_top: how many of the search's best plans the held-out part compares (with the prior).
    protect_first_last: unstructured pruning leaves the first layer and the classifier dense.
    """

    prior: str = "best"
    selection: float = 0.25
    select_top: int = 5
    protect_first_last: bool = False
    parameters_given: bool = False  # global_rl_unstructured / parameters=: exactly those tensors


def check_budget(budget, structure: str, name: Spelling = PYTHON) -> None:
    """Raise a ValueError naming ``budget`` and the values allowed for ``structure``."""
    allowed = SPACES[structure].budgets
    if budget in allowed:
        return
    takers = [s for s, kind in SPACES.items() if budget in kind.budgets]
    why = f" ({budget!r} needs {' or '.join(name.given('structure', s) for s in takers)})" if takers else ""
    raise ValueError(f"{name('budget')} must be one of {name.allowed(allowed)} with "
                     f"{name.given('structure', structure)}, got {budget!r}{why}")


def check_fraction(value, argument: str, name: Spelling = PYTHON) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name(argument)} must be a float in (0, 1), got {type(value).__name__}")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name(argument)} must be in (0, 1) (the fraction of prunable weights removed), "
                         f"got {value!r}")
    return float(value)


def check_targets(target, max_drop, name: Spelling = PYTHON) -> Optional[List[float]]:
    """``None`` (accuracy-guaranteed search) or the sorted distinct targets."""
    if target is None:
        if max_drop is None:
            raise ValueError(f"{name('target')}=None searches for the smallest model within {name('max_drop')} of "
                             f"the unpruned score: give {name('max_drop')}= (e.g. 0.01)")
        return None
    if isinstance(target, (list, tuple)):
        if not target:
            raise ValueError(f"{name('target')}: the list of targets is empty")
        values = sorted({check_fraction(t, "target", name) for t in target})
        if len(values) != len(target):
            raise ValueError(f"{name('target')}: the list has repeated values: {list(target)}")
        return values
    return [check_fraction(target, "target", name)]


def check_repair(repair, structure: str, name: Spelling = PYTHON) -> str:
    """The repair to run after the search (``None``: the structure's default)."""
    repair = STRUCTURE_DEFAULTS[structure].repair if repair is None else repair
    if not isinstance(repair, str) or repair not in REPAIRS:
        raise ValueError(f"{name('repair')} must be one of {name.allowed(REPAIRS)} or None (the structure's default), "
                         f"got {repair!r}")
    kind = space_kind(structure)
    if repair not in kind.defaults.repairs:
        takers = " or ".join(name.given("structure", s) for s, k in SPACES.items() if repair in k.defaults.repairs)
        raise ValueError(f"{name.given('repair', repair)} {REPAIR_NEEDS[repair]}: it needs {takers} ({structure} "
                         f"pruning takes {' or '.join(name.given('repair', r) for r in kind.defaults.repairs)})")
    return repair


def check_quality(prior, selection, select_top, structure: str, protect_first_last=True,
                  parameters_given=False, name: Spelling = PYTHON) -> SearchQuality:
    allowed = ("best", *space_kind(structure).priors, "none")
    if not isinstance(prior, str) or prior not in allowed:
        raise ValueError(f"{name('prior')} must be one of {name.allowed(allowed)} with "
                         f"{name.given('structure', structure)}, "
                         f"got {prior!r}")
    if isinstance(selection, bool) or not isinstance(selection, numbers.Real) or not 0.0 <= selection < 1.0:
        raise ValueError(f"{name('selection')} must be the fraction of calibration samples held out, in [0, 1), "
                         f"got {selection!r}")
    check_count(select_top, "select_top", name)
    if not isinstance(protect_first_last, bool):
        raise TypeError(f"{name('protect_first_last')} must be True or False, "
                        f"got {type(protect_first_last).__name__}")
    return SearchQuality(prior, float(selection), int(select_top), protect_first_last, bool(parameters_given))


@dataclass
class PruneOptions:
    """Every option of :func:`~torch_rlprune.rl_prune` that is a setting rather than data.

    ``checked()`` validates them all and returns a copy with the structure's defaults filled in
    (``budget``, ``max_amount``, ``bn_recalibration``, ``repair``, ``round_to``), the targets as a
    sorted list (``targets``), the latency spec (``latency``), the agent's class (``agent_type``) and
    the :class:`SearchQuality`. ``importance_scores`` is checked for its type (a dict of tensors), not
    against the model; ``parameters`` only for presence.
    """

    target: Any = 0.8
    max_drop: Optional[float] = None
    structure: str = "unstructured"
    budget: Any = None
    agent: Any = "amc"
    reward: Any = "fidelity"
    episodes: Optional[int] = None
    seed: int = 0
    calibration_samples: Optional[int] = None
    max_amount: Optional[float] = None
    importance: Any = None             # a name, or channel: a torch-pruning importance
    importance_scores: Any = None
    parameters: Any = None
    round_to: Optional[int] = None
    bn_recalibration: Optional[int] = None
    repair: Optional[str] = None
    prior: str = "best"
    selection: float = 0.25
    select_top: int = 5
    protect_first_last: bool = True
    label: Any = None
    checkpoint: Any = None
    checkpoint_every: int = 10
    resume: Any = None
    distributed: bool = False
    time_budget: Optional[float] = None
    patience: Optional[int] = None
    screen: Optional[int] = None
    cache_mb: Optional[float] = None
    synthetic_data: bool = False       # data=None: the no-data defaults (NO_DATA) apply
    # filled by checked()
    targets: Optional[List[float]] = None
    latency: Any = None
    agent_type: Any = None
    quality: Optional[SearchQuality] = None

    @property
    def tolerance(self) -> float:
        return STRUCTURE_DEFAULTS[self.structure].tolerance

    @property
    def needs_depth(self) -> bool:
        return bool(getattr(self.agent_type, "needs_depth", False))

    def checked(self, name: Spelling = PYTHON) -> "PruneOptions":
        o = replace(self, targets=check_targets(self.target, self.max_drop, name))
        o._check_max_drop(name)
        if o.structure not in STRUCTURES:
            raise ValueError(f"{name('structure')} must be one of {name.allowed(STRUCTURES)}, got {o.structure!r}")
        defaults = STRUCTURE_DEFAULTS[o.structure]
        budget = defaults.budget if o.budget is None else o.budget
        o.latency = latency_spec(budget)   # budget=Latency(...) or "latency": measured on a runtime
        o.budget = "latency" if o.latency is not None else budget
        check_budget(o.budget, o.structure, name)
        o._check_agent(name)
        o.quality = check_quality(o.prior, o.selection, o.select_top, o.structure, o.protect_first_last,
                                  o.parameters is not None, name)
        check_label(o.label)
        o._check_numbers(defaults, name)
        o._check_structure_options(name)
        o.repair = check_repair(o.repair, o.structure, name)
        o._check_files_and_processes(name)
        return o

    def _check_max_drop(self, name: Spelling) -> None:
        if self.max_drop is None:
            return
        if self.targets is not None:
            raise ValueError(f"{name('max_drop')} applies to {name('target')}=None (accuracy-guaranteed search) only")
        drop = self.max_drop
        if isinstance(drop, bool) or not isinstance(drop, numbers.Real) or not 0 <= drop < 1:
            raise ValueError(f"{name('max_drop')} must be a number in [0, 1), got {drop!r}")

    def _check_agent(self, name: Spelling) -> None:
        if isinstance(self.agent, Agent):
            self.agent_type = type(self.agent)
        elif isinstance(self.agent, str):
            if self.agent not in list_agents():
                raise ValueError(f"{name('agent')} must be one of {name.allowed(list_agents())}, got {self.agent!r}")
            self.agent_type = get_agent_class(self.agent)
        else:
            raise TypeError(f"{name('agent')} must be a name from {list_agents()} or an Agent instance")
        kind, targets = self.agent_type, self.targets
        if targets is None and not kind.supports_guarantee:
            raise ValueError(f"agent {kind.name!r} does not support {name('target')}=None (accuracy-guaranteed "
                             f"search); agents that do: "
                             f"{[a for a in list_agents() if get_agent_class(a).supports_guarantee]}")
        if getattr(kind, "needs_prior", False) and (self.prior == "none" or targets is None):
            raise ValueError(f"agent {kind.name!r} returns the prior's plan: give a {name('target')} and a "
                             f"{name('prior')} (one of {('best', *SPACES[self.structure].priors)}), not "
                             f"{name.given('prior', 'none')} or {name('target')}=None")
        if self.needs_depth and not SPACES[self.structure].removes_channels:
            takers = " or ".join(name.given("structure", s) for s, k in SPACES.items() if k.removes_channels)
            raise ValueError(f"{name.given('agent', kind.name)} removes residual blocks and shrinks channels: "
                             f"use {takers}")
        if self.needs_depth and targets is not None and len(targets) > 1:
            raise ValueError(f"agent {kind.name!r} searches one target per call; give one {name('target')} "
                             "per call")
        if targets is not None and len(targets) > 1 and isinstance(self.agent, Agent) and not kind.multi_target:
            raise ValueError("a list of targets with an Agent instance needs a multi-target agent (e.g. 'cacp'); "
                             "pass the agent's name to run one search per target")

    def _check_numbers(self, defaults: StructureDefaults, name: Spelling) -> None:
        if not (callable(self.reward) or self.reward in REWARDS):
            raise ValueError(f"{name('reward')} must be one of {name.allowed(REWARDS)} or a callable(model) -> float, "
                             f"got {self.reward!r}")
        check_count(self.episodes, "episodes", name, or_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TypeError(f"{name('seed')} must be an integer >= 0, got {type(self.seed).__name__}")
        if self.seed < 0:
            raise ValueError(f"{name('seed')} must be an integer >= 0, got {self.seed!r}")
        if self.calibration_samples is None:
            self.calibration_samples = NO_DATA.samples if self.synthetic_data else DATA_SAMPLES
        check_count(self.calibration_samples, "calibration_samples", name)
        if self.synthetic_data and self.episodes is None and self.time_budget is None:
            self.time_budget = NO_DATA.time_budget
            self.patience = NO_DATA.patience if self.patience is None else self.patience
        self.max_amount = defaults.max_amount if self.max_amount is None else self.max_amount
        amount = self.max_amount
        if isinstance(amount, bool) or not isinstance(amount, numbers.Real) or not 0 < amount <= 1:
            raise ValueError(f"{name('max_amount')} must be in (0, 1], got {amount!r}")
        if self.bn_recalibration is None:
            self.bn_recalibration = NO_DATA.bn_recalibration if self.synthetic_data else defaults.bn_recalibration
        check_count(self.bn_recalibration, "bn_recalibration", name, zero=True)
        check_count(self.checkpoint_every, "checkpoint_every", name)
        check_count(self.patience, "patience", name, or_none=True)
        budget = self.time_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, numbers.Real)
                                   or not 0 < budget < math.inf):
            raise ValueError(f"{name('time_budget')} must be a positive number of seconds or None, got {budget!r}")
        screen = self.screen
        if screen is not None and (isinstance(screen, bool) or not isinstance(screen, numbers.Integral)
                                   or screen < 0 or screen == 1):
            raise ValueError(f"{name('screen')} must be a number of samples >= 2, 0 (every plan scored on every "
                             f"sample) or None (automatic), got {screen!r}")
        cache = self.cache_mb
        if cache is not None and (isinstance(cache, bool) or not isinstance(cache, numbers.Real)
                                  or not 0 <= cache < math.inf):
            raise ValueError(f"{name('cache_mb')} must be a number of megabytes >= 0 (0: no prefix caching) or "
                             f"None ({DEFAULT_CACHE_MB}), got {cache!r}")
        self.cache_mb = DEFAULT_CACHE_MB if cache is None else float(cache)

    def _check_structure_options(self, name: Spelling) -> None:
        SPACES[self.structure].check_options(self, name)

    def _check_files_and_processes(self, name: Spelling) -> None:
        for argument in ("checkpoint", "resume"):
            value = getattr(self, argument)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{name(argument)} must be a file path, got {type(value).__name__}")
        if not isinstance(self.distributed, bool):
            raise TypeError(f"{name('distributed')} must be True or False, got {type(self.distributed).__name__}")
        if self.distributed and self.needs_depth and self.budget == "latency":
            raise ValueError(f"agent {self.agent_type.name!r} with {name.given('budget', 'latency')} times residual "
                             f"blocks on one process: call it without {name('distributed')}=True (or use "
                             f"{name.given('budget', 'macs')})")
        if self.distributed and self.reward not in REWARDS:
            raise ValueError(f"{name('distributed')}=True splits the calibration set over processes: "
                             f"{name('reward')} must be one of {REWARDS} (a sum over samples), got {self.reward!r}")

