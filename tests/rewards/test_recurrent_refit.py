"""The least-squares refit of LSTM / GRU / RNN gate matrices: the recurrence it runs is the module's,
it brings a pruned recurrent model back towards the unpruned one, it only moves kept weights, it
undoes bit for bit, and ``repair="auto"`` uses it below the unstructured threshold."""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from helpers import seeded
from torch_rlprune import rl_prune
from torch_rlprune.env.priors import lamp_unstructured
from torch_rlprune.rewards.recurrent_refit import as_batch_time, layer_call, run_layer, states_before
from torch_rlprune.rewards.repair import (AUTO_REFIT_FROM, LeastSquaresRefit, _effective, refit_scope,
                                         refit_wanted)

KINDS = [nn.LSTM, nn.GRU, nn.RNN]


class Sequence(nn.Module):
    """A recurrent classifier on the last step: rnn -> Linear."""

    def __init__(self, kind=nn.LSTM, bidirectional=False, layers=2, batch_first=True, **extra):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = kind(6, 16, num_layers=layers, batch_first=batch_first, bidirectional=bidirectional, **extra)
        self.head = nn.Linear(16 * (2 if bidirectional else 1), 4)

    def forward(self, x):
        out = self.rnn(x)[0]
        return self.head(out[:, -1] if self.batch_first else out[-1])


