"""Models taking several inputs: tuple batches (model(*batch)), dict batches (model(**batch)) and
label= saying which part is the label."""
import copy

import pytest
import torch
from torch import nn

from helpers import ModelState, assert_budget_met, seeded, tiny_bert
from torch_rlprune import rl_prune
from torch_rlprune.rewards.calibration import build_calibration
from torch_rlprune.search.checkpoint import CheckpointError
from torch_rlprune.structure.inputs import Inputs, concat, run_model
from torch_rlprune.rewards.scores import FidelityReward


class SourceTarget(nn.Module):
    """A seq2seq-style forward(src, tgt): both inputs matter."""

    def __init__(self):
        super().__init__()
        self.src, self.tgt = nn.Linear(8, 32), nn.Linear(8, 32)
        self.mix, self.head = nn.Linear(32, 32), nn.Linear(32, 5)

    def forward(self, src, tgt):
        return self.head(torch.relu(self.mix(torch.relu(self.src(src) + self.tgt(tgt)))))


class MaskedTokens(nn.Module):
    """transformers-style forward(input_ids, attention_mask)."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(50, 16), nn.Linear(16, 32), nn.Linear(32, 3)

    def forward(self, input_ids, attention_mask):
        h = torch.relu(self.fc(self.emb(input_ids))) * attention_mask[..., None]
        return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))


G = torch.Generator().manual_seed(0)
SRC, TGT = torch.randn(64, 8, generator=G), torch.randn(64, 8, generator=G)
Y = torch.randint(0, 5, (64,), generator=G)
IDS = torch.randint(0, 50, (64, 7), generator=G)
MASK = (torch.rand(64, 7, generator=G) > 0.2).float()
MASK[:, 0] = 1
DICTS = [{"input_ids": IDS[i:i + 16], "attention_mask": MASK[i:i + 16], "labels": Y[i:i + 16] % 3}
         for i in range(0, 64, 16)]


def search(model, data, **kwargs):
    kwargs = {"agent": "random", "episodes": 3, "seed": 0, "verbose": False, **kwargs}
    return rl_prune(model, 0.5, data=data, **kwargs)


def masked_fraction(model, names) -> float:
    """Zeros in the ``<tensor>_mask`` buffers of the named tensors, over their entries (read from the
    buffers, not from the library's bookkeeping)."""
    removed = total = 0
    for name in names:
        module_name, tensor_name = name.rsplit(".", 1)
        mask = model.get_submodule(module_name).get_buffer(tensor_name + "_mask")
        removed, total = removed + int((mask == 0).sum()), total + mask.numel()
    return removed / total


def remeasured_fidelity(model, reference, data) -> float:
    reward = FidelityReward(build_calibration(model, data))
    reward.prepare(reference)
    return reward(model)


# --------------------------------------------------------------------------- reading batches
def test_tuple_batches_reach_the_model_as_positional_inputs_with_the_label_apart():
    calibration = build_calibration(seeded(SourceTarget), [(SRC, TGT, Y)], num_samples=64)
    x = calibration.inputs[0]
    assert isinstance(x, Inputs) and len(x.args) == 2 and torch.equal(x.args[1], TGT)
    assert torch.equal(calibration.labels[0], Y)
    explicit = build_calibration(seeded(SourceTarget), [(Y, SRC, TGT)], num_samples=64, label=0)
    assert torch.equal(explicit.labels[0], Y) and torch.equal(explicit.inputs[0].args[0], SRC)
    none = build_calibration(seeded(SourceTarget), (SRC, TGT), num_samples=64)
    assert none.labels is None and len(none.inputs[0].args) == 2


class OptionalArguments(MaskedTokens):
    """transformers' signature: every input optional, so the batch's own shapes say where the label is."""

    def forward(self, input_ids=None, attention_mask=None):
        return super().forward(input_ids, attention_mask)


def test_with_optional_arguments_a_tuple_ends_in_its_label_only_when_that_is_one_value_per_sample():
    labelled = build_calibration(seeded(OptionalArguments), [(IDS, MASK, Y % 3)], num_samples=64)
    assert len(labelled.inputs[0].args) == 2 and torch.equal(labelled.labels[0], Y % 3)
    unlabelled = build_calibration(seeded(OptionalArguments), [(IDS, MASK)], num_samples=64)
    assert len(unlabelled.inputs[0].args) == 2 and unlabelled.labels is None


def test_one_input_batches_read_as_before_and_stay_plain_tensors():
    one = nn.Linear(8, 4)
    pair = build_calibration(one, [(SRC, torch.randn(64, 4))], num_samples=64)    # 2-D targets are labels
    assert isinstance(pair.inputs[0], torch.Tensor) and pair.labels[0].shape == (64, 4)
    named = build_calibration(one, [(SRC, Y, ["a name"] * 64)], num_samples=64)     # (image, label, path)
    assert isinstance(named.inputs[0], torch.Tensor) and torch.equal(named.labels[0], Y)
    image = build_calibration(one, [{"image": SRC, "label": Y, "path": ["p"] * 64}], num_samples=64)
    assert isinstance(image.inputs[0], torch.Tensor) and torch.equal(image.labels[0], Y)
    batches = build_calibration(one, (SRC[:32], SRC[32:]), num_samples=64)         # a tuple of two batches
    assert isinstance(batches.inputs[0], torch.Tensor) and batches.labels is None and batches.num_samples == 64


def test_dict_batches_are_keyword_inputs_and_their_labels_key_is_the_label():
    calibration = build_calibration(seeded(MaskedTokens), DICTS, num_samples=64)
    assert set(calibration.inputs[0].kwargs) == {"input_ids", "attention_mask"}
    assert torch.equal(calibration.labels[0], Y % 3)
    assert calibration.inputs[0].kwargs["input_ids"].dtype == torch.int64     # token ids stay integers


def test_multi_input_batches_slice_split_concatenate_and_move_together():
    batch = Inputs((SRC,), {"mask": IDS})
    assert len(batch[:5]) == 5 and torch.equal(batch[3:5].kwargs["mask"], IDS[3:5])
    parts = batch.split(24)
    assert [len(p) for p in parts] == [24, 24, 16]
    whole = concat(parts)
    assert torch.equal(whole.args[0], SRC) and torch.equal(whole.kwargs["mask"], IDS)
    with pytest.raises(ValueError, match="batches differ in their inputs"):
        concat([Inputs((SRC,)), Inputs((), {"src": SRC})])
    with pytest.raises(ValueError, match="differ in length"):
        Inputs((SRC, TGT[:10]))


def test_inputs_and_labels_of_different_lengths_name_data():
    with pytest.raises(ValueError, match="data: the inputs of one batch differ in length"):
        build_calibration(seeded(SourceTarget), [(SRC, TGT[:60], Y)])
    with pytest.raises(ValueError, match="data: inputs and labels differ in length \\(64 inputs, 60 labels\\)"):
        build_calibration(seeded(SourceTarget), [(SRC, TGT, Y[:60])])


# --------------------------------------------------------------------------- searches
def test_a_two_input_model_with_its_label_named_is_pruned_to_its_target_and_scores_what_it_returns():
    model = seeded(SourceTarget)
    data = [(SRC, TGT, Y)]
    result = search(model, data, label=2, reward="accuracy", selection=0.0)
    with torch.no_grad():
        accuracy = float((model(SRC, TGT).argmax(1) == Y).float().mean())
    assert_budget_met(masked_fraction(model, result.plan.amounts), 0.5)
    assert result.plan.score == pytest.approx(accuracy, abs=1e-9)     # both inputs and the labels stayed aligned


@pytest.mark.parametrize("label", [None, False])
def test_a_two_input_model_without_labels_is_scored_by_fidelity(label):
    model = seeded(SourceTarget)
    reference = copy.deepcopy(model)
    result = search(model, (SRC, TGT), label=label, selection=0.0)
    assert_budget_met(masked_fraction(model, result.plan.amounts), 0.5)
    assert result.plan.score == pytest.approx(remeasured_fidelity(model, reference, (SRC, TGT)), abs=1e-9)
    with pytest.raises(ValueError, match="reward='accuracy' needs labelled batches"):
        search(seeded(SourceTarget), (SRC, TGT), label=label, reward="accuracy")


def test_a_dict_input_model_is_pruned_with_its_labels_apart():
    model = seeded(MaskedTokens)
    result = search(model, DICTS, reward="accuracy", selection=0.0)
    assert_budget_met(masked_fraction(model, result.plan.amounts), 0.5)
    with torch.no_grad():
        accuracy = float((model(IDS, MASK).argmax(1) == Y % 3).float().mean())
    assert result.plan.score == pytest.approx(accuracy, abs=1e-9)


@pytest.mark.parametrize("model_cls, data", [(SourceTarget, (SRC, TGT)), (MaskedTokens, DICTS)],
                         ids=["tuple", "dict"])
def test_channel_pruning_of_a_multi_input_model_compacts_exactly(model_cls, data):
    model = seeded(model_cls)
    result = rl_prune(model, 0.4, data=data, structure="channel", agent="prior", verbose=False)
    example = result.example_inputs
    assert isinstance(example, tuple if model_cls is SourceTarget else dict)     # torch-pruning's forms
    with torch.no_grad():
        masked = run_model(model, example)
    info = result.compact()
    with torch.no_grad():
        compacted = run_model(model, example)
    assert info["failed"] == {} and float((masked - compacted).abs().max()) < 1e-5
    assert 1 - info["macs_after"] / result.plan.metadata["dense"]["macs"] == pytest.approx(0.4, abs=0.02)
    assert "score" in result.summary()


def test_several_channel_targets_are_applied_with_the_multi_input_example():
    results = rl_prune(seeded(SourceTarget), [0.3, 0.5], data=(SRC, TGT), structure="channel", agent="prior",
                       verbose=False)
    host = seeded(SourceTarget)
    assert results.apply(host, target=0.5) == pytest.approx(0.5, abs=0.02)
    assert run_model(host, results[0.5].example_inputs).shape == (2, 5)


def test_a_checkpointed_multi_input_search_digests_its_calibration(tmp_path):
    result = search(seeded(SourceTarget), [(SRC, TGT, Y)], checkpoint=tmp_path / "search.pt", checkpoint_every=1)
    resumed = search(seeded(SourceTarget), [(SRC, TGT, Y)], resume=tmp_path / "search.pt")
    assert resumed.plan.amounts == result.plan.amounts
    with pytest.raises(CheckpointError, match="different search \\(calibration"):   # the digest saw other data
        search(seeded(SourceTarget), [(SRC, TGT * 2, Y)], resume=tmp_path / "search.pt")


# --------------------------------------------------------------------------- refusals
def missing_key_in_the_second_batch():
    return [DICTS[0], {k: v for k, v in DICTS[1].items() if k != "labels"}]


@pytest.mark.parametrize("data, label, error, match", [
    (DICTS, "nope", ValueError, "label='nope' is not a key of the batch; keys: \\['attention_mask', 'input_ids', "
                                "'labels'\\]"),
    (missing_key_in_the_second_batch(), "labels", ValueError, "label='labels' is not a key of the batch; keys: "
                                                              "\\['attention_mask', 'input_ids'\\]"),
    (DICTS, 1, ValueError, "label=1 is a position, but the batches are dicts \\(give a key"),
    ([(SRC, TGT, Y)], 3, ValueError, "label=3 is out of range for a batch of 3 parts \\(give a position, 0 to 2"),
    ([(SRC,)], 0, ValueError, "label=0: a batch of 1 part\\(s\\) has no input left besides the label"),
    ([(SRC, TGT, Y)], "labels", ValueError, "label='labels' names a key, but the batches are tuples"),
    (SRC, 1, ValueError, "label=1 was given but the batches are plain tensors"),
    (DICTS, 1.5, TypeError, "label must be None \\(automatic\\), an int .* a str .* or False"),
    ([(SRC, TGT, Y)], True, TypeError, "label must be None \\(automatic\\), an int .* a str .* or False"),
], ids=["missing-key", "missing-in-one-batch", "int-for-dicts", "out-of-range", "only-a-label", "str-for-tuples",
        "plain-tensors", "float", "true"])
def test_a_bad_label_is_refused_before_the_model_is_touched(data, label, error, match):
    model = seeded(MaskedTokens) if isinstance(data, list) and isinstance(data[0], dict) else seeded(SourceTarget)
    state = ModelState.of(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        search(model, data, label=label)
    state.assert_unchanged(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_a_two_input_model_given_one_tensor_is_told_about_tuples_and_label():
    model = seeded(SourceTarget)
    state = ModelState.of(model)
    with pytest.raises(ValueError, match="data: the model cannot run on a batch of shape \\(\\d+, 8\\): .*missing"
                                         ".*several inputs gets batches as tuples .*dicts .*label="):
        search(model, SRC)
    state.assert_unchanged(model)


# --------------------------------------------------------------------------- transformers
def test_bert_from_a_config_is_pruned_on_its_dict_batches():
    model = tiny_bert(hidden=32, positions=16)
    reference = copy.deepcopy(model)
    data = [{"input_ids": IDS[i:i + 16] * 2, "attention_mask": MASK[i:i + 16].long(), "labels": Y[i:i + 16] % 3}
            for i in range(0, 64, 16)]
    result = rl_prune(model, 0.5, data=data, agent="prior", selection=0.0, verbose=False)
    assert any(".attention.self.query.weight" in name for name in result.plan.amounts)
    assert_budget_met(masked_fraction(model, result.plan.amounts), 0.5)
    assert result.plan.score == pytest.approx(remeasured_fidelity(model, reference, data), abs=1e-9)
