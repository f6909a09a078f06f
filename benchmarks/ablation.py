"""What each part of the default search is worth: repair, prior, held-out selection, importance.

    python benchmarks/ablation.py            # ~100 min on 2 cores
    python benchmarks/ablation.py --quick    # one seed, one target, few episodes

On the benchmark's trained timm resnet18 (Fashion-MNIST, no fine-tune, 1024 calibration images,
5000 test images) this adds the parts of the default search one at a time, at the same number of
episodes, and reports test accuracy (mean, min-max over seeds):

* the one-liners (global magnitude, LAMP) and the same heuristics with the search's BatchNorm
  repair (``agent="prior"``), without and with the least-squares refit;
* AMC as it was (no prior, no repair, no held-out selection, no refit), then + BatchNorm
  re-estimation, + the prior (actions anchored to the best of LAMP/global magnitude, scored first),
  + held-out selection, + the refit (the default), + activation-aware selection inside layers
  (Wanda), the prior's spread halved and doubled, and other settings of the default;
* channel pruning at 50% of the MACs: AMC without and with the prior and the held-out choice,
  without and with the refit, and the prior alone.

Writes benchmarks/results/ablation.{json,md}.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(HERE))
from study import study_main  # noqa: E402
from demo import trained_resnet18  # noqa: E402

import torch_rlprune.env.layerwise as env_module  # noqa: E402
from torch_rlprune import rl_prune  # noqa: E402
from torch_rlprune.demo.data import fashion_mnist, tensor_subset  # noqa: E402
from torch_rlprune.env.priors import global_magnitude_unstructured, lamp_unstructured  # noqa: E402
from torch_rlprune.structure.tensors import find_prunable  # noqa: E402
from torch_rlprune.demo.training import evaluate_accuracy  # noqa: E402

OLD = dict(prior="none", bn_recalibration=0, selection=0.0, repair="none")
NO_REFIT = dict(repair="none")
# "default": rl_prune's defaults as they are now (BatchNorm re-estimated on 4 batches of 128; the least-squares
# refit for channel plans and for weight plans from 90% on, repair="auto"); the rows before it add the parts one
# at a time, without the refit.
UNSTRUCTURED = [  # (label, rl_prune keywords, prior spread)
    ("LAMP + BN repair (agent=prior)", dict(agent="prior", prior="lamp", selection=0.0, **NO_REFIT), None),
    ("global magnitude + BN repair (agent=prior)", dict(agent="prior", prior="global", selection=0.0, **NO_REFIT),
     None),
    ("best prior + BN repair + held-out choice (agent=prior)", dict(agent="prior", **NO_REFIT), None),
    ("best prior + BN repair + held-out choice + refit (agent=prior)", dict(agent="prior"), None),
    ("AMC as before (no prior, no repair, no selection, no refit)", dict(agent="amc", **OLD), None),
    ("AMC + BN repair", dict(agent="amc", prior="none", selection=0.0, **NO_REFIT), None),
    ("AMC + BN repair + prior", dict(agent="amc", selection=0.0, **NO_REFIT), None),
    ("AMC + BN repair + prior + held-out selection", dict(agent="amc", **NO_REFIT), None),
    ("AMC + BN repair + prior + held-out selection + refit (default)", dict(agent="amc"), None),
    ("default + importance=activation", dict(agent="amc", importance="activation"), None),
    ("best prior + activation + BN repair + refit (agent=prior)", dict(agent="prior", importance="activation"),
     None),
    ("default, prior spread 0.5 logit", dict(agent="amc"), 0.5),
    ("default, prior spread 2 logits", dict(agent="amc"), 2.0),
    ("default, BN re-estimated on 1 batch", dict(agent="amc", bn_recalibration=1), None),
    ("default, 300 episodes", dict(agent="amc", episodes=300), None),
    ("default, 512 calibration images", dict(agent="amc", calibration_samples=512), None),
    ("random search around the prior (same episodes)", dict(agent="random"), None),
    ("CRL, default settings", dict(agent="crl"), None),
]
CHANNEL = [
    ("AMC, no prior, no refit", dict(agent="amc", prior="none", selection=0.0, **NO_REFIT), None),
    ("AMC + prior, no refit", dict(agent="amc", selection=0.0, **NO_REFIT), None),
    ("AMC + prior + held-out selection, no refit", dict(agent="amc", **NO_REFIT), None),
    ("AMC + prior + held-out selection + refit (default)", dict(agent="amc"), None),
    ("AMC, no prior + refit", dict(agent="amc", prior="none", selection=0.0), None),
    ("best prior alone, no refit (agent=prior)", dict(agent="prior", **NO_REFIT), None),
    ("best prior alone + refit (agent=prior)", dict(agent="prior"), None),
]


def load(calibration: int, test: int):
    """The demo's model and split; calibration images: the 512 never trained on, then training images."""
    train, test_set = fashion_mnist(ROOT / "data", train=True), fashion_mnist(ROOT / "data", train=False)
    x_all, y_all = tensor_subset(train, len(train), seed=0)
    model = trained_resnet18(x_all[:-512], y_all[:-512], 2.0, ROOT / "checkpoints" / "resnet18_fmnist_e2.pt")
    x_test, y_test = tensor_subset(test_set, len(test_set), seed=0)
    order = torch.cat([torch.arange(len(x_all) - 512, len(x_all)), torch.arange(len(x_all) - 512)])[:calibration]
    return model, x_all[order], y_all[order], x_test[:test], y_test[:test]


