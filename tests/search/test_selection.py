"""Held-out selection, protected layers and activation-aware selection inside a layer."""
import numpy as np
import pytest
import torch
from torch import nn

from helpers import inputs, seeded, small_cnn
from torch_rlprune import rl_prune
from torch_rlprune.rewards.calibration import CalibrationSet
from torch_rlprune.structure.importance import row_rank_scores, wanda_scores
from torch_rlprune.search.selection import split_calibration

QUIET = dict(verbose=False, seed=0)


class ThreeConvNet(nn.Module):
    """conv -> conv -> conv -> Linear head: four tensors, two of them protected by default."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 16, 3, padding=1)
        self.last = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.last(torch.relu(self.mid(torch.relu(self.stem(x))))))
        return self.head(x.mean((2, 3)))


# --------------------------------------------------------------------------- the split
def test_split_holds_out_a_seeded_random_share():
    x = torch.arange(100.0)[:, None]
    y = torch.arange(100) % 10
    cal = CalibrationSet(list(x.split(32)), list(y.split(32)), False)
    search, held = split_calibration(cal, 0.25, seed=0)
    s, h = torch.cat(search.inputs)[:, 0], torch.cat(held.inputs)[:, 0]
    assert len(h) == 25 and len(s) == 75
    assert set(s.tolist()).isdisjoint(h.tolist()) and set(s.tolist()) | set(h.tolist()) == set(range(100))
    assert torch.equal(torch.cat(held.labels), h.long() % 10), "labels stay with their inputs"
    assert h.tolist() != list(range(75, 100)), "random, not the tail (a class-sorted loader would lose classes)"
    again, _ = split_calibration(cal, 0.25, seed=0)
    assert torch.equal(torch.cat(again.inputs), torch.cat(search.inputs))
    assert split_calibration(cal, 0.0, seed=0)[1] is None
    tiny = CalibrationSet([x[:3]], None, False)
    assert split_calibration(tiny, 0.25, seed=0)[1] is None, "too small to leave two samples on each side"


def test_returned_plan_is_the_best_on_the_held_out_part():
    x = inputs((64, 1, 16, 16))
    result = rl_prune(ThreeConvNet(), 0.85, data=x, agent="random", episodes=12, select_top=4, **QUIET)
    sel = result.plan.metadata["selection"]
    held = [c[1] for c in sel["candidates"]]
    assert 1 <= len(held) <= 5   # the top 4, and the prior when it is not one of them
    assert sel["selection_score"] == max(held)
    assert sel["samples"] == 16
    search_scores = [c[0] for c in sel["candidates"]]
    top = search_scores[:4]
    assert top == sorted(top, reverse=True), "the search's top plans, best first"
    assert result.plan.score == search_scores[sel["chosen"]], "the plan's score stays its search score"
    assert "held-out" in result.summary()


def test_selection_off_returns_the_search_best():
    x = inputs((64, 1, 16, 16))
    result = rl_prune(ThreeConvNet(), 0.85, data=x, agent="random", episodes=12, selection=0.0, **QUIET)
    assert "selection" not in result.plan.metadata
    best = max([h["reward"] for h in result.history] + [result.plan.metadata["prior"]["score"]])
    assert result.plan.score == best


def test_a_callable_reward_is_not_split():
    x = inputs((64, 1, 16, 16))

    def reward(model):
        with torch.no_grad():
            return float(model(x).std())

    result = rl_prune(ThreeConvNet(), 0.5, data=x, agent="random", episodes=3, reward=reward, **QUIET)
    assert "selection" not in result.plan.metadata
    assert result.plan.metadata["calibration_samples"] == 64


# --------------------------------------------------------------------------- protected layers
def test_first_layer_and_classifier_stay_dense_by_default():
    x = inputs((16, 1, 16, 16))
    model = ThreeConvNet()
    result = rl_prune(model, 0.8, data=x, agent="random", episodes=3, **QUIET)
    assert set(result.plan.amounts) == {"mid.weight", "last.weight"}
    assert result.plan.metadata["protected"] == ["stem.weight", "head.weight"]
    assert not hasattr(model.stem, "weight_mask") and not hasattr(model.head, "weight_mask")
    everything = rl_prune(ThreeConvNet(), 0.8, data=x, agent="random", episodes=3, protect_first_last=False, **QUIET)
    assert set(everything.plan.amounts) == {"stem.weight", "mid.weight", "last.weight", "head.weight"}


def test_timm_classifier_is_protected_even_when_it_is_not_last():
    class HeadThenCalibration(ThreeConvNet):
        def __init__(self):
            super().__init__()
            self.post = nn.Linear(10, 10)  # runs after the classifier (a calibration layer, say)

        def forward(self, x):
            return self.post(super().forward(x))

        def get_classifier(self):
            return self.head

    result = rl_prune(HeadThenCalibration(), 0.5, data=inputs((8, 1, 16, 16)), agent="random", episodes=2, **QUIET)
    assert result.plan.metadata["protected"] == ["stem.weight", "head.weight"]
    assert "post.weight" in result.plan.amounts


def test_nothing_is_protected_where_the_ends_are_most_of_the_model():
    result = rl_prune(seeded(small_cnn, 0), 0.5, data=inputs((8, 1, 16, 16)), agent="random", episodes=2, **QUIET)
    assert "protected" not in result.plan.metadata, "the classifier holds 89% of small_cnn's weights"
    assert len(result.plan.amounts) == 3


def test_explicit_parameters_are_never_second_guessed():
    from torch_rlprune import global_rl_unstructured

    model = ThreeConvNet()
    result = global_rl_unstructured([(model.stem, "weight"), (model.head, "weight")], 0.5, model=model,
                                    agent="random", episodes=2, data=inputs((8, 1, 16, 16)), verbose=False)
    assert set(result.plan.amounts) == {"stem.weight", "head.weight"}


def test_nothing_is_protected_when_nothing_would_be_left():
    result = rl_prune(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), 0.5, data=inputs((8, 8)),
                      agent="random", episodes=2, **QUIET)
    assert set(result.plan.amounts) == {"0.weight", "2.weight"}


# --------------------------------------------------------------------------- activation-aware selection
def test_row_rank_scores_interleave_rows():
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.5, 9.0, 4.0]])
    ranks = row_rank_scores(scores)
    assert ranks.tolist() == [[2.0, 0.0, 1.0], [0.0, 2.0, 1.0]]
    order = torch.argsort(ranks.reshape(-1), stable=True)
    for k in range(1, 7):
        removed = torch.zeros(6, dtype=torch.bool)
        removed[order[:k]] = True
        per_row = removed.reshape(2, 3).sum(1)
        assert int(per_row.max() - per_row.min()) <= 1


def test_wanda_scores_weigh_each_input_by_its_norm():
    w = torch.tensor([[1.0, -2.0], [3.0, 1.0]])
    norms = torch.tensor([2.0, 0.5])
    assert wanda_scores(w, norms).tolist() == [[2.0, 1.0], [6.0, 0.5]]
    conv = nn.Conv2d(4, 4, 1, groups=2)
    s = wanda_scores(conv.weight, torch.tensor([1.0, 2.0, 3.0, 4.0]), groups=2)
    expected = conv.weight.detach().abs()[:, :, 0, 0] * torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0], [3.0, 4.0]])
    torch.testing.assert_close(s[:, :, 0, 0], expected)


def test_activation_importance_prunes_every_row_alike_and_ignores_dead_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    x = inputs((64, 6))
    with torch.no_grad():
        model[0].weight[:6] = 0.0  # inputs 0..5 of the middle layer are always 0 after the ReLU...
        model[0].bias[:6] = -1.0
        model[2].weight[:, :6] *= 100.0  # ...however large their weights
    result = rl_prune(model, 0.5, data=x, agent="prior", importance="activation", selection=0.0,
                      bn_recalibration=0, **QUIET)
    assert result.plan.metadata["importance"] == "activation"
    mask = model[2].weight_mask
    per_row = (mask == 0).sum(1)
    assert int(per_row.max() - per_row.min()) <= 1, "every output row loses the same share"
    k = int((mask == 0).sum())
    if k >= 6 * 12:
        assert bool((mask[:, :6] == 0).all())
    else:
        assert int((mask[:, :6] == 0).sum()) == k, "dead inputs go first whatever their magnitude"


def test_lstm_recurrent_matrices_fall_back_to_magnitude_and_say_so():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(5, 8)
            self.lstm = nn.LSTM(8, 8, num_layers=2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.lstm(self.proj(x))[0][:, -1])

    result = rl_prune(Seq(), 0.6, data=inputs((16, 7, 5)), agent="prior", importance="activation", **QUIET)
    assert result.plan.metadata["magnitude_fallback"] == ["lstm.weight_hh_l0", "lstm.weight_ih_l1",
                                                          "lstm.weight_hh_l1"]


@pytest.mark.parametrize("kwargs,match", [(dict(importance="wanda"), "importance must be one of"),
                                          (dict(importance="activation", importance_scores={}),
                                           "not both")])
def test_bad_importance_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rl_prune(seeded(small_cnn, 0), 0.5, data=inputs((8, 1, 16, 16)), verbose=False, **kwargs)


class _PlansOnSelection:
    """An environment whose plans have fixed per-sample gains and scores on the selection part."""

    def __init__(self, gains, search_scores):
        from torch_rlprune.env.layerwise import BestPlan

        self.gains, self.search_scores, self.applied = gains, search_scores, None
        self.priors = {0.5: np.array([1, 1])}
        self.best_by_target = {0.5: BestPlan(0.95, 0.95, np.array([2, 0]))}

    def on_plan(self, k, fn):
        self.applied = tuple(int(v) for v in k)
        return fn()

    def measure(self, k, fn):
        return float(self.on_plan(k, fn))

    def evaluate(self, k):
        return self.search_scores[tuple(int(v) for v in k)]

    def reward_of(self, score, k):   # the layer-wise environment's: the score itself
        return score

    def current_gains(self):
        return self.gains[self.applied]

    def current_score(self):
        return float(self.gains[self.applied].mean())


@pytest.mark.parametrize("wins, kept", [(2, True), (12, False)])
def test_without_data_the_prior_is_returned_unless_clearly_beaten(wins, kept):
    """32 held-out samples: a plan that agrees on 2 more of them than the prior (and loses none) is
    within noise of it, one that agrees on 12 more is not."""
    from torch_rlprune.search.selection import Selection, keep_prior_unless_clearly_better

    prior = torch.cat([torch.zeros(16), torch.ones(16)]).double()
    found = prior.clone()
    found[:wins] = 1.0
    env = _PlansOnSelection({(1, 1): prior, (2, 0): found}, {(1, 1): 0.9, (2, 0): 0.95})
    selections = {0.5: Selection(0.95, float(found.mean()), [(0.95, float(found.mean()))], 0)}
    keep_prior_unless_clearly_better(env, selections, env.current_score, env.current_gains)
    test, best = selections[0.5].prior_test, env.best_by_target[0.5]
    assert test["prior_kept"] is kept and test["samples"] == 32
    assert test["mean_difference"] == pytest.approx(wins / 32)
    if kept:
        assert best.k.tolist() == [1, 1] and best.score == best.reward == 0.9
        assert selections[0.5].selection_score == pytest.approx(0.5)
        assert selections[0.5].search_score == 0.9
    else:
        assert best.k.tolist() == [2, 0] and best.score == 0.95


def test_the_no_data_one_liner_reports_its_comparison_with_the_prior():
    model = seeded(small_cnn, 0)
    result = rl_prune(model, 0.6, episodes=6, example_inputs=inputs((2, 1, 16, 16)), **QUIET)
    selection = result.plan.metadata["selection"]
    test = selection["prior_test"]      # seeded: the search's best is not the prior here
    assert test["prior_kept"] and selection["search_score"] == result.plan.metadata["prior"]["score"]
    assert test["z"] == 2.0 and test["samples"] == result.plan.metadata["selection"]["samples"]
    assert ("the prior kept" if test["prior_kept"] else "the search beat the prior") in result.summary()


class ScriptedResults:
    """What select_plans reads from an environment: kept plans, the best, the prior, and scores."""

    def __init__(self, top, prior, held_out):
        from torch_rlprune.env.layerwise import BestPlan
        self.top_by_target = {0.5: [BestPlan(r, r, np.array(k)) for r, k in top]}
        best = self.top_by_target[0.5][0]
        self.best_by_target = {0.5: BestPlan(best.reward, best.score, best.k.copy())}
        self.priors = {0.5: np.array(prior)}
        self.search_scores = {tuple(k): r for r, k in top}
        self.search_scores[tuple(prior)] = 0.70
        self.held_out = held_out

    def evaluate(self, k):
        return self.search_scores[tuple(int(v) for v in k)]

    def reward_of(self, score, k):
        return score

    def measure(self, k, fn):
        return self.held_out[tuple(int(v) for v in k)]


@pytest.mark.parametrize("prior_held_out,chosen", [(0.9, "prior"), (0.5, "top")])
def test_the_prior_is_a_candidate_even_when_every_top_plan_beat_it_on_the_search_part(prior_held_out, chosen):
    from torch_rlprune.search.selection import select_plans

    top = [(0.80, (3, 1)), (0.78, (2, 2)), (0.75, (1, 3))]
    env = ScriptedResults(top, (0, 4), {(3, 1): 0.60, (2, 2): 0.65, (1, 3): 0.55, (0, 4): prior_held_out})
    selection = select_plans(env, [0.5], lambda: 0.0)[0.5]
    assert [c[0] for c in selection.candidates] == [0.80, 0.78, 0.75, 0.70]
    expected = (0, 4) if chosen == "prior" else (2, 2)
    assert tuple(env.best_by_target[0.5].k) == expected
    assert selection.selection_score == max(prior_held_out, 0.65)


@pytest.mark.parametrize("other_held_out,chosen", [(0.9, (4, 0)), (0.5, (2, 2))])
def test_every_prior_candidate_is_compared_not_only_the_anchor(other_held_out, chosen):
    """The actions were anchored to global magnitude (best on the search part); LAMP, worse there,
    may still be the best on held-out data, and then the search returns it, as agent="prior" would."""
    from torch_rlprune.search.selection import PriorChoice, select_plans

    top = [(0.80, (3, 1)), (0.78, (2, 2))]
    env = ScriptedResults(top, (0, 4), {(3, 1): 0.60, (2, 2): 0.65, (0, 4): 0.55, (4, 0): other_held_out})
    # (4, 0) has no score in env: its search score must come from the record (a follower never scores)
    priors = {0.5: PriorChoice("global", 0.70, {"global": 0.70, "lamp": 0.68},
                               {"global": np.array((0, 4)), "lamp": np.array((4, 0))})}
    selection = select_plans(env, [0.5], lambda: 0.0, priors)[0.5]
    assert [c[0] for c in selection.candidates] == [0.80, 0.78, 0.70, 0.68]   # the anchor before the other
    assert tuple(env.best_by_target[0.5].k) == chosen
    assert select_plans(ScriptedResults(top, (0, 4), env.held_out), [0.5], lambda: 0.0)[0.5].candidates == \
        [(0.80, 0.60), (0.78, 0.65), (0.70, 0.55)]   # without the choice's plans: the anchor only


def test_where_plans_are_scored_as_returned_the_choice_is_made_on_those_scores():
    """A refit moves plans more than their held-out scores before it can tell: the choice is made on
    the refitted scores, and the scores before the refit stay on record (the refit is judged on them)."""
    from torch_rlprune.search.selection import select_plans

    top = [(0.80, (3, 1)), (0.78, (2, 2))]
    held = {(3, 1): 0.60, (2, 2): 0.65, (0, 4): 0.55}
    after_refit = {(3, 1): 0.97, (2, 2): 0.90, (0, 4): 0.93}
    asked = []

    def as_returned(key):
        asked.append(key)
        return lambda k: after_refit[tuple(int(v) for v in k)]

    selection = select_plans(ScriptedResults(top, (0, 4), held), [0.5], lambda: 0.0, as_returned=as_returned)[0.5]
    assert asked == [0.5] and selection.returned == [0.97, 0.90, 0.93]
    assert selection.chosen == 0 and selection.selection_score == 0.60
    assert selection.as_dict()["returned_scores"] == [0.97, 0.90, 0.93]
    unrefitted = select_plans(ScriptedResults(top, (0, 4), held), [0.5], lambda: 0.0, as_returned=lambda key: None)
    assert unrefitted[0.5].chosen == 1 and "returned_scores" not in unrefitted[0.5].as_dict()


class TwoLayerLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(5, 8), nn.Linear(12, 3)
        self.rnn = nn.LSTM(8, 12, num_layers=2, batch_first=True)

    def forward(self, x):
        return self.head(self.rnn(torch.tanh(self.embed(x)))[0][:, -1])


def test_a_recurrent_search_on_data_chooses_among_its_plans_as_they_are_returned():
    model = seeded(TwoLayerLSTM, 0).eval()
    x = torch.randn(96, 10, 5, generator=torch.Generator().manual_seed(1)).cumsum(1) / 3
    result = rl_prune(model, 0.8, data=x, agent="random", episodes=6, select_top=3, **QUIET)
    selection = result.plan.metadata["selection"]
    returned = selection["returned_scores"]
    assert len(returned) == len(selection["candidates"]) >= 2
    assert returned[selection["chosen"]] == max(returned)
    assert all(0.0 < r < 1.0 for r in returned)   # output closeness, 1 / (1 + relative squared error)
    assert "chosen refitted, as returned, by how close their outputs come" in result.summary()
    plain = rl_prune(ThreeConvNet(), 0.8, data=inputs((64, 1, 16, 16)), agent="random", episodes=4, **QUIET)
    assert "returned_scores" not in plain.plan.metadata["selection"]   # convolutions: not refitted per candidate
    # without data the prior stays unless clearly beaten as searched: no candidate is refitted
    no_data = rl_prune(seeded(TwoLayerLSTM, 0).eval(), 0.8, agent="random", episodes=4,
                       example_inputs=x[:2], **QUIET)
    assert no_data.plan.metadata["synthetic_calibration"]
    assert "returned_scores" not in no_data.plan.metadata["selection"]


def test_output_closeness_tells_apart_plans_that_agree_everywhere():
    """What the refitted candidates are compared by: a model whose logits only shrank still agrees
    on every sample (top-1 agreement 1.0) but is further from the unpruned one."""
    from torch_rlprune.rewards.scores import FidelityReward

    model = seeded(ThreeConvNet, 0).eval()
    calibration = CalibrationSet([inputs((16, 1, 16, 16))], None, False)
    top1, closeness = FidelityReward(calibration), FidelityReward(calibration, top1=False)
    top1.prepare(model)
    closeness.prepare(model)
    assert top1(model) == 1.0 and closeness(model) == 1.0
    with torch.no_grad():
        model.head.weight.mul_(0.9)
        model.head.bias.mul_(0.9)
    assert top1(model) == 1.0
    assert closeness(model) < 0.999
