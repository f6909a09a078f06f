"""A search that stops before its episodes are spent: time_budget= and patience= (search/stopping.py)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import ModelState, assert_budget_met, inputs, seeded, small_cnn
from torch_rlprune import rl_prune
from torch_rlprune.search.stopping import SearchStopped, StopRule


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def episode(best, target=0.5):
    return SimpleNamespace(best_reward=best, target=target)


def test_the_time_budget_ends_the_loop_at_the_first_episode_past_the_deadline():
    clock = FakeClock()
    rule = StopRule(time_budget=10.0, clock=clock)
    rule.start()
    clock.now = 9.9
    rule.after_episode(episode(0.1))
    clock.now = 10.0
    with pytest.raises(SearchStopped) as stopped:
        rule.after_episode(episode(0.2))
    assert stopped.value.reason == "time_budget"


def test_a_share_of_the_budget_moves_the_deadline():
    clock = FakeClock()
    rule = StopRule(time_budget=10.0, clock=clock)
    rule.start(share=0.5)
    clock.now = 5.0
    with pytest.raises(SearchStopped):
        rule.after_episode(episode(0.1))


def test_patience_counts_episodes_without_a_better_plan_of_their_target():
    rule = StopRule(patience=2)
    rule.start()
    rule.after_episode(episode(0.5, target=0.5))
    rule.after_episode(episode(0.5, target=0.5))          # no better: 1
    rule.after_episode(episode(0.3, target=0.7))          # first of another target: better
    rule.after_episode(episode(0.3, target=0.7))          # 1
    with pytest.raises(SearchStopped) as stopped:
        rule.after_episode(episode(0.5, target=0.5))      # 2
    assert stopped.value.reason == "patience"


def test_patience_counts_from_a_best_chosen_again_among_fewer_plans():
    # N2N's architecture choice re-ranks the results: the best falls, and what follows gets its patience
    rule = StopRule(patience=2)
    rule.start()
    rule.after_episode(episode(0.9))
    rule.after_episode(episode(0.9))          # no better: 1
    rule.after_episode(episode(0.6))          # re-ranked: counted from 0.6
    rule.after_episode(episode(0.6))          # 1
    with pytest.raises(SearchStopped):
        rule.after_episode(episode(0.6))      # 2


def test_an_inactive_rule_never_stops():
    rule = StopRule()
    rule.start()
    for _ in range(100):
        rule.after_episode(episode(-math.inf))
    assert not rule.active


def _search(**kwargs):
    model = seeded(small_cnn, 0)
    return rl_prune(model, 0.5, data=inputs((32, 1, 16, 16)), agent="random", verbose=False, seed=3, **kwargs)


def test_patience_ends_a_seeded_search_early_and_reproducibly():
    first, second = _search(episodes=40, patience=2), _search(episodes=40, patience=2)
    stopped = first.plan.metadata["stopped"]
    assert stopped["reason"] == "patience" and stopped["of"] == 40
    assert stopped["episodes"] == first.plan.episodes < 40
    assert first.plan.amounts == second.plan.amounts and first.plan.episodes == second.plan.episodes
    assert_budget_met(first.sparsity, 0.5)


def test_a_spent_time_budget_returns_the_best_plan_after_one_episode():
    result = _search(episodes=40, time_budget=1e-9)
    assert result.plan.metadata["stopped"] == {"reason": "time_budget", "episodes": 1, "of": 40}
    assert result.plan.episodes == 1
    assert_budget_met(result.sparsity, 0.5)


def test_a_budget_that_is_not_reached_changes_nothing():
    plain, budgeted = _search(episodes=5), _search(episodes=5, time_budget=1e6, patience=1000)
    assert "stopped" not in budgeted.plan.metadata
    assert plain.plan.amounts == budgeted.plan.amounts and budgeted.plan.episodes == 5


def test_one_search_per_target_shares_the_budget_and_every_target_gets_a_plan():
    model = seeded(small_cnn, 0)
    results = rl_prune(model, [0.4, 0.6], data=inputs((32, 1, 16, 16)), agent="random", episodes=30,
                       time_budget=1e-9, verbose=False)
    for target, result in results.items():
        assert result.plan.metadata["stopped"]["reason"] == "time_budget"
        assert result.plan.episodes == 1
        assert_budget_met(result.plan.sparsity, target)


@pytest.mark.parametrize("bad", [dict(time_budget=0), dict(time_budget=-1.0), dict(time_budget=float("nan")),
                                 dict(time_budget=True), dict(time_budget=float("inf")), dict(patience=0),
                                 dict(patience=1.5)])
def test_bad_stop_settings_are_refused_before_the_model_is_touched(bad):
    model = seeded(small_cnn, 0)
    state = ModelState.of(model)
    with pytest.raises(ValueError, match=next(iter(bad))):
        rl_prune(model, 0.5, data=inputs((8, 1, 16, 16)), agent="random", episodes=2, verbose=False, **bad)
    state.assert_unchanged(model)


def test_a_stopped_amc_search_keeps_its_agent_state_consistent():
    """The stop ends AMC between two episodes: its history and best plan are whole."""
    model = seeded(small_cnn, 0)
    result = rl_prune(model, 0.5, data=inputs((32, 1, 16, 16)), agent="amc", episodes=12,
                      agent_config={"warmup": 2}, patience=3, verbose=False)
    history = result.history
    assert len(history) == result.plan.episodes <= 12
    assert np.isfinite(result.plan.score)
    assert_budget_met(result.sparsity, 0.5)


def test_the_progress_bar_gets_an_eta_before_the_first_episode_and_the_budget_left_after():
    clock = FakeClock()
    assert StopRule().forecast(100, 0.5) == "eta~100s"             # two passes an episode
    assert StopRule(time_budget=30.0).forecast(100, 0.5) == "stops within 30s"
    assert StopRule(time_budget=300.0).forecast(100, 0.5) == "eta~100s"
    rule = StopRule(time_budget=30.0, clock=clock)
    assert StopRule().remaining() == {} and rule.remaining() == {}  # not started: no deadline yet
    rule.start()
    clock.now = 12.4
    assert rule.remaining() == {"left": "18s"}
    clock.now = 40.0
    assert rule.remaining() == {"left": "0s"}
