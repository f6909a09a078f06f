"""Run records, the summary table, plots, run.json and report.md (torch_rlprune.report)."""
import json
import re
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers import fmnist_cnn, inputs, seeded, weight_masks
from torch_rlprune import rl_prune
from torch_rlprune.structure.channel import count_macs_params
from torch_rlprune.report import (RUN_FILE, format_summary, load_run, plot_amounts, plot_search, save_run, search_stats,
                                  summarize, write_report)

X = inputs((32, 1, 28, 28))
FAST = dict(data=X, agent="random", episodes=3, seed=0, verbose=False)
CACP = dict(data=X, agent="cacp", episodes=6, agent_config={"warmup": 2}, seed=0, verbose=False)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fresh():
    return seeded(fmnist_cnn, 0)


def dense_counts(example):
    """What an unpruned model of the same architecture counts: built anew, never copied."""
    return count_macs_params(fresh(), example)


def png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def images(report: Path):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())


@pytest.fixture(scope="module")
def unstructured():
    model = fresh()
    return model, rl_prune(model, 0.6, **FAST)


@pytest.fixture(scope="module")
def channel():
    model = fresh()
    return model, rl_prune(model, 0.5, structure="channel", **FAST)


@pytest.fixture(scope="module")
def multi():
    return rl_prune(fresh(), [0.3, 0.5, 0.7], **CACP)


# --------------------------------------------------------------------------- summarize
@pytest.mark.parametrize("case", ["unstructured", "channel"])
def test_record_is_json_and_matches_the_plan_and_the_counter(case, request):
    model, result = request.getfixturevalue(case)
    record = summarize(result, test_accuracy={"before": 0.9, "after": 0.85})
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    plan = result.plan
    assert [lay["name"] for lay in record["layers"]] == list(plan.amounts)
    assert {lay["name"]: lay["amount"] for lay in record["layers"]} == plan.amounts
    assert {lay["name"]: lay["units"] for lay in record["layers"]} == plan.numels
    assert [lay["kind"] for lay in record["layers"]] == [lay.kind for lay in result.layers]
    assert record["plan"] == json.loads(json.dumps(plan.to_dict()))
    assert record["sparsity"] == result.sparsity and record["target"] == plan.target
    assert len(record["history"]) == len(result.history) == record["episodes"]
    assert record["test_accuracy"] == {"before": 0.9, "after": 0.85}

    after = count_macs_params(model, result.example_inputs)
    before = dense_counts(result.example_inputs)
    assert (record["macs"]["after"], record["params"]["after"]) == after
    assert (record["macs"]["before"], record["params"]["before"]) == before
    buffers = dict(model.named_buffers())
    kept = sum(int(buffers[n[:-len("_orig")] + "_mask"].sum()) if n.endswith("_orig") else p.numel()
               for n, p in model.named_parameters())
    assert record["params"]["nonzero"] == kept
    if case == "channel":  # whole channels go: MACs and params fall, by the fraction the search reports
        assert after[0] < before[0] and after[1] < before[1]
        assert 1 - after[0] / before[0] == pytest.approx(result.sparsity, abs=1e-9)
    else:  # zeros inside kernels: only whole dead rows/columns reduce the counts; nonzero entries fall
        assert after[0] <= before[0] and after[1] <= before[1]
        pruned = sum(int((m == 0).sum()) for m in weight_masks(model).values())
        assert before[1] - record["params"]["nonzero"] == pruned
        assert pruned / sum(plan.numels.values()) == pytest.approx(result.sparsity, abs=1e-12)


def masked_state(model):
    """Every masked tensor: (the attribute the prune hook computed, its mask object)."""
    return {(n, p[:-len("_orig")]): (getattr(m, p[:-len("_orig")]).clone(), m._buffers[p[:-len("_orig")] + "_mask"])
            for n, m in model.named_modules() for p in m._parameters if p.endswith("_orig")}


