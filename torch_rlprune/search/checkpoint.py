"""Checkpoints of a running search, and resuming one to the result it would have reached.

What a search spends its time on is scoring plans (forward passes); what makes it
reproducible is the seed. A checkpoint therefore stores every plan scored so far with its
score, the episode history, the best plans, and a snapshot of the agent (networks,
optimisers, replay buffers, RNG states) and of torch's global RNG.

Resuming re-runs the search from its seed and answers every plan the checkpoint already
scored from the record instead of running the model: the agent takes the same decisions,
so its networks, optimiser moments, replay buffer and random streams are rebuilt exactly,
at the cost of the agent's own work only (AMC: about a third of a forward pass per episode).
Restoring networks into the middle of six different training loops would need every loop
rewritten as a resumable state machine; replaying them needs none, and it is checked: every
replayed episode must match the recorded one (amounts and reward), and the agent's state
at the checkpointed episode must equal the stored snapshot. A mismatch (another torch build,
another thread count) is reported with a warning and the search goes on from there.

Files are written atomically and hold only tensors, numbers, strings, lists and dicts, so
they load with ``torch.load(weights_only=True)``: a hostile file cannot run code. A file is
still untrusted data: it carries a digest of its content (a changed byte is refused), every
score in it must be finite, and a resumed search re-measures what it reports (every target's
best plans and a sample of the replayed ones): a recorded score the model does not reproduce
is a :class:`CheckpointError`, never a result.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "SearchRecorder", "load_checkpoint", "check_checkpoint_path", "agent_state",
           "states_equal"]

CHECKPOINT_FORMAT = 2   # 2: a content digest
_MAX_DEPTH = 6
REVERIFY_SAMPLE = 3     # replayed plans re-measured on resume, besides every target's best plans
_SCORE_TOLERANCE = 1e-6


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, is not a search checkpoint, or belongs to another search."""


# ----------------------------------------------------------------------------- agent state
def _to_saveable(value: Any, depth: int = 0):
    """``value`` as tensors, numbers, strings, lists and dicts (what ``weights_only`` loads)."""
    if depth > _MAX_DEPTH:
        return repr(type(value).__name__)
    if isinstance(value, np.generic):  # before the plain types: np.float64 is a float, and weights_only refuses it
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value).copy()) if value.dtype != object else \
            [_to_saveable(v, depth + 1) for v in value.tolist()]
    if isinstance(value, np.random.Generator):
        return {"bit_generator": _to_saveable(value.bit_generator.state, depth + 1)}
    if isinstance(value, nn.Module):
        return {k: v.detach().clone() for k, v in value.state_dict().items()}
    if isinstance(value, torch.optim.Optimizer):
        return _to_saveable(value.state_dict(), depth + 1)
    if isinstance(value, dict):
        return {str(k): _to_saveable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_saveable(v, depth + 1) for v in value]
    if hasattr(value, "__dict__") and not callable(value):  # replay buffers and the like
        return {k: _to_saveable(v, depth + 1) for k, v in vars(value).items() if not k.startswith("__")}
    return repr(type(value).__name__)


def agent_state(agent) -> Dict[str, Any]:
    """A snapshot of everything an agent learned and drew so far (config, callables and the agent's
    ``transient`` attributes left out), once the work it has in flight is done (``settle()``)."""
    getattr(agent, "settle", lambda: None)()
    left_out = {"config", *getattr(agent, "transient", ())}
    return {name: _to_saveable(value) for name, value in sorted(vars(agent).items())
            if name not in left_out and (isinstance(value, nn.Module) or not callable(value))}


