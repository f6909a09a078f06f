"""agent="n2n": removal of residual blocks (depth) and shrinking of channel groups (width), one budget."""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from torch_rlprune import PlanError, PruningPlan, apply_plan, compact, rl_prune
from torch_rlprune.agents.n2n import N2NAgent, n2n_reward
from torch_rlprune.structure.channel import count_macs_params
from torch_rlprune.structure.depth import RemovedBlock, find_removable_blocks
from torch_rlprune.env.depth_width import count_macs_params_removed, masked_block_names

from helpers import ModelState, RaisingReward, fmnist_cnn, inputs, seeded

timm = pytest.importorskip("timm")

TARGET = 0.5
TOLERANCE = 0.02          # the channel budget's contract
# With at most 20% of any group removed, channels alone remove at most ~30-35% of the MACs of
# these models (measured: resnet18 0.34, resnet50 0.35, mobilenetv2 0.33, deit 0.30): 50% needs blocks.
NARROW = 0.2


def timm_model(name, seed=0):
    kwargs = {"img_size": 64} if name.startswith("deit") else {}
    model = seeded(timm.create_model, seed, name, pretrained=False, num_classes=10, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # statistics that make masking != removal unless it is done right
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        nn.init.normal_(model.get_classifier().weight, std=0.1, generator=g)
    return model.eval()


def data_for(name, n=8):
    size = 64 if name.startswith("deit") else 32
    return inputs((n, 3, size, size), seed=1)


def out(model, x):
    with torch.inference_mode():
        return model(x).clone()


def removed_fraction(model, x, dense):
    return 1.0 - count_macs_params_removed(model, x[:2])[0] / dense


def check_depth_and_width(name, model, x, result):
    """Everything the contract promises about a depth+width result, checked from the model itself."""
    removed = result.plan.metadata["removed_blocks"]
    blocks_before = [b.name for b in find_removable_blocks(timm_model(name), x[:2])]
    dense = count_macs_params(timm_model(name), x[:2])[0]
    # -- at least one block removed (the budget needs it), and through the prune API
    assert removed and set(removed) <= set(blocks_before)
    assert masked_block_names(model) == removed
    assert any(k.endswith("_mask") for k in model.state_dict())
    # -- the budget, counted on the model (blocks out) and not only by the search's arithmetic
    achieved = removed_fraction(model, x, dense)
    assert abs(achieved - TARGET) <= TOLERANCE
    assert result.sparsity == pytest.approx(achieved, abs=1e-9)
    assert result.plan.sparsity == pytest.approx(achieved, abs=1e-9)
    # -- compaction: blocks become identities, channels go, the output does not change
    masked = out(model, x)
    info = compact(model, x[:2])
    assert info["removed_blocks"] == removed
    compacted = out(model, x)
    assert (masked - compacted).abs().max() < 1e-5 * max(1.0, float(masked.abs().max()))
    assert not any(k.endswith(("_mask", "_orig")) for k in model.state_dict())
    assert [n for n, m in model.named_modules() if isinstance(m, RemovedBlock)] == removed
    after = [b.name for b in find_removable_blocks(model, x[:2])]
    assert len(after) == len(blocks_before) - len(removed) and not set(after) & set(removed)
    assert 1.0 - count_macs_params(model, x[:2])[0] / dense == pytest.approx(achieved, abs=1e-3)
    assert info["removed"], "channels were removed too"
    # -- the compacted model trains
    model.train()
    model.zero_grad()
    model(x).square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads) and any(bool(g.any()) for g in grads)


