"""Hidden-unit (structured) pruning of LSTM / GRU / RNN layers: recurrent layers join
torch-pruning dependency groups through our RecurrentPruner, masks equal removal, and
`compact` shrinks hidden_size."""
import itertools
import json
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from helpers import ModelState, RaisingReward
from torch_rlprune import PruningPlan, apply_plan, compact, rl_prune
from torch_rlprune.structure.channel import ChannelStructure, apply_channel_plan, count_macs_params
from torch_rlprune.structure.channel._util import ChannelPruningError
from torch_rlprune.structure.channel.recurrent import RecurrentPruner, remove_hidden_units

STEPS, FEATURES, WIDTH, HIDDEN, CLASSES = 9, 10, 24, 16, 5


class SequenceClassifier(nn.Module):
    """Linear input projection -> recurrent layer -> Linear head on the last time step."""

    def __init__(self, cell, bidirectional, batch_first, num_layers):
        super().__init__()
        self.batch_first = batch_first
        self.proj = nn.Linear(FEATURES, WIDTH)
        self.rnn = cell(WIDTH, HIDDEN, num_layers=num_layers, batch_first=batch_first, bidirectional=bidirectional)
        self.head = nn.Linear(HIDDEN * (2 if bidirectional else 1), CLASSES)

    def forward(self, x):
        out, _ = self.rnn(torch.relu(self.proj(x)))
        return self.head(out[:, -1] if self.batch_first else out[-1])


def build(cell, bidirectional=False, batch_first=True, num_layers=1, seed=0):
    torch.manual_seed(seed)
    model = SequenceClassifier(cell, bidirectional, batch_first, num_layers).eval()
    g = torch.Generator().manual_seed(1)
    shape = (12, STEPS, FEATURES) if batch_first else (STEPS, 12, FEATURES)
    return model, torch.randn(*shape, generator=g)


def pruned_tensors(model):
    return [(m, n[:-len("_mask")]) for m in model.modules() for n, _ in m.named_buffers(recurse=False)
            if n.endswith("_mask")]


CASES = list(itertools.product((nn.LSTM, nn.GRU, nn.RNN), (1, 2), (False, True), (False, True)))
IDS = [f"{c.__name__}-{n}l-{'bi' if b else 'uni'}-{'bf' if f else 'tf'}" for c, n, b, f in CASES]


@pytest.mark.parametrize("cell, num_layers, bidirectional, batch_first", CASES, ids=IDS)
def test_hidden_units_are_searched_masked_and_compacted(cell, num_layers, bidirectional, batch_first):
    model, x = build(cell, bidirectional, batch_first, num_layers)
    dense_macs, dense_params = count_macs_params(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no flat-weights or other warnings, masked or compacted
        # max_amount 0.6: the input projection alone cannot reach the target, hidden units must go
        # repair="none": the plan alone must rebuild this model (a refit would change kept weights: test_repair.py)
        result = rl_prune(model, 0.5, data=x, structure="channel", budget="macs", agent="random", episodes=6,
                          max_amount=0.6, seed=0, verbose=False, repair="none")
        macs, _ = count_macs_params(model, x)
        assert abs(1 - macs / dense_macs - 0.5) <= 0.02, "budget met, counted on the masked model"
        assert prune.is_pruned(model.rnn)
        with torch.no_grad():
            masked = model(x)

        # the plan (JSON) rebuilds the same masks on a fresh model; prune.remove keeps the output
        twin, _ = build(cell, bidirectional, batch_first, num_layers)
        apply_plan(twin, PruningPlan.from_dict(json.loads(json.dumps(result.plan.to_dict()))))
        with torch.no_grad():
            assert torch.equal(twin(x), masked)
        for module, name in pruned_tensors(twin):
            prune.remove(module, name)
        assert not any(prune.is_pruned(m) for m in twin.modules())
        with torch.no_grad():
            assert torch.equal(twin(x), masked)

        info = result.compact()
        assert not info["failed"]
        hidden = model.rnn.hidden_size
        assert hidden < HIDDEN, "hidden units were physically removed"
        assert model.head.in_features == hidden * (2 if bidirectional else 1)
        assert model.rnn.input_size == model.proj.out_features
        with torch.no_grad():
            compacted = model(x)
        assert (compacted - masked).abs().max() < 1e-5, "masked output equals compacted output"
        assert count_macs_params(model, x)[0] == pytest.approx(macs, rel=1e-3)
        assert sum(p.numel() for p in model.parameters()) < dense_params

    model.train()
    model(x).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.rnn.parameters())
    # the module's flat weights are its (new) parameters, so cuDNN/MKLDNN see one consistent set
    assert all(a is b for a, b in zip(model.rnn._flat_weights, [getattr(model.rnn, n)
                                                                 for n in model.rnn._flat_weights_names]))


