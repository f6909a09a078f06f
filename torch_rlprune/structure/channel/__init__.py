"""Structured (channel) pruning: torch-pruning dependency groups as RL actions.

The pieces, in the order a search uses them:

* :class:`ChannelStructure` -- the model's channel groups (residual adds, concats,
  depthwise/grouped convs and timm attention heads kept consistent), each with an
  importance ranking; ``set_removed(group, n)`` masks in place and ``restore()`` undoes;
  ``cost(counts)`` gives MACs/params arithmetically.
* :func:`apply_channel_plan` -- the final plan through torch.nn.utils.prune
  (:class:`ChannelMask`, one mask per tensor).
* :func:`compact` -- physically remove the masked channels with torch-pruning.
* :func:`count_macs_params` -- mask-aware MACs/params without copying the model.

Design decisions and limits (details in each module):

* Masks are exact: every tensor of a group is masked (producers' rows and biases, norm
  weights and biases, consumers' columns, cls tokens / position embeddings / layer
  scales), and LayerNorm/GroupNorm statistics are recomputed over the alive channels by a
  forward hook (``exact_norms``); a group is ``exact=False`` only where that cannot be
  done (BatchNorm without affine, norm subclasses with their own forward).
* A *unit* is the smallest removable set: a channel; a channel per channel-group for
  grouped convs / GroupNorm; channels torch-pruning couples along several paths; a head;
  an LSTM/GRU/RNN hidden unit (every gate, layer and direction; :mod:`.recurrent`).
* timm ``Attention`` blocks lose whole heads (head_dim and therefore the softmax scale
  stay; ``num_heads``/``attn_dim`` are updated). torch-pruning's own qkv grouping is not
  used. Other attention layouts are left to torch-pruning and validation.
* What torch-pruning gets wrong is excluded with a reason, never silently pruned:
  indices out of range or not mappable to the root, grouped convs fed by a concat,
  groups reaching the model output, ``nn.MultiheadAttention``, LSTMs with ``proj_size``,
  groups whose enumeration exceeds ``group_timeout`` and groups whose masked and
  physically pruned outputs disagree (validation at construction, and again in
  :func:`compact`, which rolls back and bisects).

>>> s = ChannelStructure(model, torch.randn(1, 3, 64, 64))          # doctest: +SKIP
>>> s.set_fraction(0, 0.5); score = evaluate(model); s.restore()     # doctest: +SKIP
>>> apply_channel_plan(model, {"conv1:out": 0.5}, structure=s)       # doctest: +SKIP
>>> compact(model, torch.randn(1, 3, 64, 64))                        # doctest: +SKIP
"""
from ..methods import ChannelMask, channel_mask
from ._util import ChannelPruningError, ChannelTimeoutError
from .apply import ChannelPlanResult, apply_channel_plan, compact
from .counting import count_macs_params
from .groups import ChannelGroup, ExcludedGroup, TensorSlice
from .hard import prune_heads
from .latency import LatencyTable, measure_latency
from .norms import MaskedNormStatistics
from .recurrent import RecurrentPruner, remove_hidden_units
from .structure import ChannelStructure

__all__ = ["ChannelStructure", "ChannelGroup", "ExcludedGroup", "TensorSlice", "apply_channel_plan",
           "ChannelPlanResult", "compact", "count_macs_params", "ChannelMask", "channel_mask", "prune_heads",
           "MaskedNormStatistics", "ChannelPruningError", "ChannelTimeoutError", "RecurrentPruner",
           "remove_hidden_units", "LatencyTable", "measure_latency"]