# --------------------------------------------------------------------------- the reward
def test_reward_is_score_ratio_times_c_two_minus_c():
    assert n2n_reward(0.9, 1.0, 0.5) == pytest.approx(0.9 * 0.5 * 1.5)
    assert n2n_reward(0.45, 0.9, 0.75) == pytest.approx(0.5 * 0.75 * 1.25)
    assert n2n_reward(0.8, 1.0, 0.0) == 0.0
    assert n2n_reward(0.8, 1.0, 1.0) == pytest.approx(0.8)
    cs = np.linspace(0, 1, 11)
    values = [n2n_reward(1.0, 1.0, c) for c in cs]
    assert all(a < b for a, b in zip(values, values[1:])), "more compression, more reward"
    assert n2n_reward(0.3, 0.0, 0.5) == pytest.approx(0.3 * 0.75), "score_0 = 0: the score itself"
    assert n2n_reward(1.0, 1.0, 1.7) == pytest.approx(1.0) and n2n_reward(1.0, 1.0, -0.2) == 0.0


# --------------------------------------------------------------------------- resnet18 in depth
@pytest.fixture(scope="module")
def resnet18_run():
    model, x = timm_model("resnet18"), data_for("resnet18")
    twin = copy.deepcopy(model)
    result = rl_prune(model, TARGET, data=x, structure="channel", agent="n2n", episodes=10, max_amount=NARROW,
                      seed=0, verbose=False)
    return model, twin, x, result


def test_resnet18_channels_alone_cannot_meet_the_budget_n2n_removes_blocks():
    model, x = timm_model("resnet18"), data_for("resnet18")
    with pytest.raises(ValueError, match="cannot be reached"):
        rl_prune(model, TARGET, data=x, structure="channel", agent="random", episodes=1, max_amount=NARROW,
                 verbose=False)


def test_resnet18_budget_blocks_masked_equals_compacted_backward(resnet18_run):
    model, _, x, result = resnet18_run
    assert result.plan.agent == "n2n" and len(result.history) == 10
    assert f"blocks removed ({len(result.plan.metadata['removed_blocks'])} of 5 removable)" in result.summary()
    assert {h["phase"] for h in result.history} == {"removal", "shrink"}
    for h in result.history:  # every episode is on budget, not only the result
        assert abs(h["sparsity"] - TARGET) <= TOLERANCE
        assert h["reward"] == pytest.approx(n2n_reward(h["score"], result.baseline_score, h["sparsity"]))
    assert result.score == max(h["score"] for h in result.history
                               if h["reward"] == max(g["reward"] for g in result.history))
    masked = copy.deepcopy(model)
    check_depth_and_width("resnet18", copy.deepcopy(model), x, result)
    masked.train()
    masked(x).sum().backward()  # the masked model (prune hooks) trains as well
    grads = [p.grad for p in masked.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads) and masked.conv1.weight_orig.grad.any()


def test_resnet18_plan_json_round_trip_reproduces_depth_and_width(resnet18_run, tmp_path):
    model, twin, x, result = resnet18_run
    path = result.plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["metadata"]["removed_blocks"] == result.plan.metadata["removed_blocks"]
    apply_plan(twin, PruningPlan.load(path))              # input shape from the plan
    assert masked_block_names(twin) == result.plan.metadata["removed_blocks"]
    ours, theirs = model.state_dict(), twin.state_dict()
    assert ours.keys() == theirs.keys()
    stats = ("running_mean", "running_var", "num_batches_tracked")  # re-estimated for the plan (bn_recalibration)
    # and the layers refitted after masking (repair="lstsq"): a plan carries masks, not weights
    refitted = {f"{name}.weight_orig" for name in result.plan.metadata.get("repair", {}).get("refitted", [])}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.endswith(stats) and k not in refitted)
    bogus = PruningPlan.from_dict({**result.plan.to_dict(),
                                   "metadata": {**result.plan.metadata, "removed_blocks": ["layer2.0"]}})
    fresh = timm_model("resnet18")
    state = ModelState.of(fresh)
    with pytest.raises(PlanError, match="layer2.0"):  # it has a downsample: not removable
        apply_plan(fresh, bogus)
    state.assert_unchanged(fresh)
    twin.load_state_dict(ours)
    a, b = copy.deepcopy(model), twin
    compact(a, x[:2])
    compact(b, x[:2])
    assert [(n, type(m).__name__, tuple(p.shape for p in m.parameters(recurse=False))) for n, m in a.named_modules()] \
        == [(n, type(m).__name__, tuple(p.shape for p in m.parameters(recurse=False))) for n, m in b.named_modules()]
    assert (out(a, x) - out(b, x)).abs().max() < 1e-6



