"""Checkpoints and resume: an interrupted search continues to exactly the uninterrupted result."""
from __future__ import annotations

import copy

import numpy as np
from pathlib import Path

import pytest
import torch

from helpers import weight_masks
from torch_rlprune import rl_prune
from torch_rlprune.search.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from torch_rlprune.rewards.scores import FidelityReward

# (agent, structure, target, episodes, agent_config): every registered agent, each on its own loop
CASES = [
    ("amc", "unstructured", 0.8, 14, {"warmup": 4}),
    ("purl", "unstructured", 0.8, 8, {"warmup": 2}),
    ("crl", "unstructured", 0.8, 12, {"episodes_per_update": 4}),
    ("random", "unstructured", 0.8, 10, None),
    ("cacp", "unstructured", [0.6, 0.8], 12, {"warmup": 4}),
    ("amc", "unstructured", [0.6, 0.8], 6, {"warmup": 2}),   # one agent per target, one after the other
    ("n2n", "channel", 0.5, 12, {"rollouts": 3}),
]


class CountingFidelity:
    """Counts scoring passes and raises KeyboardInterrupt on pass ``interrupt_at`` (if given)."""

    def __init__(self, monkeypatch, interrupt_at=None):
        self.calls, self.interrupt_at = 0, interrupt_at
        original = FidelityReward.__call__

        def call(reward, model):
            self.calls += 1
            if self.calls == self.interrupt_at:
                raise KeyboardInterrupt
            return original(reward, model)

        monkeypatch.setattr(FidelityReward, "__call__", call)


def resealed(saved: dict) -> dict:
    """A checkpoint edited and given a matching digest again (a forger who knows the format)."""
    from torch_rlprune.search.checkpoint import content_digest
    saved["digest"] = content_digest(saved)
    return saved


def _search(model, calibration, agent, structure, target, episodes, config, **kwargs):
    return rl_prune(model, target=target, data=calibration, agent=agent, structure=structure, episodes=episodes,
                    agent_config=config, seed=5, verbose=False, calibration_samples=128, **kwargs)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def calibration(fmnist_train_split):
    (x, y), _ = fmnist_train_split
    return x[:128], y[:128]


@pytest.mark.parametrize("agent,structure,target,episodes,config", CASES,
                         ids=[f"{c[0]}-{c[1]}-{'multi' if isinstance(c[2], list) else c[2]}" for c in CASES])
