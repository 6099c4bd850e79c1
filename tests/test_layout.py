"""The package layout of docs/DESIGN.md holds: imports flow one way, no circles, small modules.

Reads the import graph from the source (every ``import`` and ``from … import``, including
the ones inside functions), so a lazy import cannot hide a circle or a wrong-way dependency.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "DESIGN.md"
MAX_LINES = 500

# What each subsystem may import (besides itself). Entry points (api, cli, workers) may import
# the library; the library never imports an entry point.
ALLOWED: dict[str, set[str]] = {
    "app.core": set(),
    "app.settings": set(),
    "app.distributed": set(),
    "app.storage": {"app.settings"},
    "app.serving": {"app.core", "app.storage", "app.settings"},
    "app.intake": {"app.core", "app.storage", "app.serving", "app.settings"},
    "app.retrain": {"app.core", "app.storage", "app.serving", "app.settings", "app.distributed"},
    "app.experiments": {"app.core"},
    "app.api": {"app.core", "app.storage", "app.serving", "app.retrain", "app.intake", "app.settings",
                "app.distributed"},
    "app.cli": {"app.core", "app.storage", "app.serving", "app.retrain", "app.intake", "app.settings",
                "app.distributed", "app.experiments", "app.api", "workers"},
    "workers": {"app.core", "app.storage", "app.serving", "app.retrain", "app.intake", "app.settings",
                "app.distributed"},
}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for top in ("app", "workers"):
        for path in (REPO / top).rglob("*.py"):
            if "versions" in path.parts or path.name == "env.py":  # Alembic scripts: run by file
                continue
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _subsystem(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "workers":
        return "workers"
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # ``from pkg import submodule`` depends on the submodule, not only on pkg
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module
                           for a in node.names]
            for target in targets:
                while target and target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


MODULES = _modules()
GRAPH = _imports(MODULES)


def test_no_import_cycles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(MODULES):
        if module not in index:
            visit(module)
    assert not cycles, f"import circles: {cycles}"


def test_imports_flow_one_way() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        own = _subsystem(module)
        allowed = ALLOWED.get(own)
        assert allowed is not None, f"{module}: subsystem {own!r} is not in the layout (tests/test_layout.py)"
        for target in targets:
            theirs = _subsystem(target)
            if theirs != own and theirs != "app" and theirs not in allowed:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layout:\n" + "\n".join(sorted(wrong))


def _design_map() -> str:
    text = DESIGN.read_text()
    start = text.index("## Map")
    return text[start: text.index("\n## ", start + 1)]


def test_design_map_names_the_packages_that_exist() -> None:
    named = set(re.findall(r"`((?:app|workers)(?:/\w+)*)(?:/|\.py)?`", _design_map()))
    assert named, "docs/DESIGN.md has no package map"
    for path in named:
        assert (REPO / path).exists() or (REPO / f"{path}.py").exists(), f"map names {path}, not in the tree"
    subsystems = {m.replace(".", "/") for m in ALLOWED}
    missing = {s for s in subsystems if s not in named}
    assert not missing, f"the map leaves out {sorted(missing)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module: str) -> None:
    path = MODULES[module]
    lines = len(path.read_text().splitlines())
    if lines <= MAX_LINES:
        return
    relative = path.relative_to(REPO).as_posix()
    assert relative in _design_map(), (
        f"{relative} has {lines} lines (> {MAX_LINES}): split it, or name it in the map of "
        "docs/DESIGN.md with why it reads better whole")
