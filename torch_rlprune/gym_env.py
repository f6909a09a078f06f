"""The pruning MDP as a ``gymnasium.Env``, for agents that live outside this library.

    env = PruningGymEnv(model, target=0.8, data=(x, y))
    obs, info = env.reset(seed=0)
    while ...:                                   # any gymnasium-API agent, e.g. stable-baselines3
        obs, reward, terminated, truncated, info = env.step(agent(obs))
    result = env.apply_best()                    # prune the model with the best plan seen
    env.close()                                  # without apply_best: the model is left as it was

One episode prunes every layer (or channel group) once, in execution order; the action asks for
an amount of the current layer around the heuristic prior's (0.5: the prior's own; ``prior="none"``:
the action is the fraction itself), clipped so the budget is met exactly (AMC's clipping), and the
reward comes at the end (``dense=True``: after every layer). The plan an
external agent reaches is applied exactly as ``rl_prune`` applies its own. gymnasium is an
optional dependency: ``pip install torch_rlprune[gym]``.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch
from torch import nn

try:
    import gymnasium
    from gymnasium import spaces
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("torch_rlprune.gym_env needs gymnasium: pip install 'torch_rlprune[gym]'") from err

from .env.layerwise import CONSTRAINTS
from .options import PruneOptions
from .plan import PruningPlan
from .results import PruneResult
from .search.engine import prepare_search, score_priors
from .structure.snapshot import ModelSnapshot
from .structure.tensors import find_prunable

__all__ = ["PruningGymEnv"]


class PruningGymEnv(gymnasium.Env):
    """``rl_prune``'s environment behind the gymnasium API.

    Args:
        model, target, data, reward, budget, structure, exclude, example_inputs, seed,
        calibration_samples, max_amount, bn_recalibration, label: as for :func:`torch_rlprune.rl_prune`
            (one target).
        constraint: ``"clip"`` (every episode meets the budget) or ``"free"`` (no clipping: the
            agent must learn the budget; ``info["violation"]`` reports it at the end of an episode).
        dense: a reward after every layer (the change in score) instead of only at the end.
        prior: as for :func:`~torch_rlprune.rl_prune`: the heuristic plans are scored when the
            environment is made (the best is a result before any episode) and actions are anchored
            to the best; ``"none"``: actions are the amounts themselves.

    Observation: the features of the current layer, in [0, 1]: AMC's 12
    (``torch_rlprune.env.layerwise.STATE_FEATURES``), and the prior's amount when there is a prior
    (``ANCHORED_STATE_FEATURES``). Action: ``Box(0, 1, (1,))``: with a prior, an offset
    around the prior's amount (0.5 is the prior's, 0 and 1 ``PRIOR_SPREAD`` logits below and above);
    with ``prior="none"``, the fraction of the layer to remove.
    """

    metadata = {"render_modes": []}

    def __init__(self, model: nn.Module, target: float = 0.8, data=None, reward="fidelity",
                 budget: Optional[str] = None, structure: str = "unstructured", exclude=None, example_inputs=None,
                 seed: int = 0, calibration_samples: Optional[int] = None, max_amount: Optional[float] = None,
                 bn_recalibration: Optional[int] = None, constraint: str = "clip", dense: bool = False,
                 prior: str = "best", label=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if constraint not in CONSTRAINTS:
            raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {constraint!r}")
        # rl_prune's checks and defaults; the held-out choice and the protected layers are a search's business
        options = PruneOptions(target=target, structure=structure, budget=budget, agent="random", reward=reward,
                               seed=seed, calibration_samples=calibration_samples, max_amount=max_amount,
                               bn_recalibration=bn_recalibration, prior=prior, selection=0.0, select_top=1,
                               protect_first_last=False, label=label, synthetic_data=data is None).checked()
        # budget="latency": the latency table's prediction at any width, no measured closing step
        options.latency, options.round_to = None, None
        targets, structure, budget = options.targets, options.structure, options.budget
        layers = find_prunable(model, exclude, None)
        if not layers:
            raise ValueError("the model has no prunable layers (Conv/Linear weights) left after 'exclude'")
        self.model, self.target, self.structure, self.budget, self.seed = model, targets[0], structure, budget, seed
        self._started = time.perf_counter()
        self._snapshot = ModelSnapshot(model)
        self._applied = self._closed = False
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                model.eval()
                self._search = prepare_search(model, layers, options, data, exclude, example_inputs)
                score_priors(self._search, structure, targets)  # scored first, as in rl_prune
        except BaseException:
            self._snapshot.restore()
            raise
        self.env = self._search.env
        self.env.constraint, self.env.dense = constraint, bool(dense)
        self.env.phase = "gymnasium"
        dim = self.env.observation_dim
        self.observation_space = spaces.Box(0.0, 1.0, (dim,), np.float32)
        self.action_space = spaces.Box(0.0, 1.0, (1,), np.float32)

    def _info(self) -> dict:
        t = min(self.env.t, self.env.num_steps - 1)
        low, high = self.env.action_bounds() if self.env.t < self.env.num_steps else (0.0, 0.0)
        return {"layer": self.env.layers[t].name, "action_bounds": (float(low), float(high))}

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        if self._applied or self._closed:
            raise RuntimeError("the environment was closed or its plan applied; make a new one")
        observation = self.env.reset()
        return np.clip(observation, 0.0, 1.0), self._info()

    def step(self, action):
        amount = float(np.asarray(action, dtype=np.float64).reshape(-1)[0])
        observation, reward, done, info = self.env.step(amount)
        if not done:
            info.update(self._info())
        elif "episode" in info:  # gymnasium's RecordEpisodeStatistics owns info["episode"]
            info["episode_index"] = info.pop("episode")
        return np.clip(observation, 0.0, 1.0), float(reward), bool(done), False, info

    @property
    def best_score(self) -> float:
        return self.env.best_score

    def apply_best(self) -> PruneResult:
        """Prune the model in place with the best plan of the episodes played; returns the same
        :class:`PruneResult` ``rl_prune`` would."""
        if self._applied or self._closed:
            raise RuntimeError("the environment was closed or its plan applied already")
        search, env = self._search, self.env
        env.finalize()
        if env.best_k is None:
            raise RuntimeError("no episode has finished: nothing to apply")
        try:
            env.restore()
            search.recalibrate.restore()
            amounts, numels, extra = search.space.plan_entries(env.best_k)
            plan = PruningPlan(amounts=amounts, numels=numels, target=self.target, sparsity=env.achieved(env.best_k),
                               budget=self.budget, structure=self.structure, agent="gymnasium",
                               reward=search.scorer.name, seed=int(self.seed), score=env.best_score,
                               baseline_score=search.baseline, episodes=len(env.history),
                               metadata={"calibration_samples": search.calibration.num_samples, **extra})
            achieved = search.space.apply(plan)
            if search.recalibrate:
                search.recalibrate()
        except BaseException:
            self._snapshot.restore()
            raise
        self._applied = True
        self._snapshot.restore_training()
        return PruneResult(self.model, plan, achieved, [h.as_dict() for h in env.history], search.baseline,
                           time.perf_counter() - self._started, search.forward_seconds, search.space.steps,
                           example_inputs=search.example)

    def close(self):
        """Without :meth:`apply_best`: put the model back exactly as it was."""
        if not self._applied and not self._closed:
            self.env.restore()
            self._search.recalibrate.restore()
            self._snapshot.restore()
        self._closed = True
