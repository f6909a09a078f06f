"""rl_prune(distributed=True) under torchrun: 2 CPU processes (gloo) end with the single-process plan."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from torch_rlprune import rl_prune

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "distributed_prune.py"


def _torchrun(args, tmp_path, nproc=2, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def _example():
    spec = importlib.util.spec_from_file_location("distributed_prune", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("structure,agent,config,screen,target", [("unstructured", "amc", {"warmup": 3}, 0, 0.5),
                                                                  ("channel", "purl", {"warmup": 2}, 0, 0.5),
                                                                  ("unstructured", "amc", {"warmup": 2}, 16, 0.5),
                                                                  ("channel", "n2n", {"rollouts": 2}, 0, 0.3)],
                         ids=["unstructured-amc", "channel-purl", "unstructured-amc-screened", "channel-n2n"])
def test_two_processes_end_with_the_single_process_plan(structure, agent, config, screen, target, data_root,
                                                        tmp_path):
    """With screening (rank 0 screens on its whole calibration set, promoted plans are scored by all).
    N2N at 30% (seed 3): its stage-1 best removes the residual block, so rank 0 scores both
    architectures as returned, refit included, alone."""
    common = ["--model", "test_resnet", "--structure", structure, "--agent", agent, "--episodes", "8",
              "--agent-config", json.dumps(config), "--calibration", "128", "--data-root", str(data_root), "--seed", "3",
              "--screen", str(screen), "--target", str(target)]
    run = _torchrun([EXAMPLE, *common, "--out", tmp_path / "two"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    with torch.random.fork_rng(devices=[]):
        _example().main([*common, "--single", "--out", str(tmp_path / "one")])
    single = json.loads((tmp_path / "one" / "plan_rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"plan_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank ends with the same plan applied
    for key in ("amounts", "score", "sparsity", "baseline_score", "episodes"):
        assert ranks[0][key] == single[key], key
    assert len(set(ranks[0]["amounts"].values())) > 1  # a real plan, not a uniform fallback
    if agent == "n2n":  # rank 0 scores the architectures as returned alone, on the whole search part
        choice = single["metadata"]["architecture_choice"]
        assert len(choice) == 2 and ranks[0]["metadata"]["architecture_choice"] == choice
    if screen:
        assert ranks[0]["metadata"]["screening"] == single["metadata"]["screening"]
        assert single["metadata"]["screening"]["kept_out"] > 0
    assert "processes 2" in run.stdout


SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from torch import nn
    from torch_rlprune import rl_prune
    from torch_rlprune.rewards.scores import FidelityReward
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mode = sys.argv[1]
    x = torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(rank if mode == "different-data" else 0))
    if mode == "bad-resume" and rank == 0:
        open("garbage.pt", "wb").write(b"not a checkpoint")
    if (mode == "rank0-fails" and rank == 0) or (mode == "rank1-fails" and rank == 1):
        calls = {"n": 0}
        original = FidelityReward.partial_sums
        def failing(self, m):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
            return original(self, m)
        FidelityReward.partial_sums = failing
    try:
        rl_prune(model, target=0.5, data=x, agent="random", episodes=8, verbose=False, distributed=True,
                 resume="garbage.pt" if mode == "bad-resume" else None)
    except BaseException as err:
        same = all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and \\
            set(model.state_dict()) == set(before)
        with open(f"rank{rank}.txt", "w") as f:  # separate files: torchrun interleaves the ranks' stdout
            f.write(f"rank {rank}: {type(err).__name__}: {err} | model unchanged: {same}")
        import time  # torchrun stops the other ranks once one exits with an error: let both report first
        deadline = time.time() + 60
        while not all(os.path.exists(f"rank{r}.txt") for r in (0, 1)) and time.time() < deadline:
            time.sleep(0.1)
        sys.exit(7)
""")


