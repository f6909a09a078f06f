"""Every code block of README.md and docs/*.md runs, so a snippet that stops working fails CI.

A page's Python blocks run in order as one script (a later block may use an earlier one's names) in a fresh
directory holding the prepared ``data/``: what a newcomer who copies them gets. Shell blocks run command by
command there too: ``rlprune`` (in this process, through its entry function: a process start costs ~6 s),
``python`` and ``torchrun`` as processes; ``make`` as a
dry run (``make -n``: the target and everything it needs exist; running ``make test`` inside the tests would
recurse); ``pip install`` is checked against what is installed and the extras setup.py declares. A block may
say how the test shrinks it with an HTML comment just above it, ``<!-- test: OLD => NEW; ... -->``; every
OLD must occur in the block. A block in any other language, or a command with no runner, fails.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- test: (?P<subs>[^\n]*?) -->\n)?```(?P<lang>[^\n]*)\n(?P<code>.*?)^```", re.S | re.M)
RUNNABLE = ("python", "bash")
SETUP = (ROOT / "setup.py").read_text()


def code_blocks(page: Path):
    """``(language, code)`` of every fenced block, with the test's substitutions applied."""
    found = []
    for match in BLOCK.finditer(page.read_text()):
        code = match["code"]
        for rule in filter(None, (match["subs"] or "").split(";")):
            old, new = (part.strip() for part in rule.split("=>"))
            assert old in code, f"{page.name}: the test's substitution {old!r} no longer matches its block"
            code = code.replace(old, new)
        found.append((match["lang"].strip(), code))
    return found


def shell_commands(code: str):
    """The commands of a shell block: continuations joined, comments dropped, ``&&`` chains split."""
    joined = re.sub(r"\s*\\\n\s*", " ", code)
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            yield from (part.strip() for part in line.split("&&"))


def workdir(tmp_path: Path) -> Path:
    for name in ("data", "examples", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    return tmp_path


def environment(tmp_path: Path) -> dict:
    bin_dir = str(Path(sys.executable).parent)  # rlprune, torchrun: the console scripts of this environment
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TORCH_RLPRUNE_CACHE": str(tmp_path / "cache"),
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "MPLBACKEND": "Agg"}


def _without_progress(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "%|" not in line)  # tqdm's redraws


def run(args, cwd: Path, env: dict, timeout: int = 600) -> None:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(map(str, args))} exited {done.returncode}:\n" \
                                 f"{_without_progress(done.stdout)[-3000:]}\n{_without_progress(done.stderr)[-3000:]}"


def check_pip(words, cwd: Path) -> None:
    """``pip install`` lines: the pinned versions are the installed ones; an extra is one setup.py declares."""
    for word in words[2:]:
        if word.startswith("-") or word == ".":
            continue
        extra = re.fullmatch(r"\.\[(\w+)\]", word)
        if extra:
            assert f'"{extra[1]}":' in SETUP, f"setup.py declares no extra {extra[1]!r}"
            continue
        name, _, version = word.partition("==")
        assert importlib.metadata.version(name) == version, f"{name} {version} is not the installed version"


def run_rlprune(args) -> None:
    """``rlprune ARGS`` in this process (the command line's own entry; a process start costs ~6 s)."""
    from torch_rlprune.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    assert code == 0, f"rlprune {shlex.join(args)} exited {code}:\n{_without_progress(err.getvalue())[-3000:]}"


def run_shell(command: str, cwd: Path, env: dict) -> None:
    words = shlex.split(command)
    head = words[0]
    if head == "rlprune":
        run_rlprune(words[1:])
    elif head in ("python", "python3") and words[1:3] == ["-m", "venv"]:
        run([sys.executable, "-m", "venv", "--without-pip", *words[3:]], cwd, env)  # pip: checked below
    elif head in ("python", "python3"):
        run([sys.executable, *words[1:]], cwd, env)
    elif head == "torchrun":
        run([sys.executable, "-m", "torch.distributed.run", *words[1:]], cwd, env)
    elif head == ".":
        assert (cwd / words[1]).is_file(), f"{words[1]} does not exist"
    elif head == "make":
        run(["make", "-n", *words[1:]], ROOT, env)
    elif head == "pip" and words[1] == "install":
        check_pip(words, cwd)
    else:
        raise AssertionError(f"no runner for the documented command {command!r}")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_code_block_runs_as_written(page, tmp_path, monkeypatch):
    blocks = code_blocks(page)
    assert blocks or page.name == "BENCHMARKS.md", f"{page.name} has no runnable example"
    for lang, _ in blocks:
        assert lang in RUNNABLE, f"{page.name}: a ```{lang} block the test cannot run"
    cwd, env = workdir(tmp_path), environment(tmp_path)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TORCH_RLPRUNE_CACHE", env["TORCH_RLPRUNE_CACHE"])
    script = "\n".join(code for lang, code in blocks if lang == "python")
    if script:
        (cwd / "snippets.py").write_text(script)
        with torch.random.fork_rng(devices=[]):
            exec(compile(script, str(cwd / "snippets.py"), "exec"), {"__name__": "__main__"})
    for command in (c for lang, code in blocks if lang == "bash" for c in shell_commands(code)):
        run_shell(command, cwd, env)


def test_the_readme_stays_short_and_links_only_to_pages_that_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for page in PAGES:
        for link in re.findall(r"\]\(((?:docs/)?[\w.-]+\.md)(?:#[\w-]+)?\)", page.read_text()):
            base = ROOT if page.name == "README.md" else ROOT / "docs"
            assert (base / link).is_file(), f"{page.name} links to a missing {link}"


def test_shell_blocks_are_split_into_the_commands_a_reader_would_type():
    code = "a --x 1 \\\n    --y 2   # comment\n# only a comment\nb && c\n"
    assert list(shell_commands(code)) == ["a --x 1 --y 2", "b", "c"]


def test_an_unknown_command_or_a_stale_substitution_fails(tmp_path):
    with pytest.raises(AssertionError, match="no runner"):
        run_shell("curl http://example.com", tmp_path, {})
    page = tmp_path / "page.md"
    page.write_text("<!-- test: --episodes 9 => --episodes 1 -->\n```bash\nrlprune prune x --episodes 8\n```\n")
    with pytest.raises(AssertionError, match="no longer matches"):
        code_blocks(page)