@pytest.mark.parametrize("carried", [True, False])
def test_counting_leaves_the_model_exactly_as_it_was(carried, channel, multi):
    model, result = channel
    if not carried:  # only the dense count runs: nothing recomputes the masked weights after it
        model = fresh()
        multi.apply(model, target=0.5)
        result = replace(multi[0.3], model=model)
    with torch.no_grad():
        out = model(X[:4])
    state = masked_state(model)
    assert state
    record = summarize(result)
    assert (record["macs"]["after"] is None) != carried
    after = masked_state(model)
    assert after.keys() == state.keys()
    for key, (tensor, mask) in state.items():
        assert after[key][1] is mask, key
        assert torch.equal(after[key][0], tensor), key  # still the masked tensor, not the dense one
    with torch.no_grad():
        assert torch.equal(model(X[:4]), out)


def test_count_false_and_members_of_a_multi_target_search(multi):
    assert summarize(multi[0.5], count=False)["macs"] is None
    before = dense_counts(multi[0.5].example_inputs)
    records = {t: summarize(r) for t, r in multi.items()}
    for record in records.values():  # the model is left unpruned: no plan's "after" to count
        assert record["macs"] == {"before": before[0], "after": None}
        assert record["params"]["before"] == before[1] and record["params"]["after"] is None
    model = fresh()
    multi.apply(model, target=0.5)
    for t, r in multi.items():
        record = summarize(replace(r, model=model))  # a model that carries the 0.5 plan only
        expected = count_macs_params(model, r.example_inputs)[0] if t == 0.5 else None
        assert record["macs"]["after"] == expected, t


def test_a_compacted_model_reports_no_counts_it_cannot_know():
    model = fresh()
    result = rl_prune(model, 0.5, structure="channel", **FAST)
    result.compact()  # now physically smaller: the model no longer shows what "before" was
    record = summarize(result)
    assert record["macs"] is None and record["params"] is None


def test_a_model_the_counter_cannot_run_warns_and_reports_no_counts(unstructured):
    _, result = unstructured
    with pytest.warns(UserWarning, match="MACs/params not counted"):
        record = summarize(replace(result, example_inputs=torch.randn(2, 3, 28, 28)))
    assert record["macs"] is None and record["params"] is None and record["layers"]


def test_summarize_takes_one_result(multi):
    with pytest.raises(TypeError, match=r"summarize\(r\) for r in result.values\(\)"):
        summarize(multi)
    with pytest.raises(TypeError, match="test_accuracy"):
        summarize(multi[0.3], test_accuracy=[0.9])


# --------------------------------------------------------------------------- the table
@pytest.mark.parametrize("case", ["unstructured", "channel"])
def test_format_summary_lists_every_layer_and_the_numbers(case, request):
    _, result = request.getfixturevalue(case)
    record = summarize(result, test_accuracy={"before": 0.9, "after": 0.85, "after_finetune": 0.875})
    text = format_summary(record)
    lines = text.splitlines()
    for lay in record["layers"]:
        row = next(line for line in lines if line.split()[0] == lay["name"])
        assert row.split()[1:] == [lay["kind"], str(lay["units"]), f"{lay['amount']:.1%}"]
    assert f"achieved {record['sparsity']:.4f}" in text and f"target {result.plan.target:.4f}" in text
    assert f"agent={record['agent']}" in text and f"seed={record['seed']}" in text
    assert "test accuracy 90.00% -> 85.00%  after_finetune 87.50%" in text
    ratio = record["macs"]["before"] / record["macs"]["after"]
    assert f"(x{ratio:.2f})" in text