def states_equal(a, b) -> bool:
    """Exact equality of two snapshots (NaNs equal to themselves)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and bool(torch.equal(a, b) or (a.is_floating_point()
                                                                   and torch.equal(a.isnan(), b.isnan())
                                                                   and torch.equal(a.nan_to_num(), b.nan_to_num())))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


# ----------------------------------------------------------------------------- the file
def content_digest(data: Dict[str, Any]) -> str:
    """SHA-256 over everything a checkpoint holds but its digest (and the path it was read from):
    dict keys sorted, tensors by dtype, shape and bytes, plain values by type and repr."""
    h = hashlib.sha256()

    def feed(x) -> None:
        if isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                feed(k)
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr((type(x).__name__, x)).encode())

    feed({k: v for k, v in data.items() if k not in ("digest", "path")})
    return h.hexdigest()


def _unreadable_reason(path: Path, err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, without torch's advice to load it unsafely."""
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(err, pickle.UnpicklingError) and "global" in str(err).lower():  # torch names what it refused
        return "it holds objects other than tensors and plain data; refused without loading them"
    return f"it is not a file torch.save wrote (truncated, corrupted or another format; {type(err).__name__})"


def _write_atomically(obj, path: Path) -> None:
    """Write, read back with ``weights_only=True`` (a file resume could not load is never left in place),
    flush to disk, then rename over the old checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        torch.load(tmp, map_location="cpu", weights_only=True)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"checkpoint {path}: the state would not load back ({err})") from err
    os.replace(tmp, path)


def _require(cond: bool, path, what: str) -> None:
    if not cond:
        raise CheckpointError(f"resume: {path} is not a valid torch_rlprune search checkpoint ({what})")


def load_checkpoint(path) -> dict:
    """Read and check a checkpoint file (``weights_only=True``: tensors and plain data only)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"resume: no checkpoint file at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle opcodes outside the allow-list, truncated files, ...
        raise CheckpointError(f"resume: cannot read {path} as a search checkpoint: "
                              f"{_unreadable_reason(path, err)}") from None
    _require(isinstance(data, dict), path, "not a dict")
    _require(data.get("format") == CHECKPOINT_FORMAT, path,
             f"format {data.get('format')!r}, this library reads {CHECKPOINT_FORMAT}")
    _require(isinstance(data.get("digest"), str) and data["digest"] == content_digest(data), path,
             "its content does not match its digest: the file was changed after it was written")
    for key, kind in (("fingerprint", dict), ("history", list), ("plans", torch.Tensor), ("scores", torch.Tensor),
                      ("best", list)):
        _require(isinstance(data.get(key), kind), path, f"'{key}' missing or not a {kind.__name__}")
    plans, scores = data["plans"], data["scores"]
    _require(plans.dtype == torch.int64 and plans.dim() == 2 and scores.dtype == torch.float64
             and scores.dim() == 1 and len(plans) == len(scores), path, "plans/scores shapes")
    _require(bool(torch.isfinite(scores).all()), path, "a recorded score is not finite")
    _require(bool((plans >= 0).all()), path, "a recorded plan removes a negative count")
    _require(all(isinstance(h, dict) and isinstance(h.get("amounts"), list) and isinstance(h.get("reward"), float)
                 and math.isfinite(h["reward"]) and isinstance(h.get("seconds"), float)
                 for h in data["history"]), path, "history entries")
    for i, h in enumerate(data["history"]):  # replayed into the reported episode_seconds
        _require(math.isfinite(h["seconds"]) and h["seconds"] >= 0, path,
                 f"history[{i}]['seconds'] is {h['seconds']!r}, not a finite non-negative number of seconds")
    agent = data.get("agent")
    _require(agent is None or (isinstance(agent, dict) and isinstance(agent.get("episode"), int)
                               and isinstance(agent.get("state"), dict)), path, "agent snapshot")
    for best in data["best"]:
        _require(isinstance(best, dict) and {"target", "reward", "score", "k"} <= set(best), path, "best plans")
        _require(isinstance(best["score"], float) and isinstance(best["reward"], float)
                 and (best["k"] is None or (math.isfinite(best["score"]) and math.isfinite(best["reward"]))),
                 path, "a best plan's score is not finite")
    data["path"] = path
    return data


