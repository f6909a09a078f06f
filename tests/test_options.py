"""One validation for rl_prune, the command line and the gymnasium environment (options.py)."""
import pytest
import torch_pruning as tp

from helpers import ModelState, inputs, seeded, small_cnn
from torch_rlprune import rl_prune
from torch_rlprune.structure.channel.measured import Latency
from torch_rlprune.cli.prune_options import Flags
from torch_rlprune.env.spaces import LATENCY_ROUND_TO
from torch_rlprune.options import STRUCTURE_DEFAULTS, PruneOptions


@pytest.mark.parametrize("structure", ["unstructured", "channel"])
def test_none_means_the_structures_default(structure):
    o = PruneOptions(structure=structure).checked()
    d = STRUCTURE_DEFAULTS[structure]
    assert (o.budget, o.max_amount, o.bn_recalibration, o.repair) == (d.budget, d.max_amount, d.bn_recalibration,
                                                                         d.repair)
    assert o.tolerance == d.tolerance and o.targets == [0.8] and o.latency is None and o.round_to is None


def test_given_values_win_over_defaults_and_targets_come_back_sorted():
    o = PruneOptions(structure="channel", target=[0.7, 0.3], budget="params", max_amount=0.5, repair="none",
                     bn_recalibration=0, agent="cacp").checked()
    assert o.targets == [0.3, 0.7]
    assert (o.budget, o.max_amount, o.repair, o.bn_recalibration) == ("params", 0.5, "none", 0)
    assert o.agent_type.name == "cacp"


def test_a_latency_budget_is_measured_and_keeps_kernel_friendly_widths():
    o = PruneOptions(structure="channel", budget="latency").checked()
    assert o.budget == "latency" and isinstance(o.latency, Latency) and o.round_to == LATENCY_ROUND_TO
    spec = Latency(batch=4)
    assert PruneOptions(structure="channel", budget=spec, round_to=2).checked().latency is spec


BAD = [  # (options, what rl_prune's message says, what rlprune prune's says)
    (dict(max_amount=1.5), "max_amount must be in (0, 1]", "--max-amount must be in (0, 1]"),
    (dict(calibration_samples=0), "calibration_samples must be a positive integer",
     "--calibration must be a positive integer"),
    (dict(structure="rows"), "structure must be one of ('unstructured', 'channel')",
     "--structure must be one of unstructured, channel"),
    (dict(budget="latency"), "budget must be one of ('params', 'macs') with structure='unstructured'",
     "--budget must be one of params, macs with --structure unstructured"),
    (dict(repair="ls"), "repair must be one of ('lstsq', 'auto', 'none')", "--repair must be one of lstsq, auto, none"),
    (dict(agent="n2n"), "agent='n2n' removes residual blocks", "--agent n2n removes residual blocks"),
    (dict(prior="nope"), "prior must be one of ('best',", "--prior must be one of best,"),
    (dict(target=[0.5, 0.5]), "target: the list has repeated values", "--target: the list has repeated values"),
    (dict(time_budget=0), "time_budget must be a positive number of seconds",
     "--time-budget must be a positive number of seconds"),
    (dict(patience=0), "patience must be a positive integer", "--patience must be a positive integer"),
    (dict(cache_mb=-1.0), "cache_mb must be a number of megabytes >= 0", "--cache-mb must be a number of megabytes"),
    (dict(cache_mb=True), "cache_mb must be a number of megabytes >= 0", "--cache-mb must be a number of megabytes"),
    (dict(seed=-1), "seed must be an integer >= 0, got -1", "--seed must be an integer >= 0, got -1"),
]


@pytest.mark.parametrize("options, python, flags", BAD, ids=[str(b[0]) for b in BAD])
def test_each_caller_reads_the_same_refusal_in_its_own_spelling(options, python, flags):
    with pytest.raises(ValueError) as api_error:
        PruneOptions(**options).checked()
    with pytest.raises(ValueError) as cli_error:
        PruneOptions(**options).checked(Flags())
    assert str(api_error.value).startswith(python), api_error.value
    assert str(cli_error.value).startswith(flags), cli_error.value


