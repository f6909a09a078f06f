"""PolicyUnstructured / policy_unstructured and how rl_prune's output lives inside torch.nn.utils.prune."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from helpers import assert_binary_masks, seeded, small_cnn, weight_masks
from torch_rlprune import PolicyUnstructured, apply_plan, policy_unstructured
from torch_rlprune.demo.training import train_classifier


def tie_free_linear(seed=0):
    # Gaussian weights: equal magnitudes have probability zero, so the k smallest are unique.
    return seeded(nn.Linear, seed, 12, 9)


def tie_free_conv(seed=0):
    return seeded(nn.Conv2d, seed, 3, 6, 3)


def policy_hooks(module):
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, PolicyUnstructured)]


# --------------------------------------------------------------------------- functional twin
@pytest.mark.parametrize("build", [tie_free_linear, tie_free_conv])
@pytest.mark.parametrize("amount", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0, 0, 1, 7, 40])
def test_policy_unstructured_gives_the_same_mask_as_l1_unstructured(build, amount):
    ours, theirs = build(), build()
    policy_unstructured(ours, "weight", amount=amount)
    prune.l1_unstructured(theirs, "weight", amount=amount)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)
    assert torch.equal(ours.weight, theirs.weight)


@pytest.mark.parametrize("count", [1, 5, 50, 108])
def test_int_amount_prunes_exactly_that_many_entries(count):
    module = tie_free_linear()
    policy_unstructured(module, "weight", amount=count)
    assert int((module.weight_mask == 0).sum()) == count


def test_importance_scores_decide_which_entries_go():
    module, reference = tie_free_linear(), tie_free_linear()
    scores = seeded(torch.randn, 5, 9, 12)
    policy_unstructured(module, "weight", amount=0.4, importance_scores=scores)
    prune.l1_unstructured(reference, "weight", amount=0.4, importance_scores=scores)
    assert torch.equal(module.weight_mask, reference.weight_mask)
    smallest = scores.abs().flatten().argsort()[:int(round(0.4 * scores.numel()))]
    assert bool((module.weight_mask.flatten()[smallest] == 0).all())


def test_policy_unstructured_reparametrises_through_the_prune_api():
    module = tie_free_conv()
    original = module.weight
    returned = policy_unstructured(module, "weight", amount=0.5)
    assert returned is module
    assert prune.is_pruned(module)
    assert issubclass(PolicyUnstructured, prune.BasePruningMethod)
    assert len(policy_hooks(module)) == 1
    assert module.weight_orig is original and isinstance(module.weight_orig, nn.Parameter)
    assert "weight_mask" in dict(module.named_buffers()) and "weight" not in dict(module.named_parameters())
    assert torch.equal(module.weight, module.weight_orig * module.weight_mask)


@pytest.mark.parametrize("amount, error", [(-0.1, ValueError), (1.5, ValueError), (-1, ValueError),
                                           (1000, ValueError), ("0.5", TypeError), (None, TypeError)])
def test_invalid_amounts_are_rejected_like_torch_does(amount, error):
    module = tie_free_linear()
    with pytest.raises(error):
        policy_unstructured(module, "weight", amount=amount)
    assert not prune.is_pruned(module)


def test_pruning_twice_stacks_in_a_pruning_container():
    module = tie_free_linear()
    policy_unstructured(module, "weight", amount=0.5)
    first = module.weight_mask.clone()
    policy_unstructured(module, "weight", amount=0.5)
    (hook,) = module._forward_pre_hooks.values()
    assert isinstance(hook, prune.PruningContainer)
    assert bool((module.weight_mask[first == 0] == 0).all()), "entries pruned first must stay pruned"
    alive = int(first.sum())
    assert int((module.weight_mask == 0).sum()) == int((first == 0).sum()) + round(0.5 * alive)


# --------------------------------------------------------------------------- rl_prune output in the prune API
def test_every_pruned_tensor_is_a_standard_prune_reparametrisation(pruned_cnn):
    model = pruned_cnn.model
    prunable = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for module in prunable:
        assert prune.is_pruned(module)
        assert isinstance(module.weight_orig, nn.Parameter)
        assert "weight_mask" in dict(module.named_buffers(recurse=False))
        assert len(policy_hooks(module)) == 1
        assert torch.equal(module.weight, module.weight_orig * module.weight_mask)
    assert_binary_masks(model)
    assert set(weight_masks(model)) == set(pruned_cnn.plan.amounts)


def test_prune_remove_keeps_the_zeros_in_a_plain_parameter(pruned_cnn, cnn_batch):
    model = pruned_cnn.model
    before = model(cnn_batch)
    masks = weight_masks(model)
    for name in masks:
        prune.remove(model.get_submodule(name.rsplit(".", 1)[0]), "weight")
    for name, mask in masks.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert isinstance(module.weight, nn.Parameter)
        assert not hasattr(module, "weight_orig") and not hasattr(module, "weight_mask")
        assert not module._forward_pre_hooks
        assert bool((module.weight[mask == 0] == 0).all())
    assert torch.equal(model(cnn_batch), before)


def test_l1_unstructured_on_top_prunes_a_fraction_of_what_is_still_alive(pruned_cnn):
    module = pruned_cnn.model[-1]
    first = module.weight_mask.clone()
    prune.l1_unstructured(module, "weight", amount=0.5)
    (hook,) = module._forward_pre_hooks.values()
    assert isinstance(hook, prune.PruningContainer)
    assert [type(m) for m in hook] == [PolicyUnstructured, prune.L1Unstructured]
    assert bool((module.weight_mask[first == 0] == 0).all())
    expected = int((first == 0).sum()) + round(0.5 * int(first.sum()))
    assert int((module.weight_mask == 0).sum()) == expected
    # the entries removed second are the smallest of those that were alive
    alive = module.weight_orig.detach().abs()[first == 1]
    newly = (first == 1) & (module.weight_mask == 0)
    assert module.weight_orig.detach().abs()[newly].max() <= alive.sort().values[round(0.5 * len(alive))]


def test_state_dict_loads_into_a_fresh_model_pruned_with_the_same_plan(pruned_cnn, cnn_batch):
    fresh = seeded(small_cnn, 99)  # different weights: everything must come from the state_dict
    apply_plan(fresh, pruned_cnn.plan)
    fresh.load_state_dict(pruned_cnn.model.state_dict())
    assert torch.equal(fresh(cnn_batch), pruned_cnn.model(cnn_batch))
    for name, mask in weight_masks(pruned_cnn.model).items():
        assert torch.equal(weight_masks(fresh)[name], mask)


def test_prune_identity_trick_loads_a_pruned_state_dict(pruned_cnn, cnn_batch):
    fresh = seeded(small_cnn, 99)
    for name in pruned_cnn.plan.amounts:
        prune.identity(fresh.get_submodule(name.rsplit(".", 1)[0]), "weight")
    fresh.load_state_dict(pruned_cnn.model.state_dict())
    assert torch.equal(fresh(cnn_batch), pruned_cnn.model(cnn_batch))


def test_deepcopy_of_a_pruned_model_keeps_working(pruned_cnn, cnn_batch):
    clone = copy.deepcopy(pruned_cnn.model)
    assert torch.equal(clone(cnn_batch), pruned_cnn.model(cnn_batch))
    assert all(len(policy_hooks(m)) == 1 for m in clone.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


# --------------------------------------------------------------------------- an existing training script
def own_sgd_loop(model, x, y, steps=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("train", [own_sgd_loop, lambda m, x, y: train_classifier(m, x, y, epochs=4, batch_size=8)],
                         ids=["own_loop", "train_classifier"])
def test_training_after_pruning_keeps_pruned_weights_at_zero(pruned_cnn, cnn_batch, train):
    model = pruned_cnn.model
    labels = torch.arange(len(cnn_batch)) % 10
    masks = weight_masks(model)
    before = {name: model.get_submodule(name.rsplit(".", 1)[0]).weight.detach().clone() for name in masks}
    train(model, cnn_batch, labels)
    model(cnn_batch)  # the prune hook recomputes `weight` on every forward
    for name, mask in masks.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert torch.equal(module.weight_mask, mask), f"{name}: training changed the mask"
        assert bool((module.weight[mask == 0] == 0).all()), f"{name}: a pruned weight came back"
        alive_changed = module.weight.detach()[mask == 1] != before[name][mask == 1]
        assert float(alive_changed.float().mean()) > 0.9, f"{name}: the unpruned weights did not train"
