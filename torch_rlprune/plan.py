"""A pruning plan: the portable result of a search, and how to apply it to any model."""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from .env.spaces import SPACES, STRUCTURES, space_kind
from .structure.apply import PlanError
from .structure.costs import budget_names

__all__ = ["PruningPlan", "apply_plan", "PlanError"]

PLAN_FORMAT_VERSION = 1


@dataclass
class PruningPlan:
    """Per-tensor amounts found by a search.

    Attributes:
        amounts: qualified parameter name (``"layer1.0.conv1.weight"``) -> fraction of that
            tensor's entries removed, counting entries an earlier mask already removed.
        numels: entries per tensor, to check that a model the plan is applied to matches.
        target: the fraction of the budget's cost the plan was searched for.
        sparsity: the fraction it achieves (of the budget's cost; for ``budget="latency"`` of
            the latency measured after compact, see ``metadata["latency"]["measured"]``; a
            multi-target search's plans carry the calibrated prediction).
        budget, structure, agent, reward, seed: how it was searched.
        score: the best reward, and ``baseline_score`` the unpruned model's.
    """

    amounts: Dict[str, float]
    numels: Dict[str, int]
    target: float
    sparsity: float
    budget: str = "params"
    structure: str = "unstructured"
    agent: str = "amc"
    reward: str = "fidelity"
    seed: Optional[int] = None
    score: Optional[float] = None
    baseline_score: Optional[float] = None
    episodes: Optional[int] = None
    metadata: dict = field(default_factory=dict)
    version: int = PLAN_FORMAT_VERSION

    def counts(self) -> Dict[str, int]:
        """Exact number of entries removed per tensor."""
        return {name: int(round(a * self.numels[name])) for name, a in self.amounts.items()}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data) -> "PruningPlan":
        """Build a plan from untrusted data, checking every field's type and range."""
        if not isinstance(data, dict):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
        required = {"amounts", "numels", "target", "sparsity"}
        missing = required - set(data)
        if missing:
            raise PlanError(f"plan is missing field(s) {sorted(missing)}")
        allowed = set(cls.__dataclass_fields__)
        unknown = set(data) - allowed
        if unknown:
            raise PlanError(f"plan has unknown field(s) {sorted(unknown)}")
        if data.get("version", PLAN_FORMAT_VERSION) != PLAN_FORMAT_VERSION:
            raise PlanError(f"plan format version {data.get('version')!r} is not supported "
                            f"(this library reads version {PLAN_FORMAT_VERSION})")
        amounts, numels = data["amounts"], data["numels"]
        if not isinstance(amounts, dict) or not isinstance(numels, dict) or set(amounts) != set(numels):
            raise PlanError("plan 'amounts' and 'numels' must be objects with the same keys")
        for name, a in amounts.items():
            if not isinstance(name, str) or isinstance(a, bool) or not isinstance(a, numbers.Real) \
                    or not math.isfinite(a) or not 0.0 <= a <= 1.0:
                raise PlanError(f"plan amount for {name!r} must be a number in [0, 1], got {a!r}")
        for name, n in numels.items():
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise PlanError(f"plan numel for {name!r} must be a positive integer, got {n!r}")
        v = data["target"]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v <= 1.0:
            raise PlanError(f"plan 'target' must be a number in [0, 1], got {v!r}")
        if not is_valid_sparsity(data["sparsity"], data.get("budget", "params")):
            raise PlanError(f"plan 'sparsity' must be {SPARSITY_RANGE_TEXT}, got {data['sparsity']!r}")
        for key in ("budget", "structure", "agent", "reward"):
            if key in data and not isinstance(data[key], str):
                raise PlanError(f"plan {key!r} must be a string")
        if data.get("budget", "params") not in budget_names():
            raise PlanError(f"plan 'budget' must be one of {budget_names()}, got {data['budget']!r}")
        structure, budget = data.get("structure", "unstructured"), data.get("budget", "params")
        if structure not in STRUCTURES:
            raise PlanError(f"plan 'structure' must be one of {STRUCTURES}, got {structure!r}")
        if budget not in SPACES[structure].budgets:
            takers = [s for s, kind in SPACES.items() if budget in kind.budgets]
            raise PlanError(f"plan 'budget' {budget!r} comes from {' or '.join(takers)} searches only "
                            f"(structure {' or '.join(repr(s) for s in takers)})")
        for key in ("seed", "episodes"):
            v = data.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise PlanError(f"plan {key!r} must be an integer or null, got {v!r}")
        for key in ("score", "baseline_score"):
            v = data.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)):
                raise PlanError(f"plan {key!r} must be a finite number or null, got {v!r}")
        if "metadata" in data and not isinstance(data["metadata"], dict):
            raise PlanError("plan 'metadata' must be an object")
        return cls(**{k: data[k] for k in data})

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path) -> "PruningPlan":
        """Read and check a plan file: a :class:`PlanError` naming the file if it is missing or not a
        valid plan; other ``OSError`` (no permission, ...) propagate as they are."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PlanError(f"{path}: not a valid JSON plan ({err})") from None
        except RecursionError:
            raise PlanError(f"{path}: not a valid JSON plan (nested too deeply)") from None
        except FileNotFoundError:
            raise PlanError(f"{path}: no such plan file") from None
        except IsADirectoryError:
            raise PlanError(f"{path}: a directory, not a plan file") from None
        try:
            return cls.from_dict(data)
        except PlanError as err:
            raise PlanError(f"{path}: {err}") from None


SPARSITY_RANGE_TEXT = "a number in [0, 1] (with budget 'latency' at most 1: a measured fraction below 0 is a slow-down)"


def is_valid_sparsity(value, budget: str) -> bool:
    """A fraction of the budget's cost in [0, 1]. The latency budget's is measured after compact, and
    ``1 - pruned / dense`` falls below 0 when the pruned model ran slower: kept as measured, never clamped."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return False
    return value <= 1.0 and (value >= 0.0 or budget == "latency")


def apply_plan(model: nn.Module, plan: PruningPlan, importance_scores: Optional[Dict[str, torch.Tensor]] = None,
               example_inputs: Optional[torch.Tensor] = None):
    """Prune ``model`` in place as ``plan`` says, through ``torch.nn.utils.prune``.

    Each tensor gets a :class:`PolicyUnstructured` hook removing its planned fraction of
    smallest-magnitude entries (or smallest ``importance_scores[name]``). Tensors that are
    already pruned keep their mask; the plan's fraction counts those entries. The whole
    plan is checked against the model before anything changes, and a failure part-way
    leaves the model as it was.

    A ``structure="channel"`` plan removes, per dependency group, its planned number of
    channels (the least important by group magnitude), masking every tensor of the group;
    ``example_inputs`` (default: shaped like the plan's ``metadata["input_shape"]``) trace
    the model to find the groups. The residual blocks listed in ``metadata["removed_blocks"]``
    (depth plans, ``agent="n2n"``) are masked to the identity with
    :func:`~torch_rlprune.structure.depth.mask_block`; :func:`~torch_rlprune.compact` then removes them.

    ``importance_scores`` are keyed by the plan's parameter names, each a tensor of its parameter's
    shape; a score that would go unused (another name, a ``(module, name)`` key, or any scores for a
    channel plan, which ranks channels by group magnitude) raises ``ValueError`` before the model changes.

    Returns:
        the same ``model``.
    """
    if not isinstance(plan, PruningPlan):
        raise TypeError(f"plan must be a PruningPlan, got {type(plan).__name__}")
    space_kind(plan.structure).apply_plan(model, plan, importance_scores, example_inputs)
    return model
