"""From a pruned model to a deployment runtime: ONNX (run and checked in onnxruntime), torch.export, ExecuTorch.

    report = export(model, example_inputs, "model.onnx")            # format from the suffix, or format=
    report["max_abs_diff"]                                           # onnxruntime against torch, measured

A compacted model (:func:`~torch_rlprune.compact`) or one whose masks were made permanent
(``torch.nn.utils.prune.remove``) exports like any module. A model that still carries prune
re-parametrisations is refused: exported, its masks would run as extra multiplications and its
zeros would ship as dense weights, which is never what a deployment wants.

Every export is verified: the file is loaded back in its runtime (onnxruntime for ONNX,
``torch.export.load`` for ``.pt2``, the ExecuTorch runtime for ``.pte``), run on the example
inputs, and compared with the model's own output; above ``tolerance`` the export raises
:class:`ExportMismatchError` (the file stays, for inspection). onnx, onnxruntime and onnxscript
are the optional ``deploy`` extra (``pip install -e '.[deploy]'``), executorch the ``executorch``
extra (heavy: it brings coremltools, scipy, pandas); the core package needs none of them.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np
import torch
from torch import nn

from .channel._util import restore_training, training_flags
from .inputs import Inputs, run_model

__all__ = ["EXPORT_FORMATS", "export", "ExportMismatchError", "onnx_session", "run_onnx", "onnx_latency_ms"]

EXPORT_FORMATS = ("onnx", "pt2", "pte")
_SUFFIXES = {".onnx": "onnx", ".pt2": "pt2", ".pte": "pte"}


class ExportMismatchError(RuntimeError):
    """The exported file, run in its runtime, does not compute what the model computes."""


def _masked(model: nn.Module) -> List[str]:
    return [f"{name}.{key[:-5]}" if name else key[:-5] for name, m in model.named_modules()
            for key in m._buffers if key.endswith("_mask")]


def _format_of(path: Path, fmt) -> str:
    fmt = _SUFFIXES.get(path.suffix) if fmt is None else fmt
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS} (or None: from the path's suffix, "
                         f"{', '.join(_SUFFIXES)}), got {fmt!r} for {str(path)!r}")
    return fmt


def split_example(example) -> tuple:
    """(positional tensors, keyword tensors) of an example batch."""
    if isinstance(example, Inputs):
        return tuple(example.args), dict(example.kwargs)
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    if isinstance(example, torch.Tensor):
        return (example,), {}
    raise TypeError(f"example_inputs must be a tensor, a tuple/list of tensors or a dict of tensors, "
                    f"got {type(example).__name__}")


def _outputs(output) -> List[torch.Tensor]:
    """Every tensor of an output, flattened in order (what an ONNX graph returns)."""
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return [t for value in values for t in _outputs(value)]


def onnx_session(path: Union[str, os.PathLike], threads: int = None, spinning: bool = True):
    """An onnxruntime CPU session for ``path`` (``threads``: intra-op threads, default onnxruntime's;
    ``spinning=False``: idle pool threads sleep instead of busy-waiting, see :func:`onnx_latency_ms`)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("ONNX export needs onnxruntime: pip install -e '.[deploy]'") from None
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, args: Sequence[torch.Tensor], kwargs: Dict[str, torch.Tensor]) -> List[np.ndarray]:
    """Run an onnxruntime session on torch inputs, fed in the graph's input order."""
    tensors = list(args) + list(kwargs.values())
    names = [i.name for i in session.get_inputs()]
    feed = dict(zip(names, (t.detach().cpu().numpy() for t in tensors)))
    return session.run(None, feed)


def onnx_latency_ms(paths: Sequence[Union[str, os.PathLike]], example, repeats: int = 30,
                    threads: int = None) -> List[float]:
    """Median wall time (ms) of one run of each ONNX file on ``example`` in onnxruntime, the runs
    interleaved so that a change of load hits every file alike (compare them as ratios).

    The sessions' idle threads sleep rather than spin: two sessions spinning in turn take the cores
    from each other. Measured (timm resnet18, 64x64, batch 1, 2 threads, unpruned vs half the
    MACs compacted, 4 trials of 15 interleaved runs): spinning, the fraction removed read 0.91,
    -1.01, -1.04, 0.79 and the unpruned model 6.7 ms; without, 0.65, 0.65, 0.64, 0.65 and 2.5 ms."""
    args, kwargs = split_example(example)
    sessions = [onnx_session(p, threads, spinning=False) for p in paths]
    for session in sessions:  # warm-up: first runs allocate
        for _ in range(3):
            run_onnx(session, args, kwargs)
    times = [[] for _ in sessions]
    for _ in range(int(repeats)):
        for session, out in zip(sessions, times):
            tick = time.perf_counter()
            run_onnx(session, args, kwargs)
            out.append(time.perf_counter() - tick)
    return [1e3 * statistics.median(t) for t in times]