@pytest.mark.parametrize("mode", ["different-data", "rank0-fails", "rank1-fails", "bad-resume"])
def test_failures_stop_every_rank_and_leave_the_model_untouched(mode, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    run = _torchrun([script, mode], tmp_path, timeout=180)
    assert run.returncode != 0
    files = [tmp_path / f"rank{r}.txt" for r in (0, 1)]
    assert all(f.exists() for f in files), run.stdout + run.stderr[-2000:]
    lines = [f.read_text() for f in files]
    assert all(line.endswith("model unchanged: True") for line in lines)
    if mode == "different-data":
        assert all("different calibration sets" in line for line in lines)
    elif mode == "rank0-fails":
        assert lines[0].startswith("rank 0: KeyboardInterrupt")
        assert lines[1].startswith("rank 1: RuntimeError") and "failed" in lines[1]
    elif mode == "rank1-fails":
        assert lines[1].startswith("rank 1: KeyboardInterrupt")
        assert lines[0].startswith("rank 0: RuntimeError") and "another rank failed while scoring" in lines[0]
    else:
        assert lines[0].startswith("rank 0: CheckpointError") and "cannot read" in lines[0]
        assert lines[1].startswith("rank 1: RuntimeError") and "while reading the checkpoint" in lines[1]


def test_distributed_needs_torchrun_and_a_splittable_reward(small_cnn_model, cnn_batch, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    before = {k: v.clone() for k, v in small_cnn_model.state_dict().items()}
    with pytest.raises(ValueError, match="torchrun"):
        rl_prune(small_cnn_model, target=0.5, data=cnn_batch, distributed=True, verbose=False)
    with pytest.raises(ValueError, match="reward must be one of"):
        rl_prune(small_cnn_model, target=0.5, data=cnn_batch, distributed=True, verbose=False,
                 reward=lambda m: 1.0)
    with pytest.raises(TypeError, match="distributed must be True or False"):
        rl_prune(small_cnn_model, target=0.5, data=cnn_batch, distributed="yes", verbose=False)
    with pytest.raises(ValueError, match="without distributed=True"):  # blocks are timed on one process
        rl_prune(small_cnn_model, target=0.5, data=cnn_batch, distributed=True, verbose=False, agent="n2n",
                 structure="channel", budget="latency")
    assert all(torch.equal(v, before[k]) for k, v in small_cnn_model.state_dict().items())


LATENCY_SCRIPT = textwrap.dedent("""
    import json, math, os, sys, warnings, numpy as np, torch
    from torch import nn
    from torch_rlprune import rl_prune
    from torch_rlprune.structure.channel.latency import LatencyTable
    rank = int(os.environ["RANK"])
    os.environ["TORCH_RLPRUNE_CACHE"] = f"cache{rank}"
    # timings proportional to the work, and different on each rank (as real ones are): real timings of this
    # small net on a loaded machine sometimes left no plan within 2 points of 20%, and equal fake ones would
    # not show whether the ranks share rank 0's
    def time_grid(self, module, widths, input_shape, generator):
        self.measurements += 1
        positions = math.prod(input_shape) / input_shape[1] if len(input_shape) > 2 else input_shape[0]
        outs = np.asarray(widths[1], dtype=float)
        return np.outer(widths[0], outs * (1 + 0.5 * rank * (outs % 3))) * positions * 1e-9
    measure_and_cache = LatencyTable._measure_and_cache
    def layers_plus_overhead(self, *args):
        measure_and_cache(self, *args)
        self.measured_seconds = 1.25 * sum(layer.calls * layer.dense_seconds for layer in self.layers)
    LatencyTable._time_grid = time_grid
    LatencyTable._model_seconds = lambda self, cached, model, example: 0.0
    LatencyTable._measure_and_cache = layers_plus_overhead
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 128, 3), nn.ReLU(),
                          nn.Conv2d(128, 128, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
    x = torch.randn(64, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = rl_prune(model, target=0.2, data=x, structure="channel", budget="latency", agent="random",
                          episodes=4, verbose=False, distributed=True)
    with open(f"rank{rank}.json", "w") as f:
        json.dump({"counts": result.plan.counts(), "measured": "measured" in result.plan.metadata["latency"],
                   "warned": any("torch.distributed" in str(w.message) for w in caught)}, f)
""")


def test_a_latency_budget_under_torchrun_is_the_same_uncalibrated_prediction_on_every_rank(tmp_path):
    script = tmp_path / "latency_job.py"
    script.write_text(LATENCY_SCRIPT)
    run = _torchrun([script], tmp_path, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["counts"] == ranks[1]["counts"] and ranks[0]["counts"]  # the leader's plan on every rank
    assert all(r["warned"] and not r["measured"] for r in ranks)


CHOICE_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from torch import nn
    from torch_rlprune import rl_prune
    from torch_rlprune.search.engine import PreparedSearch
    rank, mode, seed = int(os.environ["RANK"]), sys.argv[1], int(sys.argv[2])
    if mode == "reversed" and rank == 1:   # this rank's held-out scores rank the candidates the other way round
        score_selection_part = PreparedSearch.score_selection_part
        PreparedSearch.score_selection_part = lambda self: -score_selection_part(self)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 10))
    x = torch.randn(96, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    data = dict(data=x) if mode == "reversed" else dict(example_inputs=x[:1], calibration_samples=96)
    result = rl_prune(model, target=0.7, agent="random", episodes=12, seed=seed, verbose=False, distributed=True,
                      protect_first_last=False, selection=0.5, max_amount=0.99, **data)
    with open(f"rank{rank}.json", "w") as f:
        json.dump({"counts": result.plan.counts(), "selection": result.plan.metadata["selection"]}, f)
""")


@pytest.mark.parametrize("mode,seed", [("reversed", 1), ("no-data", 0)])
def test_rank_0_chooses_the_returned_plan_for_every_rank(mode, seed, tmp_path):
    """Each rank holds the whole held-out part, but scores on it may round differently on different
    machines (a refitted candidate's output distance is continuous): the other ranks take rank 0's choice
    instead of making their own. ``reversed``: rank 1's held-out scores are reversed; it still ends with rank
    0's plan. ``no-data``: only rank 0 knew which plan was the prior (it scores the priors), so only rank 0
    kept the prior when the search's plan did not clearly beat it."""
    script = tmp_path / "choice_job.py"
    script.write_text(CHOICE_SCRIPT)
    run = _torchrun([script, mode, seed], tmp_path, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    selection = ranks[0]["selection"]
    if mode == "reversed":
        held_out = [score for _, score in selection["candidates"]]
        assert len(set(held_out)) > 1   # reversed, these scores would have chosen another candidate
        assert held_out[selection["chosen"]] == max(held_out)
    else:
        assert selection["prior_test"]["samples"] > 0   # the paired test against the prior was made
