"""rl_prune and global_rl_unstructured: the public contract, end to end."""
import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from helpers import (CallOrderNet, ModelState, assert_binary_masks, assert_budget_met, inputs, mask_sparsity, seeded,
                     small_cnn)
from torch_rlprune import PruneResult, PruningPlan, global_rl_unstructured, list_agents, rl_prune

FAST = dict(agent="random", episodes=3, verbose=False)
FAST_AMC = dict(agent="amc", episodes=6, agent_config={"warmup": 2}, verbose=False)


class SharedBlockNet(nn.Module):
    """A stem, one grouped conv block used twice (its weights cost twice the MACs), a Linear head.

    With ``rescale=True`` the second call runs on a 2x downsampled map (a quarter of the positions).
    """

    def __init__(self, rescale=False):
        super().__init__()
        self.rescale = rescale
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.block(torch.relu(self.stem(x))))
        x = nn.functional.max_pool2d(x, 2) if self.rescale else x
        return self.head(torch.relu(self.block(x)).mean((2, 3)))


class TokenLinearThenConvNet(nn.Module):
    """A token-wise Linear, then two convs: the last layer's weights are the most expensive in MACs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(self.lin(x)))).flatten(1)


# --------------------------------------------------------------------------- the result
def test_result_describes_an_in_place_pruning(small_cnn_model, cnn_batch):
    result = rl_prune(small_cnn_model, 0.7, data=cnn_batch, seed=0, **FAST)
    assert isinstance(result, PruneResult)
    assert result.model is small_cnn_model
    assert isinstance(result.plan, PruningPlan)
    assert_budget_met(result.sparsity, 0.7)
    assert result.sparsity == pytest.approx(mask_sparsity(small_cnn_model))
    assert len(result.history) == 3
    for i, episode in enumerate(result.history):
        assert episode["episode"] == i
        assert {"reward", "score", "sparsity", "best_reward", "phase"} <= set(episode)
        assert_budget_met(episode["sparsity"], 0.7)
    assert [h["best_reward"] for h in result.history] == sorted(h["best_reward"] for h in result.history)
    summary = result.summary()
    assert isinstance(summary, str) and "0.7000" in summary
    assert all(name in summary for name in result.plan.amounts)


# --------------------------------------------------------------------------- the budget
@pytest.mark.parametrize("search", [FAST, FAST_AMC], ids=["random", "amc"])
@pytest.mark.parametrize("budget", ["params", "macs"])
@pytest.mark.parametrize("target", [0.2, 0.55, 0.9])
@pytest.mark.parametrize("net", [small_cnn, SharedBlockNet], ids=["cnn", "shared-block"])
def test_budget_is_met_as_counted_from_the_masks(net, target, budget, search):
    model, x = seeded(net, 1), inputs((16, 1, 16, 16))
    result = rl_prune(model, target, data=x, budget=budget, seed=0, **search)
    measured = mask_sparsity(model, budget, x)
    assert_budget_met(measured, target)
    assert measured == pytest.approx(result.sparsity)
    assert_binary_masks(model)
    assert model(x).shape == (16, 10)


@pytest.mark.parametrize("target", [0.2, 0.55, 0.9])
def test_macs_of_a_layer_called_at_two_resolutions_add_up_per_call(target):
    # block's weights run on 16x16 then on 8x8 positions: 256 + 64 MACs each per sample
    model, x = seeded(SharedBlockNet, 1, rescale=True), inputs((16, 1, 16, 16))
    result = rl_prune(model, target, data=x, budget="macs", seed=0, **FAST)
    assert_budget_met(mask_sparsity(model, "macs", x), target)
    assert result.sparsity == pytest.approx(mask_sparsity(model, "macs", x))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_macs_budget_is_met_when_the_last_layer_is_the_coarsest(target, seed):
    # Exact targets are reachable (every layer's MAC cost per weight is a multiple of 16, the
    # total is 14336), but the last conv's 4 weights cost 256 MACs each: 1.8% of the total.
    model, x = seeded(TokenLinearThenConvNet, seed), inputs((8, 1, 16, 16))
    rl_prune(model, target, data=x, budget="macs", seed=seed, **FAST)
    assert_budget_met(mask_sparsity(model, "macs", x), target)


@pytest.mark.parametrize("target", [0.5, 0.25])
def test_target_no_plan_can_meet_is_a_value_error_before_anything_changes(target):
    model = seeded(nn.Linear, 0, 3, 3)  # 9 weights: 4/9 and 5/9 are the closest to 0.5
    state = ModelState.of(model)
    with pytest.raises(ValueError, match="target"):
        rl_prune(model, target, data=inputs((4, 3)), **FAST)
    state.assert_unchanged(model)


# --------------------------------------------------------------------------- models pruned before
def test_existing_masks_are_kept_and_count_toward_the_target(small_cnn_model, cnn_batch):
    prune.random_unstructured(small_cnn_model[5], "weight", amount=0.5)  # random: not what magnitude would pick
    earlier = small_cnn_model[5].weight_mask.clone()
    rl_prune(small_cnn_model, 0.7, data=cnn_batch, seed=0, **FAST)
    mask = small_cnn_model[5].weight_mask
    assert bool((mask[earlier == 0] == 0).all()), "an entry the earlier mask removed came back"
    assert_budget_met(mask_sparsity(small_cnn_model), 0.7)
    assert isinstance(next(iter(small_cnn_model[5]._forward_pre_hooks.values())), prune.PruningContainer)


def test_target_below_the_existing_sparsity_is_a_value_error(small_cnn_model, cnn_batch):
    prune.l1_unstructured(small_cnn_model[5], "weight", amount=0.6)  # 6144 of 11464 weights: 53.6%
    small_cnn_model.train()
    state = ModelState.of(small_cnn_model)
    with pytest.raises(ValueError, match="target"):
        rl_prune(small_cnn_model, 0.4, data=cnn_batch, **FAST)
    state.assert_unchanged(small_cnn_model)


# --------------------------------------------------------------------------- bad input
class OnlyNormAndActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.act = nn.BatchNorm2d(1), nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(x)).flatten(1)


BAD_INPUTS = {
    # name: (rl_prune keyword overrides, model builder, error type, message fragments)
    "target 0": (dict(target=0), small_cnn, ValueError, ["target", r"\(0, 1\)"]),
    "target 1": (dict(target=1), small_cnn, ValueError, ["target"]),
    "target 1.0": (dict(target=1.0), small_cnn, ValueError, ["target"]),
    "target -0.1": (dict(target=-0.1), small_cnn, ValueError, ["target"]),
    "target 1.5": (dict(target=1.5), small_cnn, ValueError, ["target"]),
    "target NaN": (dict(target=float("nan")), small_cnn, ValueError, ["target"]),
    "target True": (dict(target=True), small_cnn, TypeError, ["target"]),
    "target string": (dict(target="0.5"), small_cnn, TypeError, ["target"]),
    "target None without max_drop": (dict(target=None), small_cnn, ValueError, ["target", "max_drop"]),
    "unknown agent": (dict(agent="ppo"), small_cnn, ValueError, ["agent", "amc", "random"]),
    "agent not a name": (dict(agent=42), small_cnn, TypeError, ["agent"]),
    "unknown reward": (dict(reward="loss"), small_cnn, ValueError, ["reward", "fidelity", "accuracy"]),
    "unknown budget": (dict(budget="flops"), small_cnn, ValueError, ["budget", "params", "macs"]),
    "unknown structure": (dict(structure="filters"), small_cnn, ValueError, ["structure", "unstructured", "channel"]),
    "importance_scores with channels": (dict(structure="channel", importance_scores={}), small_cnn, ValueError,
                                        ["importance_scores", "unstructured"]),
    "round_to with unstructured": (dict(round_to=8), small_cnn, ValueError, ["round_to", "channel"]),
    "episodes 0": (dict(episodes=0), small_cnn, ValueError, ["episodes"]),
    "episodes -3": (dict(episodes=-3), small_cnn, ValueError, ["episodes"]),
    "episodes 2.5": (dict(episodes=2.5), small_cnn, ValueError, ["episodes"]),
    "unknown agent option": (dict(agent="amc", agent_config={"warmupp": 3}), small_cnn, ValueError,
                             ["warmupp", "init_delta"]),
    "calibration_samples 0": (dict(calibration_samples=0), small_cnn, ValueError, ["calibration_samples"]),
    "max_amount 0": (dict(max_amount=0.0), small_cnn, ValueError, ["max_amount"]),
    "seed string": (dict(seed="0"), small_cnn, TypeError, ["seed"]),
    "no prunable layers": (dict(), OnlyNormAndActivation, ValueError, ["prunable"]),
    "everything excluded": (dict(exclude=["0", "2", "5"]), small_cnn, ValueError, ["prunable"]),
    "unknown exclude name": (dict(exclude=["conv9"]), small_cnn, ValueError, ["exclude", "conv9"]),
    "exclude wrong type": (dict(exclude=[3.5]), small_cnn, TypeError, ["exclude"]),
    "data with 3 channels": (dict(data=inputs((8, 3, 16, 16))), small_cnn, ValueError, ["data"]),
    "data of the wrong size": (dict(data=inputs((8, 1, 20, 20))), small_cnn, ValueError, ["data"]),
    "data that is not data": (dict(data=12), small_cnn, TypeError, ["data"]),
    "empty data": (dict(data=[]), small_cnn, ValueError, ["data"]),
    "accuracy without labels": (dict(reward="accuracy"), small_cnn, ValueError, ["accuracy", "label"]),
    "labels out of range": (dict(reward="accuracy", data=(inputs((8, 1, 16, 16)), torch.full((8,), 12))),
                            small_cnn, ValueError, ["label"]),
    "no data, no input shape": (dict(data=None), small_cnn, ValueError, ["data", "example_inputs"]),
    "target above max_amount": (dict(target=0.9, max_amount=0.5), small_cnn, ValueError, ["max_amount"]),
    "importance scores of the wrong shape": (dict(importance_scores={"5.weight": torch.ones(3)}), small_cnn,
                                             ValueError, ["5.weight", "shape"]),
    "importance scores for an unknown tensor": (dict(importance_scores={"9.weight": torch.ones(3)}), small_cnn,
                                                ValueError, ["9.weight"]),
    # importance_scores: a dict {name or (module, name): tensor}, whatever its contents fail on later
    "importance scores a list": (dict(importance_scores=[torch.ones(8, 1, 3, 3)]), small_cnn, TypeError,
                                 ["importance_scores", "dict", "list"]),
    "importance scores a tensor": (dict(importance_scores=torch.ones(8, 1, 3, 3)), small_cnn, TypeError,
                                   ["importance_scores", "dict", "Tensor"]),
    "importance scores of numpy arrays": (dict(importance_scores={"0.weight": np.ones((8, 1, 3, 3))}), small_cnn,
                                          TypeError, ["importance_scores", "0.weight", "torch.Tensor", "ndarray"]),
    "importance scores keyed by position": (dict(importance_scores={0: torch.ones(8, 1, 3, 3)}), small_cnn,
                                            TypeError, ["importance_scores", "keys", r"\(module, name\)", "int"]),
    # channel pruning ranks channels with a torch-pruning importance: a name it cannot call is not one
    "channel importance 'activation'": (dict(structure="channel", importance="activation"), small_cnn, ValueError,
                                        ["importance", "'magnitude'", "torch-pruning", "structure='unstructured'"]),
    "channel importance a number": (dict(structure="channel", importance=0.5), small_cnn, ValueError,
                                    ["importance", "'magnitude'", "torch-pruning", "0.5"]),
    "channel importance a class": (dict(structure="channel", importance=tp.importance.GroupMagnitudeImportance),
                                   small_cnn, ValueError, ["importance", "a class: pass an instance",
                                                           r"GroupMagnitudeImportance\(\)"]),
    "seed -1": (dict(seed=-1), small_cnn, ValueError, ["seed", ">= 0", "-1"]),
    # agent_config's episodes count like episodes= (which FAST gives: left out here so that they are the count)
    "agent_config episodes 0": (dict(episodes=None, agent_config={"episodes": 0}), small_cnn, ValueError,
                                ["agent_config", "episodes", "positive integer"]),
    "agent_config episodes -3": (dict(episodes=None, agent_config={"episodes": -3}), small_cnn, ValueError,
                                 ["agent_config", "episodes", "-3"]),
    "agent_config episodes 2.7": (dict(episodes=None, agent_config={"episodes": 2.7}), small_cnn, ValueError,
                                  ["agent_config", "episodes", "2.7"]),
    "agent_config episodes 'ten'": (dict(episodes=None, agent_config={"episodes": "ten"}), small_cnn, ValueError,
                                    ["agent_config", "episodes", "'ten'"]),
    "agent_config number a string": (dict(agent="amc", agent_config={"lr_actor": "fast"}), small_cnn, TypeError,
                                     ["agent_config", "lr_actor", "number", "str"]),
    "agent_config count a float": (dict(agent="amc", agent_config={"warmup": 2.5}), small_cnn, TypeError,
                                   ["agent_config", "warmup", "integer or None", "float"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_rejected_before_the_model_changes(case, cnn_batch):
    overrides, build, error, fragments = BAD_INPUTS[case]
    model = seeded(build, 0).train()
    kwargs = dict(target=0.5, data=cnn_batch, seed=0, **FAST)
    kwargs.update(overrides)
    state = ModelState.of(model)
    with pytest.raises(error) as info:
        rl_prune(model, **kwargs)
    for fragment in fragments:
        assert info.match(fragment), f"{case}: message {str(info.value)!r} does not mention {fragment!r}"
    state.assert_unchanged(model)


def test_an_agent_built_on_its_own_checks_its_config_and_seed():
    from torch_rlprune.agents import create_agent

    with pytest.raises(ValueError, match=r"agent_config\['episodes'\] for agent 'amc' must be a positive integer"):
        create_agent("amc", {"episodes": 0})
    with pytest.raises(TypeError, match=r"agent_config\['overlap_updates'\] for agent 'amc' must be True or False"):
        create_agent("amc", {"overlap_updates": 1})
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        create_agent("random", seed=-1)
    assert create_agent("prior", {"episodes": 0}).config.episodes == 0  # the prior agent's own default
    agent = create_agent("amc", {"warmup": np.int64(2), "init_delta": np.float64(0.4), "delta_decay": None})
    assert (agent.config.warmup, agent.config.init_delta) == (2, 0.4)


def test_model_that_is_not_a_module_is_a_type_error(cnn_batch):
    with pytest.raises(TypeError, match="model"):
        rl_prune(lambda x: x, 0.5, data=cnn_batch, **FAST)


def test_the_allowed_agents_are_listed():
    assert {"amc", "random"} <= set(list_agents())


# --------------------------------------------------------------------------- what gets pruned
def test_layers_are_searched_in_call_order_and_unused_ones_are_left_alone():
    model, x = seeded(CallOrderNet, 0), inputs((8, 3, 10))
    with pytest.warns(UserWarning, match="unused"):
        result = rl_prune(model, 0.5, data=x, seed=0, **FAST)
    assert list(result.plan.amounts) == ["a.weight", "b.weight"]
    assert not prune.is_pruned(model.unused)
    assert_budget_met(mask_sparsity(model, modules=[model.a, model.b]), 0.5)


@pytest.mark.parametrize("exclude", ["0", ["0"], "0.weight", lambda m: m[0], lambda m: [m[0], "2"]],
                         ids=["name", "list", "tensor-name", "module", "mixed"])
def test_excluded_layers_are_not_pruned(exclude, small_cnn_model, cnn_batch):
    exclude = exclude(small_cnn_model) if callable(exclude) else exclude
    rl_prune(small_cnn_model, 0.5, data=cnn_batch, exclude=exclude, seed=0, **FAST)
    assert not prune.is_pruned(small_cnn_model[0])
    assert prune.is_pruned(small_cnn_model[5])
    assert_budget_met(mask_sparsity(small_cnn_model), 0.5)


def test_importance_scores_replace_weight_magnitude(small_cnn_model, cnn_batch):
    scores = seeded(torch.randn, 3, 10, 1024)
    rl_prune(small_cnn_model, 0.6, data=cnn_batch, importance_scores={(small_cnn_model[5], "weight"): scores},
             seed=0, **FAST)
    mask = small_cnn_model[5].weight_mask
    assert scores.abs()[mask == 0].max() <= scores.abs()[mask == 1].min()


def test_global_rl_unstructured_prunes_exactly_the_given_tensors(small_cnn_model, cnn_batch):
    conv, head = small_cnn_model[2], small_cnn_model[5]
    parameters = [(conv, "weight"), (head, "weight"), (head, "bias")]
    result = global_rl_unstructured(parameters, 0.6, model=small_cnn_model, data=cnn_batch, seed=0, **FAST)
    assert set(result.plan.amounts) == {"2.weight", "5.weight", "5.bias"}
    assert not prune.is_pruned(small_cnn_model[0])
    assert not hasattr(conv, "bias_mask")
    zeros = sum(int((getattr(m, f"{n}_mask") == 0).sum()) for m, n in parameters)
    total = sum(getattr(m, f"{n}_mask").numel() for m, n in parameters)
    assert_budget_met(zeros / total, 0.6)


def test_global_rl_unstructured_takes_importance_scores_by_module_and_name(small_cnn_model, cnn_batch):
    head = small_cnn_model[5]
    scores = seeded(torch.randn, 4, 10, 1024)
    global_rl_unstructured([(head, "weight")], 0.4, {(head, "weight"): scores}, model=small_cnn_model,
                           data=cnn_batch, **FAST)
    assert int((head.weight_mask == 0).sum()) == round(0.4 * 10240)
    assert scores.abs()[head.weight_mask == 0].max() <= scores.abs()[head.weight_mask == 1].min()


@pytest.mark.parametrize("parameters, error", [([], ValueError), ([(nn.Linear(2, 2), "weight")], ValueError),
                                               ([("5", "weight")], TypeError), (None, TypeError)])
def test_global_rl_unstructured_rejects_bad_parameters(parameters, error, small_cnn_model, cnn_batch):
    state = ModelState.of(small_cnn_model)
    with pytest.raises(error, match="parameters"):
        global_rl_unstructured(parameters, 0.5, model=small_cnn_model, data=cnn_batch, **FAST)
    state.assert_unchanged(small_cnn_model)


# --------------------------------------------------------------------------- calibration data in its forms
def labelled(n=16):
    return inputs((n, 1, 16, 16)), torch.arange(n) % 10


@pytest.mark.parametrize("reward", ["fidelity", "accuracy"])
@pytest.mark.parametrize("make_data", [
    lambda: labelled(),
    lambda: DataLoader(TensorDataset(*labelled()), batch_size=5),
    lambda: TensorDataset(*labelled()),
    lambda: [labelled(8), labelled(8)],
    lambda: [{"input": x, "label": y} for x, y in [labelled(8), labelled(8)]],
], ids=["tensors", "loader", "dataset", "batches", "dict-batches"])
def test_calibration_data_in_every_documented_form(make_data, reward, small_cnn_model):
    result = rl_prune(small_cnn_model, 0.5, data=make_data(), reward=reward, seed=0, **FAST)
    assert result.plan.reward == reward
    assert_budget_met(mask_sparsity(small_cnn_model), 0.5)


def test_synthetic_calibration_from_example_inputs_warns(small_cnn_model):
    with pytest.warns(UserWarning, match="synthetic"):
        rl_prune(small_cnn_model, 0.5, example_inputs=inputs((2, 1, 16, 16)), calibration_samples=16,
                 seed=0, **FAST)
    assert_budget_met(mask_sparsity(small_cnn_model), 0.5)


def test_reward_callable_decides_the_plan(small_cnn_model, cnn_batch):
    def keep_the_head(model):  # prefers plans that prune the Linear head least
        return -float((model[5].weight == 0).float().mean())

    result = rl_prune(small_cnn_model, 0.3, data=cnn_batch, reward=keep_the_head, agent="random", episodes=20,
                      seed=0, verbose=False)
    assert result.plan.reward == "keep_the_head"
    chosen = result.plan.amounts["5.weight"]
    assert result.plan.score == max(h["reward"] for h in result.history) == pytest.approx(-chosen, abs=1e-4)


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("search", [dict(agent="random", episodes=8), dict(agent="amc", episodes=12,
                                                                           agent_config={"warmup": 4})],
                         ids=["random", "amc"])
def test_same_seed_same_search_bit_for_bit(search, cnn_batch):
    def run(seed):
        result = rl_prune(seeded(small_cnn, 0), 0.7, data=cnn_batch, seed=seed, verbose=False, **search)
        return result.plan.amounts, [h["reward"] for h in result.history]

    first = run(0)
    assert run(0) == first
    assert any(run(seed) != first for seed in (1, 2, 3)), "the seed has no effect"


# --------------------------------------------------------------------------- progress
@pytest.mark.parametrize("verbose", [True, False])
def test_progress_bar_shows_only_when_verbose(verbose, small_cnn_model, cnn_batch, capfd):
    search = {**FAST, "verbose": verbose}
    rl_prune(small_cnn_model, 0.5, data=cnn_batch, seed=0, **search)
    err = capfd.readouterr().err
    assert ("rl_prune[random]" in err) is verbose
