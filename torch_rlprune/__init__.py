"""torch_rlprune: reinforcement-learning pruning policies for ``torch.nn.utils.prune``.

>>> from torch_rlprune import rl_prune
>>> result = rl_prune(model, target=0.8, data=loader)   # doctest: +SKIP
"""
from .agents import Agent, create_agent, list_agents, register_agent
from .api import PruneResult, compact, global_rl_unstructured, rl_prune
from .env.layerwise import LayerwisePruningEnv
from .env.priors import global_magnitude_unstructured, lamp_unstructured, uniform_unstructured
from .plan import PlanError, PruningPlan, apply_plan
from .rewards.repair import LeastSquaresRefit
from .rewards.scores import AccuracyReward, CallableReward, FidelityReward, Reward
from .structure.channel.measured import Latency
from .structure.costs import BudgetMeasure, register_budget
from .structure.deploy import export
from .structure.methods import PolicyUnstructured, policy_unstructured
from .structure.sparse_format import load_sparse, save_sparse

__version__ = "0.1.0"

__all__ = ["rl_prune", "global_rl_unstructured", "compact", "PruneResult", "PruningPlan", "PlanError", "apply_plan",
           "PolicyUnstructured", "policy_unstructured",
           "lamp_unstructured", "global_magnitude_unstructured", "uniform_unstructured", "LayerwisePruningEnv", "Agent", "register_agent",
           "create_agent", "list_agents", "Reward", "FidelityReward", "AccuracyReward", "CallableReward",
           "LeastSquaresRefit", "Latency", "BudgetMeasure", "register_budget", "save_sparse", "load_sparse", "export", "__version__"]