def interrupt_the_channel_compaction(monkeypatch):
    """A KeyboardInterrupt at the channel compaction's first count: after the blocks went."""
    import torch_rlprune.structure.channel.apply as channel_apply

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(channel_apply, "count_macs_params", interrupted)


@pytest.mark.parametrize("failure", ["wrong input", "interrupt"])
def test_a_compact_that_fails_leaves_the_removed_blocks_in_place(resnet18_run, monkeypatch, failure):
    """compact() replaces the masked blocks first; a failure in the channel compaction after
    that must put the blocks back with everything else."""
    model, _, x, result = resnet18_run
    assert result.plan.metadata["removed_blocks"], "the plan removes blocks"
    model = copy.deepcopy(model)
    state = ModelState.of(model)
    modules = [(name, type(module)) for name, module in model.named_modules()]
    if failure == "wrong input":
        call, error = lambda: compact(model, x[:2, :1]), RuntimeError   # one channel where the stem takes three
    else:
        interrupt_the_channel_compaction(monkeypatch)
        call, error = lambda: compact(model, x[:2]), KeyboardInterrupt
    with pytest.raises(error):
        call()
    state.assert_unchanged(model)
    assert [(name, type(module)) for name, module in model.named_modules()] == modules
    assert not any(isinstance(module, RemovedBlock) for module in model.modules())
    assert masked_block_names(model) == result.plan.metadata["removed_blocks"]

def test_same_seed_same_depth_and_width_plan():
    x = data_for("resnet18")
    runs = [rl_prune(timm_model("resnet18"), TARGET, data=x, structure="channel", agent="n2n", episodes=6, seed=3,
                     verbose=False, agent_config={"rollouts": 2}) for _ in range(2)]
    a, b = runs
    assert a.plan.amounts == b.plan.amounts
    assert a.plan.metadata["removed_blocks"] == b.plan.metadata["removed_blocks"]
    assert [h["reward"] for h in a.history] == [h["reward"] for h in b.history]
    other = rl_prune(timm_model("resnet18"), TARGET, data=x, structure="channel", agent="n2n", episodes=6, seed=4,
                     verbose=False, agent_config={"rollouts": 2})
    assert [h["reward"] for h in other.history] != [h["reward"] for h in a.history], "the seed matters"


def test_repeated_plans_are_scored_once():
    x = data_for("resnet18", 4)
    seen = []

    def reward(model):  # records which model it scored: its output, bit for bit
        with torch.inference_mode():
            y = model(x)
        seen.append(y.numpy().tobytes())
        return float(y.softmax(1).max(1).values.mean())

    # one keep scale: the shrink stage can only propose what the budget leaves, again and again
    # no refit: it would score plans again as returned (the architecture choice, the result)
    result = rl_prune(timm_model("resnet18"), TARGET, data=x, reward=reward, structure="channel", agent="n2n",
                      episodes=8, verbose=False, bn_recalibration=0, agent_config={"keep_scales": (0.5,)},
                      repair="none")
    evaluations = result.history[-1]["evaluations"]
    assert len(seen) == len(set(seen)), "no architecture was scored twice"
    assert len(seen) == evaluations + 1, "the unpruned model once, then one score per distinct plan"
    assert evaluations < len(result.history), "some episodes repeated a plan and were not scored again"
    shrink = [h for h in result.history if h["phase"] == "shrink"]
    assert len(shrink) == 4 and len({(h["score"], h["sparsity"]) for h in shrink}) == 1


