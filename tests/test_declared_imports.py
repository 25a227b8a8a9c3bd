"""Every third-party import is declared in pyproject.toml, and commands print no Alembic
plugin chatter: what a fresh venv on a user's machine needs, checked without installing."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("db", "dicom_node", "worker", "trainer")
LOCAL = {*PACKAGES, "tests", "benchmarks"}


def _imports(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") in
                  ("importorskip", "import_module") and node.args
                  and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)):
                names.add(node.args[0].value.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in LOCAL}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(*groups: str) -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for group in groups:
        reqs += project["optional-dependencies"][group]
    return {_norm(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in reqs}


def _undeclared(modules: set[str], declared: set[str]) -> list[str]:
    dists = packages_distributions()
    missing = []
    for module in sorted(modules):
        owners = {_norm(d) for d in dists.get(module, [])}
        if not owners & declared:
            missing.append(f"{module} (from {sorted(owners) or 'no installed distribution'})")
    return missing


def test_every_import_of_the_packages_is_a_declared_dependency() -> None:
    modules: set[str] = set()
    for package in PACKAGES:
        modules |= _imports(REPO / package)
    assert _undeclared(modules, _declared()) == []


def test_every_import_of_tests_and_benchmarks_is_declared_with_the_test_extras() -> None:
    modules = _imports(REPO / "tests") | _imports(REPO / "benchmarks")
    assert _undeclared(modules, _declared("test")) == []


@pytest.mark.slow
def test_commands_print_no_alembic_plugin_lines(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env["CXR_DATA_DIR"] = str(tmp_path / "data")
    for argv in (["-m", "worker.console.cli", "status"],
                 ["-m", "worker.console.cli", "db", "upgrade"]):
        done = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "at head" in done.stderr + done.stdout
        assert "setup plugin" not in done.stderr + done.stdout
