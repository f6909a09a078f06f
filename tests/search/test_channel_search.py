"""rl_prune(structure="channel"): the shared MDP over torch-pruning dependency groups."""
import copy

import pytest
import timm
import torch
from torch import nn
from torch.nn.utils import prune

from torch_rlprune import PruningPlan, apply_plan, compact, rl_prune
from torch_rlprune.structure.channel import count_macs_params

from helpers import ModelState, RaisingReward, inputs

FAST = dict(agent="random", episodes=4, verbose=False)


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics: masking a conv alone would NOT equal removing its channels."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return randomise_batchnorm(timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10))


def prune_hook_count(model):
    return sum(isinstance(h, prune.BasePruningMethod) for m in model.modules() for h in m._forward_pre_hooks.values())


@pytest.mark.parametrize("budget, target", [("macs", 0.5), ("params", 0.4)])
def test_budget_met_and_masked_model_equals_compacted_model(resnet, budget, target):
    x = inputs((16, 1, 32, 32))
    dense = count_macs_params(resnet, x[:2])
    dense_channels = sum(m.out_channels for m in resnet.modules() if isinstance(m, nn.Conv2d))
    result = rl_prune(resnet, target, data=x, structure="channel", budget=budget, seed=0, **FAST)
    which = 0 if budget == "macs" else 1
    masked_cost = count_macs_params(resnet, x[:2])
    assert abs(1 - masked_cost[which] / dense[which] - target) <= 0.02
    assert result.sparsity == pytest.approx(1 - masked_cost[which] / dense[which])
    assert prune_hook_count(resnet) > 0
    with torch.inference_mode():
        masked = resnet(x).clone()
    info = result.compact()
    with torch.inference_mode():
        compacted = resnet(x)
    # float32 rounding of a reordered sum grows with the output's scale (1.03e-5 at |y| <= 1.7 on one CPU)
    assert (masked - compacted).abs().max() < 1e-5 * max(1.0, float(masked.abs().max()))
    assert prune_hook_count(resnet) == 0
    after = count_macs_params(resnet, x[:2])
    assert after[which] == pytest.approx(masked_cost[which], rel=1e-3)
    assert info["macs_after"] < dense[0] and info["params_after"] < dense[1]
    assert sum(m.out_channels for m in resnet.modules() if isinstance(m, nn.Conv2d)) < dense_channels
    resnet.train()
    resnet(x).sum().backward()


def test_classifier_is_never_pruned(resnet):
    x = inputs((8, 1, 32, 32))
    rl_prune(resnet, 0.5, data=x, structure="channel", seed=0, **FAST)
    assert not hasattr(resnet.fc, "weight_mask") or bool((resnet.fc.weight_mask.sum(1) > 0).all())
    compact(resnet, x[:2])
    assert resnet.fc.out_features == 10


