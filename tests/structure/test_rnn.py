"""Recurrent layers in the unstructured search: every weight_ih_l*/weight_hh_l* (and LSTM's
weight_hr_l*) matrix is a step of the MDP, pruned through the prune API."""
import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from helpers import assert_budget_met
from torch_rlprune import PruningPlan, apply_plan, rl_prune
from torch_rlprune.structure.tensors import find_prunable, recurrent_weight_names, trace_execution

STEPS, FEATURES, HIDDEN = 10, 12, 16


class SequenceClassifier(nn.Module):
    def __init__(self, cell, bidirectional, batch_first, num_layers, proj_size=0):
        super().__init__()
        extra = {"proj_size": proj_size} if proj_size else {}
        self.batch_first = batch_first
        self.rnn = cell(FEATURES, HIDDEN, num_layers=num_layers, batch_first=batch_first,
                        bidirectional=bidirectional, **extra)
        self.head = nn.Linear((proj_size or HIDDEN) * (2 if bidirectional else 1), 5)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1] if self.batch_first else out[-1])


def build(cell, bidirectional, batch_first, num_layers, proj_size=0):
    torch.manual_seed(0)
    model = SequenceClassifier(cell, bidirectional, batch_first, num_layers, proj_size).eval()
    x = torch.randn(8, STEPS, FEATURES) if batch_first else torch.randn(STEPS, 8, FEATURES)
    return model, x


def matrices(model):
    return [(n, getattr(model.rnn, n)) for n in recurrent_weight_names(model.rnn)] + [("head", model.head.weight)]


def removed_fraction(model, budget="params"):
    removed = total = 0.0
    for name, w in matrices(model):
        cost = 1 if budget == "params" or name == "head" else STEPS  # a recurrent weight runs once per step
        removed += float((w == 0).sum()) * cost
        total += w.numel() * cost
    return removed / total


CASES = list(itertools.product((nn.LSTM, nn.GRU, nn.RNN), (False, True), (False, True), (1, 2)))
IDS = [f"{c.__name__}-{'bi' if b else 'uni'}-{'bf' if f else 'tf'}-{n}l" for c, b, f, n in CASES]


@pytest.mark.parametrize("cell, bidirectional, batch_first, num_layers", CASES, ids=IDS)
def test_recurrent_weight_names_are_searched_pruned_and_removable(cell, bidirectional, batch_first, num_layers):
    model, x = build(cell, bidirectional, batch_first, num_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no flat-weights or other warnings
        # repair="none": the plan must reproduce the model bit for bit (the refit, which changes kept
        # values only, has its own tests in tests/rewards/test_recurrent_refit.py)
        result = rl_prune(model, 0.6, data=x, agent="random", episodes=3, seed=0, verbose=False,
                          protect_first_last=False, repair="none")
        expected = {f"rnn.{n}" for n in recurrent_weight_names(model.rnn)} | {"head.weight"}
        assert set(result.plan.amounts) == expected
        assert_budget_met(removed_fraction(model), 0.6)
        assert any(result.plan.amounts[f"rnn.{n}"] > 0 for n in recurrent_weight_names(model.rnn))
        assert prune.is_pruned(model.rnn)
        y = model(x)
    model.train()
    y.sum().backward()
    grad = model.rnn.weight_hh_l0_orig.grad
    assert grad is not None and bool((grad[model.rnn.weight_hh_l0_mask == 0] == 0).all()), \
        "masked entries must get no gradient through the mask"

    other, _ = build(cell, bidirectional, batch_first, num_layers)
    apply_plan(other, PruningPlan.from_dict(result.plan.to_dict()))
    model.eval()
    assert torch.equal(other(x), model(x)), "the plan reproduces the masks"

    for name in recurrent_weight_names(model.rnn):
        prune.remove(model.rnn, name)
    assert not prune.is_pruned(model.rnn)
    assert torch.equal(model(x), other(x))
    assert_budget_met(removed_fraction(model), 0.6)


def test_lstm_projection_matrices_are_steps_too():
    model, x = build(nn.LSTM, True, True, 2, proj_size=8)
    result = rl_prune(model, 0.5, data=x, agent="random", episodes=3, seed=0, verbose=False)
    assert {"rnn.weight_hr_l0", "rnn.weight_hr_l1_reverse"} <= set(result.plan.amounts)
    assert_budget_met(removed_fraction(model), 0.5)


@pytest.mark.parametrize("batch_first", [False, True])
def test_macs_budget_counts_a_recurrent_weight_once_per_time_step(batch_first):
    model, x = build(nn.GRU, True, batch_first, 2)
    rl_prune(model, 0.5, data=x, agent="random", episodes=3, budget="macs", seed=0, verbose=False,
             protect_first_last=False)
    assert_budget_met(removed_fraction(model, "macs"), 0.5)


def test_recurrent_steps_describe_layer_direction_and_time_steps():
    model, x = build(nn.LSTM, True, True, 2)
    layers, _ = trace_execution(model, find_prunable(model), lambda: model(x))
    by_name = {layer.name: layer for layer in layers}
    ih1r = by_name["rnn.weight_ih_l1_reverse"]
    assert (ih1r.kind, ih1r.kernel_size, ih1r.stride) == ("lstm", 2, 2)  # layer 2, reverse direction
    assert (ih1r.in_channels, ih1r.out_channels) == (2 * HIDDEN, 4 * HIDDEN)  # both directions in, 4 gates out
    assert by_name["rnn.weight_hh_l0"].in_channels == HIDDEN
    assert by_name["rnn.weight_hh_l0"].macs_per_weight == STEPS
    assert by_name["head.weight"].macs_per_weight == 1
    assert [n for n in by_name][-1] == "head.weight", "the head runs after the recurrent layer"


def test_only_recurrent_weight_matrices_can_be_named_in_parameters():
    model, x = build(nn.LSTM, False, True, 1)
    with pytest.raises(ValueError, match="weight matrices"):
        rl_prune(model, 0.5, data=x, agent="random", episodes=2, parameters=[(model.rnn, "bias_ih_l0")],
                 verbose=False)
    result = rl_prune(model, 0.5, data=x, agent="random", episodes=2, verbose=False,
                      parameters=[(model.rnn, "weight_ih_l0"), (model.rnn, "weight_hh_l0")])
    assert set(result.plan.amounts) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0"}
