"""The options of ``rlprune prune``: their defaults, the checks they pass before anything is read, and
``command.json``, the record of them that ``--resume`` reads back."""
from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Dict, Optional

from ..env.spaces import space_kind
from ..options import PruneOptions, Spelling
from .errors import PROG, CLIError, bad_input, one_of, positive, usage
from .loading import BUILTIN_DATA, data_shape, model_label

COMMAND_FILE = "command.json"
SEARCH_CHECKPOINT = "checkpoint.pt"
COMMAND_FORMAT_VERSION = 1
TRAIN_BATCH = 128  # train_classifier's default batch size: --train-steps N uses N * 128 images
FINETUNE_LR = 0.01  # the benchmark's fine-tune learning rate (docs/BENCHMARKS.md, `make bench`)

# Every option of `prune` that command.json keeps, with its default. The parser's defaults are
# all None, so that after parsing we know which flags were given explicitly (--resume must not
# silently ignore them); the real defaults are filled in from here.
PRUNE_DEFAULTS: Dict[str, Any] = {
    "target": [0.8], "structure": "unstructured", "agent": "amc", "budget": None, "reward": "fidelity",
    "episodes": None, "seed": 0, "max_amount": None, "exclude": [], "data": "fashion-mnist", "data_root": "data",
    "in_chans": None, "image_size": None, "calibration": 512, "test_samples": 2000, "checkpoint": None,
    "train_steps": 0, "finetune_steps": 0, "compact": False, "checkpoint_every": 10, "distributed": False,
    "prior": "best", "selection": 0.25, "importance": None, "protect_first_last": True, "repair": None,
    "export": None, "latency_batch": None, "latency_threads": None, "latency_runtime": None, "time_budget": None,
    "patience": None, "screen": None, "cache_mb": None,
}
# Options added after run directories were first written: an older command.json takes their defaults.
_LATER_OPTIONS = ("prior", "selection", "importance", "protect_first_last", "repair", "export", "latency_batch",
                  "latency_threads", "latency_runtime", "time_budget", "patience", "screen", "cache_mb")
# What command.json must hold for each option: (types allowed, element type for lists).
_PRUNE_TYPES: Dict[str, tuple] = {
    "target": (list, float), "structure": (str,), "agent": (str,), "budget": (str, type(None)), "reward": (str,),
    "episodes": (int, type(None)), "seed": (int,), "max_amount": (float, type(None)), "exclude": (list, str),
    "data": (str,), "data_root": (str,), "in_chans": (int, type(None)), "image_size": (int, type(None)),
    "calibration": (int,), "test_samples": (int,), "checkpoint": (str, type(None)), "train_steps": (int,),
    "finetune_steps": (int,), "compact": (bool,), "checkpoint_every": (int,), "distributed": (bool,),
    "prior": (str,), "selection": (float,), "importance": (str, type(None)), "protect_first_last": (bool,),
    "repair": (str, type(None)), "export": (str, type(None)), "latency_batch": (int, type(None)),
    "latency_threads": (int, type(None)), "latency_runtime": (str, type(None)),
    "time_budget": (float, type(None)), "patience": (int, type(None)), "screen": (int, type(None)),
    "cache_mb": (float, type(None)),
}
RESUME_ALLOWED = ("--quiet", "--debug")


def prune_settings(args) -> dict:
    """The options of a `prune` command line, defaults filled in where a flag was not given."""
    return {k: (PRUNE_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k)) for k in PRUNE_DEFAULTS}


_LATENCY_FLAGS = {"latency_batch": "--latency-batch", "latency_threads": "--latency-threads",
                  "latency_runtime": "--latency-runtime"}


def _validate_latency(s: dict) -> None:
    given = [flag for key, flag in _LATENCY_FLAGS.items() if s.get(key) is not None]
    if given and s["budget"] != "latency":
        raise usage(f"{', '.join(given)} need --budget latency")
    positive("--latency-batch", s.get("latency_batch"))
    positive("--latency-threads", s.get("latency_threads"))
    if s.get("latency_runtime") is not None:
        from ..structure.channel.measured import RUNTIMES

        if s["latency_runtime"] not in RUNTIMES:
            raise one_of("--latency-runtime", RUNTIMES, s["latency_runtime"])
    if s["budget"] == "latency":
        try:
            budget_spec(s)
        except ImportError as error:  # onnxruntime without the deploy extra
            raise usage(str(error)) from None