def test_plan_round_trip_reproduces_the_masks(resnet, tmp_path):
    x = inputs((8, 1, 32, 32))
    twin = copy.deepcopy(resnet)
    result = rl_prune(resnet, 0.5, data=x, structure="channel", seed=0, **FAST)
    result.plan.save(tmp_path / "plan.json")
    apply_plan(twin, PruningPlan.load(tmp_path / "plan.json"))  # input shape from the plan
    ours, theirs = resnet.state_dict(), twin.state_dict()
    assert ours.keys() == theirs.keys()
    # the plan carries masks; BatchNorm statistics re-estimated for it (bn_recalibration) and the kept
    # weights of the layers refitted after masking (repair="lstsq") stay with the model
    refitted = {f"{name}.weight_orig" for name in result.plan.metadata["repair"]["refitted"]}
    weights = [k for k in ours if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert any(k.endswith("weight_mask") for k in weights) and refitted and refitted < set(weights)
    assert all(torch.equal(ours[k], theirs[k]) for k in weights if k not in refitted)
    assert not any(torch.equal(ours[k], theirs[k]) for k in refitted)


def test_masked_state_dict_loaded_into_a_fresh_model_compacts_the_same(resnet):
    x = inputs((8, 1, 32, 32))
    fresh = copy.deepcopy(resnet)
    result = rl_prune(resnet, 0.5, data=x, structure="channel", seed=0, **FAST)
    apply_plan(fresh, result.plan, example_inputs=x[:2])  # same hooks, then the saved weights
    fresh.load_state_dict(resnet.state_dict())
    compact(fresh, x[:2])
    result.compact()
    with torch.inference_mode():
        assert (fresh(x) - resnet(x)).abs().max() < 1e-6


def test_failure_during_a_channel_search_leaves_the_model_untouched(resnet):
    x = inputs((8, 1, 32, 32))
    resnet.train()
    state = ModelState.of(resnet)
    sizes = [(m.in_channels, m.out_channels) for m in resnet.modules() if isinstance(m, nn.Conv2d)]
    with pytest.raises(RuntimeError, match="boom"):
        rl_prune(resnet, 0.5, data=x, structure="channel", reward=RaisingReward(x, 4, RuntimeError("boom")),
                 seed=0, **FAST)
    state.assert_unchanged(resnet)
    assert sizes == [(m.in_channels, m.out_channels) for m in resnet.modules() if isinstance(m, nn.Conv2d)]


def test_same_seed_same_channel_plan(resnet):
    x = inputs((8, 1, 32, 32))
    twin = copy.deepcopy(resnet)
    search = dict(agent="amc", episodes=6, agent_config={"warmup": 3}, verbose=False)
    a = rl_prune(resnet, 0.5, data=x, structure="channel", seed=3, **search)
    b = rl_prune(twin, 0.5, data=x, structure="channel", seed=3, **search)
    assert a.plan.amounts == b.plan.amounts
    assert [h["reward"] for h in a.history] == [h["reward"] for h in b.history]


COVERAGE = ["resnet18", "resnet50", "mobilenetv2_100", "mobilenetv3_small_100", "efficientnet_b0", "convnext_atto",
            "regnetx_002", "densenet121", "ghostnet_100", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
            "levit_128s", "mixer_b16_224"]
FIXED_SIZE = {"vit_tiny_patch16_224", "deit_tiny_patch16_224", "levit_128s", "mixer_b16_224"}


@pytest.mark.parametrize("name", COVERAGE)
def test_channel_search_across_timm_architectures(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **({"img_size": 64} if name in FIXED_SIZE else {}))
    randomise_batchnorm(model)
    x = inputs((4, 3, 64, 64))
    dense_macs = count_macs_params(model, x[:1])[0]
    result = rl_prune(model, 0.5, data=x, structure="channel", agent="random", episodes=2, verbose=False)
    masked_macs = count_macs_params(model, x[:1])[0]
    assert abs(1 - masked_macs / dense_macs - 0.5) <= 0.02
    with torch.inference_mode():
        masked = model(x).clone()
    result.compact()
    assert prune_hook_count(model) == 0
    with torch.inference_mode():
        compacted = model(x)
    assert compacted.shape == (4, 10)
    # relative: statistics re-estimated for the plan (bn_recalibration) can be small and amplify rounding
    # (mobilenetv2_100 here: 0.7e-4 of the output's scale, 1.1e-4 with its refitted layers; a wrong
    # channel would be of the order of the output itself)
    assert (masked - compacted).abs().max() <= 3e-4 * max(1.0, float(masked.abs().max()))
    assert count_macs_params(model, x[:1])[0] == pytest.approx(masked_macs, rel=0.01)
    model.train()
    model(x).sum().backward()


@pytest.mark.parametrize("action", [0.0, 0.125, 0.3, 1.0])
def test_coupled_coarse_groups_are_repaired_onto_the_budget(action):
    """small_cnn has two channel groups whose MACs depend on each other: after the first group
    loses 1 of 8 channels no count of the second lands within 2 pp (0.4775 or 0.5231); the
    repair must move both groups ([1, 8] -> [2, 7])."""
    from helpers import ConstantAgent, seeded, small_cnn

    model = seeded(small_cnn, 0)
    x = inputs((32, 1, 16, 16))
    dense = count_macs_params(model, x[:2])[0]
    result = rl_prune(model, 0.5, data=x, structure="channel", agent=ConstantAgent({"action": action}),
                      verbose=False)
    assert abs(1 - count_macs_params(model, x[:2])[0] / dense - 0.5) <= 0.02
    assert abs(result.sparsity - 0.5) <= 0.02


class TwoInputNet(nn.Module):
    """Token ids plus a float image: the record keeps both dtypes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.conv = nn.Conv2d(1, 32, 3, padding=1)
        self.head = nn.Linear(32 + 16, 4)

    def forward(self, ids, image):
        return self.head(torch.cat([self.embed(ids).mean(1), torch.relu(self.conv(image)).mean((2, 3))], 1))


def test_compact_needs_no_example_after_rl_prune_or_apply_plan(resnet, tmp_path):
    x = inputs((16, 1, 32, 32))
    twin, plain = copy.deepcopy(resnet), copy.deepcopy(resnet)
    result = rl_prune(resnet, 0.5, structure="channel", data=x, **FAST)
    expected = compact(copy.deepcopy(resnet), x[:2])
    info = compact(resnet)                        # the recorded example: the shapes the search ran on
    assert (info["macs_after"], info["params_after"]) == (expected["macs_after"], expected["params_after"])
    apply_plan(twin, PruningPlan.load(result.plan.save(tmp_path / "plan.json")), example_inputs=x[:2])
    reloaded = torch.load(_saved(twin, tmp_path), weights_only=False)   # a pickled module keeps the record
    assert compact(reloaded)["params_after"] == expected["params_after"]
    assert getattr(plain, "_rlprune_example", None) is None            # nothing pruned, nothing recorded


def _saved(model, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(model, path)
    return path


def test_the_recorded_example_keeps_every_input_and_its_dtype():
    from torch_rlprune.structure.inputs import recorded_example

    torch.manual_seed(0)
    model = TwoInputNet().eval()
    rl_prune(model, 0.4, structure="channel", data=(torch.randint(0, 50, (16, 5)), torch.randn(16, 1, 8, 8)),
             **FAST)
    ids, image = recorded_example(model)
    assert ids.dtype == torch.int64 and ids.shape[1:] == (5,) and image.shape[1:] == (1, 8, 8)
    compact(model)
    assert model.conv.out_channels < 32
    model._rlprune_example = {"shape": [2, 3], "dtype": "load"}       # not a dtype: ignored, never called
    assert recorded_example(model) is None
