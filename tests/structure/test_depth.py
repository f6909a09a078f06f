"""Depth reduction: finding removable residual blocks, masking them through the prune API, removing them.

Every claim is checked against an independent computation: the masked model against a
fresh copy of the model with the blocks replaced by ``nn.Identity()`` by hand, the
expected blocks against timm's own attributes (``downsample``, ``has_skip``), restores
bit for bit against a snapshot of every tensor, hook and state_dict key, MAC savings
against counting the model before and after.
"""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from helpers import ModelState, bits_equal, fmnist_cnn, randomize_norms, seeded, small_cnn
from torch_rlprune.structure.channel import count_macs_params
from torch_rlprune.structure.depth import (BranchMask, RemovableBlock, RemovedBlock, find_removable_blocks, mask_block,
                                           remove_masked_blocks, unmask_block)

EXACT = 1e-6  # the contract: masked model == model with the blocks replaced by Identity, max abs diff


# --------------------------------------------------------------------------- builders (as in test_channels)


def timm_model(name):
    timm = pytest.importorskip("timm")
    kwargs = {"img_size": 64} if name.startswith(("vit", "deit")) else {}
    model = seeded(timm.create_model, 0, name, pretrained=False, num_classes=10, **kwargs)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a classifier that reads the features visibly (timm may zero-init heads)
        nn.init.normal_(model.get_classifier().weight, std=0.1, generator=g)
        for pname, p in model.named_parameters():  # layer scales start at 1e-6: blocks would barely count
            if pname.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
    return randomize_norms(model).eval()


def x_img(shape=(2, 3, 64, 64), seed=2):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def out(model, x):
    with torch.no_grad():
        return model(x)


def max_diff(a, b):
    return float((a - b).abs().max())


def with_identity(model, names):
    """The independent reference: the blocks replaced by plain nn.Identity by hand."""
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())
    return model


# --------------------------------------------------------------------------- what each timm model must yield
def expected_blocks(name, model):
    """From timm's own attributes: blocks whose skip path is the plain input."""
    if name.startswith("resnet"):
        return [f"layer{i}.{j}" for i in range(1, 5) for j, b in enumerate(getattr(model, f"layer{i}"))
                if b.downsample is None]
    if name.startswith(("mobilenetv2", "efficientnet")):
        return [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j, b in enumerate(stage)
                if getattr(b, "has_skip", False)]
    if name.startswith("ghostnet"):  # GhostBottleneck: the skip is an empty Sequential unless it projects
        return [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j, b in enumerate(stage)
                if hasattr(b, "ghost2") and not list(b.shortcut.parameters())]
    if name.startswith("deit"):
        return [f"blocks.{i}" for i in range(len(model.blocks))]
    if name.startswith("convnext"):
        return [f"stages.{i}.blocks.{j}" for i, s in enumerate(model.stages) for j in range(len(s.blocks))]
    raise KeyError(name)


COUNTS = {"resnet18": 5, "resnet50": 12, "mobilenetv2_100": 10, "efficientnet_b0": 9, "ghostnet_100": 11,
          "deit_tiny_patch16_224": 12, "convnext_atto": 12}
# per branch: the end layers relative to the block ("" = the block's own tensor, ConvNeXt's gamma)
ENDS = {"resnet18": [("conv2", "bn2")], "resnet50": [("conv3", "bn3")], "mobilenetv2_100": [("conv_pwl", "bn3")],
        "efficientnet_b0": [("conv_pwl", "bn3")],  # the SE gate before conv_pwl stays unmasked
        # the branch ends in cat([x1, cheap(x1)]): both conv+BN pairs must output zero
        "ghostnet_100": [("ghost2.primary_conv.0", "ghost2.primary_conv.1", "ghost2.cheap_operation.0",
                          "ghost2.cheap_operation.1")],
        "deit_tiny_patch16_224": [("attn.proj",), ("mlp.fc2",)], "convnext_atto": [("mlp.fc2", "")]}
TENSORS = {"resnet18": {("conv2", "weight"), ("bn2", "weight"), ("bn2", "bias")},
           "convnext_atto": {("mlp.fc2", "weight"), ("mlp.fc2", "bias"), ("", "gamma")},
           "deit_tiny_patch16_224": {("attn.proj", "weight"), ("attn.proj", "bias"), ("mlp.fc2", "weight"),
                                     ("mlp.fc2", "bias")}}


def relative(block, full):
    return full[len(block.name) + 1:] if full != block.name else ""


