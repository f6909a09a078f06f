"""The pruning MDP behind the gymnasium API, driven by gymnasium's own tooling."""
import numpy as np
import pytest
import torch

from helpers import ModelState, assert_budget_met, mask_sparsity, seeded, small_cnn

gymnasium = pytest.importorskip("gymnasium")
from gymnasium.utils.env_checker import check_env  # noqa: E402

from torch_rlprune.env.layerwise import ANCHORED_STATE_FEATURES  # noqa: E402
from torch_rlprune.gym_env import PruningGymEnv  # noqa: E402


@pytest.fixture
def model():
    return seeded(small_cnn, 0)


def test_passes_gymnasiums_env_checker(model, cnn_batch):
    env = PruningGymEnv(model, 0.6, data=cnn_batch)
    check_env(env, skip_render_check=True)
    assert env.observation_space.shape == (len(ANCHORED_STATE_FEATURES),) and env.action_space.shape == (1,)
    env.close()


@pytest.mark.parametrize("constraint, dense", [("clip", False), ("clip", True), ("free", False)])
def test_an_external_agent_loop_reaches_a_plan_that_applies_like_rl_prune(model, cnn_batch, constraint, dense):
    env = gymnasium.wrappers.RecordEpisodeStatistics(PruningGymEnv(model, 0.6, data=cnn_batch,
                                                                   constraint=constraint, dense=dense))
    env.action_space.seed(0)
    episode_returns, steps = [], 0
    for episode in range(6):
        obs, info = env.reset(seed=episode)
        assert env.observation_space.contains(obs)
        terminated = False
        while not terminated:
            obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
            steps += 1
            assert not truncated
        episode_returns.append(info["episode"]["r"])
    inner = env.unwrapped
    assert steps == 6 * inner.env.num_steps
    assert len(inner.env.history) == 6
    if constraint == "clip" and not dense:
        assert np.allclose(episode_returns, [h.score for h in inner.env.history])
    result = inner.apply_best()
    assert result.model is model and result.plan.agent == "gymnasium"
    assert_budget_met(mask_sparsity(model), 0.6)
    assert result.plan.score == inner.best_score


def test_close_without_applying_leaves_the_model_exactly_as_it_was(model, cnn_batch):
    state = ModelState.of(model.train())
    env = PruningGymEnv(model, 0.6, data=cnn_batch)
    env.reset(seed=0)
    for _ in range(2):
        env.step(np.array([0.9], dtype=np.float32))
    env.close()
    state.assert_unchanged(model)
    with pytest.raises(RuntimeError, match="closed"):
        env.reset()


@pytest.mark.parametrize("kwargs, fragment", [(dict(target=1.5), "target"), (dict(constraint="soft"), "constraint"),
                                              (dict(budget="flops"), "budget"), (dict(structure="rows"), "structure")])
def test_bad_arguments_are_rejected_before_the_model_changes(model, cnn_batch, kwargs, fragment):
    state = ModelState.of(model)
    with pytest.raises((ValueError, TypeError), match=fragment):
        PruningGymEnv(model, data=cnn_batch, **{"target": 0.6, **kwargs})
    state.assert_unchanged(model)


def test_channel_structure_through_gymnasium(cnn_batch):
    import timm

    from helpers import inputs
    from torch_rlprune import compact

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10).eval()
    x = inputs((8, 1, 32, 32))
    from torch_rlprune.structure.channel import count_macs_params

    dense_macs = count_macs_params(model, x[:2])[0]
    env = PruningGymEnv(model, 0.4, data=x, structure="channel")
    for episode in range(2):
        env.reset(seed=episode)
        terminated = False
        while not terminated:
            _, _, terminated, _, _ = env.step(np.array([0.5], dtype=np.float32))
    result = env.apply_best()
    assert abs(result.sparsity - 0.4) <= 0.02
    info = compact(model, x[:2])
    assert abs(1 - info["macs_after"] / dense_macs - 0.4) <= 0.02