def test_removal_policy_learns_which_block_to_remove():
    x = data_for("resnet18", 2)
    removable = [b.name for b in find_removable_blocks(timm_model("resnet18"), x)]
    wanted = removable.index("layer3.1")

    def reward(model):  # only the removal of layer3.1 scores
        return 1.0 if "layer3.1" in masked_block_names(model) else 0.2

    agent = N2NAgent({"lr_removal": 0.03, "removal_share": 1.0}, seed=0)
    result = rl_prune(timm_model("resnet18"), TARGET, data=x, reward=reward, structure="channel", agent=agent,
                      episodes=40, verbose=False, bn_recalibration=0)
    with torch.no_grad():
        p_remove = agent.removal(agent.block_x).softmax(1)[:, 1]
    assert p_remove[wanted] > 0.75, p_remove
    scores = [h["score"] for h in result.history]
    assert np.mean(scores[-10:]) > np.mean(scores[:10]) + 0.2
    assert "layer3.1" in result.plan.metadata["removed_blocks"]


def test_params_budget_with_blocks():
    model, x = timm_model("resnet18"), data_for("resnet18", 4)
    dense = count_macs_params(model, x[:2])[1]
    result = rl_prune(model, TARGET, data=x, structure="channel", budget="params", agent="n2n", episodes=4,
                      max_amount=NARROW, verbose=False, agent_config={"rollouts": 2})
    assert result.plan.metadata["removed_blocks"] and result.plan.budget == "params"
    achieved = 1.0 - count_macs_params_removed(model, x[:2])[1] / dense
    assert abs(achieved - TARGET) <= TOLERANCE and result.sparsity == pytest.approx(achieved, abs=1e-9)
    compact(model, x[:2])
    assert 1.0 - sum(p.numel() for p in model.parameters()) / dense == pytest.approx(achieved, abs=1e-6)


def test_failure_during_the_search_leaves_the_model_untouched():
    model, x = timm_model("resnet18"), data_for("resnet18", 4)
    state = ModelState.of(model)
    # the 4th call is the 3rd episode: blocks and channels are masked when it raises
    with pytest.raises(RuntimeError, match="boom"):
        rl_prune(model, TARGET, data=x, structure="channel", agent="n2n", episodes=6, max_amount=NARROW,
                 reward=RaisingReward(x, 4, RuntimeError("boom")), verbose=False)
    state.assert_unchanged(model)
    assert masked_block_names(model) == []


# --------------------------------------------------------------------------- other architectures
@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2_100", "deit_tiny_patch16_224"])
def test_depth_and_width_across_architectures(name):
    model, x = timm_model(name), data_for(name, 4)
    # BN recalibration off: re-estimated statistics amplify float32 rounding in deep models (relative
    # masked-vs-compacted differences up to ~3e-5, channel-only pruning included); the masks are exact.
    result = rl_prune(model, TARGET, data=x, structure="channel", agent="n2n", episodes=4, max_amount=NARROW,
                      seed=0, verbose=False, agent_config={"rollouts": 2}, bn_recalibration=0)
    check_depth_and_width(name, model, x, result)


def test_a_model_without_residual_blocks_is_shrunk_only():
    model, x = seeded(fmnist_cnn, 0).eval(), inputs((8, 1, 28, 28))
    dense = count_macs_params(model, x[:2])[0]
    result = rl_prune(model, 0.4, data=x, structure="channel", agent="n2n", episodes=3, verbose=False)
    assert result.plan.metadata["removed_blocks"] == [] and result.plan.metadata["removable_blocks"] == []
    assert {h["phase"] for h in result.history} == {"shrink"}
    assert abs(1.0 - count_macs_params(model, x[:2])[0] / dense - 0.4) <= TOLERANCE


def test_n2n_needs_the_channel_structure_and_one_target():
    model, x = timm_model("resnet18"), data_for("resnet18", 2)
    with pytest.raises(ValueError, match="structure='channel'"):
        rl_prune(model, TARGET, data=x, agent="n2n", episodes=1, verbose=False)
    with pytest.raises(ValueError, match="one target"):
        rl_prune(model, [0.3, 0.5], data=x, structure="channel", agent="n2n", episodes=1, verbose=False)


