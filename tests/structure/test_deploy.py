"""Export of pruned models to ONNX (run in onnxruntime), torch.export and ExecuTorch, verified against torch."""
import importlib.util

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import timm  # noqa: E402

from helpers import fmnist_cnn, inputs, seeded  # noqa: E402
from torch_rlprune import compact, rl_prune  # noqa: E402
from torch_rlprune.structure.deploy import EXPORT_FORMATS, ExportMismatchError, export  # noqa: E402


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 24, num_layers=2, batch_first=True)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(self.lstm(x)[0][:, -1])


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10,
                             depth=2)


MODELS = {"cnn": (fmnist_cnn, (16, 1, 28, 28)), "vit": (tiny_vit, (16, 3, 32, 32)),
          "lstm": (Recurrent, (16, 6, 8))}


def channel_pruned(name):
    builder, shape = MODELS[name]
    model, x = seeded(builder).eval(), inputs(shape)
    rl_prune(model, 0.4, data=x, structure="channel", agent="prior", verbose=False)
    compact(model, x[:2])
    return model, x[:4]


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
@pytest.mark.parametrize("name", list(MODELS))
def test_a_compacted_model_exports_and_computes_the_same_in_its_runtime(name, fmt, tmp_path):
    if fmt == "pte" and importlib.util.find_spec("executorch") is None:
        pytest.skip("ExecuTorch export needs the executorch extra (installed by .ci/run)")
    model, x = channel_pruned(name)
    with torch.no_grad():
        expected = model(x)
    report = export(model, x, tmp_path / f"model.{fmt}")
    assert report["format"] == fmt and report["bytes"] == (tmp_path / f"model.{fmt}").stat().st_size > 0
    assert report["max_abs_diff"] <= 1e-4
    assert report["runtime"].startswith({"onnx": "onnxruntime", "pt2": "torch.export", "pte": "executorch"}[fmt])
    if fmt == "pt2":  # the file alone gives the model back
        loaded = torch.export.load(str(tmp_path / "model.pt2")).module()
        assert torch.allclose(loaded(x), expected, atol=1e-5)
    elif fmt == "onnx":
        from torch_rlprune.structure.deploy import onnx_session, run_onnx
        out = run_onnx(onnx_session(tmp_path / "model.onnx"), (x,), {})[0]
        assert torch.allclose(torch.from_numpy(out), expected, atol=1e-4)
    else:  # the file alone, in the ExecuTorch runtime
        from executorch.runtime import Runtime
        out = Runtime.get().load_program(str(tmp_path / "model.pte")).load_method("forward").execute([x])[0]
        assert torch.allclose(out, expected, atol=1e-4)


def test_an_unstructured_model_exports_once_its_masks_are_removed(tmp_path):
    model, x = seeded(fmnist_cnn).eval(), inputs((4, 1, 28, 28))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"prune masks \(0.weight\).*prune.remove"):
        export(model, x, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
    prune.remove(model[0], "weight")
    assert export(model, x, tmp_path / "model.onnx", dynamo=False)["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("path, fmt, words", [("model.tflite", None, "suffix"), ("model.onnx", "tflite", "'tflite'")])
def test_an_unknown_format_is_refused_naming_the_formats(tmp_path, path, fmt, words):
    with pytest.raises(ValueError, match=words):
        export(seeded(fmnist_cnn), inputs((2, 1, 28, 28)), tmp_path / path, format=fmt)


def test_an_export_that_computes_something_else_raises(tmp_path, monkeypatch):
    import torch_rlprune.structure.deploy as module

    real = module.run_onnx
    monkeypatch.setattr(module, "run_onnx", lambda *a: [y + 1e-2 for y in real(*a)])
    model, x = seeded(fmnist_cnn).eval(), inputs((2, 1, 28, 28))
    with pytest.raises(ExportMismatchError, match="differs from torch by 0.01"):
        export(model, x, tmp_path / "model.onnx", dynamo=False)
    assert (tmp_path / "model.onnx").exists()  # kept for inspection
