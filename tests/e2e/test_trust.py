"""Trust boundaries: degenerate data, clear errors before any change, one search at a time (issue 15)."""
import threading
import warnings

import pytest
import torch
from torch import nn

from helpers import ModelState, inputs, seeded, small_cnn
from torch_rlprune import PlanError, PruningPlan, global_rl_unstructured, rl_prune

X = inputs((64, 1, 16, 16))


def search(model, data, **kwargs):
    return rl_prune(model, 0.5, data=data, agent="random", episodes=2, verbose=False, **kwargs)


def refused(model, data, match, error=ValueError, **kwargs):
    state = ModelState.of(model)
    with pytest.raises(error, match=match):
        search(model, data, **kwargs)
    state.assert_unchanged(model)


def test_non_finite_calibration_inputs_are_refused():
    refused(seeded(small_cnn), torch.full_like(X, float("nan")), "data: .*NaN or inf")


def test_a_model_with_non_finite_outputs_is_refused_not_scored_as_perfect():
    model = seeded(small_cnn)
    with torch.no_grad():
        model[-1].bias[0] = float("nan")   # every output NaN: before, every plan "agreed" with it
    refused(model, X, "data: the unpruned model's outputs .* not finite")


class NoBatchDim(nn.Module):
    """Reduces over the batch (what an LSTM head fed the wrong layout did): (N, 16) -> (10,)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(x).mean(0)


def test_an_output_without_a_batch_dimension_is_refused():
    refused(seeded(NoBatchDim), inputs((32, 16)), "data: .*returned shape \\(10,\\).*one output per input")


@pytest.mark.parametrize("data,match", [
    (X[:0], "data: no samples"),
    ((X, torch.zeros(5, dtype=torch.long)), "data: inputs and labels differ in length \\(64 inputs, 5 labels\\)"),
])
def test_empty_or_mismatched_data_is_a_clear_error(data, match):
    refused(seeded(small_cnn), data, match)


def test_accuracy_with_labels_of_the_wrong_length_names_the_lengths():
    refused(seeded(small_cnn), (X, torch.zeros(60, dtype=torch.long)), "differ in length", reward="accuracy")


def test_the_same_tensor_twice_is_a_clear_error():
    model = seeded(small_cnn)
    state = ModelState.of(model)
    with pytest.raises(ValueError, match="parameters: .* is given twice"):
        global_rl_unstructured([(model[0], "weight"), (model[0], "weight")], 0.5, model=model, data=X,
                               agent="random", episodes=2, verbose=False)
    state.assert_unchanged(model)


def test_a_missing_plan_file_is_a_plan_error_naming_it(tmp_path):
    with pytest.raises(PlanError, match="missing.json: no such plan file"):
        PruningPlan.load(tmp_path / "missing.json")


def test_a_second_search_in_another_thread_is_refused_and_the_first_is_unharmed():
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow_reward(model):
        calls.append(1)
        started.set()
        release.wait(30)
        return 0.5

    first_model, other = seeded(small_cnn), seeded(small_cnn)
    outcome = {}

    def first():
        outcome["result"] = rl_prune(first_model, 0.5, data=X, reward=slow_reward, agent="random", episodes=2,
                                     verbose=False)

    rng = torch.get_rng_state()
    worker = threading.Thread(target=first)
    worker.start()
    assert started.wait(30)
    state = ModelState.of(other)
    try:
        with pytest.raises(RuntimeError, match="another search is running in this process"):
            search(other, X)
    finally:
        release.set()
        worker.join(60)
    state.assert_unchanged(other)
    assert abs(outcome["result"].sparsity - 0.5) <= 0.005
    assert torch.equal(torch.get_rng_state(), rng)
    search(other, X)   # and once the first is done, the next one runs


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.src, self.tgt, self.head = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, src, tgt):
        return self.head(torch.relu(self.src(src) + self.tgt(tgt)))


def test_a_model_taking_several_inputs_given_one_gets_an_error_naming_data_and_the_way_out():
    src = inputs((64, 8))
    refused(seeded(TwoInputs), [src[:32], src[32:]], "data: the model cannot run .*several inputs gets batches as "
                                                     "tuples .*or dicts .*label= says which part is the label")


class AttentionAndEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, tokens):
        x = self.emb(tokens)
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_weights_that_are_not_candidates_are_reported_every_time():
    tokens = torch.randint(0, 50, (64, 7), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="not candidates stay dense: Embedding \\(a lookup.*emb\\.weight") as seen:
        search(seeded(AttentionAndEmbedding), tokens, protect_first_last=False)
    assert not any("in_proj" in str(w.message) for w in seen)   # attention's weights are candidates now
    with warnings.catch_warnings():   # what the user excluded is their choice: not reported
        warnings.simplefilter("error", UserWarning)
        search(seeded(AttentionAndEmbedding), tokens, exclude=["attn", "emb"], protect_first_last=False)
