"""Tied weights (one Parameter held by several modules) are one prunable unit, or clearly refused (issue 16)."""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from helpers import ModelState, TiedConvs, TiedLM, seeded
from torch_rlprune import PlanError, PruningPlan, apply_plan, rl_prune
from torch_rlprune.rewards.calibration import build_calibration
from torch_rlprune.structure.channel import ChannelStructure
from torch_rlprune.rewards.scores import FidelityReward
from torch_rlprune.structure.tensors import find_prunable


TOKENS = torch.randint(0, 200, (96, 6), generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def fidelity(model, reference, data) -> float:
    reward = FidelityReward(build_calibration(model, data, None, len(data)))
    reward.prepare(reference)
    return reward(model)


def test_a_tied_weight_is_one_step_with_its_other_holders_named():
    layers = {lay.name: lay for lay in find_prunable(seeded(TiedLM))}
    assert set(layers) == {"mix.weight", "head.weight"}
    assert layers["head.weight"].aliases == ("emb.weight",)
    convs = {lay.name: lay for lay in find_prunable(seeded(TiedConvs))}
    assert "b.weight" not in convs and convs["a.weight"].aliases == ("b.weight",)


def test_unstructured_search_prunes_a_tied_weight_once_and_reports_the_returned_model():
    model, reference = seeded(TiedLM), seeded(TiedLM)
    result = rl_prune(model, 0.5, data=TOKENS, agent="random", episodes=6, seed=0, verbose=False,
                      protect_first_last=False, selection=0.0)
    assert set(result.plan.amounts) == {"mix.weight", "head.weight"}          # one amount for the shared tensor
    assert torch.equal(model.emb.weight, model.head.weight)                   # both use the same masked weight
    assert model.emb.weight_mask is model.head.weight_mask
    assert model.emb.weight_orig is model.head.weight_orig                    # still one Parameter
    assert result.plan.score == pytest.approx(fidelity(model, reference, TOKENS), abs=1e-9)
    with torch.no_grad():
        before = model(TOKENS)
    for module, name in ((model.head, "weight"), (model.emb, "weight"), (model.mix, "weight")):
        prune.remove(module, name)
    with torch.no_grad():
        assert torch.equal(model(TOKENS), before)                             # prune.remove changes nothing
    assert model.emb.weight is model.head.weight                              # and the tie survives it


def test_tied_convolutions_count_once_toward_the_target():
    model = seeded(TiedConvs)
    result = rl_prune(model, 0.6, data=IMAGES, agent="random", episodes=4, seed=1, verbose=False,
                      protect_first_last=False, selection=0.0)
    unique = [model.stem.weight, model.a.weight, model.fc.weight]
    removed = sum(int((w == 0).sum()) for w in unique) / sum(w.numel() for w in unique)
    assert abs(removed - 0.6) <= 0.005 and abs(result.sparsity - removed) < 1e-6
    assert torch.equal(model.a.weight, model.b.weight)


@pytest.mark.parametrize("builder,data", [(TiedLM, TOKENS), (TiedConvs, IMAGES)])
def test_channel_pruning_refuses_tied_weights_before_touching_them(builder, data):
    model = seeded(builder)
    state = ModelState.of(model)
    digest = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="structure='channel': the model ties weights"):
        rl_prune(model, 0.2, data=data, structure="channel", agent="random", episodes=2, verbose=False)
    with pytest.raises(ValueError, match="ties weights"):
        ChannelStructure(model, data[:2])
    state.assert_unchanged(model)
    assert all(torch.equal(v, digest[k]) for k, v in model.state_dict().items())


def test_a_plan_giving_a_tied_weight_two_amounts_is_refused():
    model = seeded(TiedConvs)
    plan = PruningPlan(amounts={"a.weight": 0.5, "b.weight": 0.2}, numels={"a.weight": 576, "b.weight": 576},
                       target=0.3, sparsity=0.3)
    with pytest.raises(PlanError, match="one tied tensor"):
        apply_plan(model, plan)
    assert not hasattr(model.a, "weight_mask") and not hasattr(model.b, "weight_mask")


def test_a_module_reused_under_several_names_is_not_a_tie_for_channel_pruning():
    class Reused(nn.Module):     # CoaT's pattern: one position-encoding conv called by several blocks
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1)
            self.shared = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.blocks = nn.ModuleList([nn.Sequential(self.shared, nn.ReLU()) for _ in range(2)])
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.stem(x)
            for block in self.blocks:
                x = x + block(x)
            return self.fc(x.mean((2, 3)))

    model = seeded(Reused)
    structure = ChannelStructure(model, IMAGES[:2])                     # no refusal: one module, one weight
    assert structure.groups
    with pytest.raises(ValueError, match="ties weights"):
        ChannelStructure(seeded(TiedConvs), IMAGES[:2])                 # two modules, one weight: refused
