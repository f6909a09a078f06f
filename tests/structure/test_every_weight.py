"""Every weight that runs is a candidate or reported: attention projections, transformers' Conv1D,
tied weights' MACs (issue 16)."""
import warnings

import pytest
import torch
from torch import nn

from helpers import Encoder, HeadsAttention, seeded, tiny_bert
from torch_rlprune import rl_prune
from torch_rlprune.rewards.calibration import build_calibration
from torch_rlprune.structure.channel import count_macs_params
from torch_rlprune.rewards.scores import FidelityReward
from torch_rlprune.structure.tensors import find_prunable, trace_execution


class Conv1D(nn.Module):
    """transformers' Conv1D as GPT-2 uses it (a Linear whose weight is stored (in, out)); defined here
    so that the test does not need transformers."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))


class GPTLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.c_fc, self.c_proj = Conv1D(48, 16), Conv1D(16, 48)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = self.inp(x)
        return self.head((h + self.c_proj(torch.tanh(self.c_fc(h)))).mean(1))


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2)   # time-major, as nn.Transformer's default

    def forward(self, query, memory):
        return self.attn(query, memory, memory, need_weights=False)[0]


SEQUENCES = torch.randn(64, 6, 8, generator=torch.Generator().manual_seed(0))


def fidelity(model, reference, data) -> float:
    reward = FidelityReward(build_calibration(model, data, None, len(data)))
    reward.prepare(reference)
    return reward(model)


def prune(model, target=0.6, **kwargs):
    return rl_prune(model, target, data=SEQUENCES, agent="random", episodes=4, seed=0, verbose=False,
                    protect_first_last=False, selection=0.0, **kwargs)


def test_attention_projections_are_candidates_traced_through_the_attention():
    layers, _ = trace_execution(seeded(Encoder), find_prunable(seeded(Encoder)), lambda: None)
    names = [lay.name for lay in find_prunable(seeded(Encoder))]
    assert "layer.self_attn.in_proj_weight" in names and "layer.self_attn.out_proj.weight" in names
    model = seeded(Encoder)
    used, unused = trace_execution(model, find_prunable(model), lambda: model(SEQUENCES[:2]))
    assert not unused                                                  # out_proj ran, through its attention
    by_name = {lay.name: lay for lay in used}
    assert by_name["layer.self_attn.out_proj.weight"].positions_per_forward == 6   # six tokens per sample
    assert by_name["layer.self_attn.in_proj_weight"].kind == "mha"


def test_a_pruned_attention_computes_with_its_masks_and_reports_what_it_returns():
    model, reference = seeded(Encoder), seeded(Encoder)
    result = prune(model)
    attn = model.layer.self_attn
    assert {"layer.self_attn.in_proj_weight", "layer.self_attn.out_proj.weight"} <= set(result.plan.amounts)
    assert float((attn.in_proj_weight_mask == 0).float().mean()) == pytest.approx(
        result.plan.amounts["layer.self_attn.in_proj_weight"], abs=1e-3)
    assert result.plan.score == pytest.approx(fidelity(model, reference, SEQUENCES), abs=1e-9)
    with torch.no_grad():
        before = model(SEQUENCES[:8])
        attn.out_proj.weight_mask.zero_()                  # the attention must read out_proj's mask
        assert not torch.allclose(model(SEQUENCES[:8]), before)


def test_a_pruned_out_proj_follows_training_of_its_unmasked_weight():
    model = seeded(Encoder)
    prune(model)
    out_proj = model.layer.self_attn.out_proj
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):   # a stale weight would fail the second backward or ignore the first step
        optimizer.zero_grad()
        model(SEQUENCES[:16]).pow(2).mean().backward()
        optimizer.step()
    model(SEQUENCES[:2])
    assert out_proj.weight_orig.grad is not None and out_proj.weight_orig.grad.abs().sum() > 0
    assert torch.equal(out_proj.weight, out_proj.weight_orig * out_proj.weight_mask)


def test_multihead_attention_macs_count_projections_scores_and_out_proj():
    model = seeded(CrossAttention)
    query, memory = torch.randn(5, 3, 16), torch.randn(9, 3, 16)        # (tokens, batch, features)
    macs, _ = count_macs_params(model, (query, memory))
    e = 16
    assert macs == 5 * e * e + 2 * 9 * e * e + 2 * 5 * 9 * e + 5 * e * e
    layer = find_prunable(model)[0]
    trace_execution(model, [layer], lambda: model(query, memory))
    assert layer.positions_per_forward == (5 + 2 * 9) // 3              # keys and values run over the memory


def test_transformers_conv1d_is_a_candidate_with_its_transposed_layout():
    model = seeded(GPTLike)
    layers = {lay.name: lay for lay in find_prunable(model)}
    assert (layers["c_fc.weight"].in_channels, layers["c_fc.weight"].out_channels) == (16, 48)
    assert layers["c_fc.weight"].input_dim == 0 and layers["inp.weight"].input_dim == 1
    macs, _ = count_macs_params(model, SEQUENCES[:2])
    assert macs == 6 * (8 * 16 + 16 * 48 + 48 * 16) + 16 * 5


def test_conv1d_search_meets_the_target_with_nothing_left_out():
    model = seeded(GPTLike)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)       # nothing is left dense without a word
        result = prune(model, 0.7)
    pruned = sum(int((m.weight_mask == 0).sum()) for m in (model.inp, model.c_fc, model.c_proj, model.head))
    total = sum(m.weight_orig.numel() for m in (model.inp, model.c_fc, model.c_proj, model.head))
    assert pruned / total == pytest.approx(0.7, abs=2e-3)
    assert result.sparsity == pytest.approx(0.7, abs=2e-3)


def test_activation_importance_ranks_conv1d_weights_within_each_output():
    model = seeded(GPTLike)
    prune(model, 0.5, importance="activation")
    kept_per_output = (model.c_fc.weight_mask != 0).sum(0)              # outputs are the columns
    assert int(kept_per_output.max() - kept_per_output.min()) <= 1      # Wanda: every output loses alike


class TiedConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.stem(x))))).mean((2, 3))


def test_a_tied_weight_costs_the_macs_of_every_layer_that_uses_it():
    model = seeded(TiedConvs)
    x = torch.randn(2, 1, 8, 8)
    used, _ = trace_execution(model, find_prunable(model), lambda: model(x))
    tied = {lay.name: lay for lay in used}["a.weight"]
    assert tied.positions_per_forward == 64 + 16                         # a at 8x8, b at stride 2
    assert sum(lay.macs for lay in used) == count_macs_params(model, x)[0]


def test_gpt2_from_a_config_has_every_matmul_weight_as_a_candidate():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, 100, (32, 8), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="stay dense: Embedding \\(a lookup, not a matmul\\): 1 \\(transformer.wpe"):
        result = rl_prune(model, 0.8, data=tokens, agent="prior", verbose=False)
    conv1d = [m for m in model.modules() if type(m).__name__ == "Conv1D"]
    assert conv1d and all(hasattr(m, "weight_mask") for m in conv1d)
    assert model.transformer.wte.weight_mask is model.lm_head.weight_mask   # tied, one unit
    assert result.sparsity == pytest.approx(0.8, abs=2e-3)


def channel_prune(model, data):
    return rl_prune(model, 0.5, data=data, structure="channel", budget="macs", agent="prior", verbose=False)


def compacts_exactly(result, data):
    with torch.no_grad():
        masked = primary(result.model(data[:4]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)       # compact removes all it planned, or says so
        info = result.compact()
    with torch.no_grad():
        compacted = primary(result.model(data[:4]))
    assert info["failed"] == {} and float((masked - compacted).abs().max()) < 1e-4
    return info


def primary(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def test_a_head_reshape_excludes_its_group_up_front_naming_the_line():
    model = seeded(HeadsAttention)
    with pytest.warns(UserWarning, match="stay whole: (\\S+):out \\(failed validation: RuntimeError: .* at "
                                         "helpers.py:\\d+ `return x.view\\(x.shape\\[0\\]") as seen:
        result = channel_prune(model, SEQUENCES)
    blocked = [key for key in result.plan.metadata["excluded"] if "failed validation" in result.plan.metadata[
        "excluded"][key]]
    assert blocked and not set(blocked) & set(result.plan.amounts) and len(seen) == 1
    info = compacts_exactly(result, SEQUENCES)
    assert 1 - info["macs_after"] / result.plan.metadata["dense"]["macs"] == pytest.approx(result.sparsity, abs=0.02)


def test_bert_from_a_config_compacts_exactly_what_the_search_planned():
    model = tiny_bert(hidden=64, positions=32)
    tokens = torch.randint(0, 100, (32, 8), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="attention.self.query:out \\(failed validation.*modeling_bert.py"):
        result = channel_prune(model, tokens)
    info = compacts_exactly(result, tokens)
    assert 1 - info["macs_after"] / result.plan.metadata["dense"]["macs"] == pytest.approx(0.5, abs=0.02)


def test_a_group_compact_cannot_remove_makes_sparsity_honest(monkeypatch):
    from torch_rlprune.structure.channel import ChannelStructure

    monkeypatch.setattr(ChannelStructure, "verify", lambda self, **kw: {"ok": True, "failed": {}})  # a missed case
    model = seeded(HeadsAttention)
    result = channel_prune(model, SEQUENCES)
    with pytest.warns(UserWarning, match="result.sparsity is now"):
        info = result.compact()
    assert info["failed"]
    assert result.sparsity == pytest.approx(1 - info["macs_after"] / result.plan.metadata["dense"]["macs"])
    assert result.sparsity < 0.5 - 0.02


def test_a_channel_refusal_says_why_each_layer_never_became_a_group():
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(8, 32, batch_first=True), nn.Linear(32, 5)

        def forward(self, x):
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
            out, _ = self.lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
            return self.fc(pad_packed_sequence(out, batch_first=True)[0][:, -1])

    with pytest.raises(ValueError, match="lstm:out: 'lstm' is fed a PackedSequence"):
        channel_prune(seeded(Packed), SEQUENCES)
    with pytest.raises(ValueError, match="c_fc:out: 'c_fc' is a transformers Conv1D"):
        channel_prune(seeded(GPTLike), SEQUENCES)


class FunctionalLinears(nn.Module):
    """torchvision Swin's pattern: the parent reads its children's weights with F.linear."""

    def __init__(self, depth: int = 7):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.projections = nn.ModuleList(nn.Linear(16, 16) for _ in range(depth))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = self.inp(x)
        for p in self.projections:
            h = h + torch.relu(nn.functional.linear(h, p.weight, p.bias))
        return self.head(h.mean(1))


def test_every_layer_that_never_ran_as_a_module_is_named_in_the_plan_and_the_summary():
    with pytest.warns(UserWarning, match="7 layer\\(s\\) never ran as modules .* and 2 more \\(plan.metadata"):
        result = rl_prune(seeded(FunctionalLinears), 0.5, data=SEQUENCES, agent="prior", verbose=False,
                          protect_first_last=False)
    assert result.plan.metadata["never_ran"] == [f"projections.{i}.weight" for i in range(7)]
    assert "never ran as modules, dense: 7 (projections.0.weight" in result.summary()
