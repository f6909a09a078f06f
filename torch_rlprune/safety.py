"""Leave the user's model exactly as it was when anything goes wrong."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["ModelSnapshot"]

_DICTS = ("_parameters", "_buffers", "_forward_pre_hooks", "_forward_hooks",
          "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
          "_backward_hooks", "_backward_pre_hooks")


class ModelSnapshot:
    """Records every module's parameter/buffer/hook *objects*, attributes and training flag.

    It copies no tensor data: the search undoes its own in-place writes
    (:class:`InPlaceMask.restore`), and this snapshot undoes structural changes such as
    a partially applied ``torch.nn.utils.prune`` re-parametrisation.
    """

    def __init__(self, model: nn.Module):
        self.modules = []
        for module in model.modules():
            dicts = {name: OrderedDict(getattr(module, name)) for name in _DICTS if hasattr(module, name)}
            # Tensor attributes too: a prune hook replaces `weight` by a new tensor at every forward.
            tensors = {k: v for k, v in module.__dict__.items() if isinstance(v, torch.Tensor)}
            self.modules.append((module, module.training, dicts, set(module.__dict__), tensors))

    def restore(self) -> None:
        for module, training, dicts, attributes, tensors in self.modules:
            for name, saved in dicts.items():
                live = getattr(module, name)
                live.clear()
                live.update(saved)
            for extra in set(module.__dict__) - attributes:
                del module.__dict__[extra]
            module.__dict__.update(tensors)
            module.training = training
