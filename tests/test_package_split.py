"""The package split (docs/architecture.md): `emp_protocol` is the wire contract and imports
neither side; the worker never imports the hub; the hub uses the worker only in its test
helper (`emp_hub.testing`, which runs a real worker). Checked on the source, every import
statement of every module (those inside functions too), so an import that is caught or
never reached at run time shows as well."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
assert spec is not None and spec.loader is not None
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)
modules, imported = import_graph.modules, import_graph.imported

PACKAGES = ("emp_protocol", "emp_worker", "emp_hub", "emp_client")
#: What each package may not import, and the modules that are allowed to anyway.
FORBIDDEN = {
    "emp_protocol": ({"emp_worker", "emp_hub", "emp_client"}, set()),
    "emp_worker": ({"emp_hub", "emp_client"}, set()),
    "emp_hub": ({"emp_worker", "emp_client"}, {"emp_hub.testing"}),
    "emp_client": ({"emp_worker", "emp_hub"}, set()),
}


def test_the_import_graph_has_no_cycle() -> None:
    """`python scripts/import_graph.py`: every import of every module, no cycle."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "import_graph.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(run.stdout)
    assert (run.returncode, report["cycles"]) == (0, []), report
    assert report["modules"] >= 50


def test_a_cycle_is_found() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_graph.cycles(edges) == [["a", "b", "c"]]


def test_the_packages_are_found() -> None:
    for package in PACKAGES:
        assert f"{package}" in modules(package), package
    assert "emp_protocol.messages" in modules("emp_protocol")


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_reaches_into_the_other_side(package: str) -> None:
    forbidden, allowed = FORBIDDEN[package]
    wrong = {
        f"{module} imports {name}"
        for module, path in modules(package).items()
        if module not in allowed
        for name in imported(module, path)
        if name.partition(".")[0] in forbidden
    }
    assert not wrong, sorted(wrong)


def test_what_the_worker_imports_of_ours_is_in_the_base_distribution() -> None:
    """The single-file worker carries the base distribution: every package of ours the
    worker imports must be in it (pyproject's packages), with its py.typed."""
    ours = {
        name.partition(".")[0]
        for module, path in modules("emp_worker").items()
        for name in imported(module, path)
        if name.startswith("emp_")
    }
    assert ours == {"emp_worker", "emp_protocol"}
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    include = tool["setuptools"]["packages"]["find"]["include"]
    data = tool["setuptools"]["package-data"]
    for package in ours:
        assert f"{package}*" in include, package
        assert "py.typed" in data[package], package
        assert package in tool["mypy"]["files"], package


def defined(path: Path) -> set[str]:
    """The public names a module defines at its top level (classes, functions, constants)."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return {name for name in names if not name.startswith("_")}


def test_the_contract_is_defined_once() -> None:
    """What emp_protocol defines (statuses, TERMINAL, OutputRef, the messages...) is
    defined nowhere else: the hub and the worker import it."""
    contract = {name for path in modules("emp_protocol").values() for name in defined(path)}
    assert {"JobStatus", "TERMINAL", "OutputRef", "PROTOCOL_VERSION"} <= contract
    again = {
        f"{module}.{name}"
        for package in ("emp_worker", "emp_hub")
        for module, path in modules(package).items()
        for name in defined(path) & contract
    }
    assert not again, sorted(again)