@pytest.mark.parametrize("name", list(COUNTS))
def test_timm_blocks_found_masked_restored_and_removed(name):
    model, x = timm_model(name), x_img()
    before_detection = ModelState.of(model)
    blocks = find_removable_blocks(model, x)
    before_detection.assert_unchanged(model)  # probing zeroes tensors in place: all must come back

    # -- detection: exactly the blocks with a plain skip, with the right branch ends
    names = [b.name for b in blocks]
    assert names == expected_blocks(name, model) and len(names) == COUNTS[name]
    if name == "resnet18":
        assert names == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    for b in blocks:
        assert [tuple(relative(b, n) for n in br.layers) for br in b.branches] == ENDS[name], b
        if name in TENSORS:
            assert {t for br in b.branches for t in br.tensors} == TENSORS[name]
        assert b.module is model.get_submodule(b.name) and b.macs > 0 and b.params > 0
        assert b.params == sum(p.numel() for p in b.module.parameters())
        assert not b.masked and b.masked_branches == ()

    # -- soft removal of two blocks == the model with those blocks replaced by Identity
    pick = [blocks[0], blocks[-1]]
    dense_macs, dense_params = count_macs_params(model, x)
    state, y0 = ModelState.of(model), out(model, x)
    for b in pick:
        mask_block(b)
        assert b.masked and b.masked_branches == tuple(range(len(b.branches)))
        for br in b.branches:
            for rel, t in br.tensors:
                m = b.module.get_submodule(rel)
                assert prune.is_pruned(m) and isinstance(getattr(m, t + "_orig"), nn.Parameter)
                assert not getattr(m, t + "_mask").any() and not getattr(m, t).any()
    reference = with_identity(timm_model(name), [b.name for b in pick])
    y_ref = out(reference, x)
    assert max_diff(y0, y_ref) > 1e-3, "removing the blocks must change the output, or this test proves nothing"
    assert max_diff(out(model, x), y_ref) < EXACT

    # -- unmasking restores every tensor, mask, hook and state_dict key bit for bit
    for b in pick:
        unmask_block(b)
        assert not b.masked
    state.assert_unchanged(model)
    assert bits_equal(out(model, x), y0)

    # -- hard removal: same output, fewer blocks, fewer MACs and parameters, backward works
    for b in pick:
        mask_block(b)
    removed = remove_masked_blocks(model)
    assert removed == [b.name for b in pick]
    for n in removed:
        assert isinstance(model.get_submodule(n), nn.Identity)
    assert max_diff(out(model, x), y_ref) < EXACT
    assert [b.name for b in find_removable_blocks(model, x)] == [n for n in names if n not in removed]
    macs, params = count_macs_params(model, x)
    assert dense_macs - macs == sum(b.macs for b in pick)
    assert dense_params - params == sum(b.params for b in pick)
    model.zero_grad()
    model(x).square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads) and any(bool(g.any()) for g in grads)
    assert remove_masked_blocks(model) == [], "nothing masked is left"


def test_prune_remove_bakes_the_zeros_and_the_block_still_removes():
    model, x = timm_model("resnet18"), x_img()
    blocks = {b.name: b for b in find_removable_blocks(model, x)}
    block = mask_block(blocks["layer2.1"])
    y_ref = out(with_identity(timm_model("resnet18"), ["layer2.1"]), x)
    # backward through the mask: the masked originals get no gradient, the rest does
    model(x).sum().backward()
    assert not model.layer2[1].conv2.weight_orig.grad.any() and not model.layer2[1].bn2.bias_orig.grad.any()
    assert model.layer2[0].conv1.weight.grad.any(), "the rest of the network still learns"
    for br in block.branches:
        for rel, t in br.tensors:
            prune.remove(block.module.get_submodule(rel), t)
    assert not any(prune.is_pruned(m) for m in block.module.modules())
    assert not model.layer2[1].bn2.weight.any() and isinstance(model.layer2[1].bn2.weight, nn.Parameter)
    assert max_diff(out(model, x), y_ref) < EXACT
    assert not block.masked
    with pytest.raises(ValueError, match="prune.remove"):
        unmask_block(block)
    assert remove_masked_blocks(model) == ["layer2.1"]
    assert max_diff(out(model, x), y_ref) < EXACT


def test_masking_composes_with_earlier_pruning_and_unmasking_restores_it():
    model, x = timm_model("resnet18"), x_img()
    prune.l1_unstructured(model.layer1[1].conv2, "weight", amount=0.3)   # pruned before: a container forms
    prune.l1_unstructured(model.layer1[1].bn2, "weight", amount=0.25)
    block = next(b for b in find_removable_blocks(model, x) if b.name == "layer1.1")
    state, y0 = ModelState.of(model), out(model, x)
    old_mask = model.layer1[1].conv2.weight_mask.clone()
    mask_block(block)
    hook = next(h for h in model.layer1[1].conv2._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod))
    assert isinstance(hook, prune.PruningContainer) and isinstance(hook._pruning_methods[-1], BranchMask)
    assert not model.layer1[1].conv2.weight_mask.any()
    y_ref = out(with_identity(timm_model("resnet18"), ["layer1.1"]), x)
    assert max_diff(out(model, x), y_ref) < EXACT
    unmask_block(block)
    state.assert_unchanged(model)
    assert bits_equal(model.layer1[1].conv2.weight_mask, old_mask)
    hooks = list(model.layer1[1].conv2._forward_pre_hooks.values())
    assert len(hooks) == 1 and isinstance(hooks[0], prune.L1Unstructured), "the container is gone again"
    assert bits_equal(out(model, x), y0)


