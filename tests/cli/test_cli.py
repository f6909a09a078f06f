"""The ``rlprune`` command line: what each command writes, and what every failure exits with.

Searches run in-process through ``cli.main(argv)`` on timm's ``test_resnet`` (373k parameters,
fast on 28x28 Fashion-MNIST) with 4 episodes and 64 calibration images; two commands run as real
processes (``python -m torch_rlprune`` and the installed ``rlprune`` script).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from torch_rlprune import PruningPlan, list_agents, rl_prune
from torch_rlprune.cli.main import EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_USAGE, main
from torch_rlprune.report import format_summary, load_run
from torch_rlprune.structure.sparse_format import load_sparse

from helpers import bits_equal

MODEL = "test_resnet"
QUICK = ["--episodes", "4", "--calibration", "64", "--test-samples", "200"]
ROOT = Path(__file__).resolve().parents[2]


def run_cli(*argv) -> tuple:
    """``(exit code, stdout, stderr)`` of ``main(argv)``, in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def masks_of(model: torch.nn.Module) -> dict:
    """``{tensor name: mask}`` read straight from the ``*_mask`` buffers."""
    found = {}
    for mname, m in model.named_modules():
        for bname, buf in m.named_buffers(recurse=False):
            if bname.endswith("_mask"):
                found[f"{mname}.{bname[:-5]}" if mname else bname[:-5]] = buf.clone()
    return found


