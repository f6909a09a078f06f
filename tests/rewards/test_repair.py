"""The least-squares refit after channel pruning (repair="lstsq"): what it reproduces, what it
leaves alone (masks, plans, layers it cannot fit) and how it fails (the model as it was)."""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from helpers import ModelState, fmnist_cnn, inputs, seeded, weight_masks
from torch_rlprune import rl_prune
from torch_rlprune.structure.channel import compact
from torch_rlprune.rewards import repair as repair_module
from torch_rlprune.rewards.recalibration import BatchNormRecalibration
from torch_rlprune.rewards.repair import (AUTO_REFIT_FROM, LeastSquaresRefit, keep_or_undo, masked_ridge_solve,
                                         refit_wanted)


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


def test_the_masked_solve_is_each_outputs_own_ridge_regression():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 7, generator=generator, dtype=torch.float64), torch.randn(40, 5, generator=generator,
                                                                                      dtype=torch.float64)
    start = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    keep = torch.rand(5, 7, generator=generator) < 0.5
    keep[0], keep[1] = False, True  # an output with nothing kept, one with everything
    ridge = 0.3
    weights, solved = masked_ridge_solve(x.T @ x, x.T @ y, keep, start, ridge)
    assert solved.tolist() == [False] + [bool(k.any()) for k in keep[1:]]
    for i in range(5):
        kept = keep[i]
        expected = start[i].clone()
        if kept.any():
            a = x[:, kept]
            expected[kept] = torch.linalg.solve(a.T @ a + ridge * torch.eye(int(kept.sum()), dtype=a.dtype),
                                                a.T @ y[:, i] + ridge * start[i, kept])
        assert torch.allclose(weights[i], expected, atol=1e-10), i
    # outputs with more kept weights than allowed rows keep their weights
    capped, solved = masked_ridge_solve(x.T @ x, x.T @ y, keep, start, ridge, max_kept=2)
    for i in range(5):
        assert bool(solved[i]) == (0 < int(keep[i].sum()) <= 2)
        if not solved[i]:
            assert torch.equal(capped[i], start[i])


def mask_entries(module: nn.Module, entries) -> None:
    mask = torch.ones_like(module.weight)
    for row, column in entries:
        mask[row, column] = 0
    prune.custom_from_mask(module, "weight", mask)


def test_an_unstructured_mask_is_refitted_output_by_output():
    """Unit 5 copies unit 0: an output that lost one of the two can compute what it did through
    the other (outputs 0-3); output 4 also lost unit 2, which nothing else carries: the fit only
    comes closer."""
    model = seeded(Duplicated, 0, False)
    x = inputs((64, 4), seed=1)
    dense = model(x).detach()
    refit = LeastSquaresRefit(model, [x[:32], x[32:]], ridge=1e-9)
    mask_entries(model.second, [(0, 5), (1, 5), (2, 5), (3, 0), (4, 0), (4, 2)])
    before = model.second.weight_orig.detach().clone()
    masked_error = (model(x) - dense).pow(2).mean(0).detach()
    assert masked_error.min() > 1e-4
    report = refit()
    assert report.refitted == ["second"] and report.skipped == {}
    assert torch.allclose(model(x)[:, :4], dense[:, :4], atol=1e-4)
    assert (model(x)[:, 4] - dense[:, 4]).pow(2).mean() < 0.9 * masked_error[4]
    after = model.second.weight_orig.detach()
    mask = model.second.weight_mask
    assert torch.equal(after[mask == 0], before[mask == 0]), "masked weights keep their values"
    refit.restore()
    assert torch.equal(model.second.weight_orig.detach(), before)


def test_too_few_calibration_rows_leave_an_unstructured_layer_alone():
    model = seeded(Duplicated, 0, False)
    x = inputs((3, 4), seed=1)
    refit = LeastSquaresRefit(model, [x])
    mask_entries(model.second, [(i, i) for i in range(5)])  # 5 kept weights per output, 3 rows
    before = model.second.weight_orig.detach().clone()
    report = refit()
    assert report.refitted == [] and "3 calibration rows" in report.skipped["second"]
    assert torch.equal(model.second.weight_orig.detach(), before)


def test_refit_wanted_follows_the_repair_and_the_auto_threshold():
    assert refit_wanted("lstsq", 0.1, AUTO_REFIT_FROM) and not refit_wanted("none", 0.9, 0.0)
    assert refit_wanted("auto", 0.1, 0.0)
    assert refit_wanted("auto", AUTO_REFIT_FROM, AUTO_REFIT_FROM)
    assert not refit_wanted("auto", AUTO_REFIT_FROM - 0.01, AUTO_REFIT_FROM)


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
    assert "least-squares refit of 1 pruned layers" in refitted.summary()
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
    ("least-squares", "unstructured", r"repair must be one of \('lstsq', 'auto', 'none'\)"),
    ("least-squares", "channel", r"repair must be one of \('lstsq', 'auto', 'none'\)"),
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



@pytest.fixture(scope="module")
def channel_targets():
    model, x = trained_cnn()
    multi = rl_prune(model, [0.3, 0.5], data=x, structure="channel", agent="random", episodes=2, seed=0,
                     bn_recalibration=1, verbose=False)
    return model, multi