def test_interrupted_search_resumes_to_the_uninterrupted_result(agent, structure, target, episodes, config,
                                                                  trained_fmnist_cnn, _trained_fmnist_cnn,
                                                                  calibration, tmp_path, monkeypatch):
    import copy
    reference = _search(copy.deepcopy(_trained_fmnist_cnn), calibration, agent, structure, target, episodes, config,
                        checkpoint=tmp_path / "reference.pt")
    multi = isinstance(target, list)
    assert len({h["reward"] for h in reference.history}) > 1, "the scores must vary for the comparison to mean anything"
    total = len(torch.load(tmp_path / "reference.pt", weights_only=True)["scores"])  # finalize() may score more

    # the unpruned model is scored once, and once more after BatchNorm recalibration (on by default)
    unpruned_passes = 2
    model, path = trained_fmnist_cnn, tmp_path / "search.pt"
    before = _state(model)
    CountingFidelity(monkeypatch, interrupt_at=unpruned_passes + 1 + total // 2)
    with pytest.raises(KeyboardInterrupt):
        _search(model, calibration, agent, structure, target, episodes, config, checkpoint=path, checkpoint_every=2)
    after = _state(model)
    assert after.keys() == before.keys() and [k for k in before if not torch.equal(after[k], before[k])] == []
    assert not weight_masks(model)

    saved = torch.load(path, weights_only=True)  # plain data only
    recorded = len(saved["scores"])
    assert 0 < recorded < total
    assert saved["agent"] is None or saved["agent"]["episode"] % 2 == 1  # snapshots at every 2nd episode

    monkeypatch.undo()
    counter = CountingFidelity(monkeypatch)
    resumed = _search(model, calibration, agent, structure, target, episodes, config, resume=path)
    # only plans never scored before, and the held-out choice, re-measured (never replayed from the file)
    results = [resumed[t] for t in target] if multi else [resumed]
    held_out = sum(len(r.plan.metadata["selection"]["candidates"]) for r in results)
    # and the replayed plans it could report (best, held-out candidates) plus a sample, measured again
    remeasured = results[0].plan.metadata["resume"]["remeasured"]
    assert 1 <= remeasured <= results[0].plan.metadata["resume"]["replayed_plans"]
    # and a channel plan's least-squares refit, measured once it is done (search part; the held-out
    # part through its per-sample gains, with their standard error, which __call__ does not count)
    repairs = [r.plan.metadata.get("repair", {}) for r in results]
    after_repair = sum(("search_score" in rec) + ("selection_score" in rec and "selection_error" not in rec)
                       for rec in repairs)
    assert all("selection_error" in rec for rec in repairs if "selection_score" in rec)
    assert counter.calls == unpruned_passes + total - recorded + held_out + remeasured + after_repair
    if multi:
        for t in target:
            assert resumed[t].plan.amounts == reference[t].plan.amounts
            assert resumed[t].plan.score == reference[t].plan.score
    else:
        assert resumed.plan.amounts == reference.plan.amounts and resumed.plan.score == reference.plan.score
        assert weight_masks(model).keys() == weight_masks(reference.model).keys()
        assert all(torch.equal(a, b) for a, b in zip(weight_masks(model).values(),
                                                     weight_masks(reference.model).values()))
    got, want = resumed.history, reference.history
    assert [(h["reward"], h["amounts"], h["evaluations"], h["target"]) for h in got] == \
        [(h["reward"], h["amounts"], h["evaluations"], h["target"]) for h in want]
    # the replayed episodes keep the wall time they took when they ran
    assert [h["seconds"] for h in got[:len(saved["history"])]] == [h["seconds"] for h in saved["history"]]
    final = torch.load(path, weights_only=True)
    assert len(final["history"]) == len(want) and len(final["scores"]) >= total


def test_checkpoint_holds_agent_state_and_resume_checks_it(trained_fmnist_cnn, calibration, tmp_path):
    import copy
    path, untouched = tmp_path / "amc.pt", copy.deepcopy(trained_fmnist_cnn)
    _search(trained_fmnist_cnn, calibration, "amc", "unstructured", 0.8, 9, {"warmup": 3}, checkpoint=path,
            checkpoint_every=4)
    saved = torch.load(path, weights_only=True)
    agent = saved["agent"]
    assert agent["episode"] == 7
    state = agent["state"]
    assert {"actor", "critic", "actor_target", "critic_target", "actor_opt", "critic_opt", "memory", "rng"} <= set(state)
    layers = len(saved["history"][0]["amounts"])
    assert state["memory"]["size"] == 7 * layers  # taken when episode 7 ended, before its steps are stored
    assert isinstance(state["rng"]["bit_generator"]["state"]["state"], int)
    assert isinstance(saved["torch_rng"], torch.Tensor)
    assert len(saved["history"]) == 9 and saved["best"][0]["k"] is not None

    # tamper with what the agent learned (digest recomputed, as a careful forger would): the replay notices
    state["actor"]["net.0.weight"] += 1.0
    torch.save(resealed(saved), path)
    with pytest.warns(RuntimeWarning, match="episode 7 did not reproduce the agent"):
        _search(untouched, calibration, "amc", "unstructured", 0.8, 9, {"warmup": 3}, resume=path)


def test_tampered_history_is_reported(trained_fmnist_cnn, calibration, tmp_path):
    import copy
    path = tmp_path / "r.pt"
    original = copy.deepcopy(trained_fmnist_cnn)
    _search(trained_fmnist_cnn, calibration, "random", "unstructured", 0.8, 6, None, checkpoint=path)
    saved = torch.load(path, weights_only=True)
    saved["history"][2]["amounts"][0] += 0.25
    torch.save(resealed(saved), path)
    with pytest.warns(RuntimeWarning, match="episode 2 did not reproduce its plan"):
        _search(original, calibration, "random", "unstructured", 0.8, 6, None, resume=path)


@pytest.mark.parametrize("change,needle", [({"target": 0.7}, "targets"), ({"seed": 6}, "seed"),
                                           ({"agent": "purl"}, "agent"), ({"episodes": 7}, "episodes")])
def test_resume_refuses_a_different_search_before_touching_the_model(change, needle, small_cnn_model, cnn_batch,
                                                                    tmp_path):
    path = tmp_path / "c.pt"
    kwargs = dict(target=0.5, data=cnn_batch, agent="random", episodes=4, seed=5, verbose=False)
    rl_prune(small_cnn_model, checkpoint=path, **kwargs)
    from helpers import seeded, small_cnn
    fresh = seeded(small_cnn, 0)
    before = _state(fresh)
    with pytest.raises(CheckpointError, match=f"different search.*{needle}"):
        rl_prune(fresh, resume=path, **{**kwargs, **change})
    assert _state(fresh).keys() == before.keys() and all(torch.equal(_state(fresh)[k], before[k]) for k in before)


@pytest.mark.parametrize("agent", ["n2n", "random"])
def test_another_repair_is_another_search_only_for_n2n(agent, cnn_batch, tmp_path):
    # N2N scores its architecture choice refitted; the other agents refit only the plan they return
    from helpers import seeded, small_cnn
    path = tmp_path / "c.pt"
    kwargs = dict(target=0.5, data=cnn_batch, agent=agent, structure="channel", episodes=3, seed=5, verbose=False)
    first = rl_prune(seeded(small_cnn, 0), checkpoint=path, repair="lstsq", **kwargs)
    if agent == "n2n":
        with pytest.raises(CheckpointError, match="different search.*repair"):
            rl_prune(seeded(small_cnn, 0), resume=path, repair="none", **kwargs)
    else:
        resumed = rl_prune(seeded(small_cnn, 0), resume=path, repair="none", **kwargs)
        assert resumed.plan.amounts == first.plan.amounts


@pytest.mark.parametrize("failure", ["interrupt while scoring the unpruned model", "unreachable target"])
def test_batchnorm_statistics_survive_a_failure_before_the_search(failure, trained_fmnist_cnn, calibration,
                                                                   monkeypatch):
    before = _state(trained_fmnist_cnn)
    if failure.startswith("interrupt"):
        CountingFidelity(monkeypatch, interrupt_at=2)  # the pass after the statistics were re-estimated
        with pytest.raises(KeyboardInterrupt):
            _search(trained_fmnist_cnn, calibration, "amc", "channel", 0.5, 2, None)
    else:
        with pytest.raises(ValueError, match="cannot be reached"):
            _search(trained_fmnist_cnn, calibration, "amc", "channel", 0.9, 2, None, max_amount=0.3)
    after = _state(trained_fmnist_cnn)
    assert [k for k in before if not torch.equal(after[k], before[k])] == []


def test_a_changed_model_is_refused_even_with_the_same_arguments(small_cnn_model, cnn_batch, tmp_path):
    path = tmp_path / "c.pt"
    kwargs = dict(target=0.5, data=cnn_batch, agent="random", episodes=3, seed=5, verbose=False)
    rl_prune(small_cnn_model, checkpoint=path, **kwargs)
    from helpers import seeded, small_cnn
    other = seeded(small_cnn, 1)  # same architecture, other weights: the record's scores would not hold
    with pytest.raises(CheckpointError, match="weights"):
        rl_prune(other, resume=path, **kwargs)
    with pytest.raises(CheckpointError, match="calibration"):
        rl_prune(seeded(small_cnn, 0), resume=path, **{**kwargs, "data": cnn_batch + 1})


def test_numpy_numbers_and_a_directory_make_a_loadable_checkpoint(small_cnn_model, cnn_batch, tmp_path):
    import numpy as np
    kwargs = dict(target=np.float64(0.5), data=cnn_batch, agent="amc", episodes=4, seed=5, verbose=False,
                  agent_config={"warmup": 2, "init_delta": np.float64(0.4)}, max_amount=np.float64(0.9))
    reference = rl_prune(copy.deepcopy(small_cnn_model), **kwargs)
    rl_prune(small_cnn_model, checkpoint=tmp_path, checkpoint_every=1, **kwargs)  # a directory
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["fingerprint"]["agent_config"]["init_delta"] == 0.4
    from helpers import seeded, small_cnn
    resumed = rl_prune(seeded(small_cnn, 0), resume=tmp_path, **kwargs)
    assert resumed.plan.amounts == reference.plan.amounts


def test_after_a_divergence_the_checkpoint_describes_the_new_search(trained_fmnist_cnn, calibration, tmp_path):
    path = tmp_path / "d.pt"
    original = copy.deepcopy(trained_fmnist_cnn)
    _search(trained_fmnist_cnn, calibration, "random", "unstructured", 0.8, 8, None, checkpoint=path,
            checkpoint_every=2)
    saved = torch.load(path, weights_only=True)
    saved["history"][3]["reward"] = -1.0  # a record this search cannot reproduce
    torch.save(resealed(saved), path)
    with pytest.warns(RuntimeWarning, match="episode 3 did not reproduce its plan"):
        resumed = _search(original, calibration, "random", "unstructured", 0.8, 8, None, resume=path,
                          checkpoint_every=2)
    final = torch.load(path, weights_only=True)
    assert [h["reward"] for h in final["history"]] == [h["reward"] for h in resumed.history]
    assert final["agent"]["episode"] == 7  # written again by this search, not the old snapshot


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/torch_rlprune_pwned"),))


def test_hostile_and_malformed_checkpoints_get_clear_errors(small_cnn_model, cnn_batch, tmp_path):
    marker = Path("/tmp/torch_rlprune_pwned")
    marker.unlink(missing_ok=True)
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "payload": _Exploit()}, hostile)
    kwargs = dict(target=0.5, data=cnn_batch, agent="random", episodes=2, verbose=False)
    with pytest.raises(CheckpointError, match="cannot read"):
        rl_prune(small_cnn_model, resume=hostile, **kwargs)
    assert not marker.exists()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(garbage)
    wrong = tmp_path / "wrong.pt"
    torch.save(resealed({"format": CHECKPOINT_FORMAT, "fingerprint": {}, "history": "x",
                         "plans": torch.zeros(1, 2, dtype=torch.int64), "scores": torch.zeros(1, dtype=torch.float64),
                         "best": []}), wrong)
    with pytest.raises(CheckpointError, match="'history'"):
        load_checkpoint(wrong)
    torch.save({"format": 99}, wrong)
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(wrong)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "missing")
    assert not hasattr(small_cnn_model[0], "weight_mask")


