"""The one undo (structure/snapshot.py): everything structural goes back, no tensor data is copied."""
import torch
from torch import nn
from torch.nn.utils import prune

from torch_rlprune.structure.snapshot import ModelSnapshot


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_restore_undoes_a_prune_reparametrisation_and_a_second_method():
    model = _model()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    hook = next(iter(model[0]._forward_pre_hooks.values()))
    snapshot = ModelSnapshot(model)
    prune.random_unstructured(model[0], "weight", amount=0.3)   # builds a PruningContainer
    prune.l1_unstructured(model[4], "weight", amount=0.2)
    container = next(iter(model[0]._forward_pre_hooks.values()))
    prune.random_unstructured(model[0], "weight", amount=0.1)   # extends the container's tuple
    snapshot.restore()
    assert list(model[0]._forward_pre_hooks.values()) == [hook]
    assert isinstance(container, prune.PruningContainer) and container not in model[0]._forward_pre_hooks.values()
    assert "weight_orig" not in dict(model[4].named_parameters())
    assert isinstance(model[4].weight, nn.Parameter)


def test_restore_puts_back_containers_methods_lists_and_data_bindings():
    model = _model()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[0], "weight", amount=0.3)
    container = next(iter(model[0]._forward_pre_hooks.values()))
    methods = container._pruning_methods
    model[4].notes = [1, 2]
    notes = model[4].notes
    data_ptr = model[4].bias.data_ptr()
    snapshot = ModelSnapshot(model)
    container._pruning_methods += (prune.Identity(),)
    notes.append(3)
    model[4].bias.data = torch.zeros(3)
    model[0].out_channels = 2
    snapshot.restore()
    assert container._pruning_methods is methods
    assert model[4].notes is notes and notes == [1, 2]
    assert model[4].bias.data_ptr() == data_ptr
    assert model[0].out_channels == 4


def test_restore_training_touches_only_the_flags():
    model = _model()
    model[1].eval()
    snapshot = ModelSnapshot(model)
    model.train()
    model[4].extra = nn.Identity()
    snapshot.restore_training()
    assert [m.training for m in model] == [True, False, True, True, True]
    assert hasattr(model[4], "extra")
    snapshot.restore()
    assert not hasattr(model[4], "extra")


def test_a_snapshot_without_recursion_leaves_the_children_alone():
    model = _model()
    snapshot = ModelSnapshot(model, recurse=False)
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    model.tag = 1
    snapshot.restore()
    assert not hasattr(model, "tag")
    assert hasattr(model[0], "weight_mask")
