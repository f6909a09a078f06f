"""PruningPlan: JSON round trip, apply_plan on other models, and untrusted plan files."""
import json
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from helpers import ModelState, seeded, small_cnn, weight_masks
from torch_rlprune import PlanError, PruningPlan, apply_plan


@pytest.fixture
def plan(pruned_cnn):
    return pruned_cnn.plan


@pytest.fixture
def fresh_model():
    """A second small_cnn with the same weights as the one `pruned_cnn` pruned, in train mode."""
    return seeded(small_cnn, 0).train()


# --------------------------------------------------------------------------- round trip
def test_save_load_round_trip_is_exact(plan, tmp_path):
    path = plan.save(tmp_path / "plan.json")
    assert json.loads(path.read_text())["amounts"] == plan.amounts  # plain JSON, readable by anything
    loaded = PruningPlan.load(path)
    assert loaded == plan
    assert loaded.counts() == plan.counts()


def test_plan_describes_the_search(pruned_cnn, plan):
    assert list(plan.amounts) == ["0.weight", "2.weight", "5.weight"]
    assert plan.numels == {"0.weight": 72, "2.weight": 1152, "5.weight": 10240}
    assert plan.target == 0.7 and plan.budget == "params" and plan.structure == "unstructured"
    assert plan.agent == "random" and plan.seed == 0 and plan.episodes == 4
    removed = sum(plan.counts().values())
    assert math.isclose(plan.sparsity, removed / sum(plan.numels.values()))
    assert plan.score == max(h["reward"] for h in pruned_cnn.history)


def test_apply_plan_to_an_identical_model_gives_identical_masks(pruned_cnn, plan, fresh_model, cnn_batch, tmp_path):
    returned = apply_plan(fresh_model, PruningPlan.load(plan.save(tmp_path / "plan.json")))
    assert returned is fresh_model
    masks, expected = weight_masks(fresh_model), weight_masks(pruned_cnn.model)
    assert masks.keys() == expected.keys()
    for name in expected:
        assert torch.equal(masks[name], expected[name]), name
    assert torch.equal(fresh_model.eval()(cnn_batch), pruned_cnn.model(cnn_batch))


def test_apply_plan_to_other_weights_removes_the_planned_count_of_smallest_entries(plan):
    other = seeded(small_cnn, 7)
    apply_plan(other, plan)
    for name, count in plan.counts().items():
        module = other.get_submodule(name.rsplit(".", 1)[0])
        mask, weight = module.weight_mask, module.weight_orig.detach().abs()
        assert int((mask == 0).sum()) == count
        assert weight[mask == 0].max() <= weight[mask == 1].min()


def test_apply_plan_counts_entries_an_earlier_mask_removed(plan):
    other = seeded(small_cnn, 0)
    prune.random_unstructured(other[5], "weight", amount=0.2)  # not the smallest: must be kept anyway
    earlier = other[5].weight_mask.clone()
    apply_plan(other, plan)
    assert bool((other[5].weight_mask[earlier == 0] == 0).all())
    assert int((other[5].weight_mask == 0).sum()) == plan.counts()["5.weight"]


def test_apply_plan_rejects_something_that_is_not_a_plan(plan, fresh_model):
    state = ModelState.of(fresh_model)
    with pytest.raises(TypeError, match="PruningPlan"):
        apply_plan(fresh_model, plan.to_dict())
    state.assert_unchanged(fresh_model)


# --------------------------------------------------------------------------- untrusted plan files
def _set(path, value):
    def mutate(d):
        keys = path.split("/")
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return mutate


def _delete(key):
    return lambda d: d.pop(key)


def _rename_tensor(old, new):
    def mutate(d):
        d["amounts"][new] = d["amounts"].pop(old)
        d["numels"][new] = d["numels"].pop(old)
    return mutate