@pytest.mark.parametrize("choice,shown", [
    ([{"removed_blocks": ["a", "b"], "search_score": 0.9, "returned_score": 0.95, "chosen": False},
      {"removed_blocks": [], "search_score": 0.8, "returned_score": 0.98, "chosen": True}],
     "architecture shrunk, chosen by the score as returned (searched -> returned, refitted): "
     "2 blocks removed 0.9000 -> 0.9500; 0 blocks removed 0.8000 -> 0.9800 (chosen)"),
    ([{"removed_blocks": ["a"], "search_score": 0.9, "returned_score": 0.95, "chosen": "yes"}],   # no readable flag: nothing marked
     "architecture shrunk, chosen by the score as returned (searched -> returned, refitted): "
     "1 blocks removed 0.9000 -> 0.9500"),
    ([{"removed_blocks": "a", "search_score": 0.9, "returned_score": 0.95}], None),   # a hand-edited run file
    ([{"removed_blocks": [], "search_score": "0.9", "returned_score": 0.95}], None),
    ("not a list", None),
])
def test_the_summary_shows_n2ns_architecture_choice_when_it_is_readable(channel, choice, shown):
    _, result = channel
    record = summarize(result)
    record["removed_blocks"] = []
    record["plan"]["metadata"]["architecture_choice"] = choice
    lines = [x for x in format_summary(record).splitlines() if x.startswith("architecture shrunk")]
    assert lines == ([shown] if shown else [])


def test_accuracy_guaranteed_record_and_empty_history(tmp_path):
    result = rl_prune(fresh(), None, max_drop=0.0, **FAST)
    record = summarize(result)
    assert record["target"] is None and record["max_drop"] == 0.0
    assert "accuracy-guaranteed (max_drop 0)" in format_summary(record)
    # best-so-far is the reward's running maximum here (the history's best_reward is a sparsity)
    assert search_stats(record)["best"] == max(h["reward"] for h in record["history"])
    empty = dict(record, history=[], episode_seconds=None)
    assert search_stats(empty) == {"episodes": 0, "best": None, "episodes_to_99": None}
    report = write_report(tmp_path, [empty])
    for name in images(report):
        assert png_size(tmp_path / name)[0] > 100
    assert not (tmp_path / "tradeoff.png").exists()


# --------------------------------------------------------------------------- plots and report.md
def test_report_for_one_target_references_valid_pngs(tmp_path, channel):
    _, result = channel
    record = summarize(result)
    save_run(tmp_path, [record], {"model": "fmnist_cnn | <b>"})
    report = write_report(tmp_path)  # from run.json
    text = report.read_text()
    assert sorted(images(report)) == ["amounts.png", "search.png"]
    for name in images(report):
        width, height = png_size(tmp_path / name)
        assert 300 < width < 3000 and 200 < height < 3000
    for lay in record["layers"]:
        assert f"| {lay['name']} |" in text
    assert "fmnist_cnn \\| &lt;b>" in text  # run metadata escaped, not markup
    stats = search_stats(record)
    assert f"| episodes | {len(record['history'])} |" in text
    assert f"| episodes to 99% of the final best | {stats['episodes_to_99']} |" in text


