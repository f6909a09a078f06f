"""The pruning MDP: the only thing agents see.

:mod:`~torch_rlprune.env.layerwise` is the shared MDP (one step per prunable tensor or channel group),
:mod:`~torch_rlprune.env.depth_width` the depth + width one N2N searches, :mod:`~torch_rlprune.env.budget`
the accounting that keeps every plan on budget,
:mod:`~torch_rlprune.env.priors` the one-shot heuristic plans every search starts from and has to beat. An environment is configured by whoever builds it (the
search), never by an agent.
"""
