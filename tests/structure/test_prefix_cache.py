"""Prefix caching replays the activations a plan shares with the plan before it: the outputs must
be bitwise those of an uncached forward, on every shape of forward a model may have."""
import numpy as np
import pytest
import torch
from torch import nn

from torch_rlprune.rewards.recalibration import BatchNormRecalibration
from torch_rlprune.structure.masks import InPlaceMask
from torch_rlprune.structure import prefix_cache
from torch_rlprune.structure.prefix_cache import PrefixCache
from torch_rlprune.structure.tensors import find_prunable

from helpers import seeded


class Block(nn.Module):
    """A residual block: its input is read again by the glue after its convolutions."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)        # one module called twice per block

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class GlueReadsEarlier(nn.Module):
    """The output of ``conv1`` reaches the result only through code outside any module."""

    def __init__(self):
        super().__init__()
        self.conv1, self.act = nn.Conv2d(1, 4, 3, padding=1), nn.Tanh()
        self.conv2, self.head = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        a = self.conv1(x)
        c = self.conv2(self.act(a))
        return self.head(c.mean((2, 3))) + a.mean()


class RecurrentNet(nn.Module):
    """An LSTM's tuple output, then a layer that reads a parameter of the root module itself."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 5)
        self.scale = nn.Parameter(torch.ones(5))

    def forward(self, x):
        out, _ = self.lstm(torch.relu(self.embed(x)))
        return self.head(out[:, -1]) * self.scale


def _setup(model, batches, max_bytes=2 ** 30):
    layers = find_prunable(model)
    masks = [InPlaceMask(layer) for layer in layers]
    units = [[m for m in (lay.module, lay.runner, *lay.alias_runners) if m is not None] for lay in layers]
    return layers, masks, PrefixCache(model, units, batches[0][:2], max_bytes)