class _MDPOnly:
    """The depth-and-width environment as an agent may see it: no model side, nothing to set but
    the phase label."""

    MODEL_SIDE = {"structure", "space", "cost_model", "blocks", "budget_cost", "score_fn", "returned_score"}

    def __init__(self, env):
        object.__setattr__(self, "_env", env)

    def __getattr__(self, name):
        assert name not in self.MODEL_SIDE, f"the agent read env.{name}"
        return getattr(self._env, name)

    def __setattr__(self, name, value):
        assert name == "phase", f"the agent set env.{name}"
        setattr(self._env, name, value)


class _GuardedN2N(N2NAgent):
    def search(self, env, episodes):
        super().search(_MDPOnly(env), episodes)


def test_n2n_sees_only_the_mdp_and_its_reward_is_set_by_whoever_builds_the_environment():
    x = data_for("resnet18")
    result = rl_prune(timm_model("resnet18"), TARGET, data=x, structure="channel", agent=_GuardedN2N(seed=3), seed=3,
                      episodes=6, verbose=False)
    baseline = result.baseline_score
    for h in result.history:
        assert h["reward"] == pytest.approx(n2n_reward(h["score"], baseline, h["sparsity"]))
    plain = rl_prune(timm_model("resnet18"), TARGET, data=x, structure="channel", agent="n2n", episodes=6, seed=3,
                     verbose=False)
    assert [h["reward"] for h in plain.history] == [h["reward"] for h in result.history]


# --------------------------------------------------------------------------- anchored to the prior

class _KeptEnvN2N(N2NAgent):
    """N2N that keeps the environment it searched, for the checks below."""

    def search(self, env, episodes):
        self.env = env
        super().search(env, episodes)


def _anchored_run(keep_scales, prior="best", episodes=6, reward="fidelity"):
    x = data_for("resnet18")
    agent = _KeptEnvN2N(seed=2, keep_scales=keep_scales, removal_share=0.0)
    result = rl_prune(timm_model("resnet18"), TARGET, data=x, structure="channel", agent=agent, seed=2,
                      episodes=episodes, verbose=False, prior=prior, selection=0.0, reward=reward)
    return agent.env, result


def test_with_a_prior_the_shrink_choices_are_offsets_around_its_widths():
    # one choice: the middle of the anchored range, the prior's own widths, in every episode
    env, result = _anchored_run(keep_scales=(0.5,))
    assert env.anchored
    no_blocks = np.zeros(env.num_blocks, dtype=bool)
    prior_widths = env.base_widths(no_blocks) / env.n
    shrink = [h for h in result.history if h["phase"] == "shrink"]
    assert shrink
    for h in shrink:
        assert np.allclose(h["amounts"][env.num_blocks:], prior_widths)
    # without a prior the same single scale means "keep half of every group": other widths
    plain_env, plain = _anchored_run(keep_scales=(0.5,), prior="none")
    assert not plain_env.anchored
    assert not np.allclose(plain.history[-1]["amounts"][env.num_blocks:], prior_widths)


def test_anchored_unit_options_move_the_prior_fraction_by_the_spread_in_logits():
    env, _ = _anchored_run(keep_scales=(0.5,))
    no_blocks = np.zeros(env.num_blocks, dtype=bool)
    budget, base = env.episode_budget(no_blocks), env.base_widths(no_blocks)
    checked = 0
    for t in range(env.num_groups):
        n, b = int(env.n[t]), int(base[t])
        if not 0 < b < n or budget.k_max[t] <= 0:
            continue
        low, middle, high = env.anchored_unit_options(budget, t, base, [0.0, 0.5, 1.0])
        group = env.structure.groups[t]
        assert middle == min(group.effective(b), int(budget.k_max[t]))
        logit = np.log(b / n) - np.log(1 - b / n)
        assert low == min(group.effective(int(round(n / (1 + np.exp(-(logit - 1)))))), int(budget.k_max[t]))
        assert high == min(group.effective(int(round(n / (1 + np.exp(-(logit + 1)))))), int(budget.k_max[t]))
        assert low <= middle <= high
        checked += 1
    assert checked > 0