def budget_spec(s: dict):
    """rl_prune's budget=: the string, or a Latency spec built from the --latency-* flags."""
    if s["budget"] != "latency":
        return s["budget"]
    from ..structure.channel.measured import Latency

    return Latency(batch=s.get("latency_batch") or 1, threads=s.get("latency_threads"),
                   runtime=s.get("latency_runtime") or "eager")


class Flags(Spelling):
    """``rlprune prune``'s spelling of rl_prune's arguments in the shared checks' messages."""

    RENAMED = {"calibration_samples": "--calibration", "protect_first_last": "--no-protect"}

    def __call__(self, argument: str) -> str:
        return self.RENAMED.get(argument, "--" + argument.replace("_", "-"))

    def allowed(self, values) -> str:
        return ", ".join(map(str, values))

    def given(self, argument: str, value) -> str:
        return f"{self(argument)} {value}"


def validate_prune(s: dict) -> None:
    """Usage errors, before anything is read or written; message names the flag and allowed values.
    rl_prune's own checks (:class:`~torch_rlprune.options.PruneOptions`) first, then the flags that
    only the command line has."""
    if not s["target"]:
        raise usage("--target needs at least one value in (0, 1)")
    try:
        PruneOptions(target=list(s["target"]), structure=s["structure"], agent=s["agent"], budget=s["budget"],
                     reward=s["reward"], episodes=s["episodes"], seed=s["seed"], max_amount=s["max_amount"],
                     calibration_samples=s["calibration"], checkpoint_every=s["checkpoint_every"],
                     prior=s["prior"], selection=s["selection"], importance=s["importance"], repair=s["repair"],
                     protect_first_last=s["protect_first_last"], distributed=s["distributed"],
                     time_budget=s["time_budget"], patience=s["patience"], screen=s["screen"],
                     cache_mb=s["cache_mb"]).checked(Flags())
    except (ValueError, TypeError) as error:
        raise usage(str(error)) from None
    _validate_latency(s)
    for flag, key in (("--test-samples", "test_samples"), ("--train-steps", "train_steps"),
                      ("--finetune-steps", "finetune_steps")):
        positive(flag, s[key], zero=True)
    data_shape(s["data"], s["in_chans"], s["image_size"])
    if s["compact"] and not space_kind(s["structure"]).removes_channels:
        raise usage("--compact needs --structure channel (unstructured pruning keeps every shape; make its "
                    "zeros permanent with torch.nn.utils.prune.remove)")
    if s["export"] is not None:
        from ..structure.deploy import EXPORT_FORMATS

        if s["export"] not in EXPORT_FORMATS:
            raise one_of("--export", EXPORT_FORMATS, s["export"])
        if not s["compact"]:
            raise usage("--export needs --compact (--structure channel): a masked model runs at dense speed; an "
                        "unstructured model's gain is its size (model_sparse.pt)")


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")  # NaN/Infinity: no option takes them


