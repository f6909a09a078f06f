"""Property tests over randomly generated small architectures and targets.

For every generated model and target the budget is either met (within 0.5 percentage points,
counted from the masks) or, when no plan at all can meet it, refused with a ValueError that
leaves the model untouched. Which of the two applies is decided independently, by enumerating
the budget fractions reachable with whole weights (at most ``MAX_AMOUNT`` of each tensor).
"""
import math
from dataclasses import dataclass
from functools import reduce
from typing import List

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import (PRUNABLE, ModelState, RaisingReward, assert_binary_masks, inputs, macs_per_weight, mask_sparsity,
                     seeded)
from torch_rlprune import rl_prune

MAX_AMOUNT = 0.98
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# The budget here is over every weight: the first layer and the classifier are candidates too.
ALL_LAYERS = dict(protect_first_last=False)


# --------------------------------------------------------------------------- architectures
@dataclass
class Arch:
    kind: str              # "conv1d", "conv2d" or "mlp"
    in_channels: int
    size: int              # input length (1-D) or side (2-D); features for "mlp"
    body: List[tuple]      # (out_channels, kernel_size, groups, batchnorm) per layer
    head: List[int]        # hidden widths of the Linear head, then the classes
    conv_head: bool = False  # classify with a 1x1 conv and global pooling instead (no Linear at all)

    def build(self) -> nn.Sequential:
        layers, channels = [], self.in_channels
        conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d}.get(self.kind)
        norm = {"conv1d": nn.BatchNorm1d, "conv2d": nn.BatchNorm2d, "mlp": nn.BatchNorm1d}[self.kind]
        for out, kernel, groups, batchnorm in self.body:
            if conv is None:
                layers.append(nn.Linear(channels, out))
            else:
                layers.append(conv(channels, out, kernel, padding=kernel // 2, groups=groups))
            layers += [norm(out)] if batchnorm else []
            layers.append(nn.ReLU())
            channels = out
        if conv is not None and self.conv_head:
            pool = nn.AdaptiveAvgPool1d(1) if self.kind == "conv1d" else nn.AdaptiveAvgPool2d(1)
            return nn.Sequential(*layers, conv(channels, self.head[-1], 1), pool, nn.Flatten())
        if conv is not None:
            pool = nn.AdaptiveAvgPool1d(2) if self.kind == "conv1d" else nn.AdaptiveAvgPool2d(2)
            layers += [pool, nn.Flatten()]
            channels *= 2 if self.kind == "conv1d" else 4
        for width in self.head:
            layers += [nn.Linear(channels, width), nn.ReLU()]
            channels = width
        return nn.Sequential(*layers[:-1])  # no activation after the classifier

    def example(self, batch: int = 4) -> torch.Tensor:
        shape = {"conv1d": (batch, self.in_channels, self.size), "mlp": (batch, self.in_channels),
                 "conv2d": (batch, self.in_channels, self.size, self.size)}[self.kind]
        return inputs(shape)


@st.composite
def architectures(draw, max_width=16, max_depth=4):
    kind = draw(st.sampled_from(["conv1d", "conv2d", "mlp"]))
    in_channels = draw(st.integers(1, max_width) if kind == "mlp" else st.integers(1, 4))
    body, channels = [], in_channels
    for _ in range(draw(st.integers(1, max_depth))):
        out = draw(st.integers(1, max_width))
        common = math.gcd(channels, out)
        groups = draw(st.sampled_from([g for g in range(1, common + 1) if common % g == 0]))
        kernel = draw(st.integers(1, 5))
        body.append((out, kernel, 1 if kind == "mlp" else groups, draw(st.booleans())))
        channels = out
    head = draw(st.lists(st.integers(1, max_width), max_size=1)) + [draw(st.integers(2, 10))]
    conv_head = kind != "mlp" and draw(st.booleans())
    return Arch(kind, in_channels, draw(st.integers(5, 10)), body, head, conv_head)


targets = st.floats(0.05, 0.95, allow_nan=False)
budgets = st.sampled_from(["params", "macs"])


# --------------------------------------------------------------------------- independent feasibility
def reachable_neighbours(model: nn.Module, x: torch.Tensor, budget: str, target: float):
    """The budget fractions just below and just above ``target`` that some plan removes exactly.

    Plans remove whole weights, at most ``MAX_AMOUNT`` of each tensor; a weight costs 1 (params)
    or the MACs it takes part in (macs). ``None`` where no reachable fraction lies on that side.
    """
    modules = [m for m in model.modules() if isinstance(m, PRUNABLE)]
    per_weight = macs_per_weight(model, x) if budget == "macs" else {m: 1 for m in modules}
    scale = reduce(math.gcd, (per_weight[m] for m in modules))
    reach, total = 1, 0  # bit s set <=> a removed cost of s (in units of `scale`) is reachable
    for m in modules:
        cost, left = per_weight[m] // scale, math.floor(MAX_AMOUNT * m.weight.numel())
        total += cost * m.weight.numel()
        chunk = 1
        while left > 0:  # bounded knapsack, splitting the count into powers of two
            take = min(chunk, left)
            reach |= reach << (take * cost)
            left -= take
            chunk *= 2
    goal = target * total
    below = (reach & ((1 << (math.floor(goal) + 1)) - 1)).bit_length() - 1
    above_bits = reach >> math.ceil(goal)
    above = math.ceil(goal) + (above_bits & -above_bits).bit_length() - 1 if above_bits else None
    return below / total, (above / total if above is not None else None)


def reachable_gap(model, x, budget, target) -> float:
    """Distance from ``target`` to the nearest fraction a plan can remove."""
    return min(abs(f - target) for f in reachable_neighbours(model, x, budget, target) if f is not None)


def reachable_target(model, x, budget, wanted) -> float:
    """``wanted`` when a plan comes within 0.4 points of it, else the nearest fraction a plan removes exactly."""
    if reachable_gap(model, x, budget, wanted) <= 0.004:
        return wanted
    options = [f for f in reachable_neighbours(model, x, budget, wanted) if f is not None and 0 < f < 1]
    assume(options)
    return min(options, key=lambda f: abs(f - wanted))


def search_or_refusal(model, x, target, budget, **search):
    """Run rl_prune; the result when a plan can meet ``target``, None after a clean refusal when none can."""
    gap = reachable_gap(model, x, budget, target)
    # between 0.4 and 0.6 points rl_prune's closest plan (built greedily) may or may not find the exact
    # knapsack's plan: no single outcome is right there, so such examples are not drawn
    assume(not 0.004 < gap <= 0.006)
    state = ModelState.of(model)
    if gap > 0.006:
        with pytest.raises(ValueError, match="target"):
            rl_prune(model, target, data=x, budget=budget, max_amount=MAX_AMOUNT, verbose=False, **ALL_LAYERS,
                     **search)
        state.assert_unchanged(model)
        return None
    try:
        return rl_prune(model, target, data=x, budget=budget, max_amount=MAX_AMOUNT, verbose=False, **ALL_LAYERS,
                        **search)
    except ValueError as error:
        raise AssertionError(f"refused a target {gap:.5f} away from a reachable plan: {error}") from None


def check_pruned(model, arch, x, target, budget, out_shape):
    modules = [m for m in model.modules() if isinstance(m, PRUNABLE)]
    assert all(hasattr(m, "weight_mask") for m in modules), "every layer runs, so every layer is in the plan"
    achieved = mask_sparsity(model, budget, x, modules)
    assert abs(achieved - target) <= 0.005, f"{arch}: achieved {achieved:.5f} for {target} ({budget})"
    assert_binary_masks(model)
    with torch.no_grad():
        out = model(x)
    assert out.shape == out_shape and bool(torch.isfinite(out).all())


def prepared(arch, seed):
    model, x = seeded(arch.build, seed), arch.example()
    with torch.no_grad():
        out_shape = model.eval()(x).shape
    return model, x, out_shape


# --------------------------------------------------------------------------- properties
@PROPERTY_SETTINGS
@given(arch=architectures(), wanted=targets, budget=budgets, episodes=st.integers(2, 4), seed=st.integers(0, 3))
def test_random_search_meets_any_reachable_budget(arch, wanted, budget, episodes, seed):
    model, x, out_shape = prepared(arch, seed)
    target = reachable_target(model, x, budget, wanted)
    rl_prune(model, target, data=x, budget=budget, agent="random", episodes=episodes, seed=seed,
             max_amount=MAX_AMOUNT, verbose=False, **ALL_LAYERS)
    check_pruned(model, arch, x, target, budget, out_shape)


@PROPERTY_SETTINGS
@given(arch=architectures(), wanted=targets, budget=budgets, seed=st.integers(0, 3))
def test_amc_meets_any_reachable_budget(arch, wanted, budget, seed):
    model, x, out_shape = prepared(arch, seed)
    target = reachable_target(model, x, budget, wanted)
    rl_prune(model, target, data=x, budget=budget, agent="amc", episodes=3, agent_config={"warmup": 1},
             seed=seed, max_amount=MAX_AMOUNT, verbose=False, **ALL_LAYERS)
    check_pruned(model, arch, x, target, budget, out_shape)


@PROPERTY_SETTINGS
@given(arch=architectures(max_width=3, max_depth=2), target=targets, budget=budgets,
       agent=st.sampled_from(["random", "amc"]))
def test_tiny_models_meet_the_budget_or_refuse_it_cleanly(arch, target, budget, agent):
    # a handful of weights: many targets lie more than 0.5 points from every plan
    model, x, out_shape = prepared(arch, 0)
    if search_or_refusal(model, x, target, budget, agent=agent, episodes=3, seed=0,
                         agent_config={"warmup": 1} if agent == "amc" else None):
        check_pruned(model, arch, x, target, budget, out_shape)


def reachable_params_target(model, wanted):
    """The params-budget fraction nearest ``wanted`` that whole weights can remove exactly."""
    sizes = [m.weight.numel() for m in model.modules() if isinstance(m, PRUNABLE)]
    most = sum(math.floor(MAX_AMOUNT * n) for n in sizes)
    return min(max(round(wanted * sum(sizes)), 1), most) / sum(sizes)


@PROPERTY_SETTINGS
@given(arch=architectures(), agent=st.sampled_from(["random", "amc"]), fail_at=st.integers(1, 5),
       training=st.booleans(), wanted=targets)
def test_a_failing_reward_leaves_any_model_untouched(arch, agent, fail_at, training, wanted):
    model, x, _ = prepared(arch, 0)
    model.train(training)
    target = reachable_params_target(model, wanted)
    state = ModelState.of(model)
    reward = RaisingReward(x, fail_at, RuntimeError("reward failed"))
    try:
        rl_prune(model, target, data=x, reward=reward, agent=agent, episodes=4,
                 agent_config={"warmup": 1} if agent == "amc" else None, max_amount=MAX_AMOUNT, verbose=False,
                 **ALL_LAYERS)
    except RuntimeError as error:
        assert error is reward.error, f"failed for another reason: {error!r}"
    else:
        assert reward.calls < fail_at, "the reward raised, yet rl_prune returned"
        assume(False)  # repeated plans are scored once: the search ended before call `fail_at`
    state.assert_unchanged(model)
