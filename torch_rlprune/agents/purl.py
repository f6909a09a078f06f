"""PuRL: Learning to Prune Deep Neural Networks via Reinforcement Learning (Gupta et al.,
2020), the DQN agent with a reward after every layer.

Where AMC waits for the end of an episode to learn how good its plan was, PuRL rewards
every pruning step, and picks each layer's amount from a small discrete set with a deep
Q-network. The dense feedback is what lets it converge in far fewer episodes (the paper
reports ~55 on ImageNet against AMC's 400). Algorithm, as we implement it:

    A = {0, 0.1, ..., 0.9}                 # discrete per-layer amounts (anchored to a prior:
                                           #  offsets around the prior's amount, 0 among them)
    env.dense = True                                      # a reward after every layer
    for episode = 1..E:
        eps = 1                                 if episode <= warm-up
              linear decay 1 -> eps_min         otherwise
        s_1 = embedding of layer 1
        for t = 1..T:                                      # one step per prunable layer
            F_t = amounts of A the budget allows at layer t   # feasible actions (never empty)
            i_t = uniform over F_t  with prob. eps, else argmax_{i in F_t} Q(s_t, i)
            env clips A[i_t] so the budget is met exactly
            r_t = score(plan so far, later layers unpruned) - score(plan before this layer)
            store (s_t, i_t, r_t, s_{t+1}, F_{t+1}, done) in the replay memory
            after warm-up: `updates_per_step` DQN updates on replayed minibatches:
                Q(s, i) -> r + gamma * (1 - done) * max_{j in F'} Q'(s', j)   (Huber loss)
                every `target_update` updates: Q' <- Q               (hard copy)

The rewards of one episode add up to its final score minus the unpruned score: the dense
reward is potential-based shaping (Ng et al. 1999) with the score of the partial plan as
the potential. With ``gamma = 1`` the return of every plan is its final score minus a
constant, so the best plan under the dense reward is exactly the best plan under the
sparse one; with ``gamma < 1`` that would no longer hold (the shaping term would have to
be ``gamma * phi(s') - phi(s)``).

What differs from the paper: the reward and the state are this library's, shared by every
agent (AMC's layer embedding; the change in the masked model's score, with no retraining
between steps; the budget met by the environment's clipping instead of being part of the
reward). Where we had no value from the paper, a hyper-parameter starts from DQN's (Mnih
et al. 2015) and is scaled to a search of tens of episodes; :class:`PuRLConfig` says which.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import register_agent
from .base import Agent


@dataclass
class PuRLConfig:
    """PuRL's hyper-parameters. "Measured" below means: the mean score of the last 10
    episodes (the near-greedy policy) on the Fashion-MNIST test CNN (3 layers) at 80%
    unstructured, fidelity reward, 40 episodes, seeds 0-5, all else at the defaults
    (``tests/test_agent_purl.py`` has the fixture). With the defaults: 0.790-0.823, mean
    0.801, against a random warm-up mean of 0.53-0.66."""

    episodes: int = 60
    """Total episodes (PuRL: ~55 on ImageNet ResNet-50, against 400 for AMC: fast convergence
    is the point of the dense reward). 60 keeps PuRL's order of magnitude. Measured: the
    last-10 mean is 0.722-0.825 (mean 0.776) after 30 episodes, 0.790-0.823 (0.801) after 40
    and 0.807-0.832 (0.820) after 60."""
    num_actions: int = 10
    """Size of the discrete action set: ``num_actions`` evenly spaced amounts from 0 to
    ``max_action`` (0, 0.1, ..., 0.9); anchored to a prior (``rl_prune(prior=...)``, the default),
    ``num_actions`` rounded up to odd offsets spanning the whole action range, the middle one the
    prior's own amount (11: logit offsets -2, -1.6, ..., +2 with the default spread). Each output of the Q-network is learnt separately, so
    fewer actions mean more samples per action in a short search; the environment's
    clipping makes the plan land on the budget exactly whatever the grid (the last layer
    takes what is left). Measured: 10 actions 0.790-0.823 (mean 0.801); 20 actions (0,
    0.05, ..., 0.95) 0.757-0.832 (mean 0.799)."""
    max_action: float = 0.9
    """Largest amount in the set. Layers that must go beyond it (the feasible range lies
    above 0.9) take the nearest amount and the environment raises it into range; amounts
    above the environment's own cap (``max_amount``: 0.98 unstructured, 0.8 per channel
    group by default) are never feasible."""
    warmup: int = 10
    """Episodes played at epsilon = 1 (phase ``"warmup"``): they fill the replay memory with
    random plans before any update. 1/6 of the episodes, AMC's share of random warm-up."""
    epsilon_min: float = 0.02
    """Exploration rate reached at the end of the decay and kept after it (DQN, Mnih et al.
    2015: 0.1). Lower here: a search of tens of episodes needs its last ones near-greedy to
    use what it learnt, and one random amount can cost a plan most of its score. Measured:
    0.02 gives 0.790-0.823, 0.05 gives 0.750-0.813."""
    decay_fraction: float = 0.7
    """Epsilon decays linearly from 1 to ``epsilon_min`` over this fraction of the episodes
    after the warm-up (a fraction, so the schedule follows ``episodes``); the rest run at
    ``epsilon_min``."""
    gamma: float = 1.0
    """Discount factor. 1 keeps the potential-based shaping exact (see the module docstring):
    the episode is short and finite, every plan's return is its final score minus the
    unpruned score, and the optimal plan is the one the sparse reward would choose."""
    hidden: int = 64
    """Width of the Q-network's two hidden layers. The state is the 12 AMC layer features and
    the output one value per action: a small MLP learns from few samples (measured: 128
    gives 0.775-0.815, no better)."""
    lr: float = 1e-3
    """Adam learning rate of the Q-network (measured: 3e-3 gives 0.755-0.836, no better)."""
    batch_size: int = 32
    """Minibatch size of each update (DQN: 32)."""
    replay_size: int = 5000
    """Replay capacity in transitions (one per layer per episode). A default search makes at
    most a few thousand transitions even on large models, so it keeps the whole search."""
    updates_per_step: int = 16
    """Gradient updates per environment step once the warm-up is over (DQN: one per 4 frames,
    where frames are cheap). Here a step costs a model evaluation (milliseconds to seconds)
    and an update of this small MLP well under a millisecond, so replaying more per step is
    nearly free and makes each expensive transition count. Measured: 16 updates (with
    ``target_update`` 50) 0.790-0.823; 4 (with 25) 0.728-0.792."""
    target_update: int = 50
    """Hard update: the target network is copied from the online network every this many
    gradient updates (DQN's scheme; Mnih et al. 2015 copy every 10k updates over millions
    of frames; a search of a few thousand updates needs a short period for values to
    propagate from the last layer back to the first at all)."""
    huber_delta: float = 1.0
    """Huber loss threshold (DQN's error clipping). Score changes lie in [-1, 1], so in
    practice the loss is quadratic."""


