"""A failed or interrupted rl_prune leaves the model exactly as it was; rl_prune never moves the global RNG."""
import pytest
import torch
from torch.nn.utils import prune

from helpers import ModelState, RaisingReward, fmnist_cnn, inputs, seeded
from torch_rlprune import rl_prune

SEARCHES = {"random": dict(agent="random", episodes=6),
            "amc": dict(agent="amc", episodes=6, agent_config={"warmup": 2})}


@pytest.fixture
def x():
    return inputs((8, 1, 28, 28))


@pytest.fixture
def model(x):
    """A BN-CNN in training mode with one submodule in eval mode and user hooks of its own."""
    net = seeded(fmnist_cnn, 0).train()
    net[1].eval()
    net[0].register_forward_hook(lambda m, i, o: None)
    net[4].register_forward_pre_hook(lambda m, i: None)
    net(x)  # one training step's worth of BatchNorm statistics, so the buffers are not trivial
    return net


def search_failing_at(model, x, call, error, search, target=0.75):
    reward = RaisingReward(x, fail_at=call, error=error)
    with pytest.raises(type(error)) as info:
        rl_prune(model, target, data=x, reward=reward, seed=0, verbose=False, **search)
    assert info.value is error, "the original exception must propagate"
    assert reward.calls == call
    return info


# --------------------------------------------------------------------------- failures
@pytest.mark.parametrize("search", list(SEARCHES))
@pytest.mark.parametrize("call", [1, 2, 5], ids=["baseline", "first-episode", "fourth-episode"])
def test_reward_raising_leaves_the_model_exactly_as_it_was(model, x, call, search):
    state = ModelState.of(model)
    search_failing_at(model, x, call, RuntimeError("reward service down"), SEARCHES[search])
    state.assert_unchanged(model)


@pytest.mark.parametrize("search", list(SEARCHES))
def test_keyboard_interrupt_leaves_the_model_exactly_as_it_was(model, x, search):
    state = ModelState.of(model)
    search_failing_at(model, x, 4, KeyboardInterrupt(), SEARCHES[search])
    state.assert_unchanged(model)


def test_failure_on_an_already_pruned_model_restores_its_masks_and_weights(model, x):
    prune.l1_unstructured(model[0], "weight", amount=0.3)
    prune.random_unstructured(model[9], "weight", amount=0.4)
    model(x)
    state = ModelState.of(model)
    search_failing_at(model, x, 4, RuntimeError("boom"), SEARCHES["random"], target=0.8)
    state.assert_unchanged(model)
    # and the model still computes what it computed before: weight == weight_orig * weight_mask
    for module in (model[0], model[9]):
        assert torch.equal(module.weight, module.weight_orig * module.weight_mask)


@pytest.mark.parametrize("value, error", [(float("nan"), ValueError), (float("inf"), ValueError),
                                          ("good", TypeError), (None, TypeError)])
def test_reward_returning_garbage_is_an_error_and_the_model_is_untouched(model, x, value, error):
    state = ModelState.of(model)
    with pytest.raises(error, match="reward"):
        rl_prune(model, 0.5, data=x, reward=lambda m: value, seed=0, verbose=False, **SEARCHES["random"])
    state.assert_unchanged(model)


def test_model_is_usable_for_a_second_search_after_a_failure(model, x):
    search_failing_at(model, x, 3, RuntimeError("boom"), SEARCHES["amc"])
    result = rl_prune(model, 0.75, data=x, seed=0, verbose=False, **SEARCHES["amc"])
    assert abs(result.sparsity - 0.75) <= 0.005


# --------------------------------------------------------------------------- success
def test_success_keeps_every_training_flag(model, x):
    flags = {name: m.training for name, m in model.named_modules()}
    assert len(set(flags.values())) == 2, "the fixture mixes train and eval submodules"
    rl_prune(model, 0.6, data=x, seed=0, verbose=False, **SEARCHES["amc"])
    assert {name: m.training for name, m in model.named_modules()} == flags


def test_success_keeps_user_hooks_and_batchnorm_statistics(model, x):
    user_hook = next(iter(model[0]._forward_hooks.values()))
    user_pre_hook = next(iter(model[4]._forward_pre_hooks.values()))
    statistics = {name: b.clone() for name, b in model.named_buffers()}
    # bn_recalibration=0: with it (the default) the result deliberately carries statistics fitted to its plan
    rl_prune(model, 0.6, data=x, seed=0, verbose=False, bn_recalibration=0, **SEARCHES["random"])
    assert list(model[0]._forward_hooks.values()) == [user_hook]
    pre_hooks = list(model[4]._forward_pre_hooks.values())
    assert pre_hooks[0] is user_pre_hook and len(pre_hooks) == 2  # the user's, then the prune hook
    for name, value in statistics.items():
        assert torch.equal(dict(model.named_buffers())[name], value), f"{name} changed by the search"


# --------------------------------------------------------------------------- the global RNG
@pytest.mark.parametrize("search", list(SEARCHES))
def test_global_torch_rng_is_unchanged_by_a_search(model, x, search):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    rl_prune(model, 0.6, data=x, seed=7, verbose=False, **SEARCHES[search])
    assert torch.equal(torch.get_rng_state(), state)


def test_global_torch_rng_is_unchanged_by_a_failed_search(model, x):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    search_failing_at(model, x, 4, RuntimeError("boom"), SEARCHES["amc"])
    assert torch.equal(torch.get_rng_state(), state)


def test_global_rng_state_does_not_change_the_search(model, x):
    def amounts_after(global_seed):
        torch.manual_seed(global_seed)
        net = seeded(fmnist_cnn, 0)
        return rl_prune(net, 0.6, data=x, seed=3, verbose=False, **SEARCHES["amc"]).plan.amounts

    assert amounts_after(1) == amounts_after(2)