def test_the_prior_competes_on_the_agents_reward_scale():
    # N2N's reward is score ratio x C(2 - C), 0.75 for a plan scoring as the unpruned model at half the
    # MACs: a prior ranked by its bare score (0.9 here) would outrank every plan of the same score.
    # Every plan scores the same here, so the prior (offered first) stays the best, on the episodes' scale.
    env, result = _anchored_run(keep_scales=(0.2, 0.5, 0.8, 1.0), episodes=8, reward=lambda model: 0.9)
    best = env.best_by_target[TARGET]
    assert best.reward == pytest.approx(n2n_reward(best.score, env.baseline_score, env.achieved(best.k)))
    on_target = [h["reward"] for h in result.history if abs(h["violation"]) <= env.tolerance]
    assert on_target and best.reward == pytest.approx(max(on_target), abs=0.01)


# --------------------------------------------------------------------------- removing or narrowing, after the refit

class _ScriptedReturnN2N(N2NAgent):
    """N2N whose environment scores plans "as returned" by ``returned(k, num_blocks)``: the choice
    of the architecture to shrink without seconds of refitting per plan."""

    def __init__(self, returned, **config):
        super().__init__(config, seed=0)
        self.returned = returned

    def search(self, env, episodes):
        self.env = env
        env.returned_score = lambda k: self.returned(k, env.num_blocks)
        super().search(env, episodes)


def _removal_rewarded(model):  # stage 1's best plan removes layer3.1
    return 1.0 if "layer3.1" in masked_block_names(model) else 0.2


@pytest.mark.parametrize("narrowing_wins", [True, False])
def test_the_shrink_stage_narrows_the_architecture_that_scores_higher_once_refitted(narrowing_wins):
    def refitted(k, num_blocks):   # the winner's refit beats every search score (at most 1.0 here)
        return 2.0 if (not np.any(k[:num_blocks])) == narrowing_wins else 0.0

    agent = _ScriptedReturnN2N(refitted, removal_share=0.5, lr_removal=0.03)
    result = rl_prune(timm_model("resnet18"), TARGET, data=data_for("resnet18", 4), reward=_removal_rewarded,
                      structure="channel", agent=agent, episodes=12, verbose=False, bn_recalibration=0, selection=0.0)
    stage1 = [h for h in result.history if h["phase"] == "removal"]
    assert any(np.any(h["amounts"][:agent.env.num_blocks]) for h in stage1), "stage 1 found a plan removing blocks"
    choice = result.plan.metadata["architecture_choice"]
    assert [bool(c["removed_blocks"]) for c in choice] == [True, False]   # stage 1's best, then narrowing only
    assert [c["search_score"] for c in choice] == [1.0, 0.2]
    # a refit that scores lower than the plan without it is undone: the plan is returned as searched
    expected = [1.0, 2.0] if narrowing_wins else [2.0, 0.2]
    assert [c["returned_score"] for c in choice] == expected
    assert [c["chosen"] for c in choice] == [not narrowing_wins, narrowing_wins]
    shrink = [h for h in result.history if h["phase"] == "shrink"]
    assert shrink and all(bool(np.any(h["amounts"][:agent.env.num_blocks])) != narrowing_wins for h in shrink)
    # the result too: stage 1's plans, scored higher before the refit, are no longer candidates
    assert bool(result.plan.metadata["removed_blocks"]) != narrowing_wins
    line = next(x for x in result.summary().splitlines() if x.startswith("architecture shrunk"))
    chosen = [" (chosen)" if c["chosen"] else "" for c in choice]
    assert line.endswith(f"-> {expected[0]:.4f}{chosen[0]}; 0 blocks removed 0.2000 -> {expected[1]:.4f}{chosen[1]}")