@pytest.mark.parametrize("error", [RuntimeError("step crashed"), KeyboardInterrupt()], ids=["error", "interrupt"])
@pytest.mark.parametrize("step", ["recalibration", "judge"])
def test_a_multi_target_apply_failing_after_the_refit_leaves_the_model_bit_identical(channel_targets, monkeypatch,
                                                                                     step, error):
    model, multi = channel_targets
    host = seeded(fmnist_cnn)
    host.load_state_dict(model.state_dict())
    host.eval()
    state, metadata = ModelState.of(host), dict(multi[0.5].plan.metadata)
    weight, mean = host[4].weight.detach().clone(), host[5].running_mean.clone()
    changed = {}

    def fail(*_):
        # what was already changed when the step failed: the failure must undo all of it
        changed.update(masked=prune.is_pruned(host), refitted=not torch.equal(host[4].weight_orig, weight),
                       recalibrated=not torch.equal(host[5].running_mean, mean))
        raise error

    if step == "recalibration":
        recalibrate = BatchNormRecalibration.__call__

        def recalibrate_then_fail(self):
            recalibrate(self)
            fail()
        monkeypatch.setattr(BatchNormRecalibration, "__call__", recalibrate_then_fail)
    else:
        monkeypatch.setattr(multi, "judge", fail)
    with pytest.raises(type(error)):
        multi.apply(host, target=0.5)
    assert changed == {"masked": True, "refitted": True, "recalibrated": True}
    state.assert_unchanged(host)
    assert multi[0.5].plan.metadata == metadata

# --------------------------------------------------------------------------- unstructured, through rl_prune
def unstructured(model, x, target=0.9, **options):
    return rl_prune(model, target, data=x, structure="unstructured", agent="random", episodes=3, seed=0,
                    verbose=False, **options)


def copy_of(model):
    twin = seeded(fmnist_cnn)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def test_auto_refits_unstructured_plans_from_the_threshold_with_the_same_masks():
    model, x = trained_cnn()
    plain, low = copy_of(model), copy_of(model)
    refitted = unstructured(model, x)
    unrepaired = unstructured(plain, x, repair="none")
    assert refitted.plan.amounts == unrepaired.plan.amounts
    masks, plain_masks = weight_masks(model), weight_masks(plain)
    assert all(torch.equal(masks[k], plain_masks[k]) for k in masks)
    record = refitted.plan.metadata["repair"]
    assert record["refitted"] and "repair" not in unrepaired.plan.metadata
    if record["kept"]:
        modules, plain_modules = dict(model.named_modules()), dict(plain.named_modules())
        changed = [n for n in record["refitted"]
                   if not torch.equal(modules[n].weight_orig, plain_modules[n].weight_orig)]
        assert changed == record["refitted"]
    assert "repair" not in unstructured(low, x, target=0.5).plan.metadata, "auto: no refit below the threshold"


def test_a_refit_scoring_lower_on_held_out_data_is_undone(monkeypatch):
    model, x = trained_cnn()
    plain = copy_of(model)

    def harmful(gram, cross, keep, start, ridge, max_kept=None):
        return start.double() + 3.0 * torch.randn(start.shape, dtype=torch.float64), keep.any(1)
    monkeypatch.setattr(repair_module, "masked_ridge_solve", harmful)
    result = unstructured(model, x, repair="lstsq")
    record = result.plan.metadata["repair"]
    assert record["kept"] is False and record["selection_score"] < record["score_without"]
    assert "undone" in result.summary()
    unstructured(plain, x, repair="none")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values())), \
        "undone: the model is the plan without the refit, BatchNorm statistics included"


class _Plan:
    def __init__(self, score, selection=None):
        self.score = score
        self.metadata = {} if selection is None else {"selection": {"selection_score": selection}}


@pytest.mark.parametrize("after, error, kept", [(0.92, 0.024, True), (0.85, 0.024, False), (0.92, 0.0, False),
                                                (0.95, None, True)])
def test_a_refit_is_undone_only_when_clearly_below_on_the_held_out_part(after, error, kept):
    """0.93 was the held-out score the plan was chosen by: a refit a little below it (within two
    standard errors of a paired difference) stays; one clearly below, or below with no error known, goes."""
    undone = []
    record = {"selection_score": after, "search_score": 0.99, **({} if error is None else {"selection_error": error})}
    out = keep_or_undo(record, _Plan(0.5, selection=0.93), lambda: undone.append(True))
    assert out["kept"] is kept and bool(undone) is (not kept)
    assert ("score_without" in out) is (not kept)


def test_without_a_held_out_part_the_search_part_decides():
    undone = []
    assert keep_or_undo({"search_score": 0.6}, _Plan(0.7), lambda: undone.append(True))["kept"] is False and undone
    assert keep_or_undo({"search_score": 0.7}, _Plan(0.7), lambda: None)["kept"] is True


def test_the_held_out_score_with_its_error_is_the_rewards_own_score():
    from torch_rlprune.rewards.calibration import build_calibration
    from torch_rlprune.rewards.repair import score_with_error
    from torch_rlprune.rewards.scores import make_reward
    model, x = trained_cnn()
    reward = make_reward("fidelity", build_calibration(model, x, None, 256, seed=0))
    reward.prepare(model)
    prune.l1_unstructured(model[0], "weight", amount=0.7)
    score, error = score_with_error(reward, model)
    assert score == pytest.approx(reward(model), abs=1e-12)
    assert error is not None and 0.0 < error < 0.1
    assert score_with_error(lambda m: 0.5, model) == (0.5, None)
