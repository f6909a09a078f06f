"""Size on disk of unstructured-pruned models in the bitmask + values format (torch_rlprune.structure.sparse_format).

    python benchmarks/sparse_size.py          # seconds; writes benchmarks/results/sparse_size.{json,md}
    python benchmarks/sparse_size.py --quick  # one model

For each model and sparsity: LAMP over every Conv/Linear weight (rl_prune's tensors; the layout
of the zeros is what matters for size, and any plan at the same sparsity stores alike), then
the file ``save_sparse`` writes against ``torch.save`` of the same weights dense
(``prune.remove``d state_dict), and a check that ``load_sparse`` gives every tensor back bit for
bit. Models: the Fashion-MNIST resnet18 of ``make bench`` (its checkpoint when present, else
untrained) and three timm models, untrained (size depends on the zeros, not on the values).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn.utils import prune

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from study import study_main  # noqa: E402
from torch_rlprune.env.priors import lamp_unstructured  # noqa: E402
from torch_rlprune.structure.sparse_format import load_sparse, save_sparse  # noqa: E402
from torch_rlprune.structure.tensors import find_prunable  # noqa: E402

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
MODELS = {"resnet18 (Fashion-MNIST)": lambda: timm.create_model("resnet18", pretrained=False, in_chans=1,
                                                                 num_classes=10),
          "mobilenetv3_small_100": lambda: timm.create_model("mobilenetv3_small_100", pretrained=False),
          "vit_tiny_patch16_224": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False),
          "convnext_atto": lambda: timm.create_model("convnext_atto", pretrained=False)}
CHECKPOINT = ROOT / "checkpoints" / "resnet18_fmnist_e2.pt"


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]()
    if name.startswith("resnet18") and CHECKPOINT.exists():
        model.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
    return model.eval()


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(view), b.view(view))
    return torch.equal(a, b)


def measure(name: str, sparsity: float, folder: Path) -> dict:
    model = build(name)
    layers = [(layer.module, layer.param_name) for layer in find_prunable(model)]
    lamp_unstructured(layers, sparsity)
    sizes = save_sparse(model, folder / "sparse.pt")
    for module, param in layers:
        prune.remove(module, param)
    dense_state = model.state_dict()
    torch.save(dense_state, folder / "dense.pt")
    back = load_sparse(folder / "sparse.pt")
    identical = back.keys() == dense_state.keys() and all(bits_equal(back[k], dense_state[k]) for k in back)
    dense_file = (folder / "dense.pt").stat().st_size
    return {"model": name, "sparsity": sparsity, "dense_file_bytes": dense_file, "sparse_file_bytes": sizes["file_bytes"],
            "ratio": dense_file / sizes["file_bytes"], "sparse_tensors": sizes["sparse_tensors"],
            "tensors": sizes["tensors"], "bit_identical": identical}


def to_markdown(report: dict, command: str) -> str:
    lines = [f"Reproduce: `{command}`. LAMP over every Conv/Linear weight, then "
             "`save_sparse` (bitmask of the nonzero entries + their values + the signs of the zeros) against "
             "`torch.save` of the same weights dense; 'loads back': `load_sparse` equal to the dense state_dict bit "
             "for bit.", "",
             "| model | weights removed | dense file | sparse file | smaller | loads back |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['sparsity']:.0%} | {r['dense_file_bytes'] / 2 ** 20:.2f} MB | "
                     f"{r['sparse_file_bytes'] / 2 ** 20:.2f} MB | x{r['ratio']:.2f} | "
                     f"{'bit-identical' if r['bit_identical'] else 'DIFFERENT'} |")
    return "\n".join(lines) + "\n"


def run(quick: bool) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in list(MODELS)[:1] if quick else MODELS:
            for sparsity in SPARSITIES:
                rows.append(measure(name, sparsity, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


if __name__ == "__main__":
    study_main("sparse_size", __doc__.splitlines()[0], run, to_markdown)
