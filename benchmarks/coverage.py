"""Coverage: the torchvision classification zoo and five transformers architectures, both structures.

    python benchmarks/coverage.py [--workers 2] [--timeout 420] [--only resnet18 transformers ...]
                                  [--structures unstructured channel] [--report results/coverage.json]

What every model is put through (one subprocess per model and structure, with a timeout: a hang
or a crash is a row of the table, never a stuck or dead benchmark):

* **unstructured**: ``rl_prune(model, 0.5, data=..., agent="prior")`` (the heuristic plans only:
  cheap). ok = it ran, the masks remove 50% (+-0.005) of the candidates' weights (recounted here
  from the ``*_mask`` buffers, not only read from ``result.sparsity``), the output shape is
  unchanged, and every >=2-D weight that takes part in the forward (it gets a gradient) is a
  candidate (has a mask), protected (``plan.metadata["protected"]``) or reported (in the left-out
  warning / ``plan.metadata["left_out"]``, or named in another warning). A weight that is none of
  these is *silent*: it stays dense and nobody says so -- the worst outcome, counted apart.
* **channel**: ``rl_prune(model, 0.5, structure="channel", budget="macs", agent="prior")`` then
  ``result.compact()``. ok = 50% (+-0.02, the library's channel tolerance) of the MACs are gone
  after compaction (recounted here), the masked and the compacted outputs agree (max abs diff
  <= 1e-4 x max(1, output scale), as in zoo_sweep.py) and compact warns of nothing it could not
  remove. *refused* = a ValueError/TypeError/ChannelPruningError whose message names a module or
  layer type of the model (the user can act on it); any other exception is a *fail*.
* Whenever ``rl_prune`` raises, the model must be exactly as before: every state_dict tensor is
  compared with ``torch.equal`` to a copy taken before the call, and the hooks are counted; a
  difference is "fail: corrupted".

torchvision models: the smallest of each family, ``weights=None``, 10 classes, ``aux_logits=False``
where allowed, eval mode, at the smallest input side among 64/96/128/224 that runs. transformers
models are built from tiny configs (hidden 32-64, 2 layers, 2 heads, vocabulary 100): nothing is
downloaded. BERT and T5 take several inputs and get dict batches (``model(**batch)``, labels under
``"labels"``, named by ``label=`` when rl_prune accepts it); without transformers installed their
rows say "skipped".

Data: 32 seeded Gaussian images (or random token ids / spectrograms) with random labels where the
model has a classifier. Writes benchmarks/results/coverage.json and coverage.md; ``--report`` only
regenerates the markdown from a JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

TARGET = 0.5
SAMPLES = 32
CHECK = 4          # samples of the batch that compares outputs before/after
SIZES = (64, 96, 128, 224)
TOLERANCE = {"unstructured": 0.005, "channel": 0.02}
STRUCTURES = ("unstructured", "channel")

# The smallest model of each torchvision classification family, with the constructor arguments
# that turn off auxiliary heads (they would be outputs the eval-mode model never computes).
TORCHVISION = [
    ("alexnet", {}), ("vgg11", {}), ("resnet18", {}), ("resnext50_32x4d", {}), ("wide_resnet50_2", {}),
    ("squeezenet1_0", {}), ("densenet121", {}), ("googlenet", {"aux_logits": False, "init_weights": True}),
    ("inception_v3", {"aux_logits": False, "init_weights": True}), ("shufflenet_v2_x0_5", {}),
    ("mobilenet_v2", {}), ("mobilenet_v3_small", {}), ("mnasnet0_5", {}), ("efficientnet_b0", {}),
    ("efficientnet_v2_s", {}), ("regnet_x_400mf", {}), ("regnet_y_400mf", {}), ("convnext_tiny", {}),
    ("vit_b_16", {}), ("swin_t", {}), ("swin_v2_t", {}), ("maxvit_t", {}),
]
TRANSFORMERS = ["bert", "gpt2", "t5", "vit", "whisper"]
# Run first, so that two workers finish together: these need 224x224 inputs or are the widest.
SLOW_FIRST = ("vit_b_16", "maxvit_t", "swin_v2_t", "swin_t", "wide_resnet50_2", "efficientnet_v2_s")


# ----------------------------------------------------------------------------- the cases

@dataclass
class Case:
    """A model, the data rl_prune gets, and one batch to compare outputs on."""

    model: object
    data: object                 # what rl_prune's data= receives
    check: object                # a batch: a tensor, or a dict for model(**batch)
    shape: str                   # the input, for the table
    kwargs: dict = field(default_factory=dict)   # extra rl_prune arguments (label=)


def seeded(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def torchvision_case(name: str, extra: dict) -> Case:
    """The model at the smallest input side it runs at: a size it refuses raises, we try the next."""
    import torch
    import torchvision

    errors = []
    for size in SIZES:
        torch.manual_seed(0)   # torchvision initialises from the global RNG: the same model every run
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **extra).eval()
        x = torch.randn(SAMPLES, 3, size, size, generator=seeded(1))
        try:
            with torch.no_grad():
                model(x[:1])
        except Exception as err:  # noqa: BLE001 - this size is refused; try the next one
            errors.append(f"{size}: {type(err).__name__}")
            continue
        y = torch.randint(0, 10, (SAMPLES,), generator=seeded(2))
        return Case(model, (x, y), x[:CHECK], f"3x{size}x{size}")
    raise RuntimeError(f"runs at none of the sizes {SIZES} ({'; '.join(errors)})")


def accepts_label_keyword() -> bool:
    """Whether rl_prune takes ``label=`` (the dict-batch API another change is adding)."""
    import inspect

    from torch_rlprune import rl_prune

    return "label" in inspect.signature(rl_prune).parameters


def dict_case(model, batch: dict, shape: str) -> Case:
    """Two dict batches of 16; the model gets ``model(**batch)``, the label stays out of it."""
    halves = [{k: v[i:i + SAMPLES // 2] for k, v in batch.items()} for i in (0, SAMPLES // 2)]
    check = {k: v[:CHECK] for k, v in batch.items() if k != "labels"}
    kwargs = {"label": "labels"} if "labels" in batch and accepts_label_keyword() else {}
    return Case(model, halves, check, shape, kwargs)


def transformers_case(name: str) -> Case:
    """Tiny configs: hidden 32-64, 2 layers, 2 heads, vocabulary 100; initialised, not downloaded."""
    import torch
    import transformers as hf

    torch.manual_seed(0)
    tokens = torch.randint(1, 100, (SAMPLES, 8), generator=seeded(1))
    if name == "bert":
        config = hf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                               vocab_size=100, max_position_embeddings=32, num_labels=4)
        model = hf.BertForSequenceClassification(config).eval()
        mask = torch.ones_like(tokens)
        mask[::2, 6:] = 0     # padding in every other sample: the mask is a real second input
        labels = torch.randint(0, 4, (SAMPLES,), generator=seeded(2))
        return dict_case(model, {"input_ids": tokens, "attention_mask": mask, "labels": labels},
                         "input_ids+attention_mask 8 tokens")
    if name == "gpt2":   # tie_word_embeddings (the default): lm_head and wte are one Parameter
        config = hf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0,
                               eos_token_id=0)
        model = hf.GPT2LMHeadModel(config).eval()
        return Case(model, tokens, tokens[:CHECK], "input_ids 8 tokens")
    if name == "t5":
        config = hf.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                             num_heads=2, decoder_start_token_id=0, pad_token_id=0)
        model = hf.T5ForConditionalGeneration(config).eval()
        decoder = torch.randint(1, 100, (SAMPLES, 6), generator=seeded(3))
        return dict_case(model, {"input_ids": tokens, "decoder_input_ids": decoder},
                         "input_ids 8 + decoder_input_ids 6")
    if name == "vit":
        config = hf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, num_labels=10)
        model = hf.ViTForImageClassification(config).eval()
        x = torch.randn(SAMPLES, 3, 32, 32, generator=seeded(1))
        return Case(model, (x, torch.randint(0, 10, (SAMPLES,), generator=seeded(2))), x[:CHECK], "3x32x32")
    if name == "whisper":   # the encoder wants exactly 2 * max_source_positions frames
        config = hf.WhisperConfig(vocab_size=100, num_mel_bins=16, d_model=32, encoder_layers=2,
                                  encoder_attention_heads=2, decoder_layers=2, decoder_attention_heads=2,
                                  encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
                                  max_target_positions=16, num_labels=4)
        model = hf.WhisperForAudioClassification(config).eval()
        x = torch.randn(SAMPLES, 16, 32, generator=seeded(1))
        return Case(model, (x, torch.randint(0, 4, (SAMPLES,), generator=seeded(2))), x[:CHECK], "16 mels x 32")
    raise ValueError(f"unknown transformers model {name!r}")


def build_case(source: str, name: str) -> Case:
    if source == "torchvision":
        return torchvision_case(name, dict(TORCHVISION)[name])
    return transformers_case(name)


# ----------------------------------------------------------------------------- checks

def forward(model, batch):
    """The model's primary output on ``batch`` (logits for transformers outputs)."""
    from torch_rlprune.rewards.calibration import primary_output

    return primary_output(model(**batch) if isinstance(batch, dict) else model(batch))


