"""The one undo of the package: leave a model exactly as it was when anything goes wrong.

A search writes mask values in place and undoes them itself (:class:`~torch_rlprune.structure.masks.InPlaceMask`);
everything *structural* — a partly applied ``torch.nn.utils.prune`` re-parametrisation, torch-pruning's
physical removal, a residual block masked for an episode — is undone by a :class:`ModelSnapshot`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List

import torch
from torch import nn
from torch.nn.utils import prune

__all__ = ["ModelSnapshot"]

_DICTS = ("_parameters", "_buffers", "_modules", "_forward_pre_hooks", "_forward_hooks",
          "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
          "_backward_hooks", "_backward_pre_hooks")


class _ModuleRecord:
    """One module's state as object references: no tensor data is copied."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.training = module.training   # also in the attributes; kept apart for restore_training()
        self.dicts = {name: OrderedDict(getattr(module, name)) for name in _DICTS if hasattr(module, name)}
        # Every attribute: a prune hook replaces `weight` by a new tensor at every forward, and physical
        # pruning rewrites sizes such as `out_channels`. Lists are edited in place by torch-pruning.
        self.attributes = dict(module.__dict__)
        self.lists = [(value, list(value)) for value in self.attributes.values() if isinstance(value, list)]
        # torch-pruning rebinds `.data`; `prune.remove` rebinds `orig.data`
        self.bindings = [(t, t.data) for t in list(module._parameters.values()) + list(module._buffers.values())
                         if isinstance(t, torch.Tensor)]
        # a second prune method on a tensor extends its container's tuple
        self.containers = [(hook, hook._pruning_methods) for hook in module._forward_pre_hooks.values()
                           if isinstance(hook, prune.PruningContainer)]

    def restore(self) -> None:
        module = self.module
        module.__dict__.clear()
        module.__dict__.update(self.attributes)
        for name, saved in self.dicts.items():
            live = getattr(module, name)
            live.clear()
            live.update(saved)
        for live_list, saved in self.lists:
            live_list[:] = saved
        for tensor, data in self.bindings:   # `.data` is a new object at every read: no identity test
            tensor.data = data
        for container, methods in self.containers:
            container._pruning_methods = methods


class ModelSnapshot:
    """Records every module of ``model`` (only ``model`` itself with ``recurse=False``): parameter,
    buffer, hook and child dicts, attributes, tensor ``.data`` bindings, prune containers and training
    flags.

    ``restore()`` puts all of it back; ``restore_training()`` only the training flags (a search runs
    the model in eval mode and hands it back in the modes it was given).
    """

    def __init__(self, model: nn.Module, recurse: bool = True):
        modules = model.modules() if recurse else [model]
        self._records: List[_ModuleRecord] = [_ModuleRecord(module) for module in modules]

    def restore(self) -> None:
        for record in self._records:
            record.restore()

    def restore_training(self) -> None:
        for record in self._records:
            record.module.training = record.training
