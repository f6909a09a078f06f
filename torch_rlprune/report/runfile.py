"""``run.json``: records saved by :func:`save_run` and read back, checked entry by entry and never
executed, by :func:`load_run`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Sequence

from ..plan import SPARSITY_RANGE_TEXT, PlanError, PruningPlan, is_valid_sparsity
from .formatting import is_int, is_number, jsonable

RUN_FILE = "run.json"
RUN_FORMAT_VERSION = 1

# The keys every record has (what summarize writes and load_run requires).
RECORD_KEYS = ("agent", "structure", "budget", "reward", "seed", "target", "sparsity", "score", "baseline_score",
               "wall_time", "forward_seconds", "episode_seconds", "episodes", "layers", "macs", "params",
               "test_accuracy", "history", "plan")


def _check(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {what}")


def _check_counts(value, where: str, field: str) -> None:
    if value is None:
        return
    _check(isinstance(value, dict), where, f"{field!r} must be an object or null, got {type(value).__name__}")
    for key in ("before", "after"):
        _check(key in value, where, f"{field!r} is missing {key!r}")
    for key, v in value.items():
        _check(v is None or (is_int(v) and v >= 0), where, f"{field}.{key} must be a non-negative integer or null")


def _check_record(r, where: str) -> None:
    _check(isinstance(r, dict), where, f"a record must be an object, got {type(r).__name__}")
    missing = [k for k in RECORD_KEYS if k not in r]
    _check(not missing, where, f"record is missing key(s) {missing}")
    for key in ("agent", "structure", "budget", "reward"):
        _check(isinstance(r[key], str), where, f"{key!r} must be a string")
    for key in ("target", "score", "baseline_score", "wall_time", "forward_seconds", "episode_seconds", "max_drop"):
        _check(r.get(key) is None or is_number(r[key]), where, f"{key!r} must be a finite number or null")
    _check(is_valid_sparsity(r["sparsity"], r["budget"]), where, f"'sparsity' must be {SPARSITY_RANGE_TEXT}")
    _check(r["target"] is None or 0 <= r["target"] <= 1, where, "'target' must be in [0, 1] or null")
    for key in ("seed", "episodes"):
        _check(r[key] is None or is_int(r[key]), where, f"{key!r} must be an integer or null")
    _check(isinstance(r["layers"], list), where, f"'layers' must be a list, got {type(r['layers']).__name__}")
    for i, lay in enumerate(r["layers"]):
        at = f"layers[{i}]"
        _check(isinstance(lay, dict), where, f"{at} must be an object, got {type(lay).__name__}")
        _check(isinstance(lay.get("name"), str) and isinstance(lay.get("kind"), str), where,
               f"{at} needs string 'name' and 'kind'")
        _check(is_int(lay.get("units")) and lay["units"] > 0, where, f"{at}.units must be a positive integer")
        _check(is_number(lay.get("amount")) and 0 <= lay["amount"] <= 1, where, f"{at}.amount must be in [0, 1]")
    _check_counts(r["macs"], where, "macs")
    _check_counts(r["params"], where, "params")
    acc = r["test_accuracy"]
    _check(acc is None or isinstance(acc, dict), where, "'test_accuracy' must be an object or null")
    for key, v in (acc or {}).items():
        _check(v is None or is_number(v), where, f"test_accuracy.{key} must be a finite number or null")
    _check(isinstance(r["history"], list), where, f"'history' must be a list, got {type(r['history']).__name__}")
    for i, h in enumerate(r["history"]):
        _check(isinstance(h, dict), where, f"history[{i}] must be an object, got {type(h).__name__}")
        _check(is_int(h.get("episode", 0)), where, f"history[{i}].episode must be an integer")
        for key in ("reward", "best_reward", "score", "sparsity", "seconds"):
            _check(h.get(key) is None or is_number(h[key]), where, f"history[{i}].{key} must be a number or null")
    if "removed_blocks" in r:
        _check(isinstance(r["removed_blocks"], list) and all(isinstance(b, str) for b in r["removed_blocks"]),
               where, "'removed_blocks' must be a list of strings")
    _check(r.get("latency") is None or isinstance(r["latency"], dict), where, "'latency' must be an object or null")
    try:
        PruningPlan.from_dict(r["plan"])
    except PlanError as err:
        raise ValueError(f"{where}: 'plan': {err}") from None


def check_records(records, where: str) -> List[dict]:
    _check(isinstance(records, (list, tuple)), where, f"'records' must be a list, got {type(records).__name__}")
    for i, r in enumerate(records):
        _check_record(r, f"{where}: records[{i}]")
    return list(records)


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def save_run(run_dir, records: Sequence[dict], extra: Optional[dict] = None) -> Path:
    """Write ``run_dir/run.json``: ``{"version": 1, "records": [...], **extra}`` (strict JSON).

    ``extra`` holds anything else worth keeping (the command line, the model name...); it may
    not use the keys ``version`` or ``records``. Records are checked as :func:`load_run` checks them.
    """
    run_dir = Path(run_dir)
    extra = {} if extra is None else extra
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise TypeError("extra must be a dict with string keys")
    clash = {"version", "records"} & set(extra)
    if clash:
        raise ValueError(f"extra may not set {sorted(clash)}: save_run writes them")
    records = check_records(jsonable(list(records)), "records")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"version": RUN_FORMAT_VERSION, "records": records, **jsonable(extra)},
                              indent=1, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def load_run(run_dir) -> dict:
    """Read ``run_dir/run.json`` (or the file itself when given its path) and check it.

    The file is parsed as data only (JSON, no code) and every record is checked field by field;
    anything malformed raises a ``ValueError`` naming the file and what is wrong.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / RUN_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no run file (write one with save_run)") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a JSON run file ({err})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as err:  # JSONDecodeError and the constants above
        raise ValueError(f"{path}: not a JSON run file ({err})") from None
    except RecursionError:
        raise ValueError(f"{path}: not a JSON run file (nested too deeply)") from None
    _check(isinstance(data, dict), str(path), f"a run file must be a JSON object, got {type(data).__name__}")
    _check(data.get("version") == RUN_FORMAT_VERSION, str(path),
           f"run format version {data.get('version')!r} is not supported (this library reads "
           f"version {RUN_FORMAT_VERSION})")
    _check("records" in data, str(path), "missing 'records'")
    check_records(data["records"], str(path))
    return data
