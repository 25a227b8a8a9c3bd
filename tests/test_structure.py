"""The map of the house, held by a test: floors, no import cycles, module sizes, and one
definition each of the things that used to be copied.

Floors (imports point downward only)::

    worker.console   the operator's side
    worker           the Celery pipeline (never imports worker.console)
    trainer          the model
    dicom_node       DICOM only
    db               the foundation

Every ``import`` counts, at module level or inside a function, because a lazy import is
still a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("db", "dicom_node", "trainer", "worker")
FLOORS = {"db": 0, "dicom_node": 1, "trainer": 2, "worker": 3, "worker.console": 4}

#: No module is longer than this (the last legacy exceptions were split by job).
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO)
            if "migrations" in rel.parts:
                continue
            name = ".".join(rel.with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imported(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports (a package's ``__init__`` only when a name is
    taken from it rather than a submodule)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES]
            if len(subs) < len(node.names):
                found.add(module)
            found.update(subs)
    out: set[str] = set()
    for module in found:
        while module and module not in MODULES:
            module = module.rpartition(".")[0]
        if module and module != name:
            out.add(module)
    return out


GRAPH = {name: _imported(name, path) for name, path in MODULES.items()}


def _floor(module: str) -> int:
    if module == "worker.console" or module.startswith("worker.console."):
        return FLOORS["worker.console"]
    return FLOORS[module.split(".")[0]]


def _cycles() -> Iterator[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    counter = [0]

    def visit(v: str) -> Iterator[list[str]]:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                yield from visit(w)
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
                yield sorted(component)

    for v in sorted(GRAPH):
        if v not in index:
            yield from visit(v)


def test_the_analyser_sees_the_packages() -> None:
    assert {"db.errors", "db.atomic", "db.metrics", "worker.console.cli",
            "worker.app", "trainer.registry"} <= set(MODULES)
    assert "db.errors" in GRAPH["dicom_node.ingest"]  # it does read imports


def test_imports_point_downward_only() -> None:
    upward = sorted(f"{a} -> {b}" for a, deps in GRAPH.items() for b in deps
                    if _floor(b) > _floor(a))
    assert upward == []


def test_no_import_cycles_between_modules() -> None:
    assert list(_cycles()) == []


def test_modules_stay_small() -> None:
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines())
             for name, path in MODULES.items()}
    too_big = sorted(f"{name}: {n} lines" for name, n in sizes.items() if n > MAX_LINES)
    assert too_big == []


def _definitions(kind: type[ast.AST], name: str) -> list[str]:
    found = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, kind) and getattr(node, "name", None) == name:
                found.append(module)
    return found


def test_one_definition_each_of_what_used_to_be_copied() -> None:
    assert _definitions(ast.FunctionDef, "production_model") == ["trainer.registry"]
    assert _definitions(ast.ClassDef, "ModelInfo") == ["trainer.registry"]
    assert _definitions(ast.FunctionDef, "resolve_device") == ["trainer.checkpoint"]
    assert _definitions(ast.FunctionDef, "file_sha256") == ["db.atomic"]