def _plans(layers, seed=0):
    """PuRL-like episodes (one more layer decided per plan), AMC-like ones (every layer at once)
    and repeats of earlier plans."""
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(2):
        k = np.zeros(len(layers), dtype=np.int64)
        for t, layer in enumerate(layers):
            k[t] = rng.integers(0, layer.numel * 9 // 10 + 1)
            plans.append(k.copy())
    plans += [np.array([rng.integers(0, lay.numel // 2 + 1) for lay in layers]) for _ in range(3)]
    return plans + plans[:3]


def _scores(model, masks, batches, plans, cache=None, recalibration=None):
    outputs = []
    for k in plans:
        for mask, kk in zip(masks, k):
            mask.set_k(int(kk))
        if cache is not None:
            cache.plan = tuple(int(v) for v in k)
        with (cache.active() if cache is not None else torch.no_grad()):
            if recalibration is not None:
                recalibration()
            with torch.inference_mode():
                outputs.append([model(x).clone() for x in batches])
    for mask in masks:
        mask.restore()
    return outputs


def _assert_same(a, b):
    assert len(a) == len(b)
    for plan_a, plan_b in zip(a, b):
        for x, y in zip(plan_a, plan_b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("builder, shape", [(ResidualNet, (6, 1, 8, 8)), (GlueReadsEarlier, (5, 1, 6, 6)),
                                            (RecurrentNet, (4, 7, 3))])
def test_replayed_outputs_are_bitwise_the_uncached_ones(builder, shape):
    model = seeded(builder).eval()
    batches = [torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    layers, masks, cache = _setup(model, batches)
    plans = _plans(layers)
    expected = _scores(model, masks, batches, plans)
    got = _scores(model, masks, batches, plans, cache)
    _assert_same(expected, got)
    assert cache.stats.reused > 0 and cache.stats.forwards == len(plans) * len(batches)
    assert not any("forward" in m.__dict__ for m in model.modules())   # every replacement undone


def test_a_cut_stores_what_code_outside_modules_reads():
    """``a.mean()`` reads conv1's output after the cut before conv2: the identity guess misses it,
    the poison check catches that, and the cut stores conv1's output too."""
    model = seeded(GlueReadsEarlier).eval()
    _, _, cache = _setup(model, [torch.randn(3, 1, 6, 6)])
    conv1 = cache.modules.index(model.conv1)
    cut = next(c for c in cache.cuts if conv1 in c.replaced)
    assert (conv1, 0) in cut.stored


def test_a_residual_cut_stores_only_what_is_read_after_it():
    model = seeded(ResidualNet).eval()
    _, _, cache = _setup(model, [torch.randn(3, 1, 8, 8)])
    second_block = cache.modules.index(model.blocks[1])
    first_block = cache.modules.index(model.blocks[0])
    at_block = next(c for c in cache.cuts if c.event == cache.entry_events[
        [i for i, lay in enumerate(find_prunable(model)) if lay.module is model.blocks[1].conv1][0]])
    assert first_block in at_block.replaced and second_block not in at_block.replaced
    assert at_block.stored == {(first_block, 0)}      # the stem's outputs are not kept


def test_stored_outputs_stay_within_the_bound_and_exact():
    model = seeded(ResidualNet).eval()
    batches = [torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    layers, masks, unbounded = _setup(model, batches)
    plans = _plans(layers)
    _scores(model, masks, batches, plans, unbounded)
    bound = unbounded.stats.peak_bytes // 3
    _, masks, cache = _setup(model, batches, max_bytes=bound)
    got = _scores(model, masks, batches, plans, cache)
    _assert_same(_scores(model, masks, batches, plans), got)
    assert 0 < cache.stats.peak_bytes <= bound
    assert cache.stats.reused > 0


def test_no_bytes_means_nothing_replayed():
    model = seeded(ResidualNet).eval()
    batches = [torch.randn(4, 1, 8, 8)]
    layers, masks, cache = _setup(model, batches, max_bytes=0)
    got = _scores(model, masks, batches, _plans(layers), cache)
    _assert_same(_scores(model, masks, batches, _plans(layers)), got)
    assert cache.stats.reused == 0 and cache.stats.peak_bytes == 0


def test_batchnorm_reestimation_runs_in_full_and_keys_what_follows():
    """Train-mode forwards re-estimate statistics: never replayed. Two different re-estimation sets
    give different statistics to the same prefix, so their eval forwards are stored apart."""
    model = seeded(ResidualNet).eval()
    batches = [torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    layers, masks, cache = _setup(model, batches)
    plans = _plans(layers)
    one, other = BatchNormRecalibration(model, batches[:1]), BatchNormRecalibration(model, batches[1:])
    alternating = [one, other]

    def recalibrate_in_turn(state={"n": 0}):
        alternating[state["n"] % 2]()
        state["n"] += 1

    expected = _scores(model, masks, batches, plans, recalibration=recalibrate_in_turn)
    recalibrate_in_turn.__defaults__[0]["n"] = 0
    got = _scores(model, masks, batches, plans, cache, recalibration=recalibrate_in_turn)
    one.restore()
    _assert_same(expected, got)
    assert cache.stats.forwards == len(plans) * len(batches)   # the train-mode forwards are not counted


def test_a_forward_that_raises_leaves_no_replacement_behind():
    model = seeded(ResidualNet).eval()
    batches = [torch.randn(4, 1, 8, 8)]
    layers, masks, cache = _setup(model, batches)
    cache.plan = tuple(0 for _ in layers)
    with cache.active(), torch.inference_mode():
        model(batches[0])
    cache.plan = tuple(1 if i == len(layers) - 1 else 0 for i in range(len(layers)))
    with pytest.raises(RuntimeError, match="boom"):
        with cache.active(), torch.inference_mode():
            handle = model.head.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
            try:
                model(batches[0])
            finally:
                handle.remove()
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks for m in model.modules())


def test_only_cuts_a_recent_plan_could_use_are_stored(monkeypatch):
    """Plans that all change the second layer (as AMC's and random search's change the first one
    searched) replay nothing deeper than the cut before it, so nothing deeper is kept; plans that
    change later layers (PuRL's) make the deeper cuts worth keeping."""
    monkeypatch.setattr(prefix_cache, "RECENT", 4)
    model = seeded(ResidualNet).eval()
    batches = [torch.randn(6, 1, 8, 8)]
    layers, masks, cache = _setup(model, batches)
    rng = np.random.default_rng(1)
    plans = [np.array([0, 1 + i] + [int(rng.integers(0, lay.numel // 2)) for lay in layers[2:]]) for i in range(12)]
    got = _scores(model, masks, batches, plans, cache)
    _assert_same(_scores(model, masks, batches, plans), got)
    assert cache.stored_events and all(event <= cache.entry_events[1] for event in cache.stored_events)
    assert cache.stats.reused == len(plans) - 2     # the first forward stores nothing: no plan before it
    _, masks, deep = _setup(model, batches)
    _scores(model, masks, batches, _plans(layers), deep)
    assert max(deep.stored_events) > cache.entry_events[1]
    assert cache.stats.peak_bytes < deep.stats.peak_bytes
