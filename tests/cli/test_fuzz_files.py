"""Fuzzing the files a user did not write: every mutation of a plan or a search checkpoint is either
refused with PlanError / CheckpointError, or gives a result whose reported numbers are measured."""
import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import inputs, seeded, small_cnn
from torch_rlprune import PlanError, PruningPlan, apply_plan, rl_prune
from torch_rlprune.rewards.calibration import build_calibration
from torch_rlprune.search.checkpoint import CheckpointError
from torch_rlprune.rewards.scores import FidelityReward

X = inputs((64, 1, 16, 16))
SEARCH = dict(data=X, agent="random", episodes=4, seed=3, verbose=False, calibration_samples=64, selection=0.0)
FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "c.pt"
    rl_prune(seeded(small_cnn), 0.5, checkpoint=path, **SEARCH)
    return path.read_bytes()


@pytest.fixture(scope="module")
def plan_text():
    model = seeded(small_cnn)
    return json.dumps(rl_prune(model, 0.5, **SEARCH).plan.to_dict())


def measured_fidelity(model) -> float:
    reward = FidelityReward(build_calibration(model, X, None, 64))
    reward.prepare(seeded(small_cnn))
    return reward(model)


def mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=4)


@FUZZ
@given(edits=EDITS)
def test_a_mutated_checkpoint_is_refused_or_its_result_is_measured(edits, checkpoint_bytes, tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(mutate(checkpoint_bytes, edits))
    model = seeded(small_cnn)
    try:
        result = rl_prune(model, 0.5, resume=path, **SEARCH)
    except CheckpointError:
        return
    assert result.plan.score == pytest.approx(measured_fidelity(model), abs=1e-9)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 30), st.sampled_from(b'0123456789.-e"{}[]:,aZ ')),
                      min_size=1, max_size=3))
def test_a_mutated_plan_is_refused_or_applies_exactly_what_it_says(edits, plan_text, tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(mutate(plan_text.encode(), edits))
    model = seeded(small_cnn)
    untouched = copy.deepcopy(model.state_dict())
    try:
        plan = PruningPlan.load(path)
        apply_plan(model, plan)
    except PlanError:
        assert all(torch.equal(v, untouched[k]) for k, v in model.state_dict().items())  # refused: no change
        return
    for name, amount in plan.amounts.items():
        module_name, _, param = name.rpartition(".")
        mask = getattr(model.get_submodule(module_name), param + "_mask")
        assert int((mask == 0).sum()) == round(amount * plan.numels[name])
