"""What a budget counts: the registry of ``budget=`` names.

A budget is a measure of a model's cost that pruning lowers. Where it comes from is a fact of the
model side, so the measures live here and everything above (the spaces, the plan, the options, the
results, the command line) asks this registry instead of comparing names:

* ``per_weight``: the cost one weight of a tensor carries. Unstructured pruning removes weights one
  by one, so a plan's cost is the sum over its masked weights (:func:`pruned_fraction`).
* ``of_counts``: the cost of a model from the (MACs per sample, parameters) the structure counts
  (:func:`~torch_rlprune.structure.channel.counting.count_macs_params`). Channel pruning removes
  whole rows and columns, whose MACs depend on two groups at once; the channel cost model answers
  these two numbers without a forward pass.
* ``measured``: timed on a runtime (``"latency"``). Only a space with a measured cost model takes it
  (the channel space's calibrated latency table).

A new budget that is a function of what the model side counts is one :func:`register_budget` call,
in this file or the user's own code; every space that can count it accepts it (which one can is the
space's rule, ``SpaceKind.counts``)::

    register_budget(BudgetMeasure("bytes", "bytes of float32 weights",
                                  per_weight=lambda layer: 4, of_counts=lambda macs, params: 4 * params))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

__all__ = ["BudgetMeasure", "register_budget", "budget_measure", "budget_names", "pruned_fraction", "BUDGET_MEASURES"]


@dataclass(frozen=True)
class BudgetMeasure:
    """One ``budget=`` name and how each structure counts it (see the module docstring)."""

    name: str
    description: str
    """What it counts, in a few words (argument errors and the command line's help list it)."""
    per_weight: Optional[Callable] = None
    """``(PrunableTensor) -> float``: the cost one weight of the tensor carries; None: weights carry
    none on their own (unstructured pruning cannot budget it)."""
    of_counts: Optional[Callable[[int, int], float]] = None
    """``(MACs per sample, parameters) -> float``: a model's cost; None: not a function of the counts."""
    traced: bool = False
    """``per_weight`` reads the feature-map sizes of a traced forward (``PrunableTensor.macs_per_weight``)."""
    measured: bool = False
    """Timed on a runtime, not counted: only a space with a measured cost model takes it."""

    def cost_of_counts(self, macs_params: Tuple[int, int]) -> float:
        if self.of_counts is None:
            raise ValueError(f"budget {self.name!r} is not a function of MACs and parameters")
        return float(self.of_counts(*macs_params))

    def removed_fraction(self, dense: Tuple[int, int], after: Tuple[int, int]) -> float:
        """Fraction of the dense model's cost that a model counting ``after`` no longer has."""
        return 1.0 - self.cost_of_counts(after) / self.cost_of_counts(dense)


BUDGET_MEASURES: Dict[str, BudgetMeasure] = {}
"""``budget=`` name -> :class:`BudgetMeasure`, in registration order."""


def register_budget(measure: BudgetMeasure) -> BudgetMeasure:
    if not isinstance(measure, BudgetMeasure):
        raise TypeError(f"register_budget takes a BudgetMeasure, got {type(measure).__name__}")
    if not isinstance(measure.name, str) or not measure.name.isidentifier():
        raise ValueError(f"a budget's name must be an identifier, got {measure.name!r}")
    if measure.per_weight is None and measure.of_counts is None and not measure.measured:
        raise ValueError(f"budget {measure.name!r} counts nothing: give per_weight, of_counts or measured=True")
    BUDGET_MEASURES[measure.name] = measure
    return measure


def budget_names() -> Tuple[str, ...]:
    return tuple(BUDGET_MEASURES)


def budget_measure(budget: str) -> BudgetMeasure:
    if not isinstance(budget, str) or budget not in BUDGET_MEASURES:
        raise ValueError(f"budget must be one of {budget_names()}, got {budget!r}")
    return BUDGET_MEASURES[budget]


def pruned_fraction(layers: List, budget: str = "params") -> float:
    """Fraction of the layers' cost (``budget``: per weight, as :class:`BudgetMeasure` counts it)
    that their prune masks remove."""
    per_weight = budget_measure(budget).per_weight
    if per_weight is None:
        raise ValueError(f"budget {budget!r} is not counted per weight")
    removed = total = 0.0
    for layer in layers:
        mask = layer.existing_mask
        cost = float(per_weight(layer))
        total += layer.numel * cost
        if mask is not None:
            removed += float((mask == 0).sum()) * cost
    return removed / total


register_budget(BudgetMeasure("params", "weights (parameters)", per_weight=lambda layer: 1.0,
                              of_counts=lambda macs, params: params))
register_budget(BudgetMeasure("macs", "multiply-accumulates per sample", per_weight=lambda layer: layer.macs_per_weight,
                              of_counts=lambda macs, params: macs, traced=True))
register_budget(BudgetMeasure("latency", "wall time on the runtime, measured", measured=True))
