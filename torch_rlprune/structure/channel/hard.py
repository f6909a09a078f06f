"""Physical removal of channels: torch-pruning for channel groups, our own code for heads."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._util import ChannelPruningError, time_limit
from .enumeration import enumerate_group
from .groups import ChannelGroup

__all__ = ["prune_heads", "hard_prune", "sync_timm_metadata"]


def _select(param: Optional[torch.Tensor], dim: int, keep: torch.Tensor) -> Optional[nn.Parameter]:
    if param is None:
        return None
    data = param.data.index_select(dim, keep.to(param.device)).contiguous()
    return nn.Parameter(data, requires_grad=param.requires_grad)


def _keep_outputs(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the ``keep`` rows of a module's weight and bias (either may be absent)."""
    for name in ("weight", "bias"):
        tensor = getattr(module, name, None)
        if tensor is not None:
            setattr(module, name, _select(tensor, 0, keep))


@torch.no_grad()
def prune_heads(attn: nn.Module, heads: Sequence[int]) -> None:
    """Remove whole heads from a timm ``Attention`` block in place.

    ``head_dim`` does not change, so ``attn.scale`` and the 1/sqrt(head_dim) fused SDPA uses
    stay correct; ``num_heads`` and ``attn_dim`` are updated (torch-pruning leaves them stale).
    """
    heads = sorted({int(h) for h in heads})
    if not heads:
        return
    H, hd = int(attn.num_heads), int(attn.head_dim)
    if heads[0] < 0 or heads[-1] >= H or len(heads) >= H:
        raise ChannelPruningError(f"cannot remove heads {heads} of {H}")
    A = H * hd
    keep_heads = [h for h in range(H) if h not in set(heads)]
    keep = torch.tensor([h * hd + j for h in keep_heads for j in range(hd)], dtype=torch.long)
    keep_qkv = torch.cat([keep + t * A for t in range(3)])
    qkv, proj = attn.qkv, attn.proj
    _keep_outputs(qkv, keep_qkv)
    qkv.out_features = int(keep_qkv.numel())
    gate = getattr(attn, "gate", None)
    if isinstance(gate, nn.Linear):
        _keep_outputs(gate, keep)
        gate.out_features = int(keep.numel())
    norm = getattr(attn, "norm", None)
    if isinstance(norm, nn.LayerNorm):
        _keep_outputs(norm, keep)
        norm.normalized_shape = (int(keep.numel()),)
    proj.weight = _select(proj.weight, 1, keep)
    proj.in_features = int(keep.numel())
    attn.num_heads = len(keep_heads)
    if hasattr(attn, "attn_dim"):
        attn.attn_dim = int(keep.numel())


def hard_prune(DG, todo: Sequence[Tuple[ChannelGroup, Sequence[int]]], *, group_timeout: Optional[float] = 20.0,
               model_name: str = "model") -> List[str]:
    """Remove ``units`` of each group for real; returns the keys pruned.

    Channel groups go through torch-pruning's group for ``(root, prune_out_channels, channels)``
    (built by :func:`enumerate_group`, which is fast where torch-pruning's own traversal
    explodes and refuses layers whose index mapping torch-pruning cannot derive) on a graph built
    from the model *as it is now* (hook-free); root indices stay valid while
    other groups shrink because a root's output channels belong to its own group only, and
    torch-pruning re-derives concat/split offsets before building each group.
    """
    done = []
    for group, units in todo:
        units = sorted({int(u) for u in units})
        if not units:
            continue
        if group.kind == "heads":
            prune_heads(group._attention, units)
            done.append(group.key)
            continue
        channels = group.channels_for_units(units)
        try:
            with time_limit(group_timeout, f"torch-pruning removal of group {group.key!r} in {model_name}"):
                g, _ = enumerate_group(DG, group._root_module, group._root_handler, channels)
                if not DG.check_pruning_group(g):
                    raise ChannelPruningError("torch-pruning refuses: a layer would lose all its channels")
                g.prune()
        except ChannelPruningError as e:
            raise ChannelPruningError(f"group {group.key!r}: {e}") from e
        except Exception as e:
            raise ChannelPruningError(f"group {group.key!r}: torch-pruning failed to remove channels: "
                                      f"{type(e).__name__}: {e}") from e
        done.append(group.key)
    return done


def sync_timm_metadata(model: nn.Module, old_features: Optional[int]) -> None:
    """Keep timm's ``num_features``/``head_hidden_size``/``embed_dim`` in step with a shrunk classifier input."""
    getter = getattr(model, "get_classifier", None)
    if old_features is None or not callable(getter):
        return
    try:
        head = getter()
    except Exception:
        return
    new = getattr(head, "in_features", None)
    if new is None or new == old_features:
        return
    for attr in ("num_features", "head_hidden_size", "embed_dim"):
        if getattr(model, attr, None) == old_features:
            setattr(model, attr, new)


def classifier_in_features(model: nn.Module) -> Optional[int]:
    getter = getattr(model, "get_classifier", None)
    if not callable(getter):
        return None
    try:
        return getattr(getter(), "in_features", None)
    except Exception:
        return None