def weights_that_run(model, batch) -> dict:
    """``{id(parameter): [every qualified name holding it]}`` for the >=2-D "weight" parameters
    that get a gradient from the output: those the forward really uses. Frozen ones (Whisper's
    position table) are unfrozen for this one backward."""
    import torch

    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(True)
        p.grad = None
    try:
        with torch.enable_grad():
            forward(model, batch).float().sum().backward()
        names = {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            for pname, p in module._parameters.items():
                if p is None or p.dim() < 2 or "weight" not in pname or p.grad is None:
                    continue
                qualified = f"{module_name}.{pname}" if module_name else pname
                names.setdefault(id(p), [])
                if qualified not in names[id(p)]:
                    names[id(p)].append(qualified)
        return names
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)


def has_mask(model, qualified: str) -> bool:
    module_name, _, pname = qualified.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return hasattr(module, pname + "_mask")


def account_weights(model, running: dict, plan, caught: list) -> dict:
    """Sort every weight that runs into candidate / protected / left out (reported) / warned / silent."""
    left_out = {name: reason for reason, names in plan.metadata.get("left_out", {}).items() for name in names}
    # a parent reading the weight itself (torchvision Swin's F.linear(x, self.qkv.weight)): listed in the plan
    left_out.update({name: "never ran as a module" for name in plan.metadata.get("never_ran", [])})
    protected = set(plan.metadata.get("protected", []))
    text = "\n".join(caught)
    out = {"candidate": 0, "protected": 0, "left_out": 0, "warned": 0, "silent": [], "left_out_reasons": {}}
    for holders in running.values():
        if any(has_mask(model, n) or n in plan.amounts for n in holders):
            out["candidate"] += 1
        elif any(n in protected for n in holders):
            out["protected"] += 1
        elif any(n in left_out for n in holders):
            out["left_out"] += 1
            reason = next(left_out[n] for n in holders if n in left_out)
            out["left_out_reasons"][reason] = out["left_out_reasons"].get(reason, 0) + 1
        elif any(n in text for n in holders):   # e.g. "never ran in a forward pass: [...]" (a wrong reason)
            out["warned"] += 1
        else:
            out["silent"].append(holders[0])
    return out