def one_liner(model, fn, target: float, x_test, y_test, protected) -> float:
    pruned = copy.deepcopy(model)
    fn([(lay.module, lay.param_name) for lay in find_prunable(pruned) if lay.name not in protected], target)
    return evaluate_accuracy(pruned, x_test, y_test)


def search(model, target, structure, kwargs, spread, seed, episodes, data, x_test, y_test) -> dict:
    pruned = copy.deepcopy(model)
    kwargs = dict(kwargs)
    previous = env_module.PRIOR_SPREAD
    env_module.PRIOR_SPREAD = previous if spread is None else spread
    try:
        tick = time.perf_counter()
        if kwargs["agent"] != "prior":
            kwargs.setdefault("episodes", episodes)
        kwargs.setdefault("calibration_samples", len(data[0]))
        result = rl_prune(pruned, target, data=data, structure=structure, seed=seed, verbose=False, **kwargs)
        seconds = time.perf_counter() - tick
    finally:
        env_module.PRIOR_SPREAD = previous
    return {"test_acc": evaluate_accuracy(pruned, x_test, y_test), "score": result.plan.score,
            "seconds": seconds, "protected": result.plan.metadata.get("protected", []),
            "prior": result.plan.metadata.get("prior"), "selection": result.plan.metadata.get("selection"),
            "refit_kept": (result.plan.metadata.get("repair") or {}).get("kept")}


def run(quick: bool) -> dict:
    seeds, targets, episodes = ([0], [0.9], 30) if quick else ([0, 1], [0.9, 0.95], 100)
    model, x_cal, y_cal, x_test, y_test = load(1024, 2000 if quick else 5000)
    data = (x_cal, y_cal)
    rows: List[dict] = []
    for target in targets:
        protected = None
        for label, kwargs, spread in UNSTRUCTURED:
            for seed in seeds:
                row = search(model, target, "unstructured", kwargs, spread, seed, episodes, data, x_test, y_test)
                protected = row["protected"]
                rows.append({"structure": "unstructured", "target": target, "method": label, "seed": seed, **row})
                print(f"{target} {label} seed {seed}: {row['test_acc']:.4f} ({row['seconds']:.0f}s)", flush=True)
        for label, fn in (("global magnitude one-liner", global_magnitude_unstructured),
                          ("LAMP one-liner", lamp_unstructured)):
            rows.append({"structure": "unstructured", "target": target, "method": label, "seed": None,
                         "test_acc": one_liner(model, fn, target, x_test, y_test, set(protected or ()))})
    for label, kwargs, spread in CHANNEL:
        for seed in seeds:
            row = search(model, 0.5, "channel", kwargs, spread, seed, episodes, data, x_test, y_test)
            rows.append({"structure": "channel", "target": 0.5, "method": label, "seed": seed, **row})
            print(f"channel {label} seed {seed}: {row['test_acc']:.4f} ({row['seconds']:.0f}s)", flush=True)
    return {"seeds": seeds, "episodes": episodes, "test_images": len(x_test), "rows": rows}


def to_markdown(report: dict, command: str) -> str:
    groups: Dict[tuple, List[dict]] = {}
    for r in report["rows"]:
        groups.setdefault((r["structure"], r["target"], r["method"]), []).append(r)
    lines = [f"Reproduce: `{command}`. timm resnet18 on Fashion-MNIST, no fine-tune, 1024 calibration images, "
             f"{report['test_images']} test images, searches of {report['episodes']} episodes unless a row says "
             "otherwise, seeds "
             f"{report['seeds']} (mean, min–max); the first conv and the classifier stay dense in every row. "
             "'default': rl_prune's defaults (BatchNorm re-estimated on 4 batches of 128; the least-squares refit "
             "for channel plans and from 90% of the weights); 'no refit': repair=\"none\".", "",
             "| structure | target | method | test acc | search s |", "|---|---|---|---|---|"]
    for (structure, target, method), rows in groups.items():
        accs = [r["test_acc"] for r in rows]
        acc = f"{statistics.fmean(accs):.2%}" + (f" ({min(accs):.2%}–{max(accs):.2%})" if len(accs) > 1 else "")
        secs = [r["seconds"] for r in rows if "seconds" in r]
        what = "weights" if structure == "unstructured" else "MACs"
        lines.append(f"| {structure} | {target:.0%} {what} | {method} | {acc} | "
                     f"{statistics.fmean(secs):.0f} |" if secs else
                     f"| {structure} | {target:.0%} {what} | {method} | {acc} | — |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    return study_main("ablation", __doc__.splitlines()[0], run, to_markdown, argv)


if __name__ == "__main__":
    main()
