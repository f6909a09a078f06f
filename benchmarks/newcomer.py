"""The README's Install and Quick start, timed as a newcomer runs them, with what each step installs.

    python benchmarks/newcomer.py      # ~6 min; writes benchmarks/results/newcomer.{json,md} and the README's table

In a fresh virtual environment under a temporary directory: every command of the README's Install block
(extracted from README.md, run as written), then each optional extra (`pip install -e '.[extra]'`),
recording wall time and how much site-packages grew; then the Quick start block, extracted and run as
written in a fresh directory holding ``data/``. Packages come from the configured registry (a local mirror
on this project's machine, so download time here is small).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from study import study_main  # noqa: E402

EXTRAS = ("deploy", "transformers", "gym", "executorch")


def _block(heading: str, lang: str) -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(rf"## {heading}.*?```{lang}\n(.*?)```", text, re.S).group(1)


def _site_bytes(venv: Path) -> int:
    return sum(f.stat().st_size for f in venv.glob("lib/python*/site-packages/**/*") if f.is_file())


def _timed(command: str, cwd: Path, env: dict) -> float:
    tick = time.perf_counter()
    subprocess.run(["bash", "-c", command], cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    return time.perf_counter() - tick


def run(quick: bool) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="newcomer-") as tmp:
        work, venv = Path(tmp), Path(tmp) / ".venv"
        env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
        env.pop("OMP_WAIT_POLICY", None)  # a newcomer's shell does not set it
        for line in _block("Install", "bash").splitlines():
            command = re.sub(r"\s+#.*$", "", line).replace("&& . .venv/bin/activate", "").strip()
            if not command:
                continue
            before = _site_bytes(venv) if venv.exists() else 0
            seconds = _timed(command, ROOT if "-e ." in command else work, env)
            rows.append({"step": command, "seconds": seconds, "added_mb": (_site_bytes(venv) - before) / 2**20})
        for extra in () if quick else EXTRAS:
            before = _site_bytes(venv)
            seconds = _timed(f"pip install -q -e '.[{extra}]'", ROOT, env)
            rows.append({"step": f"pip install -e '.[{extra}]'", "seconds": seconds,
                         "added_mb": (_site_bytes(venv) - before) / 2**20})
        (work / "quickstart.py").write_text(_block("Quick start", "python"))
        if not (work / "data").exists():
            (work / "data").symlink_to(ROOT / "data", target_is_directory=True)
        seconds = _timed(f"{venv / 'bin' / 'python'} quickstart.py", work, env)
        rows.append({"step": "the Quick start, as written", "seconds": seconds, "added_mb": 0.0})
    return {"rows": rows, "cpus": os.cpu_count()}


def to_markdown(report: dict, command: str) -> str:
    core = [r for r in report["rows"] if "[" not in r["step"] and "Quick start" not in r["step"]]
    quick = next(r for r in report["rows"] if "Quick start" in r["step"])
    lines = [f"Reproduce: `{command}` ({report['cpus']} CPUs). A fresh virtual environment, the Install block's "
             f"commands as written, then each extra, then the Quick start: **install + quick start "
             f"{(sum(r['seconds'] for r in core) + quick['seconds']) / 60:.1f} min**.", "",
             "| step | wall s | installed |", "|---|---|---|"]
    for r in report["rows"]:
        size = f"{r['added_mb'] / 1024:.1f} GB" if r["added_mb"] >= 1024 else f"{r['added_mb']:.0f} MB"
        step = r["step"].strip() if r["step"].startswith("the ") else f"`{r['step'].strip()}`"
        lines.append(f"| {step} | {r['seconds']:.0f} | {size if r['added_mb'] > 0.5 else '—'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    study_main("newcomer", __doc__.splitlines()[0], run, to_markdown)