@pytest.mark.parametrize("options", [b[0] for b in BAD], ids=[str(b[0]) for b in BAD])
def test_rl_prune_and_the_gym_refuse_with_the_shared_check(options):
    pytest.importorskip("gymnasium")
    from torch_rlprune.gym_env import PruningGymEnv

    with pytest.raises(ValueError) as expected:
        PruneOptions(**options).checked()
    model, x = seeded(small_cnn, 0), inputs((8, 1, 16, 16))
    state = ModelState.of(model)
    with pytest.raises(ValueError) as from_api:
        rl_prune(model, data=x, verbose=False, **options)
    assert str(from_api.value) == str(expected.value)
    gym_options = {k: v for k, v in options.items() if k in ("max_amount", "calibration_samples", "structure",
                                                              "budget", "prior", "target", "seed")}
    if gym_options:
        with pytest.raises(ValueError) as from_gym:
            PruningGymEnv(model, data=x, **gym_options)
        assert str(from_gym.value) == str(expected.value)
    state.assert_unchanged(model)


def test_without_data_the_search_is_budgeted_unless_told_otherwise():
    no_data = PruneOptions(target=0.5, synthetic_data=True).checked()
    assert (no_data.calibration_samples, no_data.time_budget, no_data.patience) == (128, 30.0, 20)
    assert no_data.bn_recalibration == 0 and PruneOptions(target=0.5).checked().bn_recalibration == 4
    counted = PruneOptions(target=0.5, synthetic_data=True, episodes=10).checked()
    assert (counted.calibration_samples, counted.time_budget, counted.patience) == (128, None, None)
    mine = PruneOptions(target=0.5, synthetic_data=True, time_budget=5.0, calibration_samples=64).checked()
    assert (mine.calibration_samples, mine.time_budget, mine.patience) == (64, 5.0, None)
    data = PruneOptions(target=0.5).checked()
    assert (data.calibration_samples, data.time_budget, data.patience) == (512, None, None)


# --------------------------------------------------------------------------- channel importance
@pytest.mark.parametrize("importance, hint", [
    ("activation", "(importance='activation' applies to structure='unstructured')"), ("wanda", "got 'wanda'"),
    (3, "got 3"), (tp.importance.GroupMagnitudeImportance, "a class: pass an instance, GroupMagnitudeImportance()"),
], ids=["activation", "unknown name", "number", "class"])
def test_channel_pruning_refuses_an_importance_it_cannot_call(importance, hint):
    """Each would fail on every group and fall back to magnitude without a word."""
    with pytest.raises(ValueError) as error:
        PruneOptions(structure="channel", importance=importance).checked()
    assert str(error.value).startswith("importance must be None or 'magnitude'"), error.value
    assert "torch-pruning importance" in str(error.value) and hint in str(error.value), error.value


def test_the_command_line_reads_the_channel_importance_refusal_in_flags():
    with pytest.raises(ValueError) as error:
        PruneOptions(structure="channel", importance="activation").checked(Flags())
    message = str(error.value)
    assert message.startswith("--importance must be None or 'magnitude'"), message
    assert "with --structure channel" in message
    assert "--importance activation applies to --structure unstructured" in message


@pytest.mark.parametrize("importance", ["magnitude", None, tp.importance.LAMPImportance(), lambda group: None],
                         ids=["magnitude", "none", "torch-pruning", "callable"])
def test_channel_pruning_takes_magnitude_or_any_torch_pruning_importance(importance):
    o = PruneOptions(structure="channel", importance=importance).checked()
    # "magnitude" is the default (group magnitude), not a name torch-pruning would be asked to call
    assert o.importance is (None if isinstance(importance, str) else importance)