MALFORMED = {
    # wrong types
    "amount is a string": (_set("amounts/5.weight", "0.5"), "5.weight"),
    "amount is a bool": (_set("amounts/5.weight", True), "5.weight"),
    "amount is null": (_set("amounts/5.weight", None), "5.weight"),
    "amounts is a list": (_set("amounts", [0.5, 0.5, 0.5]), "amounts"),
    "numel is a float": (_set("numels/5.weight", 10240.0), "5.weight"),
    "numel is a string": (_set("numels/5.weight", "10240"), "5.weight"),
    "target is a string": (_set("target", "0.7"), "target"),
    "sparsity is null": (_set("sparsity", None), "sparsity"),
    "budget is a number": (_set("budget", 1), "budget"),
    "metadata is a list": (_set("metadata", []), "metadata"),
    "seed is a string": (_set("seed", "zero"), "seed"),
    "score is a string": (_set("score", "high"), "score"),
    "episodes is a string": (_set("episodes", "many"), "episodes"),
    # out of range
    "negative amount": (_set("amounts/5.weight", -0.1), "5.weight"),
    "amount above one": (_set("amounts/5.weight", 1.5), "5.weight"),
    "NaN amount": (_set("amounts/5.weight", float("nan")), "5.weight"),
    "infinite amount": (_set("amounts/5.weight", float("inf")), "5.weight"),
    "zero numel": (_set("numels/5.weight", 0), "5.weight"),
    "negative numel": (_set("numels/5.weight", -3), "5.weight"),
    "target above one": (_set("target", 1.5), "target"),
    "NaN target": (_set("target", float("nan")), "target"),
    "negative sparsity of weights": (_set("sparsity", -0.05), "sparsity"),  # only a measured latency can slow down
    "sparsity above one": (_set("sparsity", 1.01), "sparsity"),
    "NaN sparsity": (_set("sparsity", float("nan")), "sparsity"),
    "future format version": (_set("version", 99), "version"),
    "unknown budget": (_set("budget", "flops"), "budget"),
    # structure
    "unknown field": (_set("evil", 1), "evil"),
    "missing amounts": (_delete("amounts"), "amounts"),
    "missing target": (_delete("target"), "target"),
    "amounts and numels disagree": (lambda d: d["numels"].pop("5.weight"), "numels"),
    "unsupported structure": (_set("structure", "channel"), "channel"),
    # does not fit the model
    "mismatched numel": (_set("numels/5.weight", 999), "5.weight"),
    "module not in the model": (_rename_tensor("5.weight", "classifier.weight"), "classifier"),
    "tensor not in the module": (_rename_tensor("5.weight", "5.kernel"), "kernel"),
    "module without weights": (_rename_tensor("0.weight", "1.weight"), "1.weight"),
    "attribute that is not a tensor": (_rename_tensor("0.weight", "0.training"), "training"),
}


def load_and_apply(path, model):
    return apply_plan(model, PruningPlan.load(path))


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_plan_raises_plan_error_and_leaves_the_model_untouched(case, plan, fresh_model, tmp_path):
    mutate, mentioned = MALFORMED[case]
    data = json.loads(json.dumps(plan.to_dict()))
    mutate(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))  # Python's json writes NaN/Infinity literals, as a hostile file may
    state = ModelState.of(fresh_model)
    with pytest.raises(PlanError, match=mentioned) as info:
        load_and_apply(path, fresh_model)
    assert isinstance(info.value, ValueError)
    state.assert_unchanged(fresh_model)


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2, 3]", b'"a plan"', b"null",
                                     b"\xff\xfe\x00\x81 binary garbage", b"[" * 100_000 + b"]" * 100_000],
                         ids=["empty", "invalid", "list", "string", "null", "not-utf8", "deeply-nested"])
