"""The examples run end to end on real data (tiny budgets here; the closing notes have full runs)."""
import importlib.util
from pathlib import Path

import torch

from helpers import needs_mnist

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lstm_example_prunes_weights_and_hidden_units(data_root, tmp_path):
    needs_mnist(data_root)
    example = load("lstm_sequential_mnist")
    out = example.main(["--epochs", "0.05", "--episodes", "6", "--calibration", "128", "--quiet",
                        "--agents", "amc", "cacp", "--seeds", "0", "--unstructured-targets", "0.8", "0.9",
                        "--data", str(data_root), "--checkpoints", str(tmp_path)])
    weights = {(r["method"], r["target"]): r for r in out["unstructured"]}
    assert set(weights) == {(m, t) for m in ("amc", "cacp", "prior", "uniform per-layer L1", "global magnitude",
                                             "LAMP", example.LAMP_REFITTED) for t in (0.8, 0.9)}
    for target in (0.8, 0.9):   # the refit changes kept values only: LAMP's plan, closer to the unpruned model
        assert weights[example.LAMP_REFITTED, target]["removed"] == weights["LAMP", target]["removed"]
    # every method removes the target of the same matrices (the search's), the one-liners included
    assert all(abs(r["removed"] - r["target"]) <= 0.005 for r in weights.values()), weights
    units = {r["method"].split()[0].split("(")[0]: r for r in out["unit_rows"]}
    assert abs(units["rl_prune"]["removed"] - 0.5) <= 0.02, "MACs removed, measured after compact"
    assert abs(units["uniform"]["removed"] - 0.5) <= 0.02, "the baseline removes as much"
    for method, row in units.items():
        assert min(row["sizes"][:2]) < 128, f"{method}: an LSTM lost hidden units physically"
    assert (tmp_path / "rowlstm_mnist_e0.05.pt").is_file()


def test_the_lstm_acceptance_table_applies_the_rule_to_the_means():
    example = load("lstm_sequential_mnist")

    def row(method, target, acc, seed=None):
        return {"method": method, "target": target, "test_acc": acc, "seed": seed}

    rows = [row("global magnitude", 0.9, 0.40), row("LAMP", 0.9, 0.50), row(example.LAMP_REFITTED, 0.9, 0.97),
            row("amc", 0.9, 0.96, 0), row("amc", 0.9, 0.94, 1), row("purl", 0.9, 0.51, 0), row("random", 0.9, 0.95, 0)]
    table = example.acceptance_markdown(rows, ["amc", "purl", "random"])
    line = next(l for l in table.splitlines() if l.startswith("| 90%"))
    assert "50.00%" in line and "amc +45.0" in line and "purl +1.0" in line
    assert "| yes |" in line and "amc +0.00, purl -44.00" in line and "amc -2.00" in line
    rows[-2] = row("purl", 0.9, 0.49, 0)   # 1 pp under the bar: one agent fails "all >= bar - 0.5"
    assert "| NO |" in example.acceptance_markdown(rows, ["amc", "purl"])


def test_the_demo_model_starts_from_the_same_weights_whoever_trains_it(tmp_path):
    """The demo and the benchmarks share one cached checkpoint: an unseeded caller used to train another
    model into it, and the demo's table then depended on which ran first. The global RNG is left alone."""
    demo = load("demo")
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    models = []
    for state in (1, 2):
        torch.manual_seed(state)
        models.append(demo.trained_resnet18(x, y, 0.0, tmp_path / f"model{state}.pt"))
        untouched = torch.rand(3, generator=torch.Generator().manual_seed(state))
        assert torch.equal(torch.rand(3), untouched)   # the global RNG as the caller left it
    first, second = (m.state_dict() for m in models)
    assert all(torch.equal(first[k], second[k]) for k in first)
    loaded = demo.trained_resnet18(x, y, 0.0, tmp_path / "model1.pt", seed=5)   # the cache, not a new model
    assert all(torch.equal(first[k], v) for k, v in loaded.state_dict().items())
    other = demo.trained_resnet18(x, y, 0.0, tmp_path / "seed5.pt", seed=5)
    assert not torch.equal(other.state_dict()["conv1.weight"], first["conv1.weight"])