def test_report_for_several_targets_has_a_tradeoff_and_one_amounts_plot_each(tmp_path, multi):
    records = [summarize(r, test_accuracy={"before": 0.9, "after": 0.9 - t / 2}) for t, r in multi.items()]
    report = write_report(tmp_path, records)
    names = images(report)
    assert sorted(names) == ["amounts_0.3.png", "amounts_0.5.png", "amounts_0.7.png", "search.png", "tradeoff.png"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(names)
    for name in names:
        assert png_size(tmp_path / name)[1] > 100
    assert "| run | target | achieved | test accuracy |" in report.read_text()


def test_episodes_to_99_percent_of_the_final_best(unstructured):
    record = summarize(unstructured[1], count=False)
    rewards = [0.1, 0.5, 0.2, 0.995, 0.9, 1.0]
    best = [max(rewards[:i + 1]) for i in range(len(rewards))]
    record["history"] = [{"episode": i, "reward": r, "best_reward": b} for i, (r, b) in enumerate(zip(rewards, best))]
    assert search_stats(record) == {"episodes": 6, "best": 1.0, "episodes_to_99": 4}
    record["history"] = [dict(h, reward=-h["reward"], best_reward=-h["best_reward"]) for h in record["history"]]
    record["history"] = [dict(h, best_reward=max(-r for r in rewards[:i + 1])) for i, h in enumerate(record["history"])]
    assert search_stats(record)["episodes_to_99"] == 1  # -0.1 from the start: negative rewards count too


def test_amounts_plot_grows_with_the_number_of_layers(tmp_path, unstructured):
    record = summarize(unstructured[1], count=False)
    many = dict(record, layers=[{"name": f"stages.{i}.conv.weight", "kind": "conv2d", "units": 64 * (i + 1),
                                 "amount": i / 80} for i in range(80)])
    _, few_height = png_size(plot_amounts(record, tmp_path / "few.png"))
    _, many_height = png_size(plot_amounts(many, tmp_path / "many.png"))
    assert many_height > 4 * few_height  # ~20 px a layer, so 80 names stay legible
    assert png_size(plot_search([dict(record, history=[])], tmp_path / "empty.png"))[0] > 100


def test_plotting_never_imports_pyplot_and_the_package_never_imports_matplotlib(tmp_path):
    code = ("import sys, torch_rlprune, torch_rlprune.report as r\n"
            "assert 'matplotlib' not in sys.modules\n"
            "rec = {'agent': 'amc', 'structure': 'channel', 'target': 0.5, 'sparsity': 0.5, 'history': [],\n"
            "       'layers': [{'name': 'a:out', 'kind': 'conv2d', 'units': 8, 'amount': 0.5}]}\n"
            f"r.plot_amounts(rec, {str(tmp_path / 'a.png')!r})\n"
            "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert png_size(tmp_path / "a.png")[0] > 100


# --------------------------------------------------------------------------- run.json
def test_save_and_load_round_trip(tmp_path, multi):
    records = [summarize(r) for r in multi.values()]
    path = save_run(tmp_path / "run", records, {"model": "fmnist_cnn", "argv": ["prune", "--target", "0.3"]})
    assert path == tmp_path / "run" / RUN_FILE
    assert load_run(tmp_path / "run") == {"version": 1, "records": records, "model": "fmnist_cnn",
                                          "argv": ["prune", "--target", "0.3"]}
    with pytest.raises(ValueError, match="version"):
        save_run(tmp_path, records, {"version": 2})


def _valid(unstructured):
    return summarize(unstructured[1], count=False)


def _broken(record):
    no_plan = {k: v for k, v in record.items() if k != "plan"}
    bad_amount = dict(record, plan=dict(record["plan"], amounts={k: 2.0 for k in record["plan"]["amounts"]}))
    return {
        "not JSON": "{\"version\": 1, \"records\": [",
        "wrong version": json.dumps({"version": 2, "records": [record]}),
        "list instead of the run object": json.dumps([record]),
        "list instead of a record": json.dumps({"version": 1, "records": [[1, 2]]}),
        "list instead of macs": json.dumps({"version": 1, "records": [dict(record, macs=[1, 2])]}),
        "records not a list": json.dumps({"version": 1, "records": {"0": record}}),
        "missing key": json.dumps({"version": 1, "records": [no_plan]}),
        "bool as a number": json.dumps({"version": 1, "records": [dict(record, sparsity=True)]}),
        "string layer units": json.dumps({"version": 1, "records": [
            dict(record, layers=[dict(record["layers"][0], units="9")])]}),
        "invalid plan": json.dumps({"version": 1, "records": [bad_amount]}),
        "NaN": json.dumps({"version": 1, "records": [dict(record, score=float("nan"))]}),
        "deep nesting": "[" * 100000 + "]" * 100000,
        "not UTF-8": b"\xff\xfe{}",
    }


@pytest.mark.parametrize("case", ["not JSON", "wrong version", "list instead of the run object",
                                  "list instead of a record", "list instead of macs", "records not a list",
                                  "missing key", "bool as a number", "string layer units", "invalid plan", "NaN",
                                  "deep nesting", "not UTF-8"])
def test_load_run_rejects_malformed_files_naming_the_file(case, tmp_path, unstructured):
    content = _broken(_valid(unstructured))[case]
    path = tmp_path / RUN_FILE
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as err:
        load_run(tmp_path)
    assert str(path) in str(err.value)


def test_load_run_of_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no run file"):
        load_run(tmp_path)


def test_a_marked_section_is_replaced_and_only_it(tmp_path):
    from torch_rlprune.report import write_marked_section

    doc = tmp_path / "README.md"
    doc.write_text("intro\n<!-- bench:start -->\nold table\n<!-- bench:end -->\nafter\n<!-- demo:start -->\nx\n"
                   "<!-- demo:end -->\n")
    assert write_marked_section(doc, "bench", "| new |\n")
    text = doc.read_text()
    assert "old table" not in text and "| new |" in text
    assert text.startswith("intro\n<!-- bench:start -->\n| new |\n<!-- bench:end -->\nafter")
    assert "<!-- demo:start -->\nx\n" in text                       # the other section is untouched
    assert not write_marked_section(doc, "lstm", "y")               # no markers: nothing written
    assert doc.read_text() == text


def test_a_published_table_lands_on_whichever_page_holds_its_markers(tmp_path):
    from torch_rlprune.report import publish_section

    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("<!-- demo:start -->\nold\n<!-- demo:end -->\n")
    (tmp_path / "docs" / "BENCHMARKS.md").write_text("# B\n<!-- bench:start -->\nold\n<!-- bench:end -->\n")
    (tmp_path / "docs" / "rnn.md").write_text("no markers\n")
    assert publish_section(tmp_path, "bench", "| new |") == [tmp_path / "docs" / "BENCHMARKS.md"]
    assert "| new |" in (tmp_path / "docs" / "BENCHMARKS.md").read_text()
    assert (tmp_path / "README.md").read_text() == "<!-- demo:start -->\nold\n<!-- demo:end -->\n"
    assert publish_section(tmp_path, "lstm", "x") == []                # no page holds it: nothing written


@pytest.mark.parametrize("reward, meaning", [("fidelity", "predicts the unpruned model's class"),
                                             ("accuracy", "top-1 accuracy on the labelled calibration inputs"),
                                             ("my_score", "your reward 'my_score'")])
def test_the_summary_says_what_its_scores_mean_for_the_reward_used(unstructured, reward, meaning):
    record = dict(summarize(unstructured[1], count=False), reward=reward)
    lines = format_summary(record).splitlines()
    score_line = next(i for i, line in enumerate(lines) if "(unpruned " in line)
    assert meaning in lines[score_line + 1]
    assert "BatchNorm statistics re-estimated" in lines[score_line + 1]  # the unpruned score was measured so
    plan = dict(record["plan"], metadata=dict(record["plan"]["metadata"], bn_recalibration=0))
    assert "re-estimated" not in format_summary(dict(record, plan=plan))


def test_the_search_and_tradeoff_plots_have_titles_and_name_the_reward(tmp_path, unstructured, monkeypatch):
    import torch_rlprune.report as report

    figures = []
    monkeypatch.setattr(report.plots, "_save", lambda fig, path: figures.append(fig) or Path(path))
    record = summarize(unstructured[1], count=False)
    plot_search([record], tmp_path / "search.png")
    report.plot_tradeoff([record, dict(record, target=0.5)], tmp_path / "tradeoff.png")
    search, tradeoff = (fig.axes[0] for fig in figures)
    assert search.get_title().startswith("Search") and "agreement with the unpruned model" in search.get_ylabel()
    assert "points" not in search.get_ylabel() and search.get_xlabel() == "episode"
    assert tradeoff.get_title() and "fraction removed" in tradeoff.get_title()
