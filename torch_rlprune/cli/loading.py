"""MODEL and --data as the commands read them: datasets (built-in or a directory of images), timm names,
pickled model files and --checkpoint state_dicts, each failure a :class:`CLIError` naming its flag."""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .errors import EXIT_FAILED, CLIError, Console, bad_input, positive, usage

BUILTIN_DATA = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}  # 1 x 28 x 28, 10 classes
IMAGEFOLDER_DEFAULT_SIZE = 64


# ----------------------------------------------------------------------------- data
@dataclass
class Data:
    """A dataset as the commands need it: shapes, splits and how to turn items into tensors."""

    name: str
    in_chans: int
    num_classes: int
    image_size: int
    train: Any = None
    test: Any = None
    adapt: Callable[[torch.Tensor], torch.Tensor] = lambda x: x

    def tensors(self, dataset, n: int, seed: int):
        from ..demo.data import tensor_subset

        x, y = tensor_subset(dataset, min(n, len(dataset)), seed=seed)
        return self.adapt(x), y


def _data_kind(value: str, flag: str = "--data") -> str:
    if value in BUILTIN_DATA:
        return value
    if Path(value).is_dir():
        return "dir"
    raise usage(f"{flag} must be one of {', '.join(BUILTIN_DATA)} or an existing directory (class subfolders, "
                f"torchvision ImageFolder), got {value!r}")


def data_shape(data: str, in_chans: Optional[int], image_size: Optional[int]) -> tuple:
    """``(kind, in_chans, image_size)`` with the defaults of ``data`` filled in (no images read)."""
    kind = _data_kind(data)
    positive("--in-chans", in_chans)
    positive("--image-size", image_size)
    if kind == "dir":
        in_chans = 3 if in_chans is None else in_chans
        if in_chans not in (1, 3):
            raise usage(f"--in-chans must be one of 1, 3 with a directory of images, got {in_chans}")
        return kind, in_chans, IMAGEFOLDER_DEFAULT_SIZE if image_size is None else image_size
    in_chans = 1 if in_chans is None else in_chans
    if in_chans not in (1, 3):
        raise usage(f"--in-chans must be one of 1, 3 with --data {data} (3 repeats the gray channel), got {in_chans}")
    return kind, in_chans, 28 if image_size is None else image_size


def _class_dirs(root: Path) -> List[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def load_data(data: str, root: str, in_chans: Optional[int], image_size: Optional[int], *,
              splits: bool = True) -> Data:
    """Open ``--data`` (with ``splits=False`` only its shapes and classes are worked out)."""
    kind, in_chans, image_size = data_shape(data, in_chans, image_size)
    if kind != "dir":
        out = Data(data, in_chans, 10, image_size)
        if in_chans != 1 or image_size != 28:
            def adapt(x, c=in_chans, s=image_size):
                if s != 28:
                    x = nn.functional.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
                return x.repeat(1, c, 1, 1) if c != 1 else x
            out.adapt = adapt
        if splits:
            from ..demo import data as datasets

            loader = datasets.fashion_mnist if data == "fashion-mnist" else datasets.mnist
            try:
                out.train, out.test = loader(root, train=True), loader(root, train=False)
            except RuntimeError as err:  # not prepared and no download possible
                raise bad_input(f"--data {data}: {err}") from None
        return out

    base = Path(data)
    train_dir = base / "train" if (base / "train").is_dir() else base
    test_dir = next((base / s for s in ("val", "test") if (base / s).is_dir()), None) if train_dir != base else None
    classes = _class_dirs(train_dir)
    if not classes:
        raise bad_input(f"--data {data}: no class subfolders in {train_dir} (expected DIR/<class>/<image> or "
                        f"DIR/train/<class>/<image>)")
    out = Data(str(base), in_chans, len(classes), image_size)
    if splits:
        from torchvision import datasets as tvd, transforms as T

        transform = T.Compose([T.Grayscale(1) if in_chans == 1 else T.Lambda(lambda im: im.convert("RGB")),
                               T.Resize((image_size, image_size)), T.ToTensor(),
                               T.Normalize([0.5] * in_chans, [0.5] * in_chans)])
        try:
            out.train = tvd.ImageFolder(str(train_dir), transform=transform)
            if test_dir is not None:
                out.test = tvd.ImageFolder(str(test_dir), transform=transform)
        except (FileNotFoundError, OSError) as err:
            raise bad_input(f"--data {data}: {err}") from None
        if out.test is not None and out.test.class_to_idx != out.train.class_to_idx:
            raise bad_input(f"--data {data}: {test_dir} has classes {sorted(out.test.class_to_idx)}, "
                            f"the training images {sorted(out.train.class_to_idx)}")
    return out


# ----------------------------------------------------------------------------- models
def looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.endswith((".pt", ".pth", ".pkl", ".bin", ".safetensors"))


def load_module_file(path: Path, console: Console) -> nn.Module:
    console.pickle_note(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle, zip, missing classes: all mean "not a model file we can read"
        raise bad_input(f"MODEL file {path} could not be loaded: {type(err).__name__}: {err}") from None
    if not isinstance(obj, nn.Module):
        hint = (" (a state_dict? pass a timm model name as MODEL and this file as --checkpoint)"
                if isinstance(obj, dict) else "")
        raise bad_input(f"MODEL file {path} holds a {type(obj).__name__}, not an nn.Module{hint}")
    return obj


def _check_timm_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    close += [n for n in timm.list_models(f"*{name}*")[:5] if n not in close]
    hint = f"; close matches: {', '.join(close[:6])}" if close else "; see timm.list_models()"
    raise usage(f"MODEL must be an existing model file or a timm model name, got {name!r} (no such file, "
                f"unknown to timm{hint})")


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise bad_input(f"--checkpoint {path}: no such file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise bad_input(f"--checkpoint {path} could not be read as a state_dict ({type(err).__name__}): it must "
                        f"be a dict of tensors saved with torch.save (read with weights_only=True, which "
                        f"refuses anything else)") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in obj.items())):
        raise bad_input(f"--checkpoint {path} is not a state_dict (a dict of tensors, or one under a "
                        f"'state_dict' or 'model' key)")
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def check_model_spec(spec: str) -> None:
    """Before anything is loaded: a missing file (exit 3) or an unknown timm name (exit 2)."""
    path = Path(spec)
    if path.is_file():
        return
    if path.exists():
        raise bad_input(f"MODEL {spec} is not a file")
    if looks_like_path(spec):
        raise bad_input(f"MODEL file {spec}: no such file")
    _check_timm_name(spec)