@pytest.mark.parametrize("kwargs,needle", [({"checkpoint_every": 0}, "checkpoint_every"),
                                           ({"checkpoint": 3}, "checkpoint must be a file path"),
                                           ({"resume": ["x"]}, "resume must be a file path")])
def test_bad_checkpoint_arguments(kwargs, needle, small_cnn_model, cnn_batch):
    with pytest.raises((ValueError, TypeError), match=needle):
        rl_prune(small_cnn_model, target=0.5, data=cnn_batch, verbose=False, **kwargs)


def test_unreadable_checkpoints_say_why_and_never_advise_loading_them_unsafely(tmp_path):
    hostile, empty, noise = tmp_path / "hostile.pt", tmp_path / "empty.pt", tmp_path / "noise.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "payload": _Exploit()}, hostile)
    empty.write_bytes(b"")
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    for path, reason in ((hostile, "objects other than tensors and plain data"), (empty, "the file is empty"),
                         (noise, "not a file torch.save wrote")):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        message = str(err.value)
        assert reason in message and str(path) in message
        assert "weights_only" not in message and "likely succeed" not in message


def _checkpointed(model, calibration, path, episodes=6):
    _search(copy.deepcopy(model), calibration, "random", "unstructured", 0.8, episodes, None, checkpoint=path)
    return torch.load(path, weights_only=True)