def test_a_masked_hidden_unit_is_the_unit_removed():
    """Unit i goes from every gate's rows, the recurrent columns and both directions of the
    next layer's input; with zero initial states the masked model computes the smaller one."""
    for cell in (nn.LSTM, nn.GRU, nn.RNN):
        model, x = build(cell, bidirectional=True, num_layers=2)
        s = ChannelStructure(model, x, validate=False)
        group = s.group("rnn:out")
        apply_channel_plan(model, {"rnn:out": 5}, structure=s)
        gone = group.removed_units(5).tolist()
        gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[cell]
        rows = [g * HIDDEN + u for g in range(gates) for u in gone]
        for name in ("weight_ih_l0", "weight_hh_l1_reverse", "bias_hh_l0_reverse", "bias_ih_l1"):
            mask = getattr(model.rnn, name + "_mask")
            assert bool((mask[rows] == 0).all()) and int((mask.reshape(mask.shape[0], -1) == 0).all(1).sum()) == len(rows)
        assert bool((model.rnn.weight_hh_l0_mask[:, gone] == 0).all())
        assert bool((model.rnn.weight_ih_l1_reverse_mask[:, gone + [HIDDEN + u for u in gone]] == 0).all())
        assert bool((model.head.weight_mask[:, gone + [HIDDEN + u for u in gone]] == 0).all())
        with torch.no_grad():
            masked = model(x)
        compact(model, x)
        assert model.rnn.hidden_size == HIDDEN - 5
        with torch.no_grad():
            assert (model(x) - masked).abs().max() < 1e-6


def test_embedding_and_conv_inputs_shrink_with_the_recurrent_layer():
    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.conv = nn.Conv1d(16, 20, 3, padding=1)
            self.gru = nn.GRU(20, 12, batch_first=True, bidirectional=True)
            self.head = nn.Linear(24, 3)

        def forward(self, tokens):
            h = torch.relu(self.conv(self.embed(tokens).transpose(1, 2))).transpose(1, 2)
            out, _ = self.gru(h)
            return self.head(out.mean(1))

    torch.manual_seed(0)
    model, tokens = Text().eval(), torch.randint(0, 50, (6, 11))
    s = ChannelStructure(model, tokens)
    assert [g.key for g in s.groups] == ["embed:out", "conv:out", "gru:out"]
    assert dict(s.group("conv:out").layers)["gru"] == "in"
    apply_channel_plan(model, {"embed:out": 0.5, "conv:out": 0.5, "gru:out": 0.5}, structure=s)
    with torch.no_grad():
        masked = model(tokens)
    info = compact(model, tokens)
    assert not info["failed"]
    assert (model.embed.embedding_dim, model.conv.out_channels, model.gru.input_size) == (8, 10, 10)
    assert (model.gru.hidden_size, model.head.in_features) == (6, 12)
    with torch.no_grad():
        assert (model(tokens) - masked).abs().max() < 1e-5


class FinalStateHead(nn.Module):
    def __init__(self, bidirectional):
        super().__init__()
        self.rnn = nn.LSTM(8, 12, num_layers=2, bidirectional=bidirectional)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        _, (h_n, _) = self.rnn(x)
        return self.head(h_n[-1])


def test_a_head_on_the_final_state_is_coupled_or_excluded_with_a_reason():
    torch.manual_seed(0)
    x = torch.randn(7, 5, 8)
    uni = FinalStateHead(bidirectional=False).eval()
    s = ChannelStructure(uni, x)
    assert dict(s.group("rnn:out").layers)["head"] == "in", "h_n[-1] feeds the head: same hidden units"
    apply_channel_plan(uni, {"rnn:out": 4}, structure=s)
    with torch.no_grad():
        masked = uni(x)
    compact(uni, x)
    assert (uni.rnn.hidden_size, uni.head.in_features) == (8, 8)
    with torch.no_grad():
        assert (uni(x) - masked).abs().max() < 1e-6

    bi = FinalStateHead(bidirectional=True).eval()
    s = ChannelStructure(bi, x)
    assert "rnn:out" not in [g.key for g in s.groups], "h_n[-1] of a bidirectional LSTM is one direction only"
    assert "out of range" in {e.key: e.reason for e in s.excluded}["rnn:out"]


