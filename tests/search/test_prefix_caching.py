"""Prefix caching in a search (structure/prefix_cache.py): the same history, plan and scores as
the uncached search, sooner, within the memory bound it reports."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import seeded
from torch_rlprune import rl_prune


@pytest.fixture
def calibration(fmnist_train_split):
    _, (x, y) = fmnist_train_split
    return x, y


def _search(model, data, agent, **kwargs):
    return rl_prune(model, 0.85, data=data, agent=agent, episodes=8, verbose=False, calibration_samples=512,
                    seed=3, **kwargs)


def _trace(result):
    return [(h["reward"], h["amounts"], h["evaluations"]) for h in result.history]


@pytest.mark.parametrize("agent, screen", [("purl", 0), ("purl", None), ("amc", 0), ("random", None)])
def test_a_cached_search_is_the_uncached_search(agent, screen, trained_fmnist_cnn, calibration):
    plain = _search(copy.deepcopy(trained_fmnist_cnn), calibration, agent, screen=screen, cache_mb=0)
    cached = _search(trained_fmnist_cnn, calibration, agent, screen=screen)
    assert _trace(cached) == _trace(plain)
    assert cached.plan.amounts == plain.plan.amounts and cached.plan.score == plain.plan.score
    assert "prefix_cache" not in plain.plan.metadata
    stats = cached.plan.metadata["prefix_cache"]
    assert stats["max_mb"] == 256.0 and stats["peak_mb"] <= stats["max_mb"]
    assert stats["cuts"] > 0 and stats["forwards"] > 0
    if agent == "purl":   # one more layer decided per step: the forwards of later steps replay a prefix
        assert stats["reused"] > stats["forwards"] / (2 if screen == 0 else 4) and stats["skipped_share"] > 0.1
        assert stats["peak_mb"] > 0


def test_the_bound_holds_in_a_search(trained_fmnist_cnn, calibration):
    result = _search(trained_fmnist_cnn, calibration, "purl", screen=0, cache_mb=0.5)
    stats = result.plan.metadata["prefix_cache"]
    assert stats["max_mb"] == 0.5 and stats["peak_mb"] <= 0.5


class NeedsFourSamples(nn.Module):
    """A forward that refuses batches under 4 (as batch statistics may): the two-sample trace fails,
    the search does not."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 3), nn.Linear(4, 10)

    def forward(self, x):
        if len(x) < 4:
            raise RuntimeError("batches of 4 or more")
        return self.head(self.conv(x).mean((2, 3)))


def test_a_model_the_trace_cannot_run_is_searched_without_the_cache():
    model = seeded(NeedsFourSamples)
    x = torch.randn(64, 1, 16, 16)
    with pytest.warns(UserWarning, match="prefix caching is off"):
        result = rl_prune(model, 0.5, data=x, agent="random", episodes=3, verbose=False, protect_first_last=False)
    assert "prefix_cache" not in result.plan.metadata and abs(result.sparsity - 0.5) < 0.01
