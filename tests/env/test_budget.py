"""Budget accounting: the generic (search-based) clipping must agree with the closed forms
on additive costs, since non-additive budgets (channels) rely on it alone."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_rlprune.env.budget import AdditiveBudget, Budget


class SearchOnly(Budget):
    """The same additive cost, answered only through `removed`: exercises the base class."""

    def __init__(self, additive: AdditiveBudget):
        self.inner = additive
        self.total, self.k_min, self.k_max = additive.total, additive.k_min, additive.k_max
        self.step_cost = additive.step_cost

    def removed(self, k):
        return self.inner.removed(k)


@st.composite
def problems(draw):
    steps = draw(st.integers(1, 6))
    numel = draw(st.lists(st.integers(1, 200), min_size=steps, max_size=steps))
    unit = draw(st.lists(st.sampled_from([1, 2, 3, 16, 64, 256]), min_size=steps, max_size=steps))
    k_min = [draw(st.integers(0, n // 3)) for n in numel]
    k_max = [draw(st.integers(lo, n)) for lo, n in zip(k_min, numel)]
    budget = AdditiveBudget(numel, unit, k_min, k_max)
    goal = draw(st.floats(budget.removed(budget.k_min), budget.removed(budget.k_max)))
    decided = [draw(st.integers(lo, hi)) for lo, hi in zip(budget.k_min, budget.k_max)]
    return budget, goal, np.array(decided, dtype=np.int64)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(problems())
def test_search_based_clipping_equals_the_closed_form(problem):
    budget, goal, k = problem
    generic = SearchOnly(budget)
    for t in range(len(k)):
        lo, hi = budget.bounds(k, t, goal)
        assert generic.bounds(k, t, goal) == (lo, hi) or lo == hi  # ties broken differently are fine
        glo, ghi = generic.bounds(k, t, goal)
        assert budget.k_min[t] <= glo <= ghi <= budget.k_max[t]


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(problems())
def test_clipped_episodes_land_on_the_goal_after_repair(problem):
    budget, goal, wishes = problem
    for model in (budget, SearchOnly(budget)):
        k = budget.k_min.copy()
        for t in range(len(k)):
            lo, hi = model.bounds(k, t, goal)
            k[t] = min(max(wishes[t], lo), hi)
        k = model.repair(k, goal)
        assert np.all(budget.k_min <= k) and np.all(k <= budget.k_max)
        # Within the coarsest unit: every step could still move by one unit one way or the other.
        assert abs(budget.removed(k) - goal) <= budget.unit_cost.max() / 2 + 1e-6