def test_file_that_is_not_a_plan_raises_plan_error(content, fresh_model, tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    state = ModelState.of(fresh_model)
    with pytest.raises(PlanError):
        load_and_apply(path, fresh_model)
    state.assert_unchanged(fresh_model)


@pytest.mark.parametrize("case", ["infinite amount", "unknown field", "missing target", "amounts and numels disagree"])
def test_a_malformed_plan_file_is_named_in_the_error(case, plan, tmp_path):
    mutate, mentioned = MALFORMED[case]
    data = json.loads(json.dumps(plan.to_dict()))
    mutate(data)
    path = tmp_path / "untrusted_plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=rf"untrusted_plan\.json: .*{mentioned}"):
        PruningPlan.load(path)


def test_plan_that_fails_on_its_last_tensor_applies_nothing(plan, fresh_model):
    data = plan.to_dict()
    data["amounts"]["missing.weight"] = 0.5  # checked after the valid entries
    data["numels"]["missing.weight"] = 4
    state = ModelState.of(fresh_model)
    with pytest.raises(PlanError, match="missing"):
        apply_plan(fresh_model, PruningPlan.from_dict(data))
    state.assert_unchanged(fresh_model)
    assert not any(prune.is_pruned(m) for m in fresh_model.modules())


def test_plan_for_another_architecture_is_refused(plan):
    other = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 5, stride=2, padding=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    state = ModelState.of(other)
    with pytest.raises(PlanError, match="2.weight"):
        apply_plan(other, plan)
    state.assert_unchanged(other)


# --------------------------------------------------------------------------- what apply_plan is given
@pytest.fixture
def channel_plan(small_cnn_model, cnn_batch):
    from torch_rlprune import rl_prune
    return rl_prune(small_cnn_model, 0.5, data=cnn_batch, structure="channel", agent="random", episodes=2, seed=0,
                    verbose=False).plan


@pytest.mark.parametrize("field, value, words", [
    ("input_shape", [3, 65536, 65536], "'input_shape' .* elements a sample"),   # ~100 GB of random inputs
    ("input_shape", [1, 16, -16], "'input_shape' must be a list of positive integers"),
    ("input_shape", [1, True, 16], "'input_shape' must be a list of positive integers"),
    ("input_shape", "1x16x16", "'input_shape' must be a list of positive integers"),
    ("round_to", "x", "'round_to' must be null or a positive integer"),
    ("round_to", 0, "'round_to' must be null or a positive integer"),
    ("round_to", 2.5, "'round_to' must be null or a positive integer"),
])
def test_channel_plan_metadata_is_checked_before_use(field, value, words, channel_plan, tmp_path):
    data = json.loads(json.dumps(channel_plan.to_dict()))
    assert data["metadata"]["input_shape"] == [1, 16, 16]
    data["metadata"][field] = value
    path = tmp_path / "channel_plan.json"
    path.write_text(json.dumps(data))
    model = seeded(small_cnn, 0)
    state = ModelState.of(model)
    with pytest.raises(PlanError, match=words):
        apply_plan(model, PruningPlan.load(path))
    state.assert_unchanged(model)
    apply_plan(model, PruningPlan.load(channel_plan.save(path)))   # the control: the plan as written applies
    assert any(prune.is_pruned(m) for m in model.modules())


def test_an_input_shape_the_plan_cannot_trace_with_is_not_needed_given_example_inputs(channel_plan, cnn_batch):
    data = channel_plan.to_dict()
    data["metadata"]["input_shape"] = [3, 65536, 65536]
    model = seeded(small_cnn, 0)
    apply_plan(model, PruningPlan.from_dict(data), example_inputs=cnn_batch[:2])
    assert any(prune.is_pruned(m) for m in model.modules())


@pytest.mark.parametrize("scores, words", [
    (lambda m: {"9.weight": torch.ones(3)}, r"importance_scores: '9\.weight' is not a tensor the plan prunes"),
    (lambda m: {(m[5], "weight"): torch.ones(10, 1024)}, r"importance_scores: keys are .*\(module, name\) tuple"),
    (lambda m: {"5.weight": torch.ones(3)}, r"importance_scores\['5\.weight'\] must be a tensor of shape"),
    (lambda m: [torch.ones(10, 1024)], "importance_scores must be a dict"),
])
def test_importance_scores_that_would_go_unused_are_refused(scores, words, plan, fresh_model):
    state = ModelState.of(fresh_model)
    with pytest.raises(ValueError, match=words):
        apply_plan(fresh_model, plan, importance_scores=scores(fresh_model))
    state.assert_unchanged(fresh_model)
    ranked = torch.arange(10 * 1024, dtype=torch.float32).reshape(10, 1024)   # the control: names work
    apply_plan(fresh_model, plan, importance_scores={"5.weight": ranked})
    removed = plan.counts()["5.weight"]
    assert bool((fresh_model[5].weight_mask.reshape(-1)[:removed] == 0).all())


def test_importance_scores_are_refused_for_a_channel_plan(channel_plan):
    model = seeded(small_cnn, 0)
    state = ModelState.of(model)
    with pytest.raises(ValueError, match="importance_scores apply to structure='unstructured'"):
        apply_plan(model, channel_plan, importance_scores={"0.weight": torch.ones(8, 1, 3, 3)})
    state.assert_unchanged(model)
