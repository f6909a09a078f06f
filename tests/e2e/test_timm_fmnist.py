"""A real architecture on real data: timm's resnet18 (1 input channel, 10 classes) on Fashion-MNIST."""
import copy

import pytest
import timm
import torch
from torch import nn
from torch.nn.utils import prune

from helpers import PRUNABLE, assert_binary_masks, assert_budget_met, mask_sparsity, seeded, weight_masks
from torch_rlprune import PolicyUnstructured, PruningPlan, apply_plan, rl_prune
from torch_rlprune.structure.inputs import infer_input_shape, reduced_image_shape

CALIBRATION = 64


def resnet18():
    return timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10)


def prunable(model):
    return [m for m in model.modules() if isinstance(m, PRUNABLE)]


@pytest.fixture(scope="module")
def calibration(fmnist_test_tensors):
    x, y = fmnist_test_tensors
    return x[:CALIBRATION], y[:CALIBRATION]


@pytest.fixture(scope="module")
def pruned_by_params(calibration):
    """resnet18 pruned to 80% of its weights by AMC (a short search) on real images and labels."""
    model = seeded(resnet18, 0)
    result = rl_prune(model, 0.8, data=calibration, reward="accuracy", agent="amc", episodes=6,
                      agent_config={"warmup": 3}, calibration_samples=CALIBRATION, seed=0, verbose=False)
    return result


def searched(model, result):
    """The modules whose weights the search pruned (the first conv and the classifier stay dense)."""
    return [model.get_submodule(name.rsplit(".", 1)[0]) for name in result.plan.amounts]


def test_params_budget_of_80_percent_is_met(pruned_by_params, calibration):
    model = pruned_by_params.model
    assert len(prunable(model)) == 21  # 17 convs, 3 downsamples, fc
    assert pruned_by_params.plan.metadata["protected"] == ["conv1.weight", "fc.weight"]
    assert len(weight_masks(model)) == len(searched(model, pruned_by_params)) == 19
    assert_budget_met(mask_sparsity(model, modules=searched(model, pruned_by_params)), 0.8)
    assert_binary_masks(model)
    for module in searched(model, pruned_by_params):
        assert any(isinstance(h, PolicyUnstructured) for h in module._forward_pre_hooks.values())
    assert not prune.is_pruned(model.conv1) and not prune.is_pruned(model.fc)


def test_pruned_resnet_still_classifies(pruned_by_params, calibration, fmnist_test_tensors):
    model = pruned_by_params.model
    x, _ = fmnist_test_tensors
    with torch.no_grad():
        out = model.eval()(x[:128])
    assert out.shape == (128, 10) and bool(torch.isfinite(out).all())


def test_macs_budget_of_50_percent_is_met(calibration):
    model, x = seeded(resnet18, 1), calibration[0]
    result = rl_prune(model, 0.5, data=calibration, budget="macs", agent="random", episodes=4,
                      calibration_samples=CALIBRATION, seed=0, verbose=False)
    measured = mask_sparsity(model, "macs", x[:2], searched(model, result))
    assert_budget_met(measured, 0.5)
    assert measured == pytest.approx(result.sparsity)
    assert_binary_masks(model)


def test_prune_remove_makes_the_pruning_permanent(pruned_by_params, calibration):
    model = copy.deepcopy(pruned_by_params.model).eval()
    x = calibration[0][:16]
    with torch.no_grad():
        before = model(x)
    masks = weight_masks(model)
    for module in searched(model, pruned_by_params):
        prune.remove(module, "weight")
        assert isinstance(module.weight, nn.Parameter) and not prune.is_pruned(module)
    for name, mask in masks.items():
        assert bool((model.get_submodule(name[:-len(".weight")]).weight[mask == 0] == 0).all())
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_plan_round_trip_to_a_fresh_resnet(pruned_by_params, tmp_path):
    plan = PruningPlan.load(pruned_by_params.plan.save(tmp_path / "resnet18.json"))
    assert plan == pruned_by_params.plan
    twin = apply_plan(seeded(resnet18, 0), plan)  # same seed: same weights
    expected = weight_masks(pruned_by_params.model)
    assert weight_masks(twin).keys() == expected.keys()
    for name, mask in weight_masks(twin).items():
        assert torch.equal(mask, expected[name]), name


def test_input_shape_comes_from_timm_pretrained_cfg_with_the_real_channel_count():
    model = resnet18()
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert tuple(infer_input_shape(model)) == (1, 224, 224)


def test_no_data_falls_back_to_synthetic_inputs_from_pretrained_cfg():
    model = seeded(resnet18, 2)
    # the config's 224x224 scaled down to a 128-pixel side: resnet18 runs on it
    with pytest.warns(UserWarning, match=r"synthetic.*\(1, 128, 128\) \(the model's \(1, 224, 224\) scaled down"):
        result = rl_prune(model, 0.5, data=None, agent="random", episodes=2, calibration_samples=4, seed=0,
                          verbose=False)
    assert result.plan.metadata["synthetic_calibration"] is True
    assert_budget_met(mask_sparsity(model, modules=searched(model, result)), 0.5)


def test_no_data_with_small_example_inputs_uses_their_shape():
    model = seeded(resnet18, 3)
    with pytest.warns(UserWarning, match=r"synthetic.*\(1, 32, 32\)"):
        result = rl_prune(model, 0.6, data=None, example_inputs=torch.zeros(2, 1, 32, 32), budget="macs",
                          agent="random", episodes=2, calibration_samples=8, seed=0, verbose=False)
    assert_budget_met(mask_sparsity(model, "macs", torch.zeros(2, 1, 32, 32), searched(model, result)), 0.6)


class FixedSizeNet(nn.Module):
    """Runs only on the 1x160x160 images its config names (a flattening head, like a fixed patch grid)."""

    pretrained_cfg = {"input_size": (1, 160, 160)}

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=8, padding=1)
        self.head = nn.Linear(2 * 20 * 20, 10)

    def forward(self, x):
        return self.head(self.conv(x).flatten(1))


def test_synthetic_images_are_scaled_down_only_where_the_model_runs_on_them():
    model = seeded(resnet18, 0).eval()
    assert reduced_image_shape(model, (1, 224, 224), 64) == (1, 64, 64)
    assert reduced_image_shape(model, (1, 224, 448), 64) == (1, 64, 128)
    assert reduced_image_shape(model, (1, 48, 48), 64) == (1, 48, 48)      # already small
    assert reduced_image_shape(model, (10, 224), 64) == (10, 224)          # not an image
    fixed = seeded(FixedSizeNet).eval()
    assert reduced_image_shape(fixed, (1, 160, 160), 128) == (1, 160, 160)
    with pytest.warns(UserWarning, match=r"synthetic Gaussian inputs of shape \(1, 160, 160\);"):
        result = rl_prune(fixed, 0.5, agent="random", episodes=2, verbose=False)
    assert result.plan.metadata["calibration_samples"] == 128


def test_the_no_data_one_liner_stops_on_its_own(recwarn):
    model = seeded(resnet18, 4)
    result = rl_prune(model, 0.8, verbose=False)
    stopped = result.plan.metadata["stopped"]
    assert stopped["reason"] in ("patience", "time_budget") and stopped["episodes"] < stopped["of"]
    assert result.plan.metadata["synthetic_calibration"] and result.plan.metadata["calibration_samples"] == 128
    assert_budget_met(mask_sparsity(model, modules=searched(model, result)), 0.8)
