from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The repository's data directory, filled by `make data`."""
    return Path(__file__).parent.parent / "data"


@pytest.fixture(scope="session")
def fmnist_test_tensors(data_root):
    """2000 normalised Fashion-MNIST test images [2000, 1, 28, 28] and labels [2000] (seed 0)."""
    from torch_rlprune.demo.data import fashion_mnist, tensor_subset

    return tensor_subset(fashion_mnist(data_root, train=False), 2000, seed=0)


# --------------------------------------------------------------------------- added for the API test-suite
@pytest.fixture(scope="session")
def fmnist_train_split(data_root):
    """10512 normalised Fashion-MNIST *training* images (seed 1): 10000 to train on, 512 to calibrate.

    Returns ``((x_train, y_train), (x_cal, y_cal))``; the two parts are disjoint.
    """
    from torch_rlprune.demo.data import fashion_mnist, tensor_subset

    x, y = tensor_subset(fashion_mnist(data_root, train=True), 10512, seed=1)
    return (x[:10000], y[:10000]), (x[10000:], y[10000:])


@pytest.fixture(scope="session")
def _trained_fmnist_cnn(fmnist_train_split, fmnist_test_tensors):
    import torch

    from helpers import fmnist_cnn, seeded
    from torch_rlprune.demo.training import evaluate_accuracy, train_classifier

    (x, y), _ = fmnist_train_split
    model = seeded(fmnist_cnn, 0)
    with torch.random.fork_rng(devices=[]):
        train_classifier(model, x, y, epochs=3, seed=0)
    accuracy = evaluate_accuracy(model, *fmnist_test_tensors)
    assert accuracy > 0.80, f"the fixture CNN reached only {accuracy:.3f} test accuracy"
    return model.eval()


@pytest.fixture
def trained_fmnist_cnn(_trained_fmnist_cnn):
    """A fresh deep copy of a small CNN trained on Fashion-MNIST (>80% test accuracy, eval mode)."""
    import copy

    return copy.deepcopy(_trained_fmnist_cnn)


@pytest.fixture
def cnn_batch():
    """32 Gaussian images [32, 1, 16, 16] (seed 0) for :func:`helpers.small_cnn`."""
    from helpers import inputs

    return inputs((32, 1, 16, 16), seed=0)


@pytest.fixture
def small_cnn_model():
    """A freshly initialised :func:`helpers.small_cnn` (seed 0)."""
    from helpers import seeded, small_cnn

    return seeded(small_cnn, 0)


@pytest.fixture
def pruned_cnn(small_cnn_model, cnn_batch):
    """``rl_prune`` result for :func:`helpers.small_cnn` at 70% (random agent, 4 episodes, seed 0)."""
    from torch_rlprune import rl_prune

    return rl_prune(small_cnn_model, 0.7, data=cnn_batch, agent="random", episodes=4, seed=0, verbose=False)
