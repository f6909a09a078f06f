"""The examples run end to end on real data (tiny budgets here; the closing notes have full runs)."""
import importlib.util
from pathlib import Path


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