def check_checkpoint_path(path, resumed: Optional[dict]) -> Optional[dict]:
    """Before any episode: refuse a ``checkpoint=`` path the search could not write, or a file
    there that is not a search checkpoint (it would be overwritten). Returns the checkpoint
    found there (other than the one being resumed), for the recorder to check it is this search's."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    existing = None
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise CheckpointError(f"checkpoint: {path} exists and is not a regular file")
        if resumed is None or Path(resumed["path"]).resolve() != path.resolve():
            try:
                existing = load_checkpoint(path)
            except CheckpointError:
                raise CheckpointError(f"checkpoint: {path} exists and is not a torch_rlprune search checkpoint; "
                                      "refusing to overwrite it (choose another path)") from None
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CheckpointError(f"checkpoint: cannot create {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CheckpointError(f"checkpoint: cannot write {path}: {ancestor} is not writable")
    return existing


class SearchRecorder:
    """Writes a search's checkpoint every ``every`` episodes and when asked (on interrupt),
    and, when resuming, feeds the recorded scores back and checks the replay against them.

    Attach with :meth:`attach` after the environment exists and before the agent runs.
    """

    def __init__(self, path: Optional[os.PathLike], every: int, fingerprint: dict,
                 resume: Optional[dict] = None, existing: Optional[dict] = None):
        self.path = Path(path) if path is not None else None
        if self.path is not None and self.path.is_dir():
            self.path = self.path / "checkpoint.pt"
        self.every = int(every)
        self.fingerprint = fingerprint
        self.resume = resume
        self.env = self.agent = None
        self._snapshot: Optional[dict] = None
        self._recorded: List[dict] = resume["history"] if resume else []
        self.remeasured = 0   # replayed plans measured again before anything was reported
        if resume is not None:
            self._check_fingerprint(resume)
        if existing is not None:  # the file at ``path`` would be overwritten: only by the same search
            self._check_fingerprint(existing, "refusing to overwrite it with this search (choose another path)")

    # ------------------------------------------------------------------ set-up
    def _check_fingerprint(self, data: dict,
                           advice: str = "resume with the same arguments, or start a new search") -> None:
        saved, now = data["fingerprint"], self.fingerprint
        differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if differ:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in differ[:6])
            what = "resume" if data is self.resume else "checkpoint"
            raise CheckpointError(f"{what}: {data['path']} belongs to a different search ({details}); {advice}")

    def attach(self, env, agent) -> None:
        self.env, self.agent = env, agent
        if self.resume is not None:
            width, plans = env.plan_width, self.resume["plans"]
            if len(plans) and plans.shape[1] != width:
                raise CheckpointError(f"resume: {self.resume['path']} records plans of {plans.shape[1]} layers, "
                                      f"this search has {width}")
            env.replay = {tuple(int(v) for v in row): float(s) for row, s in zip(self.resume["plans"].tolist(),
                                                                                  self.resume["scores"].tolist())}
        env.callbacks.insert(0, self._on_episode)

    # ------------------------------------------------------------------ per episode
    def _on_episode(self, record) -> None:
        i = record.episode
        if i < len(self._recorded):
            recorded = self._recorded[i]
            if states_equal(recorded.get("reward"), float(record.reward)) and \
                    states_equal(recorded.get("amounts"), list(record.amounts)):
                record.seconds = float(recorded.get("seconds", record.seconds))
                snap = self.resume.get("agent")
                if snap and snap.get("episode") == i and not states_equal(agent_state(self.agent), snap["state"]):
                    self._diverged(i, i + 1, "the agent's networks, optimiser or random state")
                return
            self._diverged(i, i, "its plan or reward")
        if self.path is not None and self.every > 0 and (i + 1) % self.every == 0:
            self._snapshot = {"episode": i, "state": agent_state(self.agent)}
            self.save()

    def _diverged(self, episode: int, keep: int, what: str) -> None:
        # From here on this search is its own record: the old history's tail and agent snapshot no
        # longer describe it (the scores of plans stay valid: they depend on the plan only).
        self._recorded = self._recorded[:keep]
        self.resume = {**self.resume, "agent": None}
        warnings.warn(f"resume: replaying episode {episode} did not reproduce {what} as recorded "
                      f"(another torch build or thread count, or a changed model or data?); the search "
                      f"continues from here and may not end where the interrupted one would have",
                      RuntimeWarning, stacklevel=2)

    def verify_replayed(self) -> None:
        """Re-measure what a resumed search would report from the record: every target's kept
        plans (the best, the held-out candidates) and a sample of the other replayed plans. A
        checkpoint is data from outside: a score the model does not reproduce ends the search."""
        env = self.env
        replayed = getattr(env, "replayed_keys", set())
        if self.resume is None or not replayed:
            return
        kept = {tuple(int(v) for v in p.k) for top in env.top_by_target.values() for p in top if p.k is not None}
        kept |= {tuple(int(v) for v in b.k) for b in env.best_by_target.values() if b.k is not None}
        others = sorted(replayed - kept)
        sample = others[::max(1, len(others) // REVERIFY_SAMPLE)][:REVERIFY_SAMPLE]
        for key in sorted(kept & replayed) + sample:
            recorded, measured = env._cache[key], env.remeasure(key)
            self.remeasured += 1
            if not math.isclose(recorded, measured, rel_tol=0.0, abs_tol=_SCORE_TOLERANCE):
                raise CheckpointError(
                    f"resume: {self.resume['path']} records the score {recorded:.6g} for a plan that scores "
                    f"{measured:.6g} on this model and data: the file was changed or belongs to other weights; "
                    "refusing its results (start a new search)")

    # ------------------------------------------------------------------ the file
    def state(self) -> dict:
        env = self.env
        # measurements only: a screening estimate depends on the plans kept when it was made, and the
        # replay makes it again (cheaply) from the same record
        estimated = getattr(env, "estimated_keys", ())
        scored = {key: score for key, score in env._cache.items() if key not in estimated}
        for key, score in env.replay.items():  # recorded, not yet replayed
            scored.setdefault(key, score)
        width = len(next(iter(scored))) if scored else 0
        history = [h.as_dict() for h in env.history]
        if len(history) < len(self._recorded):  # interrupted during the replay: keep the record
            history += self._recorded[len(history):]
        snapshot = self._snapshot
        if snapshot is None and self.resume is not None:
            snapshot = self.resume.get("agent")
        return {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint,
                "plans": torch.tensor(list(scored), dtype=torch.int64).reshape(len(scored), width),
                "scores": torch.tensor(list(scored.values()), dtype=torch.float64),
                "history": history,
                "best": [{"target": key, "reward": float(b.reward), "score": float(b.score),
                          "k": None if b.k is None else torch.from_numpy(np.asarray(b.k, dtype=np.int64).copy())}
                         for key, b in env.best_by_target.items()],
                "agent": snapshot, "torch_rng": torch.get_rng_state()}

    def checked_state(self) -> dict:
        state = self.state()
        state["digest"] = content_digest(state)
        return state

    def save(self) -> Optional[Path]:
        """Write the checkpoint now (no-op without a path or before the search scored anything)."""
        if self.path is None or self.env is None or not (self.env._cache or self.env.replay):
            return None
        _write_atomically(self.checked_state(), self.path)
        return self.path

    def save_after_failure(self) -> None:
        """:meth:`save` on the way out of a failed or interrupted search: a failing save warns
        instead of hiding the error that stopped the search."""
        try:
            self.save()
        except Exception as err:
            warnings.warn(f"rl_prune: could not save the checkpoint {self.path}: {err}", RuntimeWarning)
