"""AMC: AutoML for Model Compression (He et al., ECCV 2018), the DDPG agent.

Algorithm, as in the paper (Sec. 3) and its reference code:

    for episode = 1..E:
        s_1 = embedding of layer 1
        for t = 1..T:                                   # one step per prunable layer
            a_t = random U(0,1)               if episode <= warm-up
                  TN(mu(s_t), delta, [0, 1])  otherwise   # truncated-normal exploration
            env clips a_t so the budget stays reachable; s_{t+1} = next layer's embedding
        R = score of the pruned model (sparse reward, only at the end)
        store (s_t, a_t, R, s_{t+1}) for every t            # every step gets the final reward
        after warm-up, one DDPG update per stored step:
            R' = R - moving average of batch rewards         # variance-reducing baseline
            critic: Q(s,a) -> R' + gamma * Q'(s', mu'(s'))   (gamma = 1)
            actor:  maximise Q(s, mu(s));  soft-update target networks (tau)
        delta <- delta * decay

Two changes of schedule, not of algorithm: an episode's transitions are all stored before its
updates (the reference code interleaves the two), and (``overlap_updates``) the updates run on a
learner thread while the next episode is played and scored, so that episode acts with the policy
from before them (a one-episode lag, as actor-learner DDPG such as Ape-X's). The updates'
minibatches are drawn on the search's thread, so a seeded search is the same run after run.
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from torch import nn

from ..threads import agent_threads
from . import register_agent
from .base import Agent, LoopEnded


@dataclass
class AMCConfig:
    episodes: int = 100
    """Total episodes. Reference code: 800; paper: 400 for ImageNet. Anchored on a prior
    (``rl_prune``'s default) 300 episodes were no better than 100 on held-out test accuracy
    (resnet18 Fashion-MNIST at 90/95% of weights, refitted: 88.98/88.13% vs 88.93/88.00%,
    ``benchmarks/ablation.py``), so 100 gives the most quality per second."""
    warmup: Optional[int] = None
    """Random episodes that only fill the replay buffer; ``None``: ``warmup_fraction`` of the
    episodes, so a short search is not all warm-up (with a fixed 50, a 40-episode search
    returned exactly the random agent's plan)."""
    warmup_fraction: float = 1 / 6
    """Share of the episodes played at random when ``warmup`` is None: 50 of 300, the former
    fixed value (the reference code plays 100 of 800 at random)."""
    hidden: int = 300
    """Width of both hidden layers of actor and critic (paper: 300-300)."""
    lr_actor: float = 1e-3
    """Actor learning rate (reference code: 1e-4). Measured on Fashion-MNIST resnet18 at 80%
    unstructured, 300 episodes: with 1e-4 (and decay 0.95) the policy's mean reward stayed at
    0.15-0.18 and the best plan was a warm-up one (0.68 agreement); with 1e-3 (and decay 0.99)
    it climbed to 0.70-0.73 and the best plan reached 0.91."""
    lr_critic: float = 1e-3
    """Critic learning rate (reference code: 1e-3)."""
    tau: float = 0.01
    """Soft target-network update rate (reference code: 0.01)."""
    discount: float = 1.0
    """Discount factor (paper: 1, the reward arrives only at the end)."""
    batch_size: int = 64
    """Minibatch size of each DDPG update (reference code: 64)."""
    replay_per_layer: int = 100
    """Replay capacity per layer, in transitions (reference code: rmsize = 100 x layers)."""
    init_delta: float = 0.5
    """Initial std of the truncated-normal exploration noise (reference code: 0.5)."""
    delta_decay: Optional[float] = None
    """Per-episode decay of the noise after warm-up; ``None``: the rate that takes it from
    ``init_delta`` to ``final_delta`` over the episodes after the warm-up, whatever their number
    (the reference code's 0.95 over 700 episodes reaches ~0 long before the end; 0.99, our former
    fixed value, left 0.5 * 0.99^250 = 0.04 after 300 episodes but 0.34 after 40)."""
    final_delta: float = 0.04
    """Exploration noise at the last episode when ``delta_decay`` is None (what 0.99 per episode
    reached over a default 300-episode search)."""
    moving_alpha: float = 0.5
    """Update rate of the moving-average reward baseline (reference code: 0.5)."""
    init_w: float = 3e-3
    """Uniform init range of the output layers (DDPG, Lillicrap et al. 2016)."""
    overlap_updates: bool = True
    """Run an episode's updates on a learner thread while the next episode is played and scored
    (that episode acts with the policy one episode behind); ``False``: the updates between the
    episodes, after the episode's transitions are stored (the reference code interleaves each
    write with an update). A third of AMC's screened search time was its updates (1,577
    of ~3 ms each per 100 episodes on one core, the other idle; ``benchmarks/search_cost.py``).
    Whether the policy collapsed on the as-published learning fixture did not depend on it (6 of 18
    seeds with, 5 of 18 without; tests/agents/test_agent_amc.py)."""


class Actor(nn.Module):
    def __init__(self, state_dim: int, hidden: int, init_w: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())
        nn.init.uniform_(self.net[4].weight, -init_w, init_w)

    def forward(self, state):
        return self.net(state)


class Critic(nn.Module):
    def __init__(self, state_dim: int, hidden: int, init_w: float):
        super().__init__()
        self.state_in = nn.Linear(state_dim, hidden)
        self.action_in = nn.Linear(1, hidden)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.uniform_(self.head[3].weight, -init_w, init_w)

    def forward(self, state, action):
        return self.head(self.state_in(state) + self.action_in(action))


class ReplayBuffer:
    """Fixed-size ring buffer of (s, a, r, s', done)."""

    def __init__(self, capacity: int, state_dim: int):
        self.s = np.zeros((capacity, state_dim), np.float32)
        self.a = np.zeros((capacity, 1), np.float32)
        self.r = np.zeros((capacity, 1), np.float32)
        self.s2 = np.zeros((capacity, state_dim), np.float32)
        self.done = np.zeros((capacity, 1), np.float32)
        self.capacity, self.size, self.pos = capacity, 0, 0

    def add(self, s, a, r, s2, done):
        i = self.pos
        self.s[i], self.a[i], self.r[i], self.s2[i], self.done[i] = s, a, r, s2, float(done)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def draw(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """Positions of a minibatch (with replacement)."""
        return rng.integers(0, self.size, size=min(batch_size, self.size))

    def take(self, idx: np.ndarray):
        return tuple(torch.from_numpy(x[idx]) for x in (self.s, self.a, self.r, self.s2, self.done))

    def sample(self, rng: np.random.Generator, batch_size: int):
        return self.take(self.draw(rng, batch_size))


def truncated_normal(rng: np.random.Generator, mu: float, sigma: float, low=0.0, high=1.0) -> float:
    """One sample of N(mu, sigma) truncated to [low, high] (rejection; clip as a last resort)."""
    for _ in range(100):
        x = rng.normal(mu, sigma)
        if low <= x <= high:
            return float(x)
    return float(np.clip(mu, low, high))


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        targets = list(target.parameters())
        torch._foreach_mul_(targets, 1 - tau)
        torch._foreach_add_(targets, list(source.parameters()), alpha=tau)


@register_agent
class AMCAgent(Agent):
    """DDPG over per-layer amounts with AMC's exploration and reward baseline."""

    name = "amc"
    Config = AMCConfig
    supports_guarantee = True
    transient = ("learner", "learner_error")

    def _build(self, state_dim: int, num_layers: int) -> None:
        c = self.config
        # initialisation drawn from the agent's seed, not from whatever the global stream holds (rl_prune
        # seeds that stream with the same seed, so its searches are the ones they were before)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.actor = Actor(state_dim, c.hidden, c.init_w)
            self.critic = Critic(state_dim, c.hidden, c.init_w)
            self.actor_target = Actor(state_dim, c.hidden, c.init_w)
            self.critic_target = Critic(state_dim, c.hidden, c.init_w)
        self.behaviour = copy.deepcopy(self.actor)   # the policy episodes act with
        self.learner: Optional[threading.Thread] = None
        self.learner_error: Optional[BaseException] = None
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        # fused Adam: on CPU the per-tensor loop of the default implementation took a third of an update
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=c.lr_actor, fused=True)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=c.lr_critic, fused=True)
        self.memory = ReplayBuffer(c.replay_per_layer * num_layers, state_dim)
        self.moving_average = None
        self.delta = c.init_delta

    def act(self, state: np.ndarray, explore: bool) -> float:
        with torch.no_grad():
            mu = float(self.behaviour(torch.from_numpy(state)[None])[0, 0])
        return truncated_normal(self.rng, mu, self.delta) if explore else mu

    def learn(self, steps: int) -> None:
        """``steps`` DDPG updates, on the learner thread when ``overlap_updates``. Their minibatches
        are drawn here, on the search's thread, in the order a seeded run always draws them."""
        self.settle()
        batches = [self.memory.draw(self.rng, self.config.batch_size) for _ in range(steps)]
        if not self.config.overlap_updates:
            self._updates(batches)
            self._adopt_learned()
            return
        self.learner = threading.Thread(target=self._updates, args=(batches,), name="amc-learner", daemon=True)
        self.learner.start()

    def _updates(self, batches: List[np.ndarray]) -> None:
        try:
            with agent_threads():
                for idx in batches:
                    self.update(idx)
        except BaseException as error:   # raised again on the search's thread, by settle()
            self.learner_error = error

    def settle(self) -> None:
        """Wait for the updates in flight; from now on the episodes act with the learned policy.
        Nothing in flight: nothing to do (the behaviour policy already is the learned one)."""
        if self.learner is None:
            return
        self.learner.join()   # cleared only once joined: an interrupted join is retried
        self.learner = None
        self._adopt_learned()

    def _adopt_learned(self) -> None:
        """After updates: raise their error, or make the learned policy the one episodes act with."""
        error, self.learner_error = self.learner_error, None
        if error is not None:
            raise error
        self.behaviour.load_state_dict(self.actor.state_dict())

    def update(self, idx: np.ndarray) -> None:
        """One DDPG update on the minibatch at positions ``idx`` of the replay (drawn by :meth:`learn`)."""
        c = self.config
        s, a, r, s2, done = self.memory.take(idx)
        batch_mean = float(r.mean())
        if self.moving_average is None:
            self.moving_average = batch_mean
        else:
            self.moving_average += c.moving_alpha * (batch_mean - self.moving_average)
        r = r - self.moving_average
        with torch.no_grad():
            target_q = r + c.discount * (1 - done) * self.critic_target(s2, self.actor_target(s2))
        critic_loss = nn.functional.mse_loss(self.critic(s, a), target_q)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        # The critic's gradients of the actor loss would be discarded (zero_grad before its next step):
        # not computing them saves two of the update's largest matmuls.
        self.critic.requires_grad_(False)
        try:
            actor_loss = -self.critic(s, self.actor(s)).mean()
            self.actor_opt.zero_grad()
            actor_loss.backward()
        finally:
            self.critic.requires_grad_(True)
        self.actor_opt.step()
        soft_update(self.actor_target, self.actor, c.tau)
        soft_update(self.critic_target, self.critic, c.tau)

    # Hooks for agents that extend AMC's loop (CACP conditions every state on the target).
    def _state_dim(self, env) -> int:
        return env.observation_dim

    def _begin_episode(self, env, episode: int) -> None:
        pass

    def _state(self, env, observation: np.ndarray) -> np.ndarray:
        return observation

    def _stored_reward(self, env, reward: float) -> float:
        return reward

    def schedule(self, episodes: int):
        """``(warm-up episodes, noise decay per episode)`` for a search of ``episodes``."""
        c = self.config
        warmup = int(c.warmup) if c.warmup is not None else int(round(c.warmup_fraction * episodes))
        warmup = min(max(warmup, 0), max(episodes - 1, 0)) if c.warmup is None else warmup
        if c.delta_decay is not None:
            return warmup, float(c.delta_decay)
        learning = max(episodes - warmup - 1, 1)
        return warmup, float((c.final_delta / c.init_delta) ** (1.0 / learning)) if c.init_delta > 0 else 1.0

    def search(self, env, episodes: int) -> None:
        self._build(self._state_dim(env), env.num_steps)
        warmup_episodes, decay = self.schedule(episodes)
        try:
            for episode in range(episodes):
                warmup = episode < warmup_episodes
                self._begin_episode(env, episode)
                env.phase = "warmup" if warmup else "explore"
                trajectory, reward = self._play(env, warmup)
                self.settle()   # the last episode's updates, which ran while this one was scored
                reward = self._stored_reward(env, reward)
                for s, a, s2, d in trajectory:
                    self.memory.add(s, a, reward, s2, d)
                if not warmup:
                    self.learn(len(trajectory))
                    self.delta *= decay
            self.settle()
        except LoopEnded:   # a normal end (patience, time budget): the learner's error still counts
            self.settle()
            raise
        except BaseException:
            self._abandon_learner()
            raise

    def _play(self, env, warmup: bool):
        """One episode: its transitions (s, applied a, s', done) and the final reward."""
        state, done, trajectory = self._state(env, env.reset()), False, []
        while not done:
            action = float(self.rng.uniform(0, 1)) if warmup else self.act(state, explore=True)
            next_state, reward, done, info = env.step(action)
            next_state = self._state(env, next_state)
            # Store the action that asks for what was applied (after clipping): it produced the outcome.
            trajectory.append((state, info["action"], next_state, done))
            state = next_state
        return trajectory, reward

    def _abandon_learner(self) -> None:
        """The search failed or was stopped: wait for the learner, keep the search's own error."""
        try:
            self.settle()
        except BaseException:
            pass