def load_module(path) -> torch.nn.Module:
    return torch.load(path, weights_only=False).eval()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A trained-looking state_dict for test_resnet (seed 123, not the CLI's seed-0 init), saved
    under a "state_dict" key as training scripts often do."""
    import timm

    torch.manual_seed(123)
    model = timm.create_model(MODEL, pretrained=False, in_chans=1, num_classes=10)
    path = tmp_path_factory.mktemp("weights") / "test_resnet_fmnist.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    return path


@pytest.fixture(scope="module")
def unstructured_run(tmp_path_factory, data_root) -> tuple:
    out = tmp_path_factory.mktemp("runs") / "unstructured"
    code, stdout, stderr = run_cli("prune", MODEL, "--target", "0.8", "--data-root", data_root, "--out", out, *QUICK)
    assert code == 0, stderr
    return out, stdout, stderr


@pytest.fixture(scope="module")
def channel_run(tmp_path_factory, data_root, weights) -> tuple:
    out = tmp_path_factory.mktemp("runs") / "channel"
    code, stdout, stderr = run_cli("prune", MODEL, "--target", "0.5", "--structure", "channel", "--compact",
                                   *(["--export", "onnx"] if importlib.util.find_spec("onnxruntime") else []),
                                   "--checkpoint", weights, "--data-root", data_root, "--out", out,
                                   "--finetune-steps", "2", "--quiet", *QUICK)
    assert code == 0, stderr
    return out, stdout, stderr


# --------------------------------------------------------------------------- prune
def test_prune_writes_every_output_and_prints_the_summary(unstructured_run):
    out, stdout, stderr = unstructured_run
    for name in ("plan.json", "model.pt", "state_dict.pt", "summary.txt", "run.json", "report.md", "command.json",
                 "amounts.png", "search.png"):
        assert (out / name).is_file(), f"{name} missing"
    assert not (out / "model_compact.pt").exists()
    record = load_run(out)["records"][0]
    table = format_summary(record)
    assert table in stdout  # the same table result records, printed
    assert (out / "summary.txt").read_text().strip() == table
    assert "untrained" in stderr  # no --checkpoint, --train-steps 0
    assert record["test_accuracy"]["before"] is not None and record["test_accuracy"]["after"] is not None
    # the size gain of unstructured pruning: the weights the masked model computes with, bit for bit
    assert "sparse format: " in stdout and "smaller" in stdout
    masked = load_module(out / "model.pt")
    computed = load_sparse(out / "model_sparse.pt")
    assert not any(k.endswith(("_orig", "_mask")) for k in computed)
    for name, module in masked.named_modules():
        if hasattr(module, "weight_mask"):
            assert bits_equal(computed[f"{name}.weight"], module.weight_orig * module.weight_mask), name


def test_prune_prints_what_result_summary_prints(tmp_path, data_root, monkeypatch):
    import torch_rlprune

    results = []

    @functools.wraps(rl_prune)
    def spy(*a, **kw):
        results.append(rl_prune(*a, **kw))
        return results[-1]

    monkeypatch.setattr(torch_rlprune, "rl_prune", spy)
    code, stdout, stderr = run_cli("prune", MODEL, "--data-root", data_root, "--out", tmp_path / "run", "--quiet",
                                   "--episodes", 3, "--calibration", 32, "--test-samples", 0)
    assert code == 0, stderr
    assert stdout.startswith(results[0].summary() + "\n")  # no test accuracy: exactly result.summary()


def test_prune_plan_amounts_equal_the_masks_of_model_pt(unstructured_run):
    out, _, _ = unstructured_run
    plan = PruningPlan.load(out / "plan.json")
    masks = masks_of(load_module(out / "model.pt"))
    assert set(plan.amounts) == set(masks)
    for name, removed in plan.counts().items():
        assert int((masks[name] == 0).sum()) == removed, name
    total = sum(m.numel() for m in masks.values())
    assert abs(sum(int((m == 0).sum()) for m in masks.values()) / total - 0.8) <= 0.005


def test_prune_state_dict_loads_with_weights_only(unstructured_run):
    out, _, _ = unstructured_run
    state = torch.load(out / "state_dict.pt", weights_only=True)
    masks = masks_of(load_module(out / "model.pt"))
    for name, mask in masks.items():
        assert torch.equal(state[f"{name}_mask"], mask)
        assert f"{name}_orig" in state


def test_prune_channel_compact_is_smaller_and_computes_the_same(channel_run, fmnist_test_tensors):
    out, _, _ = channel_run
    masked, small = load_module(out / "model.pt"), load_module(out / "model_compact.pt")
    assert masks_of(masked) and not masks_of(small)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in masked.parameters())
    x = fmnist_test_tensors[0][:128]
    with torch.no_grad():
        assert torch.allclose(small(x), masked(x), atol=1e-4)
    run = load_run(out)
    compacted = run["compact"]["plan"]
    assert abs(compacted["macs_after"] / compacted["macs_dense"] - 0.5) <= 0.02  # --target 0.5 of the MACs
    record = run["records"][0]
    assert set(record["test_accuracy"]) == {"before", "after", "after_finetune"}
    if importlib.util.find_spec("onnxruntime"):  # --export onnx: written, checked, timed against the unpruned
        _, stdout, _ = channel_run
        assert (out / "model_compact.onnx").is_file()
        assert f"exported {out / 'model_compact.onnx'} (onnxruntime" in stdout and "onnxruntime batch 1:" in stdout


def test_prune_with_a_latency_budget_measures_it_on_the_runtime_asked_for(tmp_path, data_root, weights):
    out = tmp_path / "latency"
    code, stdout, stderr = run_cli("prune", MODEL, "--target", "0.2", "--structure", "channel", "--budget", "latency",
                                   "--latency-batch", "2", "--latency-threads", "1", "--checkpoint", weights,
                                   "--data-root", data_root, "--out", out, "--quiet", "--agent", "random", *QUICK)
    assert code == 0, stderr
    assert "measured after compact on eager" in stdout and "batch 2, 1 threads" in stdout
    measured = json.loads((out / "plan.json").read_text())["metadata"]["latency"]["measured"]
    assert measured["spec"] == {"batch": 2, "threads": 1, "runtime": "eager", "tolerance": 0.02, "rounds": 4,
                                "repeats": 10, "blocks": 3, "max_blocks": 12}
    command = json.loads((out / "command.json").read_text())
    assert json.dumps(command).count('"latency_batch": 2') == 1


def test_apply_plan_to_a_fresh_model_gives_the_same_masks(channel_run, unstructured_run, weights, tmp_path):
    for (out, _, _), extra in ((channel_run, ["--checkpoint", weights]), (unstructured_run, [])):
        target = tmp_path / f"{out.name}_applied.pt"
        code, stdout, stderr = run_cli("apply", out / "plan.json", MODEL, "--data", "fashion-mnist", "--out", target,
                                       *extra)
        assert code == 0, stderr
        assert "applied" in stdout and str(target) in stdout
        assert "re-estimate them" in stderr   # the plan was scored with re-estimated BatchNorm statistics
        # a channel search refits layers after masking (repair="lstsq"); a plan file carries no weights
        assert ("LeastSquaresRefit" in stderr) == (out.name == "channel")
        applied, searched = masks_of(load_module(target)), masks_of(load_module(out / "model.pt"))
        assert applied.keys() == searched.keys()
        assert all(torch.equal(applied[k], searched[k]) for k in applied), out.name
    # the README's workflow: the plan on a fresh model, then the pruned state_dict loads into it
    fresh = load_module(tmp_path / "unstructured_applied.pt")
    fresh.load_state_dict(torch.load(unstructured_run[0] / "state_dict.pt", weights_only=True))


def test_compact_command(channel_run, tmp_path, fmnist_test_tensors):
    out, _, _ = channel_run
    before = digest(out / "model.pt")
    target = tmp_path / "small.pt"
    code, stdout, stderr = run_cli("compact", out / "model.pt", "--input-shape", 1, 28, 28, "--out", target)
    assert code == 0, stderr
    assert "MACs" in stdout and "params" in stdout and "trust" in stderr  # the pickle note
    masked, small = load_module(out / "model.pt"), load_module(target)
    x = fmnist_test_tensors[0][:64]
    with torch.no_grad():
        assert torch.allclose(small(x), masked(x), atol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in masked.parameters())
    assert digest(out / "model.pt") == before
    # without --input-shape: the shapes recorded when it was pruned, never a guess
    code, stdout, stderr = run_cli("compact", out / "model.pt", "--out", tmp_path / "auto.pt")
    assert code == 0, stderr
    assert "(input 1 x 28 x 28)" in stdout
    with torch.no_grad():
        assert torch.allclose(load_module(tmp_path / "auto.pt")(x), small(x), atol=1e-5)
    unrecorded = load_module(out / "model.pt")
    del unrecorded._rlprune_example
    torch.save(unrecorded, tmp_path / "old.pt")
    code, _, stderr = run_cli("compact", tmp_path / "old.pt", "--out", tmp_path / "old_small.pt")
    assert code == EXIT_USAGE and "--input-shape C H W is needed" in stderr and "records no input shape" in stderr
    # never over an existing file without --force, never over the input
    assert run_cli("compact", out / "model.pt", "--input-shape", 1, 28, 28, "--out", target)[0] == EXIT_USAGE
    assert run_cli("compact", out / "model.pt", "--out", out / "model.pt", "--force")[0] == EXIT_USAGE
    assert digest(out / "model.pt") == before


def test_report_regenerates_report_md(unstructured_run, channel_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(unstructured_run[0], run)
    for name in ("report.md", "amounts.png", "search.png"):
        (run / name).unlink()
    code, stdout, stderr = run_cli("report", run)
    assert code == 0, stderr
    assert (run / "report.md").is_file() and (run / "amounts.png").is_file() and (run / "search.png").is_file()
    both = tmp_path / "both"
    code, _, stderr = run_cli("report", run, channel_run[0], "--out", both)
    assert code == 0, stderr
    text = (both / "report.md").read_text()
    assert "unstructured" in text and "channel" in text


@pytest.mark.parametrize("content", ['{"version": 1, "records": "all"}', '{"version": 1, "records": [{"agent": 1}]}',
                                     "{", '{"version": 2, "records": []}'])
def test_report_refuses_a_hostile_run_file(tmp_path, content):
    (tmp_path / "run.json").write_text(content)
    code, _, stderr = run_cli("report", tmp_path)
    assert code == EXIT_INPUT and "run.json" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "report.md").exists()


def test_multi_target_writes_one_plan_and_model_per_target(tmp_path, data_root):
    out = tmp_path / "multi"
    code, stdout, stderr = run_cli("prune", MODEL, "--target", "0.5", "0.7", "--agent", "cacp", "--data-root",
                                   data_root, "--out", out, "--quiet", *QUICK)
    assert code == 0, stderr
    for t in ("0.5", "0.7"):
        plan = PruningPlan.load(out / f"plan_{t}.json")
        assert plan.target == float(t)
        masks = masks_of(load_module(out / f"model_{t}.pt"))
        assert {k: int((m == 0).sum()) for k, m in masks.items()} == plan.counts()
        torch.load(out / f"state_dict_{t}.pt", weights_only=True)
    assert len(load_run(out)["records"]) == 2
    assert stdout.count("rl_prune: agent=cacp") == 2


def test_prune_on_an_image_folder(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("val", 4)):
        for label in ("cats", "dogs"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "run"
    code, _, stderr = run_cli("prune", MODEL, "--data", tmp_path / "images", "--image-size", 32, "--target", 0.5,
                              "--episodes", 2, "--calibration", 8, "--test-samples", 8, "--out", out, "--quiet")
    assert code == 0, stderr
    model = load_module(out / "model.pt")
    assert model.conv1[0].in_channels == 3 and model.get_classifier().out_features == 2  # RGB, 2 classes
    record = load_run(out)["records"][0]
    assert record["test_accuracy"]["after"] is not None  # from val/
    assert record["plan"]["metadata"]["calibration_samples"] == 8


# --------------------------------------------------------------------------- agents, help, processes
def test_agents_lists_every_registered_agent():
    code, stdout, _ = run_cli("agents")
    assert code == 0
    listed = [line.split()[0] for line in stdout.splitlines()[1:]]
    assert listed == list_agents()
    assert "AMC" in stdout and "300" in stdout


@pytest.mark.parametrize("command", [[], ["prune"], ["apply"], ["compact"], ["report"], ["agents"]])
def test_help_has_examples_and_exit_codes(command):
    code, stdout, _ = run_cli(*command, "--help")
    assert code == 0
    assert "examples:" in stdout and "exit codes:" in stdout and "130" in stdout


def test_module_and_console_script_run_as_processes(tmp_path):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, "-m", "torch_rlprune", "agents"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in list_agents())
    script = Path(sys.executable).parent / "rlprune"
    if not script.is_file():
        pytest.skip("the rlprune console script is not installed (pip install -e .)")
    done = subprocess.run([str(script), "prune", MODEL, "--structure", "chanel"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == EXIT_USAGE
    assert "rlprune: error: --structure must be one of unstructured, channel, got 'chanel'" in done.stderr
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- failures
@pytest.mark.parametrize("argv, code, words", [
    (["--structure", "chanel"], EXIT_USAGE, ["--structure", "unstructured, channel", "'chanel'"]),
    (["--target", "1.5"], EXIT_USAGE, ["--target", "(0, 1)", "1.5"]),
    (["--target", "0.5", "nan"], EXIT_USAGE, ["--target", "nan"]),
    (["--agent", "nope"], EXIT_USAGE, ["--agent", "'nope'"] + list_agents()),
    (["--reward", "loss"], EXIT_USAGE, ["--reward", "fidelity, accuracy"]),
    (["--budget", "latency"], EXIT_USAGE, ["--budget", "params, macs", "unstructured"]),
    (["--compact"], EXIT_USAGE, ["--compact", "--structure channel"]),
    (["--repair", "ls"], EXIT_USAGE, ["--repair", "lstsq, auto, none", "'ls'"]),
    (["--structure", "channel", "--compact", "--export", "tflite"], EXIT_USAGE, ["--export", "onnx, pt2, pte", "'tflite'"]),
    (["--export", "onnx"], EXIT_USAGE, ["--export needs --compact"]),
    (["--agent", "n2n"], EXIT_USAGE, ["--agent n2n", "--structure channel"]),
    (["--data", "no-such-dir"], EXIT_USAGE, ["--data", "fashion-mnist, mnist", "no-such-dir"]),
    (["--latency-batch", "4"], EXIT_USAGE, ["--latency-batch", "--budget latency"]),
    (["--structure", "channel", "--budget", "latency", "--latency-runtime", "tflite"], EXIT_USAGE,
     ["--latency-runtime", "eager, onnxruntime", "'tflite'"]),
    (["--structure", "channel", "--budget", "latency", "--latency-threads", "0"], EXIT_USAGE,
     ["--latency-threads", "positive"]),
    (["--episodes", "0"], EXIT_USAGE, ["--episodes", "positive"]),
    (["--episodes", "abc"], EXIT_USAGE, ["--episodes", "abc"]),  # argparse's own
    (["--seed", "-1"], EXIT_USAGE, ["--seed must be an integer >= 0", "-1"]),
    (["--structure", "channel", "--importance", "activation"], EXIT_USAGE,
     ["--importance must be None or 'magnitude'", "--structure channel", "'activation'"]),
])
def test_bad_flag_values_exit_2_naming_the_flag(tmp_path, argv, code, words):
    out = tmp_path / "out"
    got, stdout, stderr = run_cli("prune", MODEL, "--out", out, *argv)
    assert got == code
    assert all(w in stderr for w in words), stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists()


def test_unknown_timm_name_lists_close_matches(tmp_path):
    code, _, stderr = run_cli("prune", "resnt18", "--out", tmp_path / "out")
    assert code == EXIT_USAGE
    assert "rlprune: error:" in stderr and "'resnt18'" in stderr and "resnet18" in stderr
    assert not (tmp_path / "out").exists()


def test_model_file_that_is_not_a_module_exits_3(tmp_path, data_root):
    path = tmp_path / "weights_only.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    before = digest(path)
    code, _, stderr = run_cli("prune", path, "--data-root", data_root, "--out", tmp_path / "out", *QUICK)
    assert code == EXIT_INPUT
    assert str(path) in stderr and "not an nn.Module" in stderr and "--checkpoint" in stderr
    assert digest(path) == before and not (tmp_path / "out").exists()
    code, _, stderr = run_cli("prune", tmp_path / "missing.pt", "--out", tmp_path / "out")
    assert code == EXIT_INPUT and "missing.pt" in stderr


def test_checkpoint_that_does_not_fit_exits_3(tmp_path, data_root, unstructured_run):
    state = unstructured_run[0] / "state_dict.pt"  # weight_orig/weight_mask: not a plain state_dict
    code, _, stderr = run_cli("prune", MODEL, "--checkpoint", state, "--data-root", data_root,
                              "--out", tmp_path / "out", *QUICK)
    assert code == EXIT_INPUT
    assert f"--checkpoint {state}" in stderr and "unexpected key" in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, words", [
    (None, ["no such file"]),
    ('{"amounts": "all", "numels": {}, "target": 0.5, "sparsity": 0.5}', ["amounts"]),
    ('{"amounts": {"fc.weight": 2.0}, "numels": {"fc.weight": 10}, "target": 0.5, "sparsity": 0.5}',
     ["fc.weight", "[0, 1]"]),
    ('{"amounts": {"fc.weight": 0.5}, "numels": {"fc.weight": 10}, "target": "high", "sparsity": 0.5}',
     ["target"]),
    ('[1, 2, 3]', ["JSON object"]),
    ("not json at all", ["not a valid JSON plan"]),
    ("[" * 100000, ["not a valid JSON plan"]),
    ('{"amounts": {"nope.weight": 0.5}, "numels": {"nope.weight": 10}, "target": 0.5, "sparsity": 0.5}',
     ["does not fit", "nope"]),
])
def test_missing_or_hostile_plan_file_exits_3(tmp_path, content, words):
    plan = tmp_path / "plan.json"
    if content is not None:
        plan.write_text(content)
    out = tmp_path / "applied.pt"
    code, stdout, stderr = run_cli("apply", plan, MODEL, "--in-chans", 1, "--num-classes", 10, "--out", out)
    assert code == EXIT_INPUT
    assert str(plan) in stderr and all(w in stderr for w in words), stderr
    assert "Traceback" not in stderr and not out.exists()


def test_apply_refuses_a_negative_seed_as_prune_does(tmp_path):
    out = tmp_path / "applied.pt"
    code, stdout, stderr = run_cli("apply", tmp_path / "plan.json", MODEL, "--in-chans", 1, "--num-classes", 10,
                                   "--seed", -1, "--out", out)
    assert code == EXIT_USAGE and "--seed must be >= 0, got -1" in stderr, stderr
    assert "Traceback" not in stderr and stdout == "" and not out.exists()


def test_library_failure_exits_4_with_its_message(tmp_path, data_root, monkeypatch):
    import torch_rlprune

    def broken(*args, **kwargs):
        raise RuntimeError("the agent finished without a plan")

    monkeypatch.setattr(torch_rlprune, "rl_prune", broken)
    code, _, stderr = run_cli("prune", MODEL, "--data-root", data_root, "--out", tmp_path / "out", *QUICK)
    assert code == EXIT_FAILED
    assert "rlprune: error: the agent finished without a plan" in stderr and "Traceback" not in stderr
    code, _, stderr = run_cli("prune", MODEL, "--data-root", data_root, "--out", tmp_path / "out2", "--debug", *QUICK)
    assert code == EXIT_FAILED and "Traceback" in stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()  # nothing to resume: no run dir


def _interrupt_after(monkeypatch, episodes: int) -> None:
    """Ctrl-C at the start of episode ``episodes`` (what the search calls between episodes)."""
    from torch_rlprune.env.layerwise import LayerwisePruningEnv

    reset, fired = LayerwisePruningEnv.reset, []

    def interrupting_reset(self):
        if len(self.history) == episodes and not fired:
            fired.append(True)
            raise KeyboardInterrupt
        return reset(self)

    monkeypatch.setattr(LayerwisePruningEnv, "reset", interrupting_reset)


def test_interrupt_exits_130_and_says_how_to_resume(tmp_path, data_root, monkeypatch):
    out = tmp_path / "run"
    _interrupt_after(monkeypatch, 2)
    code, stdout, stderr = run_cli("prune", MODEL, "--data-root", data_root, "--out", out, "--quiet",
                                   "--checkpoint-every", 1, *QUICK)
    assert code == EXIT_INTERRUPTED
    assert f"rlprune prune --resume {out}" in stderr and "Traceback" not in stderr
    assert (out / "command.json").is_file() and not (out / "plan.json").exists()
    assert (out / "checkpoint.pt").is_file()
    # the run directory is refused as a new --out, and --resume takes no other option
    assert run_cli("prune", MODEL, "--out", out)[0] == EXIT_USAGE
    code, _, stderr = run_cli("prune", "--resume", out, "--target", "0.5")
    assert code == EXIT_USAGE and "--target" in stderr and "--quiet" in stderr


def test_resume_continues_to_the_uninterrupted_result(tmp_path, data_root, monkeypatch):
    import torch_rlprune

    # --train-steps: the resumed run rebuilds and retrains the model; it must get the same weights
    args = ["--target", "0.7", "--episodes", "8", "--checkpoint-every", "2", "--calibration", "64",
            "--test-samples", "0", "--train-steps", "5", "--data-root", data_root, "--quiet"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_cli("prune", MODEL, "--out", straight, *args)[0] == 0
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 5)
        assert run_cli("prune", MODEL, "--out", stopped, *args)[0] == EXIT_INTERRUPTED
    calls = []

    @functools.wraps(rl_prune)  # keeps the signature the CLI inspects for resume=
    def spy(*a, **kw):
        calls.append(kw)
        return rl_prune(*a, **kw)

    monkeypatch.setattr(torch_rlprune, "rl_prune", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, stdout, stderr = run_cli("prune", "--resume", stopped, "--quiet")
    assert code == 0, stderr
    assert not [w for w in caught if "resume" in str(w.message)]  # the replay reproduced every episode
    assert Path(calls[0]["resume"]) == stopped / "checkpoint.pt"
    assert PruningPlan.load(stopped / "plan.json").amounts == PruningPlan.load(straight / "plan.json").amounts
    rewards = [[h["reward"] for h in load_run(d)["records"][0]["history"]] for d in (stopped, straight)]
    assert rewards[0] == rewards[1] and len(rewards[0]) == 8
    assert run_cli("prune", "--resume", stopped)[0] == EXIT_USAGE  # finished: nothing to resume


@pytest.mark.parametrize("content", ["{", '{"version": 1, "model": "test_resnet", "options": {"target": "0.5"}}',
                                     '{"version": 9, "model": "test_resnet", "options": {}}'])
def test_resume_refuses_a_hostile_command_file(tmp_path, content):
    (tmp_path / "command.json").write_text(content)
    code, _, stderr = run_cli("prune", "--resume", tmp_path)
    assert code == EXIT_INPUT and "command.json" in stderr and "Traceback" not in stderr


def test_resume_refuses_wrong_option_types_in_command_file(tmp_path, unstructured_run):
    command = json.loads((unstructured_run[0] / "command.json").read_text())
    command["options"]["episodes"] = "4; rm -rf /"
    (tmp_path / "command.json").write_text(json.dumps(command))
    code, _, stderr = run_cli("prune", "--resume", tmp_path)
    assert code == EXIT_INPUT and "episodes" in stderr
    command["options"]["episodes"], command["options"]["structure"] = 4, "chanel"
    (tmp_path / "command.json").write_text(json.dumps(command))
    code, _, stderr = run_cli("prune", "--resume", tmp_path)
    assert code == EXIT_INPUT and "--structure must be one of unstructured, channel" in stderr


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/torch_rlprune_cli_pwned"),))


def test_resume_never_unpickles_a_model_file_named_only_by_the_run_directory(tmp_path, unstructured_run):
    """The audit's case: command.json of a run directory points MODEL at a hostile pickle."""
    marker = Path("/tmp/torch_rlprune_cli_pwned")
    marker.unlink(missing_ok=True)
    hostile = tmp_path / "model.pt"
    torch.save(_Payload(), hostile)
    run = tmp_path / "run"
    run.mkdir()
    command = json.loads((unstructured_run[0] / "command.json").read_text())
    command["model"] = str(hostile)
    (run / "command.json").write_text(json.dumps(command))
    code, _, stderr = run_cli("prune", "--resume", run)
    assert code == EXIT_USAGE and "pickles" in stderr and f"prune {hostile} --resume" in stderr
    assert not marker.exists()


def test_resume_without_a_search_checkpoint_says_it_starts_over(tmp_path, data_root):
    args = ["--target", "0.5", "--episodes", "2", "--calibration", "64", "--test-samples", "0", "--data-root",
            data_root, "--quiet"]
    run = tmp_path / "run"
    assert run_cli("prune", MODEL, "--out", run, *args)[0] == 0
    (run / "run.json").unlink()
    (run / "checkpoint.pt").unlink()
    code, _, stderr = run_cli("prune", "--resume", run, "--quiet")
    assert code == 0, stderr
    assert "starts over" in stderr


def test_out_never_holds_the_input_model(tmp_path, unstructured_run):
    run = tmp_path / "run"
    shutil.copytree(unstructured_run[0], run)
    before = digest(run / "model.pt")
    code, _, stderr = run_cli("prune", run / "model.pt", "--out", run, "--force")
    assert code == EXIT_USAGE and "MODEL" in stderr
    assert digest(run / "model.pt") == before


def test_distributed_needs_an_explicit_out(tmp_path):
    code, _, stderr = run_cli("prune", MODEL, "--distributed")
    assert code == EXIT_USAGE and "--distributed" in stderr


@pytest.mark.parametrize("argv, usage, hint", [
    (["prune", MODEL, "--targett", "0.5"], "usage: rlprune prune", "--targett (did you mean --target"),
    (["compact", "model.pt", "--outt", "x.pt"], "usage: rlprune compact", "did you mean --out"),
])
def test_a_misspelled_flag_prints_its_subcommands_usage_with_the_closest_flag(argv, usage, hint):
    code, _, stderr = run_cli(*argv)
    assert code == EXIT_USAGE
    assert stderr.startswith(usage) and hint in stderr
    assert "COMMAND ..." not in stderr  # not the top-level usage


def test_training_and_fine_tuning_show_progress_unless_quiet(tmp_path, data_root):
    args = ["prune", MODEL, "--target", "0.5", "--agent", "prior", "--calibration", "64", "--test-samples", "0",
            "--train-steps", "3", "--finetune-steps", "2", "--data-root", data_root]
    code, _, stderr = run_cli(*args, "--out", tmp_path / "loud")
    assert code == 0
    assert re.search(r"training: .*/3", stderr) and re.search(r"fine-tuning: .*/2", stderr)
    code, _, stderr = run_cli(*args, "--out", tmp_path / "quiet", "--quiet")
    assert code == 0 and "training:" not in stderr and "fine-tuning:" not in stderr


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_console_script_sets_openmps_wait_policy_before_torch_loads(given, expected):
    import importlib.metadata

    (script,) = importlib.metadata.entry_points(group="console_scripts", name="rlprune")
    assert script.value == "torch_rlprune_console:main"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = ("import os, sys, torch_rlprune_console as console\n"
            "assert 'torch' not in sys.modules, 'torch loaded before the policy was set'\n"
            "sys.argv = ['rlprune', 'agents']\n"
            "assert console.main() == 0\n"
            "print('policy', os.environ['OMP_WAIT_POLICY'])\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "amc" in done.stdout and f"policy {expected}" in done.stdout
    # python -m torch_rlprune: torch is loaded before it runs, so it restarts itself with the policy set
    done = subprocess.run([sys.executable, "-m", "torch_rlprune", "agents"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "amc" in done.stdout


def test_patience_and_time_budget_reach_the_search_and_its_plan(tmp_path, data_root):
    out = tmp_path / "stopped"
    code, _, stderr = run_cli("prune", MODEL, "--target", "0.5", "--agent", "random", "--episodes", "30",
                              "--time-budget", "1e-9", "--patience", "5", "--data-root", data_root, "--out", out,
                              "--quiet", *QUICK[2:])
    assert code == 0, stderr
    plan = PruningPlan.load(out / "plan.json")
    assert plan.metadata["stopped"] == {"reason": "time_budget", "episodes": 1, "of": 30}
    assert json.loads((out / "command.json").read_text())["options"]["time_budget"] == 1e-9