def sequences(n=96, steps=12, seed=1):
    """Smooth random sequences (a recurrent layer's input is seldom white noise)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, steps, 6, generator=g).cumsum(1) / 3


def rnn_weights(module):
    return [(module, n) for n in module._flat_weights_names if n.startswith("weight_")]


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, stored) -> bool:
    return all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("batch_first,bidirectional", [(True, False), (False, True)], ids=["batch_first", "bidir"])
def test_the_recurrence_it_runs_is_the_modules(kind, batch_first, bidirectional):
    module = seeded(kind, 0, 5, 7, num_layers=2, batch_first=batch_first, bidirectional=bidirectional).double()
    x = torch.randn((3, 6, 5) if batch_first else (6, 3, 5), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2))   # 3 sequences of 6 steps
    hx_shape = (2 * (2 if bidirectional else 1), 3, 7)
    h0 = torch.randn(hx_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hx = (h0, h0.flip(0)) if kind is nn.LSTM else h0
    with torch.no_grad():
        expected = module(x, hx)[0]
    seq, weights = as_batch_time(module, x), _effective(module)
    for layer in range(2):
        seq = torch.cat([run_layer(layer_call(module, weights, layer, d, hx, 3), seq)
                         for d in range(2 if bidirectional else 1)], 2)
    assert torch.allclose(seq, expected if batch_first else expected.transpose(0, 1), atol=1e-12)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_the_state_a_step_starts_from_is_the_one_the_module_carries_into_it(kind, reverse):
    module = seeded(kind, 0, 5, 7, bidirectional=True, batch_first=True).double()
    x = torch.randn(3, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h0 = torch.randn(2, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hx = (h0, -h0) if kind is nn.LSTM else h0
    call = layer_call(module, _effective(module), 0, int(reverse), hx, 3)
    steps = torch.tensor([0, 2, 5])
    states = states_before(call, run_layer(call, x), steps)
    for i, t in enumerate(steps.tolist()):
        seen = x[:, t + 1:] if reverse else x[:, :t]   # what the direction has read before step t
        if seen.shape[1] == 0:
            expected = h0[int(reverse)]
        else:
            with torch.no_grad():
                h_n = module(seen, hx)[1]
            expected = (h_n[0] if kind is nn.LSTM else h_n)[int(reverse)]
        assert torch.allclose(states[:, i], expected, atol=1e-12), t


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidir"])
def test_the_refit_brings_a_pruned_recurrent_model_back_towards_the_unpruned_one(kind, bidirectional):
    model = seeded(Sequence, 0, kind, bidirectional).eval()
    x, held_out = sequences(), sequences(seed=7)
    with torch.no_grad():
        dense = model.rnn(held_out)[0]
    refit = LeastSquaresRefit(model, [x[:48], x[48:]])
    lamp_unstructured(rnn_weights(model.rnn), 0.8)
    masks = {n: getattr(model.rnn, f"{n}_mask").clone() for _, n in rnn_weights(model.rnn)}
    stored = {n: getattr(model.rnn, f"{n}_orig").detach().clone() for _, n in rnn_weights(model.rnn)}
    with torch.no_grad():
        before = (model.rnn(held_out)[0] - dense).pow(2).mean()
    report = refit()
    with torch.no_grad():
        after = (model.rnn(held_out)[0] - dense).pow(2).mean()
    assert report.refitted == ["rnn"] and not report.skipped
    assert after < 0.75 * before   # every output step, on sequences it was not fitted on
    for n, mask in masks.items():
        assert torch.equal(getattr(model.rnn, f"{n}_mask"), mask)               # the plan holds
        orig = getattr(model.rnn, f"{n}_orig").detach()
        assert torch.equal(orig[mask == 0], stored[n][mask == 0])              # masked values untouched
        assert not torch.equal(orig[mask != 0], stored[n][mask != 0])          # kept ones refitted
        assert bool((getattr(model.rnn, n)[mask == 0] == 0).all())             # what the forward uses


def test_restore_puts_back_every_bit_of_pruned_and_unpruned_matrices_without_a_forward():
    model = seeded(Sequence, 0, nn.GRU).eval()
    refit = LeastSquaresRefit(model, [sequences()])
    prune.l1_unstructured(model.rnn, "weight_ih_l0", amount=0.8)   # weight_hh_l0 stays a plain parameter
    stored = state_of(model)
    plain = model.rnn.weight_hh_l0
    refit()
    assert not torch.equal(model.rnn.weight_hh_l0, stored["rnn.weight_hh_l0"]), "the unpruned matrix is refitted"
    assert model.rnn.weight_hh_l0 is plain, "in place: the same Parameter"
    refit.restore()
    assert same_state(model, stored)
    flat = dict(zip(model.rnn._flat_weights_names, model.rnn._flat_weights))
    assert torch.equal(flat["weight_ih_l0"], stored["rnn.weight_ih_l0_orig"] * stored["rnn.weight_ih_l0_mask"])
    assert flat["weight_hh_l0"] is plain


def test_inputs_removed_upstream_are_taken_over_by_the_kept_ones_that_carry_them():
    model = seeded(Sequence, 0, nn.LSTM, layers=1).eval()
    x, held_out = sequences(), sequences(seed=7)
    for seq in (x, held_out):      # features 1 and 4 repeat features 2 and 0: nothing is lost without them
        seq[..., 1], seq[..., 4] = seq[..., 2], seq[..., 0]
    with torch.no_grad():
        dense = model.rnn(held_out)[0]
    refit = LeastSquaresRefit(model, [x], ridge=1e-9)
    mask = torch.ones_like(model.rnn.weight_ih_l0)
    mask[:, [1, 4]] = 0                       # as a removed channel upstream leaves it
    prune.custom_from_mask(model.rnn, "weight_ih_l0", mask)
    with torch.no_grad():
        before = (model.rnn(held_out)[0] - dense).pow(2).mean()
    assert refit().refitted == ["rnn"]
    with torch.no_grad():
        assert (model.rnn(held_out)[0] - dense).pow(2).mean() < 1e-3 * before


def lstm_with_projection():
    model = seeded(Sequence, 0, nn.LSTM, layers=1, proj_size=8).eval()
    model.head = nn.Linear(8, 4)
    return model, "weight_hh_l0", 0.5, "proj_size"


def lstm_with_a_weight_normed_matrix():
    """A value written into a matrix recomputed on access would be lost while the layer counted as refitted."""
    from torch.nn.utils.parametrizations import weight_norm

    model = seeded(Sequence, 0, nn.LSTM, layers=1).eval()
    weight_norm(model.rnn, "weight_hh_l0")
    return model, "weight_ih_l0", 0.8, "weight_hh_l0"


@pytest.mark.parametrize("build", [lstm_with_projection, lstm_with_a_weight_normed_matrix],
                         ids=["proj_size", "weight_norm"])
def test_what_it_cannot_refit_is_left_as_it_was_and_named(build):
    model, pruned, amount, reason = build()
    refit = LeastSquaresRefit(model, [sequences()])
    prune.l1_unstructured(model.rnn, pruned, amount=amount)
    before = state_of(model)
    report = refit()
    assert reason in report.skipped["rnn"] and not report.refitted
    assert same_state(model, before)


def test_the_recurrent_scope_leaves_every_other_layer_alone():
    model = seeded(Sequence, 0, nn.RNN).eval()
    refit = LeastSquaresRefit(model, [sequences()], scope="recurrent")
    lamp_unstructured(rnn_weights(model.rnn) + [(model.head, "weight")], 0.8)
    head = model.head.weight_orig.detach().clone()
    assert refit().refitted == ["rnn"]
    assert torch.equal(model.head.weight_orig, head)
    with pytest.raises(ValueError, match="scope"):
        LeastSquaresRefit(model, [sequences()], scope="linear")


def test_auto_refits_recurrent_layers_below_the_threshold_and_counts_rounding_as_on_it():
    recurrent, feedforward = Sequence(), nn.Sequential(nn.Linear(4, 4))
    assert refit_scope("auto", 0.8, AUTO_REFIT_FROM, recurrent) == "recurrent"
    assert refit_scope("auto", 0.8, AUTO_REFIT_FROM, feedforward) is None
    assert refit_scope("none", 0.8, AUTO_REFIT_FROM, recurrent) is None
    assert refit_scope("lstsq", 0.1, AUTO_REFIT_FROM, feedforward) == "all"
    # a 90% plan landing within the budget's rounding below 0.9 is refitted (it was not)
    assert refit_scope("auto", AUTO_REFIT_FROM - 2e-6, AUTO_REFIT_FROM, feedforward) == "all"
    assert not refit_wanted("auto", AUTO_REFIT_FROM - 0.01, AUTO_REFIT_FROM)


def test_rl_prune_refits_a_recurrent_model_by_default_with_the_same_masks():
    model = seeded(Sequence, 0, nn.LSTM).eval()
    x = sequences(128)
    with torch.no_grad():
        y = model(x).argmax(1)
    plain = seeded(Sequence, 0, nn.LSTM).eval()
    # no held-out choice: it compares the candidates refitted (tests/search/test_selection.py), so it
    # may pick another plan with the refit than without
    refitted_plan = rl_prune(model, 0.8, data=(x, y), agent="prior", verbose=False, seed=0, selection=0).plan
    plain_plan = rl_prune(plain, 0.8, data=(x, y), agent="prior", verbose=False, seed=0, repair="none",
                          selection=0).plan
    assert refitted_plan.metadata["repair"]["refitted"] == ["rnn"]
    assert "repair" not in plain_plan.metadata
    assert refitted_plan.amounts == plain_plan.amounts
    for _, n in rnn_weights(model.rnn):
        assert torch.equal(getattr(model.rnn, f"{n}_mask"), getattr(plain.rnn, f"{n}_mask"))


def test_a_search_whose_refit_hit_the_memory_bound_says_so_in_its_summary(monkeypatch):
    from torch_rlprune.rewards import recurrent_refit
    model = seeded(Sequence, 0, nn.LSTM).eval()
    x = sequences(128)
    with torch.no_grad():
        y = model(x).argmax(1)
    monkeypatch.setattr(recurrent_refit, "MAX_SEQUENCE_BYTES", 10 * 8 * 12 * (2 * 16 + 3 * 16))   # ten sequences
    result = rl_prune(model, 0.8, data=(x, y), agent="prior", verbose=False, seed=0)
    record = result.plan.metadata["repair"]
    assert record["refitted"] == ["rnn"] and record["notes"]["rnn"].startswith("refitted on the first 10 of ")
    assert "rnn refitted on the first 10 of " in result.summary()

def test_after_the_refit_every_pruned_tensor_is_its_masked_value_without_a_forward():
    """The reference forwards run with the masks lifted; what they leave in ``weight`` must not stay."""
    model = seeded(Sequence, 0, nn.LSTM).eval()
    refit = LeastSquaresRefit(model, [sequences()])
    lamp_unstructured(rnn_weights(model.rnn) + [(model.head, "weight")], 0.8)
    refit()
    for module, name in rnn_weights(model.rnn) + [(model.head, "weight")]:
        expected = getattr(module, f"{name}_orig") * getattr(module, f"{name}_mask")
        assert torch.equal(getattr(module, name), expected), name
    flat = dict(zip(model.rnn._flat_weights_names, model.rnn._flat_weights))
    assert all(torch.equal(flat[n], getattr(model.rnn, n)) for _, n in rnn_weights(model.rnn))


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_an_unbatched_call_with_its_state_runs_as_the_module_does(kind):
    module = seeded(kind, 0, 5, 7, num_layers=2).double()
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))     # [T, F]
    h0 = torch.randn(2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))   # [layers, H]
    hx = (h0, -h0) if kind is nn.LSTM else h0
    with torch.no_grad():
        expected = module(x, hx)[0]
    seq, weights = as_batch_time(module, x), _effective(module)
    for layer in range(2):
        seq = run_layer(layer_call(module, weights, layer, 0, hx, 1), seq)
    assert torch.allclose(seq[0], expected, atol=1e-12)


class KeywordCall(nn.Module):
    """Calls its LSTM with keyword arguments only."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.LSTM(6, 16, batch_first=True), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.rnn(input=x, hx=None)[0][:, -1])


