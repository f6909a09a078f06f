"""The least-squares refit after channel pruning (repair="lstsq"): what it reproduces, what it
leaves alone (masks, plans, layers it cannot fit) and how it fails (the model as it was)."""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from helpers import ModelState, fmnist_cnn, inputs, seeded, weight_masks
from torch_rlprune import rl_prune
from torch_rlprune.structure.channel import compact
from torch_rlprune.rewards.repair import LeastSquaresRefit


def mask_inputs(module: nn.Module, removed) -> None:
    """Remove input channels ``removed`` of ``module`` through the prune API."""
    mask = torch.ones_like(module.weight)
    mask[:, removed] = 0
    prune.custom_from_mask(module, "weight", mask)


class Duplicated(nn.Module):
    """Hidden unit 5 (channel 5 of the conv) is an exact copy of unit 0: without it, the next
    layer can still compute exactly what it did, if its weight for unit 5 moves onto unit 0."""

    def __init__(self, conv: bool):
        super().__init__()
        self.first = nn.Conv1d(3, 6, 3, padding=1) if conv else nn.Linear(4, 6)
        self.second = nn.Conv1d(6, 5, 3, padding=1) if conv else nn.Linear(6, 5)
        with torch.no_grad():
            self.first.weight[5] = self.first.weight[0]
            self.first.bias[5] = self.first.bias[0]

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1d"])
def test_the_refit_reproduces_the_unpruned_output_when_the_kept_channels_can(conv):
    model = seeded(Duplicated, 0, conv)
    x = inputs((64, 3, 10) if conv else (64, 4), seed=1)
    dense = model(x).detach()
    refit = LeastSquaresRefit(model, [x[:32], x[32:]], ridge=1e-9, positions=10)
    mask_inputs(model.second, [5])
    assert (model(x) - dense).abs().max() > 1e-2  # without the refit, unit 5's share is lost
    report = refit()
    assert report.refitted == ["second"]
    assert torch.allclose(model(x), dense, atol=1e-4)
    assert bool((model.second.weight[:, 5] == 0).all())  # the mask still holds


def test_only_kept_weights_change_and_restore_puts_back_every_bit():
    model = seeded(Duplicated, 0, False)
    x = inputs((64, 4), seed=1)
    refit = LeastSquaresRefit(model, [x])
    mask_inputs(model.second, [2, 5])
    before = model.second.weight_orig.detach().clone()
    refit()
    changed = model.second.weight_orig.detach() != before
    assert changed[:, [0, 1, 3, 4]].any() and not changed[:, [2, 5]].any()
    assert torch.equal(model.second.weight_mask[:, [2, 5]], torch.zeros(5, 2))
    refit.restore()
    assert torch.equal(model.second.weight_orig.detach(), before)
    assert torch.equal(model.second.weight, before * model.second.weight_mask)


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)

    def forward(self, x):
        return self.shared(torch.relu(self.shared(torch.relu(self.first(x)))))


def test_layers_it_cannot_fit_are_left_as_they_were_and_named():
    model = seeded(Reused)
    x = inputs((32, 4))
    refit = LeastSquaresRefit(model, [x])
    mask_inputs(model.shared, [1])
    before = model.shared.weight_orig.detach().clone()
    report = refit()
    assert report.refitted == [] and "runs 2 times" in report.skipped["shared"]
    assert torch.equal(model.shared.weight_orig.detach(), before)


def test_an_unstructured_mask_is_not_refitted():
    model = seeded(Duplicated, 0, False)
    x = inputs((32, 4))
    refit = LeastSquaresRefit(model, [x])
    prune.random_unstructured(model.second, "weight", amount=0.5)
    before = model.second.weight_orig.detach().clone()
    assert refit().refitted == []
    assert torch.equal(model.second.weight_orig.detach(), before)


