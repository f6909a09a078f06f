"""torch-pruning's dependency graph, and every use of torch-pruning's internals in one file.

- :func:`build_graph`: the graph, built with LSTM/GRU/RNN as one node each and with a tolerant
  index mapping (a concat/reshape whose channels torch-pruning cannot infer excludes the groups
  through it instead of failing the model). That mapping replaces torch-pruning's own function
  during the build only, under a lock, and only on the torch-pruning versions it was written
  against (``PATCHED_VERSIONS``; FIELD-NOTES has what 1.6 does); any other version builds with
  torch-pruning's own mapping and a warning.
- :func:`hybrid_indices`, :func:`group_item`, ``Dependency``, ``Group``: the private types a
  worklist walk over the graph (:func:`~torch_rlprune.structure.channel.enumeration.enumerate_group`) builds.
"""
from __future__ import annotations

import threading
import warnings
from typing import Any, Dict, List, Optional, Sequence, Set

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers
from torch_pruning.dependency import index_mapping
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.group import Group

from ._util import ChannelPruningError, ChannelTimeoutError, run_model, time_limit
from .recurrent import RecurrentPruner

__all__ = ["build_graph", "update_index_mapping", "hybrid_indices", "group_item", "Dependency", "Group",
           "RNN_TYPES", "PATCHED_VERSIONS"]

RNN_TYPES = (nn.RNNBase,)
PATCHED_VERSIONS = ("1.6.",)   # torch-pruning releases whose update_index_mapping we replace during a build
_GRAPH_BUILD = threading.Lock()
_warned_version: List[str] = []


def _patchable() -> bool:
    version = getattr(tp, "__version__", "?")
    if version.startswith(PATCHED_VERSIONS) and hasattr(index_mapping, "update_index_mapping"):
        return True
    if not _warned_version:
        _warned_version.append(version)
        warnings.warn(f"torch_rlprune: torch-pruning {version} is not one of {PATCHED_VERSIONS}; channel groups use "
                      "its own index mapping, so a model whose concat/reshape channels it cannot infer fails as a "
                      "whole instead of excluding those groups", UserWarning, stacklevel=3)
    return False


def hybrid_indices(idxs: Sequence[int]) -> list:
    """Channel indices as torch-pruning tracks them through the graph (each its own root)."""
    return [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs]


def group_item(dep, idxs: Sequence[int], root_idxs: Sequence[Any]):
    """One member of a torch-pruning ``Group``: ``dep`` applied to ``idxs``, reached from ``root_idxs``."""
    item = _helpers.GroupItem(dep, list(idxs))
    item.root_idxs = list(root_idxs)
    return item


