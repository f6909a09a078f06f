"""Which synthetic inputs rank plans the way 224x224 does, at what cost (the no-data one-liner's data).

    python benchmarks/synthetic_inputs.py [--quick]

With ``data=None`` rl_prune scores plans on Gaussian inputs. At the model's native 224x224 one
scoring pass of resnet18 over 512 of them takes ~10 s on 2 cores, so a search cannot fit in a minute.
A smaller side and fewer samples are far cheaper; what matters is whether they order plans as 224x224
does. For each timm model (``pretrained=False, in_chans=1, num_classes=10``, as the one-liner is tried):

1. twelve plans at 80% of the weights, the ones a random search around the prior proposes;
2. each plan scored independently of the library (``prune.l1_unstructured`` with the plan's per-layer
   counts, top-1 agreement with the unpruned model on the inputs; no BatchNorm re-estimation, as
   rl_prune scores without data) on
   256 Gaussian inputs at 224x224 (the reference) and on 128 at smaller sides;
3. Spearman's rank correlation of each setting's scores with the reference's, and the seconds of one
   scoring of a plan (re-estimation and scoring pass).
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn.utils import prune

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from study import study_main  # noqa: E402

from torch_rlprune import rl_prune  # noqa: E402

MODELS = ("resnet18", "mobilenetv3_small_050", "mobilenetv3_large_100", "efficientnet_b0", "regnetx_002")
REFERENCE = (224, 256)
SETTINGS = ((32, 128), (64, 128), (96, 128), (128, 128), (64, 64))
PLANS = 12
TARGET = 0.8


def spearman(a, b) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):          # ties share their mean rank
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def plans_of(model: nn.Module) -> list:
    """Per-layer removal counts of the plans a random search around the prior scores (cheap inputs)."""
    x = torch.randn(96, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    result = rl_prune(copy.deepcopy(model), TARGET, data=x, agent="random", episodes=PLANS, verbose=False,
                      selection=0.0, screen=0, calibration_samples=96, bn_recalibration=0)
    counts = []
    for h in result.history:
        counts.append({(layer.module_name, layer.param_name): int(round(a * layer.numel))
                       for layer, a in zip(result.layers, h["amounts"])})
    return counts


def score(model: nn.Module, plan: dict, x: torch.Tensor, teacher: torch.Tensor) -> float:
    """Top-1 agreement with the unpruned model's predictions ``teacher`` on ``x``."""
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    for (module_name, tensor), count in plan.items():
        if count:
            prune.l1_unstructured(modules[module_name], tensor, amount=count)
    with torch.no_grad():
        return float((pruned(x).argmax(1) == teacher).double().mean())


def measure(name: str, settings) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, in_chans=1, num_classes=10).eval()
    plans = plans_of(model)
    rows = {}
    for side, count in (REFERENCE, *settings):
        x = torch.randn(count, 1, side, side, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            teacher = model(x).argmax(1)
        tick = time.perf_counter()
        scores = [score(model, plan, x, teacher) for plan in plans]
        rows[f"{side}x{count}"] = {"side": side, "samples": count, "scores": scores,
                                   "seconds_per_plan": (time.perf_counter() - tick) / len(plans)}
    reference = rows[f"{REFERENCE[0]}x{REFERENCE[1]}"]["scores"]
    for row in rows.values():
        row["spearman"] = spearman(row["scores"], reference)
    return {"model": name, "plans": len(plans), "settings": rows}


def run(quick: bool) -> dict:
    torch.set_num_threads(2)
    models = MODELS[:1] if quick else MODELS
    report = {"target": TARGET, "reference": list(REFERENCE), "models": []}
    for name in models:
        report["models"].append(measure(name, SETTINGS[1:2] if quick else SETTINGS))
        print({k: (v["spearman"], round(v["seconds_per_plan"], 3)) for k, v in report["models"][-1]["settings"].items()},
              flush=True)
    return report


def to_markdown(report: dict, command: str) -> str:
    settings = list(report["models"][0]["settings"])
    lines = [f"Reproduce: `{command}`. Per timm model (untrained, 1 channel, 10 classes), {report['models'][0]['plans']} "
             f"plans at {report['target']:.0%} of the weights scored on Gaussian inputs (top-1 agreement with the "
             f"unpruned model, no BatchNorm re-estimation, as rl_prune scores without data): Spearman's rank "
             f"correlation with the scores on {report['reference'][1]} inputs at "
             f"{report['reference'][0]}x{report['reference'][0]}, and seconds per plan scored (side x samples; "
             "copying and masking the model included, the cores shared with other jobs: compare within a row).",
             "",
             "| model | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for m in report["models"]:
        cells = [f"{m['settings'][s]['spearman']:.2f} ({m['settings'][s]['seconds_per_plan']:.2f} s)" for s in settings]
        lines.append(f"| {m['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    study_main("synthetic_inputs", __doc__.splitlines()[0], run, to_markdown)