# --------------------------------------------------------------------------- through rl_prune
def trained_cnn():
    """fmnist_cnn with a few steps on a learnable synthetic task (so fidelity means something)."""
    model = seeded(fmnist_cnn)
    x = inputs((256, 1, 28, 28), seed=3)
    y = (x[:, 0, :14].mean((1, 2)) > 0).long() + 2 * (x[:, 0, 14:].mean((1, 2)) > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x


def conv_output(model, x):
    """The second conv's output (before its BatchNorm)."""
    captured = []
    handle = model[4].register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        model(x)
    handle.remove()
    return captured[0]


def search(model, x, **options):
    return rl_prune(model, 0.5, data=x, structure="channel", agent="random", episodes=3, seed=0, verbose=False,
                    **options)


def test_rl_prune_refits_channel_plans_by_default_with_the_same_masks():
    model, x = trained_cnn()
    plain = seeded(fmnist_cnn)
    plain.load_state_dict(model.state_dict())
    dense_model = seeded(fmnist_cnn)
    dense_model.load_state_dict(model.state_dict())
    dense_model.eval()
    refitted = search(model, x)
    unrepaired = search(plain.eval(), x, repair="none")
    assert refitted.plan.amounts == unrepaired.plan.amounts
    masks, plain_masks = weight_masks(model), weight_masks(plain)
    assert masks.keys() == plain_masks.keys() and all(torch.equal(masks[k], plain_masks[k]) for k in masks)
    record = refitted.plan.metadata["repair"]
    assert record["refitted"] == ["4"] and "9" in record["skipped"] and "repair" not in unrepaired.plan.metadata
    assert 0.0 <= record["selection_score"] <= 1.0 and 0.0 <= record["search_score"] <= 1.0
    assert "least-squares refit of 1 layers" in refitted.summary()
    kept = model[4].weight_mask.abs().sum((1, 2, 3)) > 0
    # the refit's objective: the refitted conv's output closer to the unpruned model's (the model's
    # own output need not be: BatchNorm re-estimation moves it either way on this small model)
    error = (conv_output(model, x) - conv_output(dense_model, x))[:, kept].pow(2).mean()
    plain_error = (conv_output(plain, x) - conv_output(dense_model, x))[:, kept].pow(2).mean()
    assert error < 0.5 * plain_error
    with torch.no_grad():
        masked = model(x[:4])
    compact(model, x[:2])
    with torch.no_grad():
        assert torch.allclose(model(x[:4]), masked, atol=1e-5)


@pytest.mark.parametrize("repair, structure, match", [
    ("lstsq", "unstructured", "needs structure='channel'"),
    ("least-squares", "channel", r"repair must be one of \('lstsq', 'none'\)"),
    (True, "channel", "repair must be one of")])
def test_bad_repair_is_refused_before_the_model_is_touched(repair, structure, match):
    model, x = trained_cnn()
    state = ModelState.of(model)
    with pytest.raises(ValueError, match=match):
        rl_prune(model, 0.5, data=x, structure=structure, repair=repair, agent="random", episodes=2, verbose=False)
    state.assert_unchanged(model)


@pytest.mark.parametrize("error", [RuntimeError("solver crashed"), KeyboardInterrupt()])
def test_a_refit_failing_part_way_leaves_the_model_bit_identical(monkeypatch, error):
    model, x = trained_cnn()
    prune.l1_unstructured(model[0], "weight", amount=0.2)  # masks of its own to put back too
    state = ModelState.of(model)
    solve = torch.linalg.solve

    def failing(*args, **kwargs):
        raise error
    monkeypatch.setattr(torch.linalg, "solve", failing)
    with pytest.raises(type(error)):
        search(model, x)
    monkeypatch.setattr(torch.linalg, "solve", solve)
    state.assert_unchanged(model)


def test_a_multi_target_search_refits_what_it_applies():
    model, x = trained_cnn()
    multi = rl_prune(model, [0.3, 0.5], data=x, structure="channel", agent="random", episodes=2, seed=0,
                     verbose=False)
    fresh = seeded(fmnist_cnn)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items()})
    fresh.eval()
    before = fresh[4].weight.detach().clone()
    multi.apply(fresh, target=0.5)
    assert multi[0.5].plan.metadata["repair"]["refitted"] == ["4"]
    kept = fresh[4].weight_mask.abs().sum((0, 2, 3)) > 0
    assert not torch.equal(fresh[4].weight_orig.detach()[:, kept], before[:, kept])
