"""The real gain of unstructured pruning: size. A bitmask + values file of a pruned model.

A masked model computes at dense cost, but its zeros need not be stored. Every float tensor
whose zeros make it worth it is written as a bitmask of the entries stored (``numel / 8``
bytes) and those entries' values; the rest stay dense. Loading gives back the model's weights
bit for bit (NaN entries are stored like any nonzero, and the signs of the zeros are kept), as a plain state_dict that
loads into an unpruned model of the same architecture.

    sizes = save_sparse(model, "model.sparse.pt")     # {"dense_bytes", "sparse_bytes", "ratio", ...}
    model.load_state_dict(load_sparse("model.sparse.pt"))

A pruned model (``torch.nn.utils.prune`` re-parametrised) is saved as the weights it computes
with (``weight_orig * weight_mask``), the form ``prune.remove`` would leave. The file holds
tensors and plain data only (``torch.load(weights_only=True)``), and :func:`load_sparse` checks
every entry before it builds a tensor: a file is never trusted to be what it says.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Union

import numpy as np
import torch
from torch import nn

__all__ = ["save_sparse", "load_sparse", "sparse_state_dict", "dense_state_dict", "sparse_sizes", "SparseFormatError"]

FORMAT = "torch_rlprune.sparse"
VERSION = 1
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_DIM = 2 ** 63   # torch sizes are int64


class SparseFormatError(ValueError):
    """A file that is not a sparse model file of this format, or does not hold what it says."""


def _effective_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state_dict a model computes with: pruned tensors as ``orig * mask``, no ``_orig``/``_mask``."""
    state = dict(model.state_dict())
    for key in [k for k in state if k.endswith("_orig")]:
        base = key[:-len("_orig")]
        mask = state.get(base + "_mask")
        if mask is None:
            continue
        state[base] = state.pop(key) * mask
        del state[base + "_mask"]
    return state


def _encode(tensor: torch.Tensor) -> Union[torch.Tensor, dict]:
    """A bitmask of the nonzero entries (NaN included) and their values; a pruned weight's zeros
    are often ``-0.0`` (``orig * mask`` of a negative weight), so a second bitmask over the zeros
    alone keeps their signs (empty when there are none)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype not in _FLOATS or tensor.numel() == 0:
        return tensor.clone()
    flat = tensor.reshape(-1)
    nonzero = flat != 0
    zero_signs = torch.signbit(flat[~nonzero])
    values = flat[nonzero]
    bits = torch.from_numpy(np.packbits(nonzero.numpy()))
    negative = (torch.from_numpy(np.packbits(zero_signs.numpy())) if bool(zero_signs.any())
                else torch.zeros(0, dtype=torch.uint8))
    entry = {"shape": list(tensor.shape), "bits": bits, "values": values, "negative_zeros": negative}
    if _nbytes(entry) >= tensor.numel() * tensor.element_size():
        return tensor.clone()  # too few zeros to pay for the bitmask
    return entry


def sparse_state_dict(model_or_state: Union[nn.Module, Dict[str, torch.Tensor]]) -> dict:
    """The file's content for a model (or a plain state_dict): plain data and CPU tensors."""
    state = _state_of(model_or_state)
    return {"format": FORMAT, "version": VERSION, "tensors": {name: _encode(t) for name, t in state.items()}}


def _nbytes(entry) -> int:
    if isinstance(entry, torch.Tensor):
        return entry.numel() * entry.element_size()
    return sum(_nbytes(entry[key]) for key in ("bits", "values", "negative_zeros"))


def _state_of(model_or_state) -> Dict[str, torch.Tensor]:
    return _effective_state(model_or_state) if isinstance(model_or_state, nn.Module) else dict(model_or_state)


def _sizes(state: Dict[str, torch.Tensor], encoded: dict) -> dict:
    dense = sum(t.numel() * t.element_size() for t in state.values())
    sparse = sum(_nbytes(e) for e in encoded.values())
    return {"dense_bytes": dense, "sparse_bytes": sparse, "ratio": dense / max(1, sparse),
            "sparse_tensors": sum(isinstance(e, dict) for e in encoded.values()), "tensors": len(encoded)}


def sparse_sizes(model_or_state: Union[nn.Module, Dict[str, torch.Tensor]]) -> dict:
    """Bytes of the tensors stored dense and in this format (file overhead aside), their ratio, and
    how many tensors the bitmask paid for."""
    state = _state_of(model_or_state)
    return _sizes(state, {name: _encode(t) for name, t in state.items()})