def mask_sparsity(model) -> float:
    """Fraction of the masked tensors' entries the masks remove (each mask once: tied weights share one)."""
    masks = {}
    for module in model.modules():
        for name, buf in module._buffers.items():
            if name.endswith("_mask") and buf is not None:
                masks[id(buf)] = buf
    total = sum(m.numel() for m in masks.values())
    return sum(int((m == 0).sum()) for m in masks.values()) / total if total else 0.0


def snapshot(model) -> dict:
    """Everything a failed call must leave as it was: state_dict tensors, hooks, training flags."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return {"state": state, "hooks": hooks, "training": [m.training for m in model.modules()]}


def unchanged(model, before: dict) -> str:
    """'' when the model is exactly as in ``before``, else what differs."""
    after = snapshot(model)
    if set(after["state"]) != set(before["state"]):
        diff = sorted(set(after["state"]) ^ set(before["state"]))
        return f"state_dict keys differ: {diff[:3]}"
    changed = [k for k, v in before["state"].items()
               if v.shape != after["state"][k].shape or not torch_equal(v, after["state"][k])]
    if changed:
        return f"{len(changed)} tensor(s) changed: {changed[:3]}"
    if after["hooks"] != before["hooks"]:
        return f"hooks {before['hooks']} -> {after['hooks']}"
    if after["training"] != before["training"]:
        return "training flags changed"
    return ""


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and torch.equal(a, b)


def module_names_in(message: str, model) -> list:
    """Modules (by qualified name, or layer type) of ``model`` that ``message`` names: a refusal the
    user can act on names what blocks it. Bare Sequential indices ("0") are too short to count."""
    named = {n for n, _ in model.named_modules() if n and not n.isdigit() and n in message}
    named = [n for n in named if not any(other != n and n in other for other in named)]  # the deepest only
    types = {type(m).__name__ for m in model.modules()}
    return sorted(named)[:3] or sorted(t for t in types if t in message)[:3]


def classify_error(err: BaseException, model, before: dict) -> dict:
    """refused (a clear error naming its module), fail, or fail: corrupted (the model changed)."""
    from torch_rlprune.structure.channel import ChannelPruningError

    message = f"{type(err).__name__}: {err}"
    row = {"error": message[:600]}
    corrupted = unchanged(model, before)
    if corrupted:
        return {**row, "status": "fail", "notes": f"corrupted: {corrupted}"}
    if str(err).startswith("data:"):   # the data API refused the batch: not a verdict on the model
        return {**row, "status": "fail", "notes": "data API refused the batch (dict batches pending)"}
    clear = isinstance(err, (ValueError, TypeError, NotImplementedError, ChannelPruningError))
    names = module_names_in(str(err), model)
    if clear and names:
        return {**row, "status": "refused", "notes": f"names {', '.join(names)}; model unchanged"}
    return {**row, "status": "fail", "notes": "model unchanged; " + ("the error names no module of the model"
                                                                     if clear else "a crash, not a refusal")}


def call_rl_prune(case: Case, structure: str):
    """rl_prune with every warning caught (they are part of the result: the left-out report)."""
    from torch_rlprune import rl_prune

    extra = {"budget": "macs"} if structure == "channel" else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = rl_prune(case.model, TARGET, data=case.data, structure=structure, agent="prior", verbose=False,
                          **extra, **case.kwargs)
    return result, [f"{w.category.__name__}: {w.message}" for w in caught]


# ----------------------------------------------------------------------------- the two runs

def run_unstructured(case: Case, row: dict, report) -> dict:
    import torch

    with torch.no_grad():
        shape = tuple(forward(case.model, case.check).shape)
    running = weights_that_run(case.model, case.check)
    before = snapshot(case.model)
    report("rl_prune")
    try:
        result, caught = call_rl_prune(case, "unstructured")
    except Exception as err:  # noqa: BLE001 - a refusal or a failure is the result
        return {**row, **classify_error(err, case.model, before), "weights": len(running)}
    row["warnings"] = [w[:300] for w in caught][:8]
    with torch.no_grad():
        shape_kept = tuple(forward(case.model, case.check).shape) == shape
    weights = account_weights(case.model, running, result.plan, caught)
    recounted = mask_sparsity(case.model)
    met = abs(result.sparsity - TARGET) <= TOLERANCE["unstructured"] and \
        abs(recounted - TARGET) <= TOLERANCE["unstructured"]
    left_out_warned = not weights["left_out"] or any("stay dense" in w for w in caught)
    status = "silent" if weights["silent"] else "ok" if met and shape_kept and left_out_warned else "fail"
    notes = [] if shape_kept else ["output shape changed"]
    if not left_out_warned:
        notes.append("left out but not warned")
    if weights["protected"]:
        notes.append(f"{weights['protected']} protected (first/classifier)")
    if weights["warned"]:
        notes.append(f"{weights['warned']} named only in another warning")
    return {**row, "status": status, "target_met": met, "sparsity": round(result.sparsity, 4),
            "recounted": round(recounted, 4), "weights": len(running), **weights, "notes": "; ".join(notes)}


def run_channel(case: Case, row: dict, report) -> dict:
    import torch

    from torch_rlprune.structure.channel import count_macs_params

    with torch.no_grad():
        dense_out = forward(case.model, case.check)
    dense_macs = count_macs_params(case.model, case.check)[0]
    before = snapshot(case.model)
    report("rl_prune")
    try:
        result, caught = call_rl_prune(case, "channel")
    except Exception as err:  # noqa: BLE001 - a refusal or a failure is the result
        return {**row, **classify_error(err, case.model, before)}
    excluded = result.plan.metadata.get("excluded", {})
    found = dict(groups=len(result.plan.amounts), excluded=len(excluded),
                 excluded_reasons=short_reasons(excluded.values()), warnings=[w[:300] for w in caught][:8])
    row.update(found)
    with torch.no_grad():
        masked = forward(case.model, case.check)
    report("compact", **found)
    with warnings.catch_warnings(record=True) as compact_caught:
        warnings.simplefilter("always")
        info = result.compact()
    compact_warnings = [str(w.message)[:300] for w in compact_caught if str(w.message).startswith("compact")]
    with torch.no_grad():
        compacted = forward(case.model, case.check)
    macs_removed = 1 - count_macs_params(case.model, case.check)[0] / dense_macs
    diff = float((compacted - masked).abs().max()) if compacted.shape == masked.shape else float("inf")
    scale = float(masked.abs().max())
    exact = diff <= 1e-4 * max(1.0, scale)
    met = abs(macs_removed - TARGET) <= TOLERANCE["channel"] and abs(result.sparsity - TARGET) <= TOLERANCE["channel"]
    notes = [] if compacted.shape == dense_out.shape else ["output shape changed"]
    notes += [f"compact: {len(info.get('failed', {}))} group(s) not removed"] if info.get("failed") else []
    notes += compact_warnings[:1]
    ok = met and exact and not compact_warnings and not info.get("failed") and compacted.shape == dense_out.shape
    return {**row, "status": "ok" if ok else "fail", "target_met": met, "sparsity": round(result.sparsity, 4),
            "macs_removed": round(macs_removed, 4), "max_abs_diff": diff, "output_scale": scale,
            "exact": exact, "notes": "; ".join(notes) if notes else ("" if ok else "masked != compacted"
                                                                      if not exact else "target missed")}


def short_reasons(reasons) -> dict:
    """``{reason's first words: count}``: "failed validation", "changes the model's output", ...
    Names and numbers are blanked so that the same reason at different layers counts as one."""
    out = {}
    for reason in reasons:
        key = re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'...'", reason)).split(":")[0].split(" (")[0][:60]
        out[key] = out.get(key, 0) + 1
    return out


def run_one(source: str, name: str, structure: str) -> None:
    """Runs inside the subprocess; prints a JSON line after every phase (the last one is the result,
    and on a timeout the last one says how far it got)."""
    row = {"source": source, "model": name, "structure": structure}

    def report(phase: str, **fields):
        row.update(fields, phase=phase)
        print(json.dumps(row, default=str), flush=True)

    if source == "transformers":
        try:
            import transformers  # noqa: F401 - the optional extra: torch_rlprune[transformers]
        except ImportError:
            report("done", status="skipped", notes="skipped: transformers not installed")
            return
    report("build")
    case = build_case(source, name)
    report("built", input=case.shape, params=sum(p.numel() for p in case.model.parameters()))
    run = run_unstructured if structure == "unstructured" else run_channel
    final = run(case, dict(row), report)
    final["phase"] = "done"
    print(json.dumps(final, default=str), flush=True)


# ----------------------------------------------------------------------------- the parent

def run_subprocess(source: str, name: str, structure: str, timeout: float) -> dict:
    tick = time.perf_counter()
    # One thread per child: two children share the two cores; passive OpenMP does not spin.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--one", source, name, structure]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parent)
        stdout, stderr, timed_out = proc.stdout, proc.stderr, False
    except subprocess.TimeoutExpired as err:
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        stderr, timed_out = "", True
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    row = json.loads(lines[-1]) if lines else {"source": source, "model": name, "structure": structure}
    if timed_out:
        row.update(status="timeout", error=f"no result in {timeout:.0f}s (last phase: {row.get('phase', 'start')})")
    elif row.get("phase") != "done":
        tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
        row.update(status="fail", error=f"crash in {row.get('phase', 'start')}: {tail[0][:400]}")
    row["seconds"] = round(time.perf_counter() - tick, 1)
    return row


def jobs(only, structures) -> list:
    todo = [("torchvision", name) for name, _ in TORCHVISION] + [("transformers", name) for name in TRANSFORMERS]
    todo = [(s, n) for s, n in todo if not only or s in only or n in only]
    return [(s, n, st) for s, n in todo for st in structures]


# ----------------------------------------------------------------------------- the report

def percent(part: int, whole: int) -> str:
    return f"{part}/{whole} ({part / whole:.0%})" if whole else "0/0"


def headline(rows) -> str:
    def pick(source, structure):
        return [r for r in rows if r["source"] == source and r["structure"] == structure and r["status"] != "skipped"]

    tv_u, tv_c = pick("torchvision", "unstructured"), pick("torchvision", "channel")
    hf_u, hf_c = pick("transformers", "unstructured"), pick("transformers", "channel")
    silent = sum(len(r.get("silent", [])) for r in rows)
    silent_rows = sum(r["status"] == "silent" for r in rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    return (f"**torchvision ok: unstructured {percent(sum(r['status'] == 'ok' for r in tv_u), len(tv_u))}, channel "
            f"{percent(sum(r['status'] == 'ok' for r in tv_c), len(tv_c))}; transformers unstructured ok "
            f"{percent(sum(r['status'] == 'ok' for r in hf_u), len(hf_u))}, channel exact or clear refusal "
            f"{percent(sum(r['status'] in ('ok', 'refused') for r in hf_c), len(hf_c))}; silent weights: {silent}"
            f" (in {silent_rows} rows)**" + (f"; {skipped} rows skipped" if skipped else ""))


def left_out_cell(r: dict) -> str:
    if r["structure"] == "channel":
        if "excluded" not in r:
            return ""
        reasons = ", ".join(f"{k} x{v}" for k, v in r.get("excluded_reasons", {}).items())
        return f"{r['excluded']} groups kept whole" + (f": {reasons}" if reasons else "")
    if "left_out" not in r:
        return ""
    reasons = ", ".join(f"{k.split(' (')[0]} x{v}" for k, v in r.get("left_out_reasons", {}).items())
    return f"{r['left_out']} of {r['weights']}" + (f": {reasons}" if reasons else "")


def cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def markdown(rows) -> str:
    lines = [headline(rows), "",
             f"Target {TARGET:.0%} (unstructured: of the candidate weights, +-{TOLERANCE['unstructured']}; channel: "
             f"of the MACs, +-{TOLERANCE['channel']}), agent=\"prior\", {SAMPLES} random samples; masked vs compacted "
             "is the max abs difference (ok below 1e-4 x max(1, output scale)). *silent* = a weight that runs, stays "
             "dense and is reported nowhere. `python benchmarks/coverage.py` regenerates this file.", "",
             "| source | model | structure | status | target met | masked vs compacted | MACs removed | "
             "weights left out | seconds | error / notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = f"{r['max_abs_diff']:.2g} (scale {r['output_scale']:.2g})" if "max_abs_diff" in r else ""
        macs = f"{r['macs_removed']:.1%}" if "macs_removed" in r else ""
        met = {True: "yes", False: "no"}.get(r.get("target_met"), "")
        if "sparsity" in r and r["structure"] == "unstructured":
            met += f" ({r['sparsity']:.3f})"
        notes = "; ".join(x for x in (r.get("notes", ""), r.get("error", ""),
                                      f"silent: {', '.join(r['silent'][:4])}" if r.get("silent") else "") if x)
        model = f"{r['model']} ({r['input']})" if r.get("input") else r["model"]
        lines.append(f"| {r['source']} | {cell(model)} | {r['structure']} | {r['status']} | {met} | {diff} | {macs} | "
                     f"{cell(left_out_cell(r))} | {r.get('seconds', '')} | {cell(notes[:300])} |")
    return "\n".join(lines) + "\n"


def write(rows, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "coverage.json").write_text(json.dumps(rows, indent=1, default=str))
    (out / "coverage.md").write_text(markdown(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=420, help="seconds per model and structure")
    parser.add_argument("--only", nargs="*", help="model names, or a source (torchvision, transformers)")
    parser.add_argument("--structures", nargs="*", default=list(STRUCTURES), choices=STRUCTURES)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--report", help="regenerate coverage.md next to this coverage.json; run nothing")
    args = parser.parse_args()
    if args.one:
        try:
            run_one(*args.one)
        except Exception:  # noqa: BLE001 - an error outside rl_prune (building the model) is a result too
            print(traceback.format_exc(), file=sys.stderr)
            sys.exit(1)
        return
    if args.report:
        path = Path(args.report)
        (path.parent / "coverage.md").write_text(markdown(json.loads(path.read_text())))
        print(markdown(json.loads(path.read_text())).splitlines()[0])
        return
    todo = jobs(args.only, args.structures)
    order = sorted(todo, key=lambda j: j[1] not in SLOW_FIRST)   # stable: slow ones first, else table order
    started = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        done = dict(zip(order, pool.map(lambda j: progress(run_subprocess(*j, args.timeout), started), order)))
    rows = [done[j] for j in todo]
    out = Path(args.out)
    if args.only or args.structures != list(STRUCTURES):   # a partial run updates its rows in the full table
        rows = merge(out / "coverage.json", rows)
    write(rows, out)
    print(headline(rows))


def progress(row: dict, started: float) -> dict:
    print(f"[{time.perf_counter() - started:6.0f}s] {row['source']:<12} {row['model']:<20} {row['structure']:<12} "
          f"{row['status']:<8} {row.get('seconds', '')}s {row.get('notes', '')[:60]} {row.get('error', '')[:80]}",
          flush=True)
    return row


def merge(path: Path, rows: list) -> list:
    """The earlier full table with these rows replaced (or added): partial re-runs keep the table whole."""
    if not path.exists():
        return rows
    new = {(r["source"], r["model"], r["structure"]): r for r in rows}
    old = json.loads(path.read_text())
    merged = [new.pop((r["source"], r["model"], r["structure"]), r) for r in old]
    return merged + list(new.values())


if __name__ == "__main__":
    main()