def export_onnx(model, args, kwargs, path: Path, dynamo: bool) -> None:
    if importlib.util.find_spec("onnx") is None:  # the exporter needs it: say so before torch does
        raise ImportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install -e '.[deploy]'")
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress lines and deprecation notes
        torch.onnx.export(model, args, str(path), kwargs=kwargs or None, dynamo=dynamo, external_data=False)


def _export_pte(model, args, kwargs, path: Path):
    """ExecuTorch: torch.export, lowered to the XNNPACK CPU backend where it can be, written as ``.pte``
    and run back in the ExecuTorch runtime. Returns (outputs, runtime name)."""
    if importlib.util.find_spec("executorch") is None:
        raise ImportError("ExecuTorch export needs executorch: pip install -e '.[executorch]'")
    import executorch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    program = torch.export.export(model, args, kwargs or None)
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(lowered.buffer)
    method = Runtime.get().load_program(str(path)).load_method("forward")
    outputs = method.execute([*args, *kwargs.values()])
    version = getattr(executorch, "__version__", None) or importlib.metadata.version("executorch")
    return [o.detach().cpu().numpy() for o in outputs if isinstance(o, torch.Tensor)], f"executorch {version}"


def _compare(expected: List[torch.Tensor], got: List[np.ndarray]) -> float:
    if len(got) < 1 or len(expected) < 1:
        raise ExportMismatchError("the exported model returns no tensor to compare")
    pairs = list(zip(expected, got))
    for want, have in pairs:
        if tuple(want.shape) != tuple(np.shape(have)):
            raise ExportMismatchError(f"exported output shape {tuple(np.shape(have))} != torch's {tuple(want.shape)}")
    return max(float(np.max(np.abs(want.detach().cpu().numpy().astype(np.float64) - np.asarray(have, np.float64))))
               if want.numel() else 0.0 for want, have in pairs)


@torch.no_grad()
def export(model: nn.Module, example_inputs, path: Union[str, os.PathLike], format: str = None, *,
           tolerance: float = 1e-4, dynamo: bool = True) -> dict:
    """Export ``model`` (compacted or ``prune.remove``d) to ``path`` and verify it in its runtime.

    Args:
        model: the module, in eval mode for the export (its flags are put back after).
        example_inputs: one batch: a tensor, a tuple of tensors (``model(*x)``) or a dict (``model(**x)``).
        path: the file to write.
        format: ``"onnx"``, ``"pt2"`` (``torch.export``) or ``"pte"`` (ExecuTorch, XNNPACK-lowered,
            run back in the ExecuTorch runtime; the optional ``executorch`` extra); ``None`` takes
            it from the suffix.
        tolerance: the largest absolute output difference accepted (runtime against torch).
        dynamo: ONNX only: torch's dynamo-based exporter (default) or the TorchScript one.

    Returns:
        ``{"path", "format", "bytes", "max_abs_diff", "runtime"}``.

    Raises:
        ValueError: bad arguments, or prune masks still on the model (before anything is written).
        ExportMismatchError: the exported file computes something else than the model.
    """
    path = Path(path)
    fmt = _format_of(path, format)
    masked = _masked(model)
    if masked:
        raise ValueError(f"model still carries prune masks ({', '.join(masked[:3])}{', ...' if len(masked) > 3 else ''}):"
                         " call torch_rlprune.compact(model, example_inputs) for channel pruning or "
                         "torch.nn.utils.prune.remove(module, name) for unstructured pruning before exporting")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    args, kwargs = split_example(example_inputs)
    flags = training_flags(model)
    model.eval()
    try:
        expected = _outputs(run_model(model, example_inputs))
        if fmt == "onnx":
            export_onnx(model, args, kwargs, path, dynamo)
            got = run_onnx(onnx_session(path), args, kwargs)
            import onnxruntime
            runtime = f"onnxruntime {onnxruntime.__version__}"
        elif fmt == "pte":
            got, runtime = _export_pte(model, args, kwargs, path)
        else:
            program = torch.export.export(model, args, kwargs or None)
            torch.export.save(program, str(path))
            got = [t.detach().cpu().numpy() for t in _outputs(torch.export.load(str(path)).module()(*args, **kwargs))]
            runtime = f"torch.export {torch.__version__}"
    finally:
        restore_training(flags)
    diff = _compare(expected, got)
    report = {"path": str(path), "format": fmt, "bytes": path.stat().st_size, "max_abs_diff": diff, "runtime": runtime}
    if not diff <= tolerance:
        raise ExportMismatchError(f"{path}: {runtime} differs from torch by {diff:.3g} (tolerance {tolerance:g}); "
                                  "the file is kept for inspection")
    return report
