"""The model side: which tensors can be pruned, masks on them, undo, counting, compaction and export.

Nothing here knows about policies, rewards or searches: this package never imports ``env``, ``agents``,
``rewards``, ``search`` or the API (``tests/test_architecture.py`` checks it). Channel groups live in
:mod:`torch_rlprune.structure.channel`, removable residual blocks in :mod:`torch_rlprune.structure.depth`.
"""
