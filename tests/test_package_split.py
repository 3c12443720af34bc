"""The package split (docs/architecture.md): `emp_protocol` is the wire contract and imports
neither side; the worker never imports the hub; the hub uses the worker only in its test
helper (`emp_hub.testing`, which runs a real worker). Checked on the source, every import
statement of every module (those inside functions too), so an import that is caught or
never reached at run time shows as well."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("emp_protocol", "emp_worker", "emp_hub")
#: What each package may not import, and the modules that are allowed to anyway.
FORBIDDEN = {
    "emp_protocol": ({"emp_worker", "emp_hub"}, set()),
    "emp_worker": ({"emp_hub"}, set()),
    "emp_hub": ({"emp_worker"}, {"emp_hub.testing"}),
}


def modules(package: str) -> dict[str, Path]:
    """The package's modules by dotted name."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported(module: str, path: Path) -> set[str]:
    """The dotted names of the modules `module` imports (relative imports resolved)."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            names.add(base)
    return names


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