# --------------------------------------------------------------------------- RNNs trace as one node
class _Passthrough(torch.autograd.Function):
    """``value`` (computed without a graph) attached to ``source`` by one autograd node."""

    @staticmethod
    def forward(ctx, source, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def _opaque_rnn_forward(module: nn.Module):
    """The module's forward as one autograd node from its input to its output sequence.

    On CPU an LSTM traces as one node but a GRU as many small ops torch-pruning would read as
    layers of their own (FIELD-NOTES). The final states (``h_n``, ``c_n``) are attached to the
    output sequence, so a head that reads ``h_n`` is coupled to the module's output features
    too: exactly right for a unidirectional module (``h_n[-1]`` has the hidden units in the
    output's order); for a bidirectional one the indices do not line up and the group is
    excluded (out of range) instead of pruned wrongly.
    """
    original = module.forward

    def forward(input, *args, **kwargs):
        with torch.no_grad():
            out = original(input, *args, **kwargs)
        if not (isinstance(input, torch.Tensor) and isinstance(out, tuple) and isinstance(out[0], torch.Tensor)):
            return out
        # the model's own input carries no graph: hang the output on the module's first weight
        # (torch-pruning ignores a layer's own parameters, as for a first conv)
        source = input if input.requires_grad else getattr(module, module._flat_weights_names[0])
        sequence = _Passthrough.apply(source, out[0])

        def attach(state):
            if isinstance(state, torch.Tensor):
                return _Passthrough.apply(sequence, state)
            if isinstance(state, tuple):
                return tuple(attach(s) for s in state)
            return state

        return (sequence,) + tuple(attach(s) for s in out[1:])

    return forward


_INDEX_MAPPING_UPDATES = {
    "CONCAT": "update_concat_index_mapping", "SPLIT": "update_split_index_mapping",
    "RESHAPE": "update_reshape_index_mapping", "UNBIND": "update_unbind_index_mapping",
    "EXPAND": "update_expand_index_mapping", "SLICE": "update_slice_index_mapping",
}


def update_index_mapping(DG) -> Dict[int, str]:
    """torch-pruning's ``update_index_mapping``, one node at a time.

    torch-pruning derives the index mapping of each concat/split/reshape/... from inferred
    channel counts and crashes the whole graph when one of them is unknown (CspNet's and
    CoaT's concats: ``None`` channels; SHViT's reshapes: division by zero). Here a node whose
    mapping cannot be derived is recorded in ``DG.unmappable`` (node id -> reason) instead, and
    any group that reaches it is excluded with that reason, so the rest of the model still prunes.
    """
    unmappable: Dict[int, str] = {}
    for node in DG.module2node.values():
        fn_name = _INDEX_MAPPING_UPDATES.get(getattr(node.type, "name", ""))
        if fn_name is None:
            continue
        try:
            getattr(index_mapping, fn_name)(DG, node)
        except Exception as e:  # noqa: BLE001 - recorded; groups through this node are excluded
            unmappable[id(node)] = (f"torch-pruning cannot map channel indices through {node.type.name.lower()} "
                                    f"'{node.name}' ({type(e).__name__}: {str(e)[:80]})")
    DG.unmappable = unmappable
    return unmappable


class _TolerantIndexMapping:
    """While building the graph, torch-pruning calls :func:`update_index_mapping` instead of its own.

    The only place torch-pruning is patched, and only for the duration of one build: builds hold a
    lock (another thread's build would otherwise restore the original under this one), and on a
    torch-pruning this was not written against the original runs, with a warning (once)."""

    def __init__(self, patch: bool):
        self.patch = patch

    def __enter__(self):
        _GRAPH_BUILD.acquire()
        self._original = None
        if self.patch:
            self._original = index_mapping.update_index_mapping
            index_mapping.update_index_mapping = update_index_mapping
        return self

    def __exit__(self, *exc):
        try:
            if self._original is not None:
                index_mapping.update_index_mapping = self._original
        finally:
            _GRAPH_BUILD.release()
        return False


def build_graph(model: nn.Module, example_inputs, seconds: Optional[float] = None):
    """torch-pruning's dependency graph, built safely; returns ``(DG, grad_fns of the outputs)``.

    LSTM/GRU/RNN modules are one node each, pruned by our :class:`RecurrentPruner`; tracing runs
    with gradients enabled and our own ``forward_fn``, warnings are silenced, the call is
    time-limited, and a crash becomes a :class:`ChannelPruningError` naming the model.
    """
    model_name = type(model).__name__
    rnns = [m for m in model.modules() if isinstance(m, RNN_TYPES)]
    pruner = RecurrentPruner()
    customized = {cls: pruner for cls in {type(m) for m in rnns}}
    for m in rnns:
        m.forward = _opaque_rnn_forward(m)
    output_fns: Set[Any] = set()

    def forward_fn(m, x):
        out = run_model(m, x)
        for o in tp.utils.flatten_as_list(out):
            if isinstance(o, torch.Tensor) and o.grad_fn is not None:
                output_fns.add(o.grad_fn)
        return out

    patch = _patchable()  # its warning must not fall under the build's silenced ones
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.enable_grad(), _TolerantIndexMapping(patch), \
                    time_limit(seconds, f"torch-pruning dependency graph of {model_name}"):
                DG = tp.DependencyGraph().build_dependency(
                    model, example_inputs, forward_fn=forward_fn,
                    customized_pruners=customized or None, verbose=False)
    except ChannelTimeoutError:
        raise
    except Exception as e:
        raise ChannelPruningError(f"torch-pruning could not build the dependency graph of {model_name}: "
                                  f"{type(e).__name__}: {e}") from e
    finally:
        for m in rnns:
            m.__dict__.pop("forward", None)
    return DG, output_fns