class QNetwork(nn.Module):
    """State -> one Q-value per discrete amount."""

    def __init__(self, state_dim: int, num_actions: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_actions))

    def forward(self, state):
        return self.net(state)


class ReplayMemory:
    """Fixed-size ring buffer of (s, action index, r, s', feasible actions at s', done)."""

    def __init__(self, capacity: int, state_dim: int, num_actions: int):
        self.s = np.zeros((capacity, state_dim), np.float32)
        self.a = np.zeros(capacity, np.int64)
        self.r = np.zeros(capacity, np.float32)
        self.s2 = np.zeros((capacity, state_dim), np.float32)
        self.feasible2 = np.ones((capacity, num_actions), bool)
        self.done = np.zeros(capacity, np.float32)
        self.capacity, self.size, self.pos = capacity, 0, 0

    def add(self, s, a, r, s2, feasible2, done):
        i = self.pos
        self.s[i], self.a[i], self.r[i], self.s2[i], self.feasible2[i], self.done[i] = s, a, r, s2, feasible2, done
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, batch_size: int):
        idx = rng.integers(0, self.size, size=min(batch_size, self.size))
        return tuple(torch.from_numpy(x[idx]) for x in (self.s, self.a, self.r, self.s2, self.feasible2, self.done))


@register_agent
class PuRLAgent(Agent):
    """DQN over a discrete set of per-layer amounts, rewarded after every layer.

    Only *feasible* actions are chosen (invalid-action masking): the amounts of the set that
    lie within ``env.action_bounds()``, or, when none does (the last layer, whose amount the
    budget fixes), the one nearest to that range. The same mask, stored for the next state,
    restricts the max of the Q-learning target. The replay memory stores the chosen index;
    with the mask it is also the nearest index of the amount the environment applied, so
    every stored value is the value of what actually happened.

    Why not let the agent choose any amount and let the environment clip it: many actions
    then lead to the same transition (at the last layer all of them do), each is trained only
    when drawn, and the max over them in the target picks whichever is most overestimated.
    Measured (see :class:`PuRLConfig`): without the mask 0.698-0.802 (mean 0.765), with it
    0.790-0.823 (mean 0.801); with 20 actions the unmasked policy kept falling back to one
    poor plan (0.48: the second conv pruned as little as the budget allows, so the Linear
    head had to take 98%).
    """

    name = "purl"
    Config = PuRLConfig

    def __init__(self, config=None, seed: int = 0, **overrides):
        super().__init__(config, seed=seed, **overrides)
        c = self.config
        if c.num_actions < 2 or not 0.0 < c.max_action <= 1.0:
            raise ValueError(f"agent_config for 'purl': num_actions must be >= 2 and max_action in (0, 1], "
                             f"got {c.num_actions} and {c.max_action}")
        if not 0.0 <= c.epsilon_min <= 1.0 or not 0.0 <= c.gamma <= 1.0:
            raise ValueError("agent_config for 'purl': epsilon_min and gamma must be in [0, 1]")

    def _build(self, state_dim: int, anchored: bool) -> None:
        c = self.config
        # Anchored to a prior, an action is an offset around the prior's amount: an odd grid over
        # [0, 1] holds 0.5, the prior itself, and every layer can keep or leave it in both directions.
        self.actions = (np.linspace(0.0, 1.0, c.num_actions + 1 - c.num_actions % 2) if anchored
                        else np.linspace(0.0, c.max_action, c.num_actions))
        # Initialised from the agent's seed whatever the caller did with torch's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.rng.integers(2 ** 31)))
            self.q = QNetwork(state_dim, len(self.actions), c.hidden)
        self.q_target = copy.deepcopy(self.q)
        self.optimizer = torch.optim.Adam(self.q.parameters(), lr=c.lr)
        self.memory = ReplayMemory(c.replay_size, state_dim, len(self.actions))
        self.updates = 0

    def feasible(self, env) -> np.ndarray:
        """Mask of the amounts the current layer may take (never empty)."""
        lo, hi = env.action_bounds()
        mask = (self.actions >= lo - 1e-9) & (self.actions <= hi + 1e-9)
        if not mask.any():
            mask[np.argmin(np.maximum(lo - self.actions, self.actions - hi))] = True
        return mask

    def epsilon(self, episode: int, episodes: int) -> float:
        c = self.config
        if episode < c.warmup:
            return 1.0
        decay_episodes = max(1.0, c.decay_fraction * (episodes - c.warmup))
        progress = min(1.0, (episode - c.warmup) / decay_episodes)
        return 1.0 + progress * (c.epsilon_min - 1.0)

    def act(self, state: np.ndarray, feasible: np.ndarray, epsilon: float) -> int:
        if self.rng.uniform() < epsilon:
            return int(self.rng.choice(np.flatnonzero(feasible)))
        with torch.no_grad():
            q = self.q(torch.from_numpy(state)[None])[0]
        return int(q.masked_fill(~torch.from_numpy(feasible), -torch.inf).argmax())

    def update(self) -> None:
        c = self.config
        s, a, r, s2, feasible2, done = self.memory.sample(self.rng, c.batch_size)
        with torch.no_grad():
            best_next = self.q_target(s2).masked_fill(~feasible2, -torch.inf).max(1).values
            target = r + c.gamma * torch.where(done > 0, 0.0, best_next)  # no bootstrap past the end
        q = self.q(s).gather(1, a[:, None])[:, 0]
        loss = nn.functional.huber_loss(q, target, delta=c.huber_delta)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        if self.updates % c.target_update == 0:
            self.q_target.load_state_dict(self.q.state_dict())

    def search(self, env, episodes: int) -> None:
        c = self.config
        self._build(env.observation_dim, getattr(env, "anchored", False))
        env.dense = True
        all_actions = np.ones(len(self.actions), bool)
        for episode in range(episodes):
            epsilon = self.epsilon(episode, episodes)
            learning = episode >= c.warmup
            env.phase = "explore" if learning else "warmup"
            state, done = env.reset(), False
            feasible = self.feasible(env)
            while not done:
                index = self.act(state, feasible, epsilon)
                next_state, reward, done, _ = env.step(float(self.actions[index]))
                next_feasible = all_actions if done else self.feasible(env)
                self.memory.add(state, index, reward, next_state, next_feasible, done)
                state, feasible = next_state, next_feasible
                if learning:
                    for _ in range(c.updates_per_step):
                        self.update()