def test_vit_branches_mask_separately_and_only_whole_blocks_are_removed():
    model, x = timm_model("deit_tiny_patch16_224"), x_img()
    block = find_removable_blocks(model, x)[3]
    assert block.name == "blocks.3" and len(block.branches) == 2

    class Zero(nn.Module):
        def forward(self, h, **kwargs):  # Attention is called with attn_mask=...
            return torch.zeros_like(h)

    mask_block(block, branches=[1])                    # the MLP branch only
    assert block.masked_branches == (1,) and not block.masked
    reference = timm_model("deit_tiny_patch16_224")
    reference.blocks[3].mlp = Zero()
    assert max_diff(out(model, x), out(reference, x)) < EXACT
    assert remove_masked_blocks(model) == [], "half a block is not an identity"
    mask_block(block, branches=0)                      # now the attention branch too
    assert block.masked
    reference.blocks[3].attn = Zero()
    assert max_diff(out(model, x), out(reference, x)) < EXACT
    assert remove_masked_blocks(model) == ["blocks.3"]
    assert isinstance(model.blocks[3], RemovedBlock)
    assert model.blocks[3](torch.ones(1, 2), attn_mask=None, is_causal=False).sum() == 2  # ViT's mask call
    assert max_diff(out(model, x), out(reference, x)) < EXACT


# --------------------------------------------------------------------------- small hand-built models
class Residual(nn.Module):
    """``x + bn(conv(relu(bn(conv(x)))))``; optional skip scale, non-affine norm, shape change."""

    def __init__(self, c=8, skip_scale=1.0, affine=True, out_c=None):
        super().__init__()
        out_c = out_c or c
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, out_c, 3, padding=1), nn.BatchNorm2d(out_c, affine=affine)
        self.proj = nn.Conv2d(c, out_c, 1) if out_c != c else None
        self.skip_scale = skip_scale

    def forward(self, x):
        skip = x if self.proj is None else self.proj(x)
        return self.skip_scale * skip + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Residual()

    def forward(self, x):
        return self.block(self.block(x))  # weight sharing: removing it removes two applications


def toy(seed=0):
    def build():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                             nn.Sequential(Residual(), Residual()),   # a stage made of removable blocks only
                             Residual(skip_scale=0.5), Residual(affine=False), Residual(out_c=12),
                             nn.Sequential(nn.Conv2d(12, 8, 1), Shared()),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return randomize_norms(seeded(build, seed)).eval()


def test_hand_built_blocks_only_plain_skips_are_reported_and_stacks_as_their_blocks():
    model, x = toy(), x_img((2, 3, 16, 16))
    blocks = find_removable_blocks(model, x)
    # Not the stage "1" (only a stack of its two blocks), not the scaled, non-affine or projecting blocks,
    # not the block called twice ("5.1.block"); but its caller "5.1" is an identity once that block is masked.
    assert [b.name for b in blocks] == ["1.0", "1.1", "5.1"]
    assert blocks[0].branches[0].layers == ("1.0.conv2", "1.0.bn2")
    assert blocks[2].branches[0].layers == ("5.1.block.conv2", "5.1.block.bn2")
    for b in blocks:
        mask_block(b)
    y_ref = out(with_identity(toy(), ["1.0", "1.1", "5.1"]), x)
    assert max_diff(out(model, x), y_ref) < EXACT
    assert remove_masked_blocks(model) == ["1.0", "1.1", "5.1"]
    assert max_diff(out(model, x), y_ref) < EXACT
    assert find_removable_blocks(model, x) == []
    assert [b.name for b in find_removable_blocks(toy(), x, exclude=["1", "5.1.block"])] == []
    assert [b.name for b in find_removable_blocks(toy(), x, exclude="1")] == ["5.1"]


def test_models_without_residuals_have_no_removable_blocks():
    assert find_removable_blocks(seeded(small_cnn, 0), torch.randn(2, 1, 16, 16)) == []
    assert find_removable_blocks(seeded(fmnist_cnn, 0).eval(), torch.randn(2, 1, 28, 28)) == []
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.Conv2d(8, 8, 3, padding=1),
                                                                        nn.BatchNorm2d(8), nn.ReLU()))
    assert find_removable_blocks(plain, torch.randn(2, 3, 8, 8)) == []
    assert remove_masked_blocks(plain) == []


def test_misuse_is_refused_before_anything_changes():
    model, x = toy(), x_img((2, 3, 16, 16))
    block = find_removable_blocks(model, x)[0]
    state = ModelState.of(model)
    with pytest.raises(ValueError, match="not masked"):
        unmask_block(block)
    with pytest.raises(IndexError):
        mask_block(block, branches=[1])
    with pytest.raises(TypeError):
        mask_block(model[1][0])
    with pytest.raises(ValueError, match="no module named"):
        find_removable_blocks(model, x, exclude="nope")
    state.assert_unchanged(model)
    mask_block(block)
    mask_block(block)  # masking twice is a no-op, and one unmask undoes it
    unmask_block(block)
    state.assert_unchanged(model)
    model.train()
    flags = [m.training for m in model.modules()]
    find_removable_blocks(model, x)
    assert [m.training for m in model.modules()] == flags, "detection runs in eval mode and restores the flags"
