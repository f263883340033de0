"""The rooms of ``a3q/`` import only rooms below them, counting imports inside functions too (docs/architecture.md).

A room is a folder of ``a3q/`` (``arch``, ``io``, …) or a top-level module (``graph``, ``engine``, …). Every
``import`` statement counts wherever it stands (module level or inside a function), except under
``if TYPE_CHECKING:`` (annotations only, never executed). Since every import goes down the declared order, the
folders form no cycle. A lazy registry reaches its plugins by name (``importlib.import_module`` of a string), which
is not an import statement and keeps the registry below its plugins.

Imports left inside functions are few and say why on their line: an optional or heavy dependency that only one
path needs (PEFT, vLLM), the package's own facade (``a3q.load``/``a3q.run``), and the command line, which imports
per command so that ``a3q --help``, ``verify`` and ``serve`` start at once (0.2 s instead of seconds).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "a3q"

#: lowest first: a room may import itself and the rooms before it
ROOM_ORDER = [
    "a3q",  # the package itself: __version__ (its load()/run() facade defers everything else)
    "numerics", "placement", "atomic", "distributed", "report",  # torch/stdlib utilities
    "modeling",  # the self-contained files artifacts ship (torch + transformers only)
    "quant", "module_types", "cache", "graph",  # module formats, their registry, the KV cache, the graph
    "arch", "layer_store",  # families and model surgery; where decoder layers live
    "assets", "io", "calib",  # models and corpora on disk, loading and artifacts, text
    "pipeline", "metrics", "registry", "recipe", "checkpoint",  # the layer-by-layer pass and what it runs on
    "stages", "checks", "preflight", "session", "engine",  # what runs, and running it
    "search",  # a3q search: many engine runs, one budget
    "serving", "cli", "__main__",  # ways in
]
#: files whose function-level imports are the documented exceptions (see the module docstring)
DEFERRING_FILES = {"a3q/__init__.py", "a3q/cli.py"}
#: what a deferred import elsewhere must say on its line
REASONS = ("deferred", "lazy", "imports PEFT", "vLLM")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it is inside a function or class, skipping ``if TYPE_CHECKING:``."""
    found = []

    def walk(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, nested))
            walk(child, nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))

    walk(tree, False)
    return found


def targets(node: ast.Import | ast.ImportFrom, module: str, path: Path) -> list[str]:
    """The a3q modules an import statement names (a submodule when ``from package import submodule``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "a3q"]
    base = node.module or ""
    if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    if base.split(".")[0] != "a3q":
        return []
    submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in FILES]
    return submodules or [base]


def upward_imports() -> list[str]:
    rank = {name: index for index, name in enumerate(ROOM_ORDER)}
    found = []
    for module, path in sorted(FILES.items()):
        here = room(module)
        for node, nested in imports(ast.parse(path.read_text())):
            for target in targets(node, module, path):
                there = room(target)
                if here == "a3q" and nested:  # the facade
                    continue
                if rank[there] > rank[here]:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {here} imports {target}")
    return found


def test_every_room_is_in_the_order():
    assert {room(module) for module in FILES} <= set(ROOM_ORDER), \
        f"new rooms to place in ROOM_ORDER: {sorted({room(m) for m in FILES} - set(ROOM_ORDER))}"


def test_rooms_import_only_rooms_below_them():
    upward = upward_imports()
    assert not upward, "imports against the room order (docs/architecture.md):\n" + "\n".join(upward)


def test_function_level_imports_are_few_and_say_why():
    deferred, silent = [], []
    for module, path in sorted(FILES.items()):
        name = str(path.relative_to(PACKAGE.parent))
        lines = path.read_text().splitlines()
        for node, nested in imports(ast.parse(path.read_text())):
            if not nested or not targets(node, module, path) or name in DEFERRING_FILES:
                continue
            deferred.append(f"{name}:{node.lineno}")
            around = " ".join(lines[max(0, node.lineno - 3): node.end_lineno])
            if not any(reason in around for reason in REASONS):
                silent.append(f"{name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not silent, "a function-level import without a reason on its line:\n" + "\n".join(silent)
    assert len(deferred) <= 10, deferred


def test_modeling_files_are_self_contained():
    """What an artifact ships imports no a3q module: only its siblings (relative), torch, transformers, stdlib."""
    for path in (PACKAGE / "modeling").glob("*.py"):
        if path.name == "__init__.py":
            continue
        for node, _ in imports(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(name.split(".")[0] == "a3q" for name in names), f"{path.name}:{node.lineno}"


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    tree = ast.parse("def f():\n    from a3q.engine import run_recipe\n")
    (node, nested), = imports(tree)
    assert nested and targets(node, "a3q.graph", PACKAGE / "graph.py") == ["a3q.engine"]
    assert ROOM_ORDER.index(room("a3q.engine")) > ROOM_ORDER.index(room("a3q.graph"))
