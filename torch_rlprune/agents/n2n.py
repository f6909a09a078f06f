"""N2N: Network to Network compression via policy gradient RL (Ashok et al., ICLR 2018), two stages.

Algorithm, as in the paper (Sec. 3-4) and its reference code, with this library's budget:

    Stage 1 -- layer removal (removal_share of the episodes):
        every `rollouts` episodes:
            for each rollout:
                x_1..x_B = embeddings of the removable residual blocks (in execution order)
                p_1..p_B = softmax(head(biLSTM(x_1..x_B)))          # keep / remove per block
                a_i ~ p_i, block by block; a choice that would make the budget unreachable
                    (overshoot, or too little left to remove) is masked out  [budget, ours]
                the remaining channel groups shrink onto the budget as the prior's heuristic
                    allocates (global or uniform; uniform without a prior)   [budget, ours]
                R = (score / score_0) * C * (2 - C)      # C: fraction of MACs/params removed
            b = running mean of the rewards of earlier rollouts (the batch's own mean at first)
            removal policy <- Adam step on -sum (R - b) * log pi(a)         # REINFORCE
            (forced choices -- one option left by the budget -- carry no log-probability)
    Between them: the best stage-1 architecture, unless the one removing only the blocks the
        budget needs scores higher as rl_prune returns it (refit included)     [refit, ours]
    Stage 2 -- layer shrinkage (the other episodes), on that architecture:
        every `rollouts` episodes:
            for each rollout:
                for every channel group t still present (execution order):
                    h_t = LSTM([embedding of group t, previous scale, budget state], h_{t-1})
                    s_t ~ softmax(head(h_t)) over keep_scales, scales that leave the budget
                        unreachable masked out (AMC's clipping as a mask)    [budget, ours];
                        when the feasible range falls between two scales, its nearest count;
                        with a prior, the choices are offsets around the prior's width of
                        the group instead (the middle one: the prior's count) [prior, ours]
                the counts are repaired onto the budget (rounding)
                R as above
            shrink policy <- REINFORCE step with the running-mean baseline

    Architectures already scored are not scored again (the environment caches by plan).

Differences from the paper, and why:
    * Blocks, not layers: a layer of a residual network can only disappear with its block
      (torch_rlprune.structure.depth finds the blocks that are the identity once their branch is zero).
    * A budget: N2N has none (the C(2-C) term trades accuracy for compression); here every
      episode meets the target, so C stays at the target (within the budget's rounding) and the
      reward is the score ratio, with C(2-C) breaking ties towards more compression.
    * No student training: the reference trains every student 5 epochs with distillation; here
      scoring is the same as for the other agents (masked model on the calibration data, BN
      statistics re-estimated when bn_recalibration is on). KD fine-tuning is not implemented.
    * The advantage is per rollout (R_i - b); the reference code uses the batch mean for all.
    * Anchored to the prior (rl_prune's default, ``prior="best"``): the shrink stage's choices are
      as many logit offsets around the prior's width of each group (``anchored_unit_options``, the
      same range as the layer-wise agents' actions), so its first, near-uniform policy samples
      plans around the prior instead of absolute widths from 20% to 100%. Measured (make bench,
      resnet18 on Fashion-MNIST at 50% of the MACs, 60 episodes, 3 seeds): the same mean test
      accuracy as absolute widths (88.63%); its best plans now remove three residual blocks, which
      score higher before the least-squares refit than width-only plans and lower after it.
    * Which architecture stage 2 shrinks is chosen as rl_prune returns plans, refit included
      (``DepthWidthEnv.score_as_returned``, two refits): stage 1's best, or the plan removing only
      the blocks the budget needs, at the prior's widths. When the latter wins, only its plans can
      be the result (``DepthWidthEnv.keep_results_of``). Measured (the same bench): three removed
      blocks lost after the refit in every seed, and N2N went from 88.63% to 88.91% (88.66-89.06%),
      level with random search at equal plans (88.97%).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np
import torch
from torch import nn

from . import register_agent
from .base import Agent

__all__ = ["N2NAgent", "N2NConfig", "n2n_reward"]


def n2n_reward(score: float, baseline_score: float, compression: float) -> float:
    """N2N's reward ``(score / score_0) * C * (2 - C)``.

    ``C`` is the fraction of the cost (MACs or params) removed, clipped to [0, 1]; ``score_0`` is
    the unpruned model's score (a non-positive ``score_0`` leaves the score as it is).

    >>> round(n2n_reward(0.9, 1.0, 0.5), 6)
    0.675
    """
    c = min(max(float(compression), 0.0), 1.0)
    ratio = float(score) / float(baseline_score) if baseline_score > 0 else float(score)
    return ratio * c * (2.0 - c)


@dataclass
class N2NConfig:
    episodes: int = 300
    """Total episodes (architectures proposed) over both stages. The reference code runs 100
    policy updates of 5 rollouts per stage; CPU-scaled to 300 in all, as for AMC."""
    removal_share: float = 0.5
    """Fraction of the episodes spent in stage 1 (removal); the rest shrink the best stage-1
    architecture. Models without removable blocks spend every episode in stage 2."""
    rollouts: int = 5
    """Architectures sampled per policy update (reference code: N = 5)."""
    hidden: int = 30
    """Hidden size of both LSTMs (reference code: 30)."""
    num_layers: int = 2
    """Stacked LSTM layers of both policies (reference code: 2)."""
    lr_removal: float = 0.003
    """Adam learning rate of the removal policy (reference code: 0.003)."""
    lr_shrink: float = 0.003
    """Adam learning rate of the shrink policy. The reference code uses 0.1 for shrinkage; with
    our masked action sets and short searches 0.003 (the removal rate) is used for both."""
    keep_scales: Tuple[float, ...] = field(default=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
    """Fractions of a group's units that may stay (the shrink action set). The reference code's
    lookup is 0.25, 0.5 (x5), 0.6, ..., 1.0; a scale below ``1 - max_amount`` is capped there.
    With a prior, as many choices spread evenly over the anchored range around the prior's width
    (one scale: the prior's width itself)."""


class RemovalPolicy(nn.Module):
    """Bidirectional LSTM over the blocks; keep (0) / remove (1) logits per block."""

    def __init__(self, features: int, hidden: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, layers, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 2)

    def forward(self, x):                       # x: (B, F)
        out, _ = self.lstm(x[:, None, :])
        return self.head(out[:, 0, :])          # (B, 2)


class ShrinkPolicy(nn.Module):
    """LSTM over the remaining groups, conditioned on the previous scale; logits over the scales."""

    def __init__(self, features: int, hidden: int, layers: int, choices: int):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, layers)
        self.head = nn.Linear(hidden, choices)

    def forward(self, x, state=None):           # x: (T, F)
        out, state = self.lstm(x[:, None, :], state)
        return self.head(out[:, 0, :]), state   # (T, C)


