"""The package has no import cycles: a walk over the module-level ``import`` statements of ``a3q/``.

An edge A → B means importing A executes B at import time: ``import B``, ``from B import x`` (and ``B.x`` when x is
a submodule), and B's parent packages, whose ``__init__`` runs first. Imports inside functions and under
``if TYPE_CHECKING:`` do not count here: this is the module-level check (no module imports itself through others at
import time); the room order, which counts every import, is ``tests/test_layer_order.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "a3q"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in [node, *(node.body + node.orelse if isinstance(node, (ast.If, ast.Try)) else [])]:
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in files)
        edges = set()
        for target in targets:
            parts = target.split(".")
            for end in range(1, len(parts) + 1):  # the target and every parent package it runs first
                candidate = ".".join(parts[:end])
                if candidate in files and candidate != name:
                    edges.add(candidate)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_walk_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a3q_has_no_import_cycles():
    graph = import_graph()
    assert "a3q.engine" in graph and "a3q.pipeline.runner" in graph["a3q.engine"]
    cycle = find_cycle(graph)
    assert cycle is None, " → ".join(cycle)