class _OffTargetNarrowingN2N(_ScriptedReturnN2N):
    """The narrowing candidate misses the target (as a latency budget with coarse blocks can)."""

    def search(self, env, episodes):
        fewest = env.keep_first_removal()
        narrowing, on_target = env.join(fewest, env.base_widths(fewest)), env.on_target
        env.on_target = lambda k: on_target(k) and not np.array_equal(k, narrowing)
        super().search(env, episodes)


@pytest.mark.parametrize("case", ["refit scores NaN", "off target"])
def test_a_narrowing_that_cannot_be_the_result_never_replaces_stage_ones_architecture(case):
    def refitted(k, num_blocks):   # narrowing would win by far, were its score usable
        if not np.any(k[:num_blocks]):
            return float("nan") if case == "refit scores NaN" else 2.0
        return 0.0

    kind = _ScriptedReturnN2N if case == "refit scores NaN" else _OffTargetNarrowingN2N
    agent = kind(refitted, removal_share=0.5, lr_removal=0.03)
    result = rl_prune(timm_model("resnet18"), TARGET, data=data_for("resnet18", 4), reward=_removal_rewarded,
                      structure="channel", agent=agent, episodes=12, verbose=False, bn_recalibration=0, selection=0.0)
    assert "layer3.1" in result.plan.metadata["removed_blocks"]
    shrink = [h for h in result.history if h["phase"] == "shrink"]
    assert shrink and all(np.any(h["amounts"][:agent.env.num_blocks]) for h in shrink)
    choice = result.plan.metadata.get("architecture_choice")
    if case == "off target":
        assert choice is None   # not even scored: two refits for a plan that cannot be returned
    else:
        assert [c["chosen"] for c in choice] == [True, False]


def test_without_a_refit_the_shrink_stage_keeps_stage_ones_best():
    agent = _KeptEnvN2N(seed=0, removal_share=0.5, lr_removal=0.03)
    result = rl_prune(timm_model("resnet18"), TARGET, data=data_for("resnet18", 4), reward=_removal_rewarded,
                      structure="channel", agent=agent, episodes=12, verbose=False, bn_recalibration=0,
                      selection=0.0, repair="none")
    assert agent.env.returned_score is None and "architecture_choice" not in result.plan.metadata
    assert "layer3.1" in result.plan.metadata["removed_blocks"]


class _ReturnedPriorN2N(N2NAgent):
    """Scores the prior's plan as returned before searching, checking that it leaves the model as it was."""

    def search(self, env, episodes):
        model = env.space.model
        fewest = env.keep_first_removal()
        env.evaluate(env.join(fewest, env.uniform_widths(fewest)))   # BatchNorm statistics: another plan's
        env.restore()   # score_as_returned takes the search's in-place masks off first
        before = ModelState.of(model)
        self.returned = env.score_as_returned(env.join(fewest, env.base_widths(fewest)))
        before.assert_unchanged(model)   # weights, BatchNorm statistics, prune hooks
        super().search(env, episodes)


def test_score_as_returned_is_the_refitted_models_score_and_undoes_everything():
    x = data_for("resnet18", 16)

    def confidence(model):  # continuous: any difference in the model shows
        with torch.inference_mode():
            return float(model(x).softmax(1).max(1).values.mean())

    agent = _ReturnedPriorN2N(seed=1, removal_share=0.0, keep_scales=(0.5,))   # every plan: the prior's
    result = rl_prune(timm_model("resnet18"), TARGET, data=x, reward=confidence, structure="channel", agent=agent,
                      episodes=3, verbose=False, selection=0.0, repair="lstsq", prior="global")
    repair = result.plan.metadata["repair"]
    assert repair["refitted"], "the refit changed layers: the score after it is not the search's"
    assert agent.returned == pytest.approx(repair["search_score"], rel=1e-6)
    assert result.plan.metadata["architecture_choice"][0]["returned_score"] == agent.returned