def test_a_changed_byte_of_content_is_refused(_trained_fmnist_cnn, calibration, tmp_path):
    path = tmp_path / "c.pt"
    saved = _checkpointed(_trained_fmnist_cnn, calibration, path)
    saved["scores"][0] += 1e-3   # edited without the digest
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match="does not match its digest"):
        load_checkpoint(path)


@pytest.mark.parametrize("edit", ["nan", "inf reward"])
def test_non_finite_records_are_refused_at_load(edit, _trained_fmnist_cnn, calibration, tmp_path):
    path = tmp_path / "c.pt"
    saved = _checkpointed(_trained_fmnist_cnn, calibration, path)
    if edit == "nan":
        saved["scores"][1] = float("nan")
    else:
        saved["history"][0]["reward"] = float("inf")
    torch.save(resealed(saved), path)
    with pytest.raises(CheckpointError, match="not finite|history entries"):
        load_checkpoint(path)


@pytest.mark.parametrize("seconds", [float("inf"), float("nan"), -1.0])
def test_impossible_episode_seconds_are_refused_at_load(seconds, tmp_path):
    """A recorded episode time flows into the reported ``episode_seconds``: it must be a real duration."""
    def checkpoint(value):
        return resealed({"format": CHECKPOINT_FORMAT, "fingerprint": {}, "best": [],
                         "plans": torch.zeros(1, 2, dtype=torch.int64), "scores": torch.zeros(1, dtype=torch.float64),
                         "history": [{"amounts": [0.5, 0.5], "reward": 0.25, "seconds": 0.5},
                                     {"amounts": [0.5, 0.5], "reward": 0.25, "seconds": value}]})
    path = tmp_path / "c.pt"
    torch.save(checkpoint(0.0), path)
    assert load_checkpoint(path)["history"][1]["seconds"] == 0.0   # the control: a real duration loads
    torch.save(checkpoint(seconds), path)
    with pytest.raises(CheckpointError, match=r"c\.pt .*history\[1\]\['seconds'\]"):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:resume. replaying:RuntimeWarning")   # the replay notices too
