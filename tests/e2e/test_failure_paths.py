"""Every way rl_prune, ChannelStructure and compact can fail leaves the model bit-identical: weights,
masks, hooks and flags, on the models issue 16 found corrupted (tied weights, attention reshapes,
attention layers, recurrent layers) and on an already pruned one."""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from helpers import Encoder, HeadsAttention, ModelState, RaisingReward, TiedConvs, TiedLM, seeded
from torch_rlprune import apply_plan, rl_prune
from torch_rlprune.search.engine import Search
from torch_rlprune.structure.channel import ChannelStructure, ChannelTimeoutError, compact


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 32, batch_first=True)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.lstm(x)[0][:, -1])


SEQUENCES = torch.randn(32, 6, 8, generator=torch.Generator().manual_seed(0))
TOKENS = torch.randint(0, 200, (32, 6), generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
MODELS = {"heads-attention": (HeadsAttention, SEQUENCES), "encoder": (Encoder, SEQUENCES),
          "lstm": (Recurrent, SEQUENCES), "tied-lm": (TiedLM, TOKENS), "tied-convs": (TiedConvs, IMAGES)}
UNTIED = ["heads-attention", "encoder", "lstm"]


def already_pruned(name):
    """The model with masks of its own, so that a failure has hooks and buffers to put back."""
    cls, data = MODELS[name]
    model = seeded(cls)
    for module in [m for m in model.modules() if isinstance(m, nn.Linear)][:2]:
        prune.l1_unstructured(module, "weight", amount=0.3)
    model(data[:2])
    return model, data


def fails_cleanly(model, error, call, match=None):
    state = ModelState.of(model)
    with pytest.raises(error, match=match):
        call()
    state.assert_unchanged(model)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("structure", ["unstructured", "channel"])
def test_a_reward_failing_mid_search_leaves_the_model_bit_identical(name, structure):
    model, data = already_pruned(name)
    reward = RaisingReward(data[:8], fail_at=2, error=RuntimeError("reward service down"))
    error = ValueError if structure == "channel" and name.startswith("tied") else RuntimeError
    fails_cleanly(model, error, lambda: rl_prune(model, 0.3, data=data, reward=reward, structure=structure,
                                                 agent="random", episodes=4, verbose=False))


@pytest.mark.parametrize("name", list(MODELS))
def test_an_interrupted_search_leaves_the_model_bit_identical(name):
    model, data = already_pruned(name)
    reward = RaisingReward(data[:8], fail_at=4, error=KeyboardInterrupt())
    fails_cleanly(model, KeyboardInterrupt, lambda: rl_prune(model, 0.6, data=data, reward=reward, agent="amc",
                                                             episodes=5, verbose=False))


def test_a_failing_undo_still_puts_the_structure_back(monkeypatch):
    """The search fails, then putting its values back fails too: the masks and hooks it added still go."""
    undo = Search.undo

    def undo_then_break(self):
        undo(self)
        raise RuntimeError("undo broke")

    monkeypatch.setattr(Search, "undo", undo_then_break)
    model, data = already_pruned("encoder")
    reward = RaisingReward(data[:8], fail_at=2, error=ValueError("reward service down"))
    fails_cleanly(model, RuntimeError, lambda: rl_prune(model, 0.3, data=data, reward=reward, agent="random",
                                                        episodes=4, verbose=False), match="undo broke")


@pytest.mark.parametrize("name", UNTIED)
@pytest.mark.parametrize("bad", [dict(target=1.5), dict(agent="nope"), dict(structure="rows"),
                                 dict(data="nan"), dict(target=0.999, structure="channel", max_amount=0.5)],
                         ids=["target", "agent", "structure", "nan-data", "unreachable"])
def test_refused_arguments_and_unreachable_targets_leave_the_model_bit_identical(name, bad):
    model, data = already_pruned(name)
    kwargs = dict(target=0.5, data=data, agent="random", episodes=2, verbose=False)
    kwargs.update(bad)
    if kwargs["data"] == "nan":
        kwargs["data"] = torch.full_like(data, float("nan"))
    fails_cleanly(model, (ValueError, TypeError), lambda: rl_prune(model, **kwargs))


def test_a_checkpoint_path_under_a_file_leaves_the_model_bit_identical(tmp_path):
    model, data = already_pruned("encoder")
    (tmp_path / "file").write_text("mine")
    fails_cleanly(model, (ValueError, OSError), lambda: rl_prune(
        model, 0.5, data=data, agent="random", episodes=2, verbose=False, checkpoint=tmp_path / "file" / "ck.pt"))


@pytest.mark.parametrize("name", list(MODELS))
def test_channel_structure_leaves_the_model_bit_identical_whether_it_refuses_or_validates(name):
    model, data = already_pruned(name)
    if name.startswith("tied"):
        fails_cleanly(model, ValueError, lambda: ChannelStructure(model, data[:2]), match="ties weights")
        return
    state = ModelState.of(model)
    structure = ChannelStructure(model, data[:2])     # validation removes channels for real, then undoes it
    structure.restore()
    state.assert_unchanged(model)
    fails_cleanly(model, ChannelTimeoutError, lambda: ChannelStructure(model, data[:2], timeout=1e-9))


def pruned_by_channels(name):
    cls, data = MODELS[name]
    model = seeded(cls)
    result = rl_prune(model, 0.3, data=data, structure="channel", agent="prior", verbose=False)
    return model, data, result


@pytest.mark.parametrize("name", UNTIED)
def test_compact_that_fails_part_way_leaves_the_model_bit_identical(name, monkeypatch):
    import torch_rlprune.structure.channel.apply as apply_module

    model, data, _ = pruned_by_channels(name)
    calls = {"n": 0}
    real = apply_module.count_macs_params

    def failing_second_count(*args, **kwargs):   # after the hooks are gone and channels removed
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(apply_module, "count_macs_params", failing_second_count)
    fails_cleanly(model, RuntimeError, lambda: compact(model, data[:2]), match="out of memory")


@pytest.mark.parametrize("name", UNTIED)
def test_compact_that_times_out_leaves_the_model_bit_identical(name):
    model, data, _ = pruned_by_channels(name)
    fails_cleanly(model, ChannelTimeoutError, lambda: compact(model, data[:2], timeout=1e-9))


def test_a_plan_refused_part_way_leaves_the_tied_model_bit_identical():
    model = seeded(TiedLM)
    plan = rl_prune(seeded(TiedLM), 0.5, data=TOKENS, agent="random", episodes=2, verbose=False).plan
    plan.numels["head.weight"] += 1                     # the second entry no longer fits this model
    fails_cleanly(model, Exception, lambda: apply_plan(model, plan), match="head.weight")