def save_sparse(model: Union[nn.Module, Dict[str, torch.Tensor]], path: Union[str, os.PathLike]) -> dict:
    """Write ``model``'s weights (or a state_dict) in the bitmask + values format; returns
    :func:`sparse_sizes` plus ``file_bytes``, the size of the file written."""
    state = _state_of(model)
    content = {"format": FORMAT, "version": VERSION, "tensors": {name: _encode(t) for name, t in state.items()}}
    torch.save(content, path)
    return {**_sizes(state, content["tensors"]), "file_bytes": os.path.getsize(path)}


# --------------------------------------------------------------------------- reading back (untrusted)
def _fail(path, what: str) -> SparseFormatError:
    return SparseFormatError(f"{path}: not a {FORMAT} file of version {VERSION}: {what}")


def _unpack(name: str, bits, count: int, what: str, path) -> torch.Tensor:
    if not (isinstance(bits, torch.Tensor) and bits.dtype == torch.uint8 and bits.dim() == 1):
        raise _fail(path, f"tensor {name!r}: {what} must be a 1-D uint8 tensor")
    if bits.numel() != (count + 7) // 8:
        raise _fail(path, f"tensor {name!r}: {bits.numel()} {what} bytes for {count} entries")
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=count).astype(bool))


def _decode(name: str, entry, path) -> torch.Tensor:
    if isinstance(entry, torch.Tensor):
        return entry
    if not isinstance(entry, dict) or set(entry) != {"shape", "bits", "values", "negative_zeros"}:
        raise _fail(path, f"tensor {name!r} is neither a tensor nor a {{shape, bits, values, negative_zeros}} entry")
    shape, values = entry["shape"], entry["values"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < _MAX_DIM
                                            for d in shape)):
        raise _fail(path, f"tensor {name!r}: shape must be a list of sizes (0 to 2**63 - 1), got {shape!r}")
    if not (isinstance(values, torch.Tensor) and values.dtype in _FLOATS and values.dim() == 1):
        raise _fail(path, f"tensor {name!r}: values must be a 1-D float tensor")
    # Python ints: a product in int64 wraps ([2**32, 2**32] -> 0). The bitmask in the file holds one bit
    # an entry, so a shape bigger than the file is refused by its length below, before anything is allocated.
    numel = math.prod(shape)
    nonzero = _unpack(name, entry["bits"], numel, "bitmask", path)
    if int(nonzero.sum()) != values.numel():
        raise _fail(path, f"tensor {name!r}: the bitmask marks {int(nonzero.sum())} entries, the file holds "
                          f"{values.numel()} values")
    out = torch.zeros(numel, dtype=values.dtype)
    out[nonzero] = values
    negative_zeros = entry["negative_zeros"]
    if not isinstance(negative_zeros, torch.Tensor) or negative_zeros.numel():  # empty: every zero is +0.0
        zeros = (~nonzero).nonzero().squeeze(1)
        negative = _unpack(name, negative_zeros, len(zeros), "negative_zeros", path)
        out[zeros[negative]] = -0.0
    try:
        return out.reshape(shape)
    except (RuntimeError, OverflowError) as error:  # e.g. an empty tensor of sizes torch cannot stride
        raise _fail(path, f"tensor {name!r}: shape {shape!r} is not a tensor torch can build ({error})") from None


def dense_state_dict(content: dict, path="the content") -> Dict[str, torch.Tensor]:
    """The state_dict a :func:`sparse_state_dict` content stands for, every entry checked."""
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise _fail(path, "no format marker")
    if content.get("version") != VERSION:
        raise _fail(path, f"version {content.get('version')!r}")
    tensors = content.get("tensors")
    if not isinstance(tensors, dict) or not all(isinstance(k, str) for k in tensors):
        raise _fail(path, "'tensors' must map names to entries")
    return {name: _decode(name, entry, path) for name, entry in tensors.items()}


def load_sparse(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """The state_dict saved by :func:`save_sparse`, bit for bit; ``model.load_state_dict`` it into
    an unpruned model of the same architecture. Loaded with ``weights_only=True`` and checked
    entry by entry: a file that is not what it claims raises :class:`SparseFormatError`."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # pickle refused by weights_only, truncated file, not a torch file
        raise _fail(path, f"unreadable ({type(error).__name__}: {error})") from None
    return dense_state_dict(content, path)
