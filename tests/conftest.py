from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The repository's data directory, filled by `make data`."""
    return Path(__file__).parent.parent / "data"


@pytest.fixture(scope="session")
def fmnist_test_tensors(data_root):
    """2000 normalised Fashion-MNIST test images [2000, 1, 28, 28] and labels [2000] (seed 0)."""
    from torch_rlprune.data import fashion_mnist, tensor_subset

    return tensor_subset(fashion_mnist(data_root, train=False), 2000, seed=0)