def test_a_recurrent_layer_called_with_keywords_is_refitted():
    model = seeded(KeywordCall, 0).eval()
    x = sequences(128)
    with torch.no_grad():
        y = model(x).argmax(1)
    plan = rl_prune(model, 0.8, data=(x, y), agent="prior", verbose=False, seed=0).plan
    assert plan.metadata["repair"]["refitted"] == ["rnn"]


def test_auto_leaves_an_excluded_recurrent_layer_without_a_refit():
    model = seeded(Sequence, 0, nn.LSTM).eval()
    x = sequences(128)
    with torch.no_grad():
        y = model(x).argmax(1)
    plan = rl_prune(model, 0.5, data=(x, y), agent="prior", verbose=False, seed=0, exclude=["rnn"],
                    protect_first_last=False).plan
    assert "repair" not in plan.metadata   # nothing recurrent pruned: no refit, no scores for one
    assert refit_scope("auto", 0.5, AUTO_REFIT_FROM, model, {"rnn.weight_ih_l0": 0.0, "head.weight": 0.5}) is None
    assert refit_scope("auto", 0.5, AUTO_REFIT_FROM, model, {"rnn.weight_hh_l0": 0.3}) == "recurrent"


def test_a_refit_pass_that_moves_the_outputs_away_is_undone(monkeypatch):
    import torch_rlprune.rewards.recurrent_refit as recurrent

    real = recurrent._solve_blocks

    def overshoot(systems, new, anchor, keep, ridge, min_rows):   # every solution ten times too large
        solved = real(systems, new, anchor, keep, ridge, min_rows)
        for part in new:
            part.mul_(10)
        return solved

    model = seeded(Sequence, 0, nn.RNN, layers=1).eval()
    refit = LeastSquaresRefit(model, [sequences()])
    lamp_unstructured(rnn_weights(model.rnn), 0.8)
    stored = state_of(model)
    monkeypatch.setattr(recurrent, "_solve_blocks", overshoot)
    report = refit()
    assert "closer" in report.skipped["rnn"] and not report.refitted
    assert same_state(model, stored)