def _check_command_file(run_dir: Path) -> dict:
    """Read and check ``run_dir/command.json``: every option present, of its type (data only)."""
    path = run_dir / COMMAND_FILE
    if not run_dir.is_dir():
        raise bad_input(f"--resume {run_dir}: no such directory")
    if not path.is_file():
        raise bad_input(f"--resume {run_dir}: not a run directory of `rlprune prune` (no {COMMAND_FILE})")

    def bad(what: str) -> CLIError:
        return bad_input(f"{path}: {what}")

    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise bad(f"not a valid JSON command file ({err})") from None
    if not isinstance(data, dict):
        raise bad(f"must be a JSON object, got {type(data).__name__}")
    if data.get("version") != COMMAND_FORMAT_VERSION:
        raise bad(f"command file version {data.get('version')!r} is not supported (this rlprune reads "
                  f"{COMMAND_FORMAT_VERSION})")
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise bad("'model' must be a non-empty string")
    options = data.get("options")
    if not isinstance(options, dict):
        raise bad("'options' must be an object")
    missing, unknown = set(PRUNE_DEFAULTS) - set(options), set(options) - set(PRUNE_DEFAULTS)
    options = {**{k: PRUNE_DEFAULTS[k] for k in missing & set(_LATER_OPTIONS)}, **options}
    missing -= set(_LATER_OPTIONS)
    if missing or unknown:
        raise bad(f"'options' is missing {sorted(missing)} / has unknown {sorted(unknown)}")
    settings = {}
    for key, value in options.items():
        kinds = _PRUNE_TYPES[key]
        if kinds[0] is list:
            ok = isinstance(value, list) and all(
                isinstance(v, kinds[1]) or (kinds[1] is float and isinstance(v, int)) for v in value) and \
                not any(isinstance(v, bool) for v in value)
        else:
            ok = (isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)) or \
                 (float in kinds and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise bad(f"option {key!r} has the wrong type: {value!r}")
        settings[key] = value
    settings["target"] = [float(t) for t in settings["target"]]
    try:
        validate_prune(settings)
    except CLIError as err:  # the file holds values the command line would refuse
        raise bad(str(err)) from None
    settings["model"] = data["model"]
    argv = data.get("argv")
    settings["_argv"] = argv if isinstance(argv, list) and all(isinstance(a, str) for a in argv) else None
    return settings


def resume_settings(args) -> tuple:
    """``(settings, out_dir)`` for ``prune --resume DIR``."""
    run_dir = Path(args.resume)
    given = sorted(f"--{k.replace('_', '-')}" for k in PRUNE_DEFAULTS if getattr(args, k) is not None)
    if args.out is not None:
        given.append("--out")
    if args.force:
        given.append("--force")
    if given:
        raise usage(f"--resume takes every option from {run_dir / COMMAND_FILE}; {', '.join(given)} cannot be "
                    f"given with it (allowed with --resume: {', '.join(RESUME_ALLOWED)})")
    settings = _check_command_file(run_dir)
    if args.model is not None and args.model != settings["model"] and \
            Path(args.model).resolve() != Path(settings["model"]).resolve():
        raise usage(f"--resume {run_dir} prunes MODEL {settings['model']!r} (from {COMMAND_FILE}); "
                    f"got MODEL {args.model!r}: leave MODEL out")
    if (run_dir / "run.json").is_file():
        raise usage(f"--resume {run_dir}: that run finished (run.json exists); nothing to resume")
    if args.model is None and Path(settings["model"]).exists():
        # a run directory is data from outside; a model file is a pickle, which runs code when loaded
        raise usage(f"--resume {run_dir} prunes the model file {settings['model']!r} (from {COMMAND_FILE}); "
                    f"model files are pickles and run code when loaded, so rlprune loads one only when you name "
                    f"it yourself: {PROG} prune {settings['model']} --resume {run_dir}")
    return settings, run_dir


def _absolute(value: Optional[str]) -> Optional[str]:
    return None if value is None else str(Path(value).resolve())


def default_out(model: str, agent: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{model_label(model)}-{agent}-{stamp}"
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out


def command_record(args, s: dict, model_spec: str) -> dict:
    from .. import __version__

    options = {k: s[k] for k in PRUNE_DEFAULTS}
    # Paths absolute, so that --resume works from any directory.
    options["data_root"] = _absolute(options["data_root"])
    options["checkpoint"] = _absolute(options["checkpoint"])
    if options["data"] not in BUILTIN_DATA:
        options["data"] = _absolute(options["data"])
    model = _absolute(model_spec) if Path(model_spec).is_file() else model_spec
    return {"version": COMMAND_FORMAT_VERSION, "torch_rlprune": __version__, "model": model, "options": options,
            "argv": list(args.argv)}

