"""bn_recalibration: BatchNorm statistics re-estimated for each scored plan, and for the result."""
import pytest
import torch
from torch import nn

from torch_rlprune import rl_prune
from torch_rlprune.recalibration import BatchNormRecalibration

from helpers import ModelState, RaisingReward, inputs, seeded


def small_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 10))


def running_stats(model):
    return [(m.running_mean.clone(), m.running_var.clone()) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_recalibration_reestimates_and_restores_exactly():
    model = seeded(small_cnn, 0).eval()
    x = inputs((64, 1, 16, 16))
    before = running_stats(model)
    recalibrate = BatchNormRecalibration(model, [x[:32], x[32:]])
    recalibrate()
    after = running_stats(model)
    assert all(not torch.equal(a[0], b[0]) for a, b in zip(after, before))
    assert not any(m.training for m in model.modules())
    # the cumulative estimate over both batches is the batch statistics of the first layer's input
    first_bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        pre = model[0](x)
    assert torch.allclose(first_bn.running_mean, pre.mean((0, 2, 3)), atol=1e-5)
    recalibrate.restore()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(running_stats(model), before))


@pytest.mark.parametrize("structure", ["unstructured", "channel"])
def test_result_carries_the_statistics_of_its_plan(structure):
    model = seeded(small_cnn, 0).eval()
    x = inputs((256, 1, 16, 16))
    before = running_stats(model)
    rl_prune(model, 0.5, data=x, structure=structure, agent="random", episodes=3, verbose=False,
             bn_recalibration=1, calibration_samples=256)
    after = running_stats(model)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(after, before))
    BatchNormRecalibration(model, [x[:128]])()  # re-estimating on the same batch changes nothing
    assert all(torch.allclose(a[0], b[0], atol=1e-6) for a, b in zip(running_stats(model), after))


@pytest.mark.parametrize("structure, default", [("channel", 1), ("unstructured", 0)])
def test_recalibration_default_depends_on_the_structure(structure, default):
    model = seeded(small_cnn, 0).eval()
    x = inputs((64, 1, 16, 16))
    before = running_stats(model)
    result = rl_prune(model, 0.5, data=x, structure=structure, agent="random", episodes=3, verbose=False)
    assert result.plan.metadata["bn_recalibration"] == default
    changed = any(not torch.equal(a[0], b[0]) for a, b in zip(running_stats(model), before))
    assert changed is bool(default)


def test_without_recalibration_statistics_are_untouched():
    model = seeded(small_cnn, 0).eval()
    x = inputs((64, 1, 16, 16))
    before = running_stats(model)
    rl_prune(model, 0.5, data=x, agent="random", episodes=3, verbose=False, bn_recalibration=0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(running_stats(model), before))


def test_failed_search_with_recalibration_leaves_the_model_untouched():
    model = seeded(small_cnn, 0).train()
    x = inputs((64, 1, 16, 16))
    state = ModelState.of(model)
    with pytest.raises(RuntimeError, match="boom"):
        rl_prune(model, 0.5, data=x, reward=RaisingReward(x, 3, RuntimeError("boom")), agent="random",
                 episodes=4, verbose=False, bn_recalibration=1)
    state.assert_unchanged(model)


def test_bad_recalibration_argument_is_rejected():
    with pytest.raises(ValueError, match="bn_recalibration"):
        rl_prune(seeded(small_cnn, 0), 0.5, data=inputs((8, 1, 16, 16)), bn_recalibration=-1, verbose=False)
