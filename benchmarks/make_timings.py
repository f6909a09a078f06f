"""The README's two commands, `make demo` and `make test`, timed on fresh clones as a newcomer runs them.

    python benchmarks/make_timings.py          # ~35 min on 2 cores; writes benchmarks/results/make_timings.{json,md}
    python benchmarks/make_timings.py --quick  # only the set-up part of one clone (~2 min)
    python benchmarks/make_timings.py --only test  # one command; the other's row kept from the last run

Each command gets its own fresh ``git clone`` of this checkout's HEAD (no .venv, no data, no checkpoint),
so each pays for its own set-up, as on a fresh machine. The set-up part (``make install data``: the venv,
torch and the package from the registry, the datasets) is timed first, then the command itself, which
finds them in place; the README shows both and their sum. Run alone on the machine: the test suite and
the demo use both cores. Packages come from the configured registry (a local mirror on this project's
machine, with pip's cache warm), so a first install elsewhere downloads for longer.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from study import study_main  # noqa: E402

COMMANDS = ("demo", "test")
WHAT = {"demo": "trains resnet18 on Fashion-MNIST, prunes 80% against the heuristics, writes its table",
        "test": "the whole test suite"}


def _clean_env() -> dict:
    env = dict(os.environ)
    for name in ("VIRTUAL_ENV", "OMP_WAIT_POLICY", "PYTHONPATH"):  # a newcomer's shell sets none of them
        env.pop(name, None)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    return env


def _timed(args, cwd: Path, env: dict) -> float:
    tick = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed in {cwd} (exit {done.returncode}):\n{done.stdout[-3000:]}")
    return time.perf_counter() - tick


def _head(repo: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()


def _kept_rows(commands) -> list:
    """The last run's rows of the commands not timed now (each row names the commit it timed)."""
    try:
        last = json.loads((HERE / "results" / "make_timings.json").read_text())
    except (OSError, ValueError):
        return []
    return [r for r in last.get("rows", []) if r.get("command", "").split()[-1] not in commands]


def run(quick: bool, only=None) -> dict:
    env, rows = _clean_env(), []
    commands = COMMANDS[:1] if quick else (only or COMMANDS)
    for command in commands:
        with tempfile.TemporaryDirectory(prefix=f"make-{command}-") as tmp:
            clone = Path(tmp) / "clone"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
            setup = _timed(["make", "install", "data"], clone, env)
            own = 0.0 if quick else _timed(["make", command], clone, env)
            rows.append({"command": f"make {command}", "setup_seconds": setup, "command_seconds": own,
                         "commit": _head(clone)})  # each clone is of HEAD when it was made
    if only and not quick:
        rows = sorted(rows + _kept_rows(commands), key=lambda r: COMMANDS.index(r["command"].split()[-1]))
    return {"rows": rows, "cpus": os.cpu_count(), "quick": quick}


def to_markdown(report: dict, command: str) -> str:
    lines = [f"Reproduce: `{command}` ({report['cpus']} CPUs): each command on its own fresh clone, the set-up "
             "(`make install data`) timed apart from the rest.", "",
             "| command | what it does | commit | set-up min | the rest min | total min |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        name = r["command"].split()[-1]
        total = r["setup_seconds"] + r["command_seconds"]
        lines.append(f"| `{r['command']}` | {WHAT[name]} | {r['commit']} | {r['setup_seconds'] / 60:.1f} | "
                     f"{r['command_seconds'] / 60:.1f} | **{total / 60:.1f}** |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--only", choices=COMMANDS, action="append")
    known, rest = pre.parse_known_args()
    study_main("make_timings", __doc__.splitlines()[0], lambda quick: run(quick, known.only), to_markdown, rest)