def test_recorded_scores_the_model_does_not_reproduce_are_refused(_trained_fmnist_cnn, calibration, tmp_path):
    """The audit's case: every recorded score set to 1.0 (digest recomputed). Resume re-measures what it
    would report, refuses the file, and leaves the model as it was."""
    path = tmp_path / "c.pt"
    saved = _checkpointed(_trained_fmnist_cnn, calibration, path, episodes=8)
    saved["scores"].fill_(1.0)
    for h in saved["history"]:
        h["reward"] = h["score"] = 1.0
    for b in saved["best"]:
        b["reward"] = b["score"] = 1.0
    torch.save(resealed(saved), path)
    model = copy.deepcopy(_trained_fmnist_cnn)
    before = _state(model)
    with pytest.raises(CheckpointError, match="records the score 1 for a plan that scores"):
        _search(model, calibration, "random", "unstructured", 0.8, 8, None, resume=path)
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not weight_masks(model)


def test_plans_of_another_width_are_a_checkpoint_error(_trained_fmnist_cnn, calibration, tmp_path):
    path = tmp_path / "c.pt"
    saved = _checkpointed(_trained_fmnist_cnn, calibration, path)
    saved["plans"] = torch.cat([saved["plans"], saved["plans"][:, :1]], dim=1)
    torch.save(resealed(saved), path)
    with pytest.raises(CheckpointError, match="records plans of"):
        _search(copy.deepcopy(_trained_fmnist_cnn), calibration, "random", "unstructured", 0.8, 6, None,
                resume=path)


def test_checkpoint_never_overwrites_a_file_that_is_not_this_search(small_cnn_model, cnn_batch, tmp_path):
    kwargs = dict(target=0.5, data=cnn_batch, agent="random", episodes=3, seed=5, verbose=False)
    important = tmp_path / "important.txt"
    important.write_text("my thesis")
    before = _state(small_cnn_model)
    with pytest.raises(CheckpointError, match="checkpoint: .*important.txt exists and is not a torch_rlprune"):
        rl_prune(small_cnn_model, checkpoint=important, **kwargs)
    assert important.read_text() == "my thesis"
    assert all(torch.equal(_state(small_cnn_model)[k], before[k]) for k in before)
    # a checkpoint of another search is not overwritten either; the same search may write it again
    path = tmp_path / "search.pt"
    rl_prune(copy.deepcopy(small_cnn_model), checkpoint=path, **kwargs)
    with pytest.raises(CheckpointError, match="checkpoint: .*different search.*seed.*refusing to overwrite"):
        rl_prune(copy.deepcopy(small_cnn_model), checkpoint=path, **{**kwargs, "seed": 6})
    rl_prune(copy.deepcopy(small_cnn_model), checkpoint=path, **kwargs)


def test_an_unwritable_checkpoint_path_is_refused_before_any_episode(small_cnn_model, cnn_batch, tmp_path,
                                                                      monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    episodes = []
    monkeypatch.setattr(FidelityReward, "__call__", lambda self, model: episodes.append(1) or 0.5)
    with pytest.raises(CheckpointError, match="a_file is not a directory"):
        rl_prune(small_cnn_model, 0.5, data=cnn_batch, agent="random", episodes=3, verbose=False,
                 checkpoint=blocker / "sub" / "c.pt")
    assert episodes == []   # refused before the unpruned model was even scored
