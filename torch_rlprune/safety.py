"""Leave the user's model exactly as it was when anything goes wrong."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["ModelSnapshot"]

_DICTS = ("_parameters", "_buffers", "_modules", "_forward_pre_hooks", "_forward_hooks",
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
            # Every attribute too: a prune hook replaces `weight` by a new tensor at every forward,
            # and physical pruning rewrites sizes such as `out_channels`.
            self.modules.append((module, module.training, dicts, dict(module.__dict__)))

    def restore(self) -> None:
        for module, training, dicts, attributes in self.modules:
            module.__dict__.clear()
            module.__dict__.update(attributes)
            for name, saved in dicts.items():
                live = getattr(module, name)
                live.clear()
                live.update(saved)
            module.training = training