def _masked_log_probs(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)


@register_agent
class N2NAgent(Agent):
    """Two-stage REINFORCE: a removal policy over residual blocks, then a shrink policy over groups."""

    name = "n2n"
    Config = N2NConfig
    needs_depth = True
    """rl_prune gives this agent the depth-and-width environment (blocks + channel groups)."""
    episode_reward = staticmethod(n2n_reward)
    """The environment rl_prune builds for this agent rewards an episode with N2N's reward."""

    def _check(self, env) -> None:
        if not getattr(env, "supports_depth", False):
            raise TypeError("agent 'n2n' removes residual blocks: use rl_prune(..., structure='channel', agent='n2n')")
        c = self.config
        scales = tuple(float(s) for s in c.keep_scales)
        if not scales or not all(0.0 < s <= 1.0 for s in scales):
            raise ValueError(f"keep_scales must be fractions in (0, 1], got {c.keep_scales!r}")
        if not 0.0 <= c.removal_share <= 1.0:
            raise ValueError(f"removal_share must be in [0, 1], got {c.removal_share!r}")
        if c.rollouts < 1 or c.hidden < 1 or c.num_layers < 1:
            raise ValueError("rollouts, hidden and num_layers must be positive")

    def search(self, env, episodes: int) -> None:
        self._check(env)
        c = self.config
        self.block_x = torch.from_numpy(env.block_features())
        self.group_x = env.group_features()
        self.scales = np.array(sorted({float(s) for s in c.keep_scales}), dtype=np.float64)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.removal = RemovalPolicy(self.block_x.shape[1], c.hidden, c.num_layers)
            self.shrink = ShrinkPolicy(self.group_x.shape[1] + 5, c.hidden, c.num_layers, len(self.scales))
        self.removal_opt = torch.optim.Adam(self.removal.parameters(), lr=c.lr_removal)
        self.shrink_opt = torch.optim.Adam(self.shrink.parameters(), lr=c.lr_shrink)
        stage1 = int(round(episodes * c.removal_share)) if env.num_blocks else 0

        env.phase = "removal"
        self._run(env, stage1, self._removal_rollout, self._removal_log_prob, self.removal_opt)
        self.removed = self._architecture(env)

        self.anchors = env.base_widths(self.removed) if env.anchored else None
        count = len(self.scales)
        self.choices = np.linspace(0.0, 1.0, count) if count > 1 else np.array([0.5])
        env.phase = "shrink"
        self._run(env, episodes - stage1, self._shrink_rollout, self._shrink_log_prob, self.shrink_opt)

    def _architecture(self, env) -> np.ndarray:
        """The blocks the shrink stage keeps removed: stage 1's best, unless the plan that removes
        only what the budget needs, at the prior's widths and on the target, rewards higher as
        rl_prune returns it (refit included). Stage 1 ranks before the refit, which restores
        narrowed layers but not removed blocks."""
        fewest = env.keep_first_removal()
        best = env.best_k
        if best is None:
            return fewest
        removed = env.split(best)[0]
        narrowing = env.join(fewest, env.base_widths(fewest))
        if np.array_equal(removed, fewest) or not env.on_target(narrowing):
            return removed
        with_blocks, narrowed = env.score_as_returned(best), env.score_as_returned(narrowing)
        if with_blocks is None or narrowed is None:
            return removed
        keeps = env.reward_of(with_blocks, best)
        narrows = env.reward_of(narrowed, narrowing)
        chosen = fewest if math.isfinite(narrows) and not narrows < keeps else removed
        env.choose_architecture(chosen)
        return chosen

    # ----------------------------------------------------------------- REINFORCE
    def _run(self, env, episodes: int, rollout, log_prob, optimizer) -> None:
        rewards_seen: List[float] = []
        batch = []
        for episode in range(episodes):
            env.reset()
            trajectory, record = rollout(env)
            batch.append((trajectory, record.reward))
            if len(batch) == self.config.rollouts or episode == episodes - 1:
                rewards = np.array([r for _, r in batch])
                baseline = float(np.mean(rewards_seen)) if rewards_seen else float(rewards.mean())
                loss = 0.0
                for (traj, r), adv in zip(batch, rewards - baseline):
                    if adv != 0.0 and traj is not None:
                        loss = loss - float(adv) * log_prob(traj)
                if isinstance(loss, torch.Tensor):
                    optimizer.zero_grad()
                    (loss / len(batch)).backward()
                    optimizer.step()
                rewards_seen.extend(rewards.tolist())
                batch = []

    def _sample(self, logits: torch.Tensor, allowed: np.ndarray) -> Tuple[int, bool]:
        """A choice among the allowed ones; the second value says whether it was a choice at all."""
        if allowed.sum() == 1:
            return int(np.argmax(allowed)), False
        logp = _masked_log_probs(logits.detach().double(), torch.from_numpy(allowed))
        p = logp.exp().numpy()
        return int(self.rng.choice(len(p), p=p / p.sum())), True

    # ----------------------------------------------------------------- stage 1: removal
    def _removal_rollout(self, env):
        with torch.no_grad():
            logits = self.removal(self.block_x)
        removed = np.zeros(env.num_blocks, dtype=bool)
        allowed = np.zeros((env.num_blocks, 2), dtype=bool)
        actions = np.zeros(env.num_blocks, dtype=np.int64)
        counted = np.zeros(env.num_blocks, dtype=bool)
        for i in range(env.num_blocks):
            allowed[i] = env.block_options(removed, i)
            actions[i], counted[i] = self._sample(logits[i], allowed[i])
            removed[i] = actions[i] == 1
        record = env.finish(removed, env.base_widths(removed))
        traj = (torch.from_numpy(allowed), torch.from_numpy(actions), torch.from_numpy(counted))
        return (traj if counted.any() else None), record

    def _removal_log_prob(self, traj) -> torch.Tensor:
        allowed, actions, counted = traj
        logp = _masked_log_probs(self.removal(self.block_x), allowed)
        return logp.gather(1, actions[:, None])[:, 0][counted].sum()

    # ----------------------------------------------------------------- stage 2: shrinkage
    def _shrink_rollout(self, env):
        removed = self.removed
        budget = env.episode_budget(removed)
        k = np.zeros(env.num_groups, dtype=np.int64)
        active = [t for t in range(env.num_groups) if budget.k_max[t] > 0]
        inputs, allowed_rows, actions, counted = [], [], [], []
        state, previous = None, 1.0
        for t in active:
            lo, hi = budget.bounds(k, t, env.goal)
            n = int(env.n[t])
            units = env.unit_options(budget, t, self.scales) if self.anchors is None else \
                env.anchored_unit_options(budget, t, self.anchors, self.choices)
            allowed = (units >= lo) & (units <= hi)
            reduced = budget.removed(k) / budget.total
            x = np.concatenate([self.group_x[t], [previous, reduced, env.target, lo / n, hi / n]]).astype(np.float32)
            with torch.no_grad():
                logits, state = self.shrink(torch.from_numpy(x)[None], state)
            if allowed.any():
                a, free = self._sample(logits[0], allowed)
                k[t] = units[a]
            else:  # the feasible range falls between two scales: the nearest feasible count
                a, free = int(torch.argmax(logits[0])), False
                k[t] = min(max(int(units[a]), lo), hi)
                allowed = np.zeros(len(units), dtype=bool)
                allowed[a] = True
            previous = 1.0 - k[t] / n
            inputs.append(x)
            allowed_rows.append(allowed)
            actions.append(a)
            counted.append(free)
        record = env.finish(removed, k)
        if not any(counted):
            return None, record
        traj = (torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(allowed_rows)),
                torch.tensor(actions, dtype=torch.long), torch.tensor(counted, dtype=torch.bool))
        return traj, record

    def _shrink_log_prob(self, traj) -> torch.Tensor:
        x, allowed, actions, counted = traj
        logits, _ = self.shrink(x)
        logp = _masked_log_probs(logits, allowed)
        return logp.gather(1, actions[:, None])[:, 0][counted].sum()
