"""The examples of docs/plugins.md and docs/hooks.md, run as written."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from emp_worker import hookspecs

pytestmark = [pytest.mark.slow, pytest.mark.worker]

DOC = Path(__file__).parent.parent / "docs" / "plugins.md"


def block_after(text: str, marker: str) -> str:
    """The first fenced code block after `marker`."""
    rest = text[text.index(marker) :]
    match = re.search(r"```(?:python|toml)\n(.*?)```", rest, re.S)
    assert match is not None, marker
    return match.group(1)


def blocks_after(text: str, marker: str, end: str) -> list[str]:
    """The Python blocks between `marker` and `end`."""
    rest = text[text.index(marker) :]
    return re.findall(r"```python\n(.*?)```", rest[: rest.index(end)], re.S)


def run_pytest(folder: Path) -> subprocess.CompletedProcess[str]:
    """pytest in `folder`, as a plugin author runs it there."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(folder)},
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )


def test_the_documented_plugin_and_its_tests(tmp_path: Path) -> None:
    """The plugin project of docs/plugins.md, written out as documented (its
    pyproject.toml with the test configuration), passes its documented tests under pytest;
    without that configuration, pytest does not run them."""
    text = DOC.read_text()
    package = tmp_path / "emp_connector_echo"
    package.mkdir()
    (package / "__init__.py").write_text(block_after(text, "`emp_connector_echo/__init__.py`:"))
    (tmp_path / "tests").mkdir()
    tests = blocks_after(text, "## Testing a connector", "## Installing")
    assert len(tests) == 3
    (tmp_path / "tests" / "test_echo.py").write_text("\n\n".join(tests))
    project = block_after(text, "`pyproject.toml`:")
    (tmp_path / "pyproject.toml").write_text(project)
    bare = run_pytest(tmp_path)
    assert bare.returncode != 0 and "async def functions are not natively supported" in (
        bare.stdout + bare.stderr
    )
    configured = project + "\n" + block_after(text, "## Testing a connector")
    assert tomllib.loads(configured)["tool"]["pytest"]["ini_options"]
    (tmp_path / "pyproject.toml").write_text(configured)
    done = run_pytest(tmp_path)
    assert done.returncode == 0 and "3 passed" in done.stdout, done.stdout + done.stderr


# -- docs/hooks.md: a plugin and its test per hook ----------------------------------------------

HOOKS_DOC = Path(__file__).parent.parent / "docs" / "hooks.md"


def hook_sections() -> dict[str, str]:
    """The sections of docs/hooks.md by hook name (`## `name``)."""
    parts = re.split(r"^## `(\w+)`\n", HOOKS_DOC.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_hook_has_a_section() -> None:
    specs = {
        name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "emp_worker_spec")
    }
    assert specs and set(hook_sections()) == specs


@pytest.mark.parametrize("hook", sorted(hook_sections()))
async def test_the_hook_example_runs_as_written(
    hook: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each section's files (a plugin module and its test), written out as named; every
    `test_*` function of the test module runs."""
    files = re.findall(r"^`([\w/.]+)`:\n\n```python\n(.*?)```", hook_sections()[hook], re.M | re.S)
    tests = [path for path, _ in files if Path(path).name.startswith("test_")]
    assert files and tests, f"the section of {hook} has no plugin and test"
    for path, code in files:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SHARED_DISK", str(tmp_path / "shared-disk"))  # store_output's example
    before = set(sys.modules)
    try:
        for path in tests:
            spec = importlib.util.spec_from_file_location(Path(path).stem, tmp_path / path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            ran = 0
            for name, function in vars(module).items():
                if name.startswith("test_") and callable(function):
                    await function() if inspect.iscoroutinefunction(function) else function()
                    ran += 1
            assert ran, f"{path} has no test"
    finally:
        for name in set(sys.modules) - before:  # the example's own modules, not emp's
            if str(getattr(sys.modules[name], "__file__", "")).startswith(str(tmp_path)):
                del sys.modules[name]