def load_model(spec: str, *, in_chans: Optional[int], num_classes: Optional[int], checkpoint: Optional[str],
               seed: int, console: Console) -> nn.Module:
    """MODEL as a file (pickled module) or a timm name, with ``checkpoint``'s weights loaded."""
    path = Path(spec)
    check_model_spec(spec)
    if path.is_file():
        model = load_module_file(path, console)
    else:
        if in_chans is None or num_classes is None:
            raise usage("a timm MODEL needs --in-chans and --num-classes (or --data) to be built")
        import timm

        with torch.random.fork_rng(devices=[]):  # the same untrained weights on every run with this seed
            torch.manual_seed(int(seed))
            try:
                model = timm.create_model(spec, pretrained=False, in_chans=in_chans, num_classes=num_classes)
            except Exception as err:
                raise CLIError(f"timm could not build {spec!r} (in_chans={in_chans}, num_classes={num_classes}): "
                               f"{type(err).__name__}: {err}", EXIT_FAILED) from None
    if checkpoint is not None:
        state = _read_state_dict(checkpoint)
        _check_fits(model, state, f"--checkpoint {checkpoint} does not fit MODEL {spec}")
        model.load_state_dict(state)
    return model.eval()


def _check_fits(model: nn.Module, state: Dict[str, torch.Tensor], what: str) -> None:
    """A short message (counts and a few names) instead of load_state_dict's wall of keys."""
    own = model.state_dict()

    def some(names) -> str:
        names = sorted(names)
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    problems = []
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    wrong = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing:
        problems.append(f"{len(missing)} missing key(s) ({some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) ({some(unexpected)})")
    if wrong:
        k = sorted(wrong)[0]
        problems.append(f"{len(wrong)} shape mismatch(es) ({k}: {tuple(state[k].shape)} in the file, "
                        f"{tuple(own[k].shape)} in the model)")
    if problems:
        hint = (" (a pruned model's state_dict, with weight_orig/weight_mask: load it into a model the plan was "
                "applied to, or use the pickled model.pt)" if any(k.endswith("_mask") for k in unexpected) else "")
        raise bad_input(f"{what}: {'; '.join(problems)}{hint}")


def model_label(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec).stem if Path(spec).is_file() else spec) or "model"


def masked(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{qualified tensor name: mask}`` of every tensor carrying a prune mask."""
    out = {}
    for mname, m in model.named_modules():
        for bname, buf in m._buffers.items():
            if bname.endswith("_mask") and bname[:-5] + "_orig" in m._parameters:
                out[f"{mname}.{bname[:-5]}" if mname else bname[:-5]] = buf
    return out


def check_output(model: nn.Module, x: torch.Tensor, data: Data, spec: str) -> Optional[int]:
    """One forward on two samples: a clear usage error when MODEL cannot take the data's inputs;
    returns the number of classes it predicts (None when its output is not [N, K])."""
    try:
        with torch.no_grad():
            y = model(x[:2])
    except Exception as err:
        raise usage(f"MODEL {spec} does not accept --data {data.name} inputs of shape {tuple(x.shape[1:])}: "
                    f"{type(err).__name__}: {err} (see --in-chans and --image-size)") from None
    return int(y.shape[-1]) if isinstance(y, torch.Tensor) and y.dim() == 2 else None

