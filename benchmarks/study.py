"""The command line every study in benchmarks/ shares: run (or reload a JSON), write the results, the README.

    python benchmarks/<study>.py [--quick] [--out DIR] [--report JSON] [--no-readme]

A study gives its name, ``run(quick) -> report`` and ``to_markdown(report, command) -> str``; the
report goes to ``<out>/<name>.json``, the table to ``<out>/<name>.md`` and, for a full run, into
README.md or docs/*.md between the study's markers, so the published figures are always the run's.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from torch_rlprune.report import publish_section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def study_main(name: str, description: str, run: Callable[[bool], dict], to_markdown: Callable[[dict, str], str],
               argv=None) -> dict:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="one seed, small budgets (smoke test)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--report", metavar="JSON", help="only regenerate the markdown (and README) from a JSON")
    parser.add_argument("--no-readme", action="store_true", help="do not write the table into README.md / docs/")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_quick" if args.quick else name
    if args.report:
        report = json.loads(Path(args.report).read_text())
    else:
        report = run(args.quick)
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    markdown = to_markdown(report, f"python benchmarks/{name}.py" + (" --quick" if args.quick else ""))
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
    if not args.quick and not args.no_readme:
        for page in publish_section(ROOT, name, markdown):
            print(f"{page.relative_to(ROOT)} updated")
    return report