def test_past_its_memory_bound_the_refit_reads_the_first_sequences_only_and_says_so(monkeypatch):
    from torch_rlprune.rewards import recurrent_refit
    x = sequences()
    per_sequence = 8 * x.shape[1] * (2 * 16 + 3 * 16)   # five float64 copies of 16 units (inputs: 6 wide)
    fitted = {}
    for name, batches, bound in (("bounded", [x[:48], x[48:]], 40 * per_sequence + 7), ("first 40", [x[:40]], None)):
        model = seeded(Sequence, 0).eval()
        refit = LeastSquaresRefit(model, batches)
        lamp_unstructured(rnn_weights(model.rnn), 0.8)
        if bound is not None:
            monkeypatch.setattr(recurrent_refit, "MAX_SEQUENCE_BYTES", bound)
        report = refit().as_dict()
        monkeypatch.undo()
        fitted[name] = (report, {n: getattr(model.rnn, f"{n}_orig").detach().clone()
                                 for _, n in rnn_weights(model.rnn)})
    bounded, first = fitted["bounded"], fitted["first 40"]
    assert bounded[0]["refitted"] == ["rnn"] and "first 40 of 96" in bounded[0]["notes"]["rnn"]
    assert "notes" not in first[0]
    assert all(torch.equal(bounded[1][n], first[1][n]) for n in first[1])


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_a_bound_below_one_sequence_still_reads_one_with_its_own_state(kind):
    from torch_rlprune.rewards.recurrent_refit import _first, _sequences_within
    module = seeded(kind, 0, 6, 16, num_layers=2)                           # time-major: [T, N, F]
    xs = [torch.randn(12, 5, 6, generator=torch.Generator().manual_seed(1)), torch.zeros(12, 4, 6)]
    h0 = torch.arange(2 * 5 * 16, dtype=torch.float32).reshape(2, 5, 16)   # [layers, N, H]
    calls = [(xs[0], (h0, -h0) if kind is nn.LSTM else h0), (xs[1], None)]
    assert _sequences_within(module, calls, max_bytes=1) == [1, 0]
    per_sequence = 8 * 12 * (2 * 16 + 3 * 16)
    assert _sequences_within(module, calls, max_bytes=6 * per_sequence + 1) == [5, 1]
    kept = _first(module, calls, [1, 0])
    assert len(kept) == 1
    x, hx = kept[0]
    assert x.dtype == torch.float64 and torch.equal(x, xs[0][:, :1].transpose(0, 1).double())   # [1, T, F]
    if kind is nn.LSTM:
        assert torch.equal(hx[0], h0[:, :1]) and torch.equal(hx[1], -h0[:, :1])
    else:
        assert torch.equal(hx, h0[:, :1])
