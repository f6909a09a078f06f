"""CRL: pruning through constrained reinforcement learning (Malik et al., 2021), PPO-Lagrangian.

AMC keeps every episode on budget by clipping the agent's actions. CRL instead lets the
agent choose any amount and poses the budget as a constraint of a constrained MDP: the
policy maximises the plan's score subject to "remove at least the target", and a Lagrange
multiplier, raised by dual ascent while the policy removes too little, prices the shortfall
into the reward. The paper solves it with PPO-Lagrangian (Ray et al. 2019); so do we.

Algorithm, as implemented here (the CMDP of the paper, PPO-Lagrangian updates):

    env.constraint = "free"                      # amounts are NOT clipped to the budget
    lambda = lambda_init
    repeat until E episodes:
        for i = 1..B (one batch):
            s_1 = embedding of layer 1
            for t = 1..T:                        # one step per prunable layer
                u_t ~ N(mu(s_t), sigma)          # Gaussian policy, mean in (0, 1)
                a_t = clip(u_t, 0, 1)            # the amount; the env only keeps it in the layer's range
            R_i = score of the plan              # sparse, at the end of the episode
            c_i = max(0, target - sparsity)      # shortfall: the constraint's cost (one-sided)
            L_i = R_i - lambda * c_i             # Lagrangian reward, credited to every step
        A_{i,t} = L_i - V(s_{i,t}, lambda)       # gamma = 1, GAE lambda = 1 (Monte-Carlo)
        normalise A over the batch
        K epochs of PPO-clip on the policy, MSE on the value baseline
        lambda <- max(0, lambda + lr_lambda * (mean_i c_i - cost_limit))   # dual ascent

"Reference" below is the PPO-Lagrangian reference implementation (Ray et al. 2019,
safety-starter-agents: penalty_init 1, penalty_lr 5e-2, clip 0.2, pi_lr 3e-4, vf_lr 1e-3,
GAE 0.97, 4000 steps per epoch); "CleanRL" is its ``ppo_continuous_action``.

Design decisions (each a choice the paper leaves to the PPO-Lagrangian reference or that our
MDP forces):

* One-sided cost. The budget is "remove at least the target": a plan that removes less is
  infeasible, one that removes more is feasible but scores worse, and the score already
  punishes that. A two-sided ``|violation|`` would make the multiplier push back against
  over-pruning too, which the score does on its own; and a signed cost would *reward*
  over-pruning once lambda is positive. The per-episode *signed* violation is what the
  environment records (``env.history[i].violation``) and what users see.
* Gaussian, not Beta. A Gaussian over the amount with a learned state-independent log-std
  (CleanRL's ``ppo_continuous_action``) and the sample clipped to [0, 1]; the log-probability
  is that of the unclipped sample, as in CleanRL. A Beta would need no clip, but the clip only
  bites at amounts 0 and 1, which the layers' own range (``max_amount``) caps anyway. The mean
  goes through a sigmoid so it starts at 0.5 (AMC's warm-up mean, no prior on the budget) and
  cannot drift far outside [0, 1], where every sample would clip to the same amount and a
  batch would carry no signal.
* Monte-Carlo returns (gamma = 1, GAE lambda = 1; reference: 0.99 and 0.97). The reward comes
  only at the end of an episode of one step per layer, as in AMC; discounting would only
  shrink the credit of the first layers.
* The multiplier is not in the policy's state: the policy should settle on one plan for one
  budget, and lambda is a training signal, not a property of the layer (the reference does not
  give it to the policy either). It *is* an input of the value baseline, because the Lagrangian
  return it predicts changes with lambda.
* Feasibility is repaired by the environment, never by the agent: a free plan within
  ``env.feasibility_slack`` of the budget is projected onto it and the projection scored, as a
  candidate result and as the episode's score (the plan itself is never scored: a second
  forward for a plan that can never be returned cost half of the channel search's plans), and
  :meth:`LayerwisePruningEnv.finalize` projects the least-violating plan if none came near.
  The returned plan therefore always meets the target; the agent itself never clips.

Results for users: ``env.history[i].violation`` per episode (target minus achieved sparsity;
also in ``PruneResult.history``) and ``agent.lambda_history`` (lambda after each update).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import numpy as np
import torch
from torch import nn

from . import register_agent
from .base import Agent

__all__ = ["CRLAgent", "CRLConfig"]


@dataclass
class CRLConfig:
    episodes: int = 200
    """Total episodes (plans scored). The reference counts environment steps (epochs of 4000);
    here every episode costs one scoring pass over the calibration set, so the budget is counted
    in plans: 200 = 25 updates of 8. Measured on the Fashion-MNIST test CNN at 80% (seeds 0 and 1,
    512 calibration samples): the mean |violation| of a batch falls from 0.31-0.35 to below 0.05
    within 7 updates, lambda climbs mostly in those (1 -> 3.5 and 4.1, 4.2 and 4.6 at the end),
    and the remaining updates narrow the policy (std 0.1 -> 0.04) until up to 5 of a batch's 8
    plans land within the feasibility slack and refine the result (final fidelity 0.818 and 0.838; random search's best of 200 on-budget
    plans: 0.85). Below AMC's 300: the budget and the policy settle within ~100 episodes (the
    learning test stops at 120)."""
    episodes_per_update: int = 8
    """Episodes per PPO batch (reference: 4000 environment steps per epoch, i.e. several long
    episodes). Ours are one step per layer, so a batch is a few plans: 8 keeps the advantage
    normalisation and the mean shortfall of the dual step meaningful while giving 25 updates in
    200 episodes."""
    update_epochs: int = 10
    """PPO epochs over each batch (reference: up to 80 policy iterations with a KL stop;
    CleanRL: 10). The batch is tiny (8 x layers steps), so it is one full-batch step per epoch."""
    clip_coef: float = 0.2
    """PPO ratio clipping (reference and CleanRL: 0.2)."""
    lr_policy: float = 1e-2
    """Adam learning rate of the policy (reference: 3e-4). Raised: only 25 updates of 10 steps
    each are available, against hundreds in the reference. Measured (Fashion-MNIST CNN at 80%,
    seeds 0-2, 200 episodes, 256 calibration samples, the other defaults): against 3e-3, 1e-2
    lowers the late mean |violation| from 0.044 to 0.029 and lands 55 instead of 38 plans within
    the feasibility slack (final fidelity 0.841 vs 0.818)."""
    lr_value: float = 1e-2
    """Adam learning rate of the value baseline (reference: 1e-3), raised with ``lr_policy``."""
    hidden: int = 64
    """Width of the two tanh hidden layers of policy and value networks (reference: 64-64)."""
    init_std: float = 0.1
    """Initial standard deviation of the Gaussian over amounts (CleanRL: 1 for actions in
    [-1, 1]). Ours live in [0, 1] and a plan is only scored as a result within 2 percentage
    points of the budget. Measured (as ``lr_policy``): 0.2 (with learning rates 3e-3) still had
    a std of 0.11 after 200 episodes and landed only ~23 plans that close; 0.1 or 0.15 with the
    default rates end at 0.03-0.05 and land ~50."""
    min_std: float = 0.02
    """Floor on the policy's standard deviation (not in the reference): keeps exploring at the
    precision of the feasibility slack instead of collapsing within 25 updates."""
    lambda_init: float = 1.0
    """Initial Lagrange multiplier (reference PPO-Lagrangian: penalty_init 1.0)."""
    lr_lambda: float = 3.0
    """Dual-ascent step on the multiplier per update (reference: penalty_lr 5e-2). The reference
    cost is a count per episode (limit 25); ours is a fraction of the model (a shortfall of
    ~0.3 at the start, against a score that falls by several units per unit of sparsity near
    the target), and there are only 25 updates: lambda must grow by a few units in the first
    ~10. Measured (as ``lr_policy``): 1.0 took lambda from 1 to ~3 over the whole search and
    left a late mean |violation| of 0.033; 3.0 reached 4-6 and 0.029, with the best final
    plans (mean 0.841 vs 0.826 fidelity)."""
    cost_limit: float = 0.005
    """The constraint: mean shortfall per batch at most this (reference: cost_lim, in its own
    units). Half a percentage point, the unstructured budget tolerance of ``rl_prune``."""
    max_grad_norm: float = 0.5
    """Gradient-norm clipping of both networks (CleanRL: 0.5)."""


def _layer(i: int, o: int, std: float = math.sqrt(2)) -> nn.Linear:
    """Orthogonal weights, zero bias (CleanRL's ``layer_init``)."""
    layer = nn.Linear(i, o)
    nn.init.orthogonal_(layer.weight, std)
    nn.init.zeros_(layer.bias)
    return layer


class GaussianPolicy(nn.Module):
    """Amount ~ N(sigmoid(mlp(state)), exp(log_std)), clipped to [0, 1] by the caller."""

    def __init__(self, state_dim: int, hidden: int, init_std: float, min_std: float):
        super().__init__()
        self.mean_net = nn.Sequential(_layer(state_dim, hidden), nn.Tanh(), _layer(hidden, hidden), nn.Tanh(),
                                      _layer(hidden, 1, std=0.01))
        self.log_std = nn.Parameter(torch.tensor([math.log(init_std)]))
        self.min_log_std = math.log(min_std)

    def distribution(self, states: torch.Tensor) -> torch.distributions.Normal:
        mean = torch.sigmoid(self.mean_net(states)).squeeze(-1)
        std = self.log_std.clamp(min=self.min_log_std).exp().expand_as(mean)
        return torch.distributions.Normal(mean, std)


class ValueBaseline(nn.Module):
    """V(state, lambda): the expected Lagrangian return of the episode from this layer on."""

    def __init__(self, state_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(_layer(state_dim + 1, hidden), nn.Tanh(), _layer(hidden, hidden), nn.Tanh(),
                                 _layer(hidden, 1, std=1.0))

    def forward(self, states: torch.Tensor, lam: float) -> torch.Tensor:
        lam_column = torch.full((states.shape[0], 1), lam, dtype=states.dtype)
        return self.net(torch.cat([states, lam_column], 1)).squeeze(-1)


@dataclass
class Batch:
    """The steps of a batch of episodes, each step credited with its episode's return."""

    states: torch.Tensor       # [N, state_dim]
    samples: torch.Tensor      # [N] unclipped Gaussian samples
    log_probs: torch.Tensor    # [N] under the policy that sampled them
    episode: torch.Tensor      # [N] index of the step's episode in the batch
    scores: np.ndarray         # [B] the env's final reward (the score)
    costs: np.ndarray          # [B] shortfall max(0, violation)


@register_agent
class CRLAgent(Agent):
    """PPO-Lagrangian over per-layer amounts; the budget is a constraint, not a clip."""

    name = "crl"
    Config = CRLConfig

    def _build(self, state_dim: int) -> None:
        c = self.config
        with torch.random.fork_rng(devices=[]):  # initialisation drawn from the agent's seed only
            torch.manual_seed(int(self.rng.integers(2 ** 31)))
            self.policy = GaussianPolicy(state_dim, c.hidden, c.init_std, c.min_std)
            self.value = ValueBaseline(state_dim, c.hidden)
        self.policy_opt = torch.optim.Adam(self.policy.parameters(), lr=c.lr_policy, eps=1e-5)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=c.lr_value, eps=1e-5)
        self.lam = float(c.lambda_init)
        self.lambda_history: List[float] = []

    def collect(self, env, episodes: int) -> Batch:
        """Play ``episodes`` episodes with the current policy, unclipped."""
        states, samples, owners, scores, costs = [], [], [], [], []
        for i in range(episodes):
            state, done = env.reset(), False
            while not done:
                with torch.no_grad():
                    dist = self.policy.distribution(torch.from_numpy(state)[None])
                mean, std = float(dist.mean[0]), float(dist.stddev[0])
                sample = mean + std * float(self.rng.standard_normal())
                states.append(state)
                samples.append(sample)
                owners.append(i)
                state, reward, done, info = env.step(min(max(sample, 0.0), 1.0))
            scores.append(reward)
            costs.append(max(0.0, info["violation"]))
        states_t = torch.from_numpy(np.stack(states))
        samples_t = torch.tensor(samples, dtype=torch.float32)
        with torch.no_grad():
            log_probs = self.policy.distribution(states_t).log_prob(samples_t)
        return Batch(states_t, samples_t, log_probs, torch.tensor(owners), np.asarray(scores, np.float64),
                     np.asarray(costs, np.float64))

    def update(self, batch: Batch) -> None:
        """PPO-clip on the Lagrangian return, then one dual-ascent step on lambda."""
        c = self.config
        lagrangian = torch.tensor(batch.scores - self.lam * batch.costs, dtype=torch.float32)
        returns = lagrangian[batch.episode]  # gamma = 1: every step's return is its episode's
        with torch.no_grad():
            advantages = returns - self.value(batch.states, self.lam)
        if advantages.numel() > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        for _ in range(c.update_epochs):
            ratio = (self.policy.distribution(batch.states).log_prob(batch.samples) - batch.log_probs).exp()
            policy_loss = -torch.min(ratio * advantages,
                                     ratio.clamp(1 - c.clip_coef, 1 + c.clip_coef) * advantages).mean()
            self.policy_opt.zero_grad()
            policy_loss.backward()
            nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
            self.policy_opt.step()
            value_loss = 0.5 * (self.value(batch.states, self.lam) - returns).pow(2).mean()
            self.value_opt.zero_grad()
            value_loss.backward()
            nn.utils.clip_grad_norm_(self.value.parameters(), c.max_grad_norm)
            self.value_opt.step()
        self.lam = max(0.0, self.lam + c.lr_lambda * (float(batch.costs.mean()) - c.cost_limit))
        self.lambda_history.append(self.lam)

    def search(self, env, episodes: int) -> None:
        c = self.config
        self._build(env.observation_dim)
        env.constraint = "free"
        env.phase = "crl"
        done = 0
        while done < episodes:
            batch = self.collect(env, min(c.episodes_per_update, episodes - done))
            done += len(batch.scores)
            self.update(batch)
