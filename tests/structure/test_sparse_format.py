"""The bitmask + values file of an unstructured-pruned model: smaller, bit-identical, and checked
entry by entry when read back."""
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from helpers import bits_equal, fmnist_cnn, inputs, seeded
from torch_rlprune.env.priors import uniform_unstructured
from torch_rlprune.structure.sparse_format import (SparseFormatError, dense_state_dict, load_sparse, save_sparse,
                                                   sparse_sizes, sparse_state_dict)


def pruned_cnn(amount=0.8):
    """80% of every weight tensor (the format's gain is per tensor; global magnitude would leave the
    small first conv nearly dense)."""
    model = seeded(fmnist_cnn)
    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    uniform_unstructured(layers, amount)
    return model


def test_a_pruned_model_loads_back_bit_identical_into_an_unpruned_one(tmp_path):
    model = pruned_cnn()
    x = inputs((4, 1, 28, 28))
    with torch.no_grad():
        expected = model.eval()(x)
    sizes = save_sparse(model, tmp_path / "m.pt")
    fresh = seeded(fmnist_cnn, 1).eval()
    state = load_sparse(tmp_path / "m.pt")
    fresh.load_state_dict(state)
    for name, tensor in fresh.state_dict().items():
        module_name, _, param = name.rpartition(".")
        module = model.get_submodule(module_name)
        assert bits_equal(tensor, getattr(module, param)), name
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    # 80% of the weights gone: the bitmask (1/32 of float32) + 20% of the values
    assert sizes["ratio"] >= 3.0
    assert all(isinstance(sparse_state_dict(model)["tensors"][k], dict) for k in ("0.weight", "4.weight", "9.weight"))
    torch.save(fresh.state_dict(), tmp_path / "dense.pt")
    # on disk too (this small model's per-tensor record overhead weighs: 3.8x in tensors, less in files)
    assert sizes["file_bytes"] * 2.5 < (tmp_path / "dense.pt").stat().st_size


def test_negative_zero_nan_and_dense_tensors_come_back_as_they_were():
    weight = torch.tensor([[0.0, -0.0, 1.5, 0.0], [0.0, 0.0, float("nan"), 0.0], [0.0] * 4, [0.0, 0.0, 0.0, -2.0]])
    state = {"sparse": weight, "dense": torch.arange(1, 7, dtype=torch.float32), "count": torch.tensor(7),
             "half": torch.zeros(64, dtype=torch.float16), "empty": torch.zeros(0)}
    content = sparse_state_dict(state)
    assert isinstance(content["tensors"]["sparse"], dict) and isinstance(content["tensors"]["dense"], torch.Tensor)
    back = dense_state_dict(content)
    assert back.keys() == state.keys()
    for name in state:
        assert bits_equal(back[name], state[name]), name
    assert torch.signbit(back["sparse"][0, 1]) and math.isnan(back["sparse"][1, 2])


def test_a_dense_model_is_not_made_larger():
    model = seeded(fmnist_cnn)
    with torch.no_grad():  # no zeros anywhere (BatchNorm starts with zero means and biases)
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    sizes = sparse_sizes(model)
    assert sizes["sparse_tensors"] == 0 and sizes["sparse_bytes"] == sizes["dense_bytes"]


def test_masks_already_removed_and_masks_still_on_save_the_same():
    masked = pruned_cnn()
    removed = pruned_cnn()
    for module in removed.modules():
        if prune.is_pruned(module) and hasattr(module, "weight_mask"):
            prune.remove(module, "weight")
    a, b = dense_state_dict(sparse_state_dict(masked)), dense_state_dict(sparse_state_dict(removed))
    assert a.keys() == b.keys() and all(bits_equal(a[k], b[k]) for k in a)


def entry(**change):
    good = sparse_state_dict({"w": torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0])})
    good["tensors"]["w"].update(change)
    return good


@pytest.mark.parametrize("content, words", [
    ({"format": "other", "version": 1, "tensors": {}}, "no format marker"),
    ({"format": "torch_rlprune.sparse", "version": 99, "tensors": {}}, "version 99"),
    ({"format": "torch_rlprune.sparse", "version": 1, "tensors": []}, "'tensors' must map"),
    ({"format": "torch_rlprune.sparse", "version": 1, "tensors": {"w": "x"}}, "neither a tensor"),
    (entry(shape=[10, -1]), "shape must be"),
    (entry(bits=torch.zeros(2, dtype=torch.int64)), "bitmask must be"),
    (entry(negative_zeros=torch.zeros(9, dtype=torch.uint8)), "9 negative_zeros bytes for 9 entries"),
    (entry(negative_zeros="no"), "negative_zeros must be"),
    (entry(values=torch.zeros(1, dtype=torch.int64)), "values must be"),
    (entry(bits=torch.zeros(5, dtype=torch.uint8)), "5 bitmask bytes for 10 entries"),
    (entry(values=torch.zeros(3)), "marks 1 entries, the file holds 3"),
])
def test_a_file_that_is_not_what_it_says_is_refused(tmp_path, content, words):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(SparseFormatError, match=words):
        load_sparse(path)


@pytest.mark.parametrize("shape, words", [
    ([2 ** 32, 2 ** 32], "0 bitmask bytes for 18446744073709551616 entries"),   # an int64 product wraps to 0
    ([2 ** 63], "shape must be"),                                                # not even an int64
    ([2 ** 62, 2 ** 62, 0], "not a tensor torch can build"),                     # empty, but torch's numel overflows
])
def test_a_shape_too_big_for_the_file_is_refused_naming_file_and_tensor(tmp_path, shape, words):
    path = tmp_path / "bad.pt"
    torch.save(entry(shape=shape, bits=torch.zeros(0, dtype=torch.uint8), values=torch.zeros(0)), path)
    with pytest.raises(SparseFormatError, match=rf"bad\.pt: .*tensor 'w': .*{words}"):
        load_sparse(path)


def test_a_file_with_code_in_it_is_never_run(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "torch_rlprune.sparse", "version": 1, "tensors": {"w": Payload()}}, path)
    with pytest.raises(SparseFormatError, match="unreadable"):
        load_sparse(path)
