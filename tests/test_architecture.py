"""The package's arrows, checked on the source: imports run one way and private names stay private.

api/cli -> search -> env / agents / rewards -> structure -> torch, torch-pruning, timm (ARCHITECTURE.md).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "torch_rlprune"

# part -> the parts it must never import
NEVER = {
    "structure": {"env", "agents", "rewards", "search", "api", "options", "results", "plan", "gym_env", "cli",
                  "demo", "report"},
    "agents": {"structure", "rewards", "search", "api", "options", "results", "plan", "gym_env", "cli", "demo",
               "report"},
    "env": {"agents", "search", "api", "options", "results", "gym_env", "cli", "demo", "report"},
    "rewards": {"env", "agents", "search", "api", "options", "results", "gym_env", "cli", "demo", "report"},
    "search": {"api", "gym_env", "cli", "demo", "report"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, top_level_only: bool = False) -> List[Tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every import of the package in ``path``."""
    tree = ast.parse(path.read_text())
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(target, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
    return [(t, n, line) for t, n, line in found if t.split(".")[0] == "torch_rlprune"]


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


SOURCES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(p) for p in SOURCES}


def resolve(target: str, name: str) -> str:
    """The module an import binds: ``from a import b`` is module ``a.b`` when that is a module."""
    return f"{target}.{name}" if f"{target}.{name}" in MODULES else target


def test_the_source_tree_is_found():
    assert len(SOURCES) > 40 and "torch_rlprune.structure.tensors" in MODULES


@pytest.mark.parametrize("part", sorted(NEVER))
def test_imports_run_one_way(part):
    wrong = [f"{module_name(p)}:{line} imports {resolve(t, n)}"
             for p in SOURCES if part_of(module_name(p)) == part
             for t, n, line in imports_of(p) if part_of(resolve(t, n)) in NEVER[part]]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_modules_private_name():
    wrong = [f"{module_name(p)}:{line} imports {t}.{n}" for p in SOURCES for t, n, line in imports_of(p)
             if n.startswith("_") and not n.startswith("__") and t != module_name(p)]
    assert not wrong, "\n".join(wrong)


def _graph(top_level_only: bool) -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for p in SOURCES:
        here = module_name(p)
        graph[here] = {resolve(t, n) for t, n, _ in imports_of(p, top_level_only)} - {here}
    return graph


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # a package's __init__ importing its own submodules is how a package is made, not a cycle
            if nxt.startswith(node + ".") or node.startswith(nxt + ".") and nxt == node.rsplit(".", 1)[0]:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_import_cycle_between_modules():
    cycle = _cycle(_graph(top_level_only=False))
    assert not cycle, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_only_the_graph_module_patches_torch_pruning():
    """torch-pruning's internals are replaced in one place, behind a version check (structure/channel/graph.py)."""
    wrong = []
    for p in SOURCES:
        if p.name == "graph.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setattr" and node.args:
                targets = [node.args[0]]
            for target in targets:
                root = target
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in ("tp", "torch_pruning") and root is not target:
                    wrong.append(f"{module_name(p)}:{node.lineno}")
    assert not wrong, wrong


STRUCTURE_NAMES = {"unstructured", "channel"}


def _compares_a_structure_name(node: ast.AST) -> bool:
    """``x.structure == "channel"``, ``s["structure"] != "unstructured"``, ``structure in ("channel", ...)``."""
    if not isinstance(node, ast.Compare):
        return False
    sides = [node.left, *node.comparators]
    names = [s.value for s in sides if isinstance(s, ast.Constant)]
    names += [e.value for s in sides if isinstance(s, (ast.Tuple, ast.List, ast.Set)) for e in s.elts
              if isinstance(e, ast.Constant)]
    return any(n in STRUCTURE_NAMES for n in names if isinstance(n, str)) and \
        any("structure" in ast.unparse(s) for s in sides if not isinstance(s, (ast.Constant, ast.Tuple, ast.List)))


def test_structures_differ_in_one_module():
    """Everything that depends on ``structure`` asks its registered SpaceKind (env/spaces.py)."""
    wrong = [f"{module_name(p)}:{node.lineno}: {ast.unparse(node)}" for p in SOURCES
             if module_name(p) != "torch_rlprune.env.spaces"
             for node in ast.walk(ast.parse(p.read_text())) if _compares_a_structure_name(node)]
    assert not wrong, "\n".join(wrong)


def test_the_structure_check_finds_a_comparison():
    assert _compares_a_structure_name(ast.parse('plan.structure == "channel"').body[0].value)
    assert _compares_a_structure_name(ast.parse('"unstructured" != s["structure"]').body[0].value)
    assert not _compares_a_structure_name(ast.parse('plan.budget == "latency"').body[0].value)
    assert not _compares_a_structure_name(ast.parse('self.PRUNING_TYPE == "unstructured"').body[0].value)


def _code_lines(function: ast.AST) -> int:
    """Lines of a function without its docstring (rl_prune's argument reference is its documentation)."""
    lines = function.end_lineno - function.lineno + 1
    first = function.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 600


def test_no_function_needs_scrolling():
    long = [f"{module_name(p)}.{node.name}: {_code_lines(node)} lines" for p in SOURCES
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)


def test_no_file_holds_too_many_concepts():
    big = [f"{module_name(p)}: {n} lines" for p in SOURCES
           if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not big, "\n".join(big)


def test_the_readme_layout_names_what_exists():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("`benchmarks/` writes")]
    layout = layout[layout.index("    torch_rlprune/"):layout.index("    tests/")]
    files = {p.name for p in SOURCES}
    named = set(re.findall(r"\b([a-z_]+\.py)\b", layout))
    assert named and named <= files, sorted(named - files)
    folders = {p.parent.name for p in SOURCES if p.name == "__init__.py" and p.parent.parent == PACKAGE}
    assert folders <= set(re.findall(r"\b([a-z_]+)/", layout)), sorted(folders)