def test_unsupported_recurrent_layers_are_excluded_with_the_reason():
    class Projected(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 10)
            self.rnn = nn.LSTM(10, 12, proj_size=4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.rnn(self.proj(x))[0][:, -1])

    torch.manual_seed(0)
    model, x = Projected().eval(), torch.randn(3, 5, 6)
    s = ChannelStructure(model, x)
    reasons = {e.key: e.reason for e in s.excluded}
    assert "proj_size=4" in reasons["rnn:out"]
    assert "proj_size=4" in reasons["proj:out"], "the input side of the same layer is refused too"
    assert not s.groups


def test_excluding_the_recurrent_layer_keeps_its_hidden_units():
    model, x = build(nn.LSTM)
    result = rl_prune(model, 0.3, data=x, structure="channel", agent="random", episodes=3, exclude=["rnn"],
                      seed=0, verbose=False)
    assert "rnn:out" not in result.plan.amounts
    assert hasattr(model.rnn, "weight_ih_l0_mask"), "its input columns still shrink with the projection"
    assert not hasattr(model.rnn, "weight_hh_l0_mask")
    result.compact()
    assert model.rnn.hidden_size == HIDDEN and model.rnn.input_size < WIDTH


def test_the_pruner_refuses_half_a_bidirectional_unit():
    rnn = nn.GRU(6, 8, bidirectional=True)
    with pytest.raises(ChannelPruningError, match="every direction"):
        RecurrentPruner().prune_out_channels(rnn, [3])          # unit 3 forward only
    RecurrentPruner().prune_out_channels(rnn, [3, 11])
    assert rnn.hidden_size == 7 and rnn.weight_hh_l0_reverse.shape == (21, 7)
    with pytest.raises(ChannelPruningError, match="cannot remove"):
        remove_hidden_units(rnn, range(7))                      # every unit


def test_macs_of_time_major_and_batch_first_models_agree():
    tm, x_tm = build(nn.LSTM, batch_first=False, num_layers=2)
    bf, x_bf = build(nn.LSTM, batch_first=True, num_layers=2)
    assert count_macs_params(tm, x_tm) == count_macs_params(bf, x_bf)
    s_tm, s_bf = ChannelStructure(tm, x_tm, validate=False), ChannelStructure(bf, x_bf, validate=False)
    assert s_tm.dense_macs == s_bf.dense_macs == count_macs_params(bf, x_bf)[0]
    per_step = sum(math.prod(getattr(bf.rnn, n).shape) for n in bf.rnn._flat_weights_names if n.startswith("weight"))
    assert s_bf.dense_macs == STEPS * (per_step + FEATURES * WIDTH) + HIDDEN * CLASSES


def test_failed_channel_search_leaves_a_recurrent_model_untouched():
    model, x = build(nn.LSTM, bidirectional=True, num_layers=2)
    state = ModelState.of(model)
    with pytest.raises(RuntimeError, match="boom"):
        rl_prune(model, 0.5, data=x, structure="channel", reward=RaisingReward(x, 3, RuntimeError("boom")),
                 agent="random", episodes=5, seed=0, verbose=False)
    state.assert_unchanged(model)
    assert model.rnn.hidden_size == HIDDEN


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
def test_the_default_refit_fits_the_recurrent_layer_and_compact_stays_exact(cell):
    model, x = build(cell, False, True, 2)
    plain, _ = build(cell, False, True, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = rl_prune(model, 0.5, data=x, structure="channel", budget="macs", agent="prior",
                          max_amount=0.6, seed=0, verbose=False)          # repair: "lstsq", the channel default
        rl_prune(plain, 0.5, data=x, structure="channel", budget="macs", agent="prior", max_amount=0.6,
                 seed=0, verbose=False, repair="none")
    repair = result.plan.metadata["repair"]
    assert "rnn" in repair["refitted"] and "rnn" not in repair["skipped"]
    masks, plain_state = {k: v for k, v in model.state_dict().items() if k.endswith("_mask")}, plain.state_dict()
    assert masks and all(torch.equal(v, plain_state[k]) for k, v in masks.items())   # the same masks
    assert not torch.equal(model.rnn.weight_hh_l0_orig, plain.rnn.weight_hh_l0_orig)
    with torch.no_grad():
        masked = model(x)
    assert not result.compact()["failed"]
    with torch.no_grad():
        assert (model(x) - masked).abs().max() < 1e-5, "refitted, masked output equals compacted output"
