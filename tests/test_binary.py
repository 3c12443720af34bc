"""The single-file worker (scripts/build-worker.sh, packaging/pyinstaller/), built once per
session and run as a user runs it: against a real hub, with a plugin installed after the
build, and the commands of docs/binary.md as written.

The build takes minutes; it is kept under build/test-binary/<key>, where the key is a hash
of every file that goes into it (the worker's and the plugins' sources, the spec, the build
script) and of this Python, and reused while none of them changes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import Cluster, cluster

# The first test that needs the binary builds it (minutes on two cores).
pytestmark = [pytest.mark.slow, pytest.mark.binary, pytest.mark.worker, pytest.mark.timeout(1500)]

ROOT = Path(__file__).parent.parent
DOC = ROOT / "docs" / "binary.md"
#: What goes into the binary: a change to any of these means a new build.
SOURCES = [
    "pyproject.toml",
    "README.md",
    "emp_protocol",
    "emp_worker",
    "plugins",
    "packaging/pyinstaller",
    "scripts/build-worker.sh",
]


@dataclass
class Binary:
    """A built single-file worker."""

    path: Path
    build_info: dict[str, str]


def sources_key() -> str:
    """A hash of the files the build reads (tracked and new ones, not ignored ones) and of
    this Python."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", *SOURCES],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    digest = hashlib.sha256(sys.version.encode())
    for name in sorted(n.decode() for n in listed if n):
        path = ROOT / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def doc_blocks(heading: str) -> list[str]:
    """The ```sh blocks of one section (`## heading`) of docs/binary.md."""
    text = DOC.read_text()
    section = text[text.index(f"\n## {heading}\n") + 1 :]
    end = section.find("\n## ")
    return re.findall(r"```sh\n(.*?)```", section if end < 0 else section[:end], re.S)


@pytest.fixture(scope="session")
def binary() -> Binary:
    """The single-file worker, built by the command of docs/binary.md (or reused)."""
    cache = ROOT / "build" / "test-binary"
    home = cache / sources_key()
    found = sorted((home / "dist").glob("emp-worker-*")) if (home / "done").exists() else []
    if not found:
        for old in cache.glob("*"):
            shutil.rmtree(old)
        home.mkdir(parents=True)
        [build] = doc_blocks("Build")
        done = subprocess.run(
            ["bash", "-euc", build + 'echo "$worker"'],
            cwd=ROOT,
            env={**os.environ, "EMP_BUILD_DIR": str(home), "PYTHON": sys.executable},
            capture_output=True,
            text=True,
            timeout=1500,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-5000:]
        found = [Path(done.stdout.strip().splitlines()[-1])]
        (home / "done").write_text(str(found[0]))
    info = json.loads((home / "build" / "pyinstaller" / "info" / "build_info.json").read_text())
    return Binary(found[0], info)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The binary's environment: its own plugin directory, and TMPDIR in the test's folder
    (where onefile unpacks itself)."""
    (tmp_path / "tmp").mkdir()
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("EMP_")},
        "TMPDIR": str(tmp_path / "tmp"),
        "EMP_PLUGIN_DIR": str(tmp_path / "plugins"),
        "EMP_BUILD_PYTHON": sys.executable,  # builds a plugin folder into a wheel
    }


@pytest.fixture
def hub(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Cluster]:
    """A hub process in the test's namespace (removed afterwards)."""
    with cluster(redis_url, namespace, tmp_path) as running:
        yield running


def run(binary: Binary, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The binary with these arguments, to its end."""
    return subprocess.run(
        [str(binary.path), *args], env=env, capture_output=True, text=True, timeout=300
    )


def no_extraction_left(env: dict[str, str]) -> None:
    """Onefile removed what it unpacked (`_MEI*`) when it ended."""
    assert list(Path(env["TMPDIR"]).glob("_MEI*")) == []


def test_the_name_says_version_os_and_architecture(binary: Binary) -> None:
    os_name = {"Linux": "linux", "Darwin": "macos"}[os.uname().sysname]
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}[
        os.uname().machine
    ]
    assert binary.path.name == f"emp-worker-{importlib.metadata.version('emp')}-{os_name}-{arch}"
    assert binary.path.parent.name == "dist"


def test_version_commit_and_build_date(binary: Binary, env: dict[str, str]) -> None:
    done = run(binary, env, "--version")
    assert done.returncode == 0, done.stderr
    version = importlib.metadata.version("emp")  # the root pyproject.toml's
    commit, built = binary.build_info["commit"], binary.build_info["built"]
    assert done.stdout == f"emp-worker {version} (commit {commit}, built {built})\n"
    assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?", commit)
    sha = commit.removesuffix("-dirty")
    assert subprocess.run(["git", "cat-file", "-e", sha], cwd=ROOT).returncode == 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", built)
    no_extraction_left(env)


def test_doctor_against_a_hub_that_reports_the_same_version(
    binary: Binary, env: dict[str, str], hub: Cluster
) -> None:
    env |= {"EMP_HUB_URL": f"ws://127.0.0.1:{hub.port}", "EMP_CONNECTORS": "simulation"}
    done = run(binary, env, "doctor", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["hub"]["ok"] and report["connectors"]["simulation"]["ok"]
    assert report["version"] == hub.get("/health/live")["version"]
    assert report["version"] == importlib.metadata.version("emp")
    assert {p["name"]: p["origin"] for p in report["plugins"]} == {
        f"emp-connector-{name}": "bundled"
        for name in ("a1111", "comfyui", "rest", "simulation", "websocket")
    }
    no_extraction_left(env)


def test_the_binary_runs_on_uvloop(binary: Binary, env: dict[str, str], hub: Cluster) -> None:
    """uvloop is bundled (a dependency of the worker on Linux and macOS) and chosen."""
    env |= {
        "EMP_HUB_URL": f"ws://127.0.0.1:{hub.port}",
        "EMP_CONNECTORS": "simulation",
        "EMP_LOG_LEVEL": "debug",
    }
    done = run(binary, env, "doctor")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "event loop: uvloop" in done.stderr
    env["EMP_WORKER_LOOP"] = "asyncio"
    done = run(binary, env, "doctor")
    assert done.returncode == 0 and "event loop: asyncio" in done.stderr, done.stderr


def test_run_registers_and_completes_a_job_then_sigterm_drains(
    binary: Binary, env: dict[str, str], hub: Cluster
) -> None:
    worker = hub.start_worker("w-binary", program=str(binary.path), **own(env))
    hub.wait_for_workers("w-binary")
    job = hub.wait_job(hub.submit(payload={"duration": 0.2}))
    assert (job["status"], job["worker_id"]) == ("completed", "w-binary")
    [live] = hub.get("/api/workers")
    assert live["capabilities"]["services"] == ["simulation"]

    job_id = hub.submit(payload={"duration": 2})
    hub.wait_job(job_id, {"active"})
    worker.signal(signal.SIGTERM)  # onefile's parent passes it to the worker
    assert worker.wait(30) == 0, worker.text()
    job = hub.wait_job(job_id)
    assert (job["status"], job["worker_id"]) == ("completed", "w-binary")
    assert hub.get("/api/workers") == []
    no_extraction_left(env)


def own(env: dict[str, str]) -> dict[str, str]:
    """The test's TMPDIR and plugin directory, for a worker the cluster starts."""
    return {k: env[k] for k in ("TMPDIR", "EMP_PLUGIN_DIR")}


STDLIB_PLUGIN = {
    "pyproject.toml": """\
[build-system]
requires = ["setuptools>=70.1"]
build-backend = "setuptools.build_meta"

[project]
name = "emp-connector-stdlib"
version = "1.0.0"
dependencies = ["pluggy>=1.0"]  # bundled: not installed again

[project.entry-points.emp_worker]
stdlib = "emp_connector_stdlib"

[tool.setuptools]
packages = ["emp_connector_stdlib"]
""",
    "emp_connector_stdlib/__init__.py": """\
# Standard-library modules the worker itself does not import: bundled for plugins.
import csv
import decimal
import fractions
import io
import sqlite3
import statistics
import xml.etree.ElementTree as ET
import zoneinfo

from emp_worker import hookimpl
from emp_worker.connector import Connector, Health


class Stdlib(Connector):
    name = "stdlib"

    async def health(self):
        return Health(ok=True, detail="-")

    async def run(self, job, ctx):
        rows = list(csv.reader(io.StringIO(job.payload["csv"])))
        numbers = [decimal.Decimal(x) for x in rows[0]]
        db = sqlite3.connect(":memory:")
        [[total]] = db.execute("select ?+?", (str(numbers[0]), str(numbers[1]))).fetchall()
        return {
            "sum": str(sum(numbers)),
            "sql": total,
            "mean": str(statistics.mean(numbers)),
            "half": str(fractions.Fraction(1, 2)),
            "xml": ET.fromstring("<a>b</a>").text,
            "utc": str(zoneinfo.ZoneInfo("UTC")),
        }


@hookimpl
def register_connectors(register):
    register(Stdlib)
""",
}


def test_a_plugin_installed_after_the_build_loads_at_the_next_start_and_runs_a_job(
    binary: Binary, env: dict[str, str], hub: Cluster, tmp_path: Path
) -> None:
    project = tmp_path / "emp-connector-stdlib"
    for name, text in STDLIB_PLUGIN.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    done = run(binary, env, "plugins", "install", str(project))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == (
        f"installed emp-connector-stdlib into {env['EMP_PLUGIN_DIR']}"
    )
    installed = {p.name for p in Path(env["EMP_PLUGIN_DIR"]).iterdir()}
    assert installed == {"emp_connector_stdlib", "emp_connector_stdlib-1.0.0.dist-info"}

    listing = json.loads(run(binary, env, "plugins", "list", "--json").stdout)
    origins = {p["name"]: (p["origin"], p["status"]) for p in listing["plugins"]}
    assert origins["emp-connector-stdlib"] == ("installed", "loaded")
    assert origins["emp-connector-simulation"] == ("bundled", "loaded")

    hub.start_worker(
        "w-plugin", program=str(binary.path), **own(env), EMP_CONNECTORS="stdlib,simulation"
    )
    hub.wait_for_workers("w-plugin")
    job = hub.wait_job(hub.submit(job_type="stdlib", payload={"csv": "1.5,2.5"}))
    assert job["status"] == "completed", job
    assert job["result"] == {
        "sum": "4.0",
        "sql": 4.0,
        "mean": "2",
        "half": "1/2",
        "xml": "b",
        "utc": "UTC",
    }


def test_a_plugin_that_imports_a_left_out_stdlib_module_is_reported(
    binary: Binary, env: dict[str, str]
) -> None:
    """docs/binary.md: tkinter is not bundled; a plugin importing it fails to load, and
    `plugins list` says why (the plugin is written into the plugin directory by hand)."""
    plugins = Path(env["EMP_PLUGIN_DIR"])
    (plugins / "emp_tk").mkdir(parents=True)
    (plugins / "emp_tk" / "__init__.py").write_text("import tkinter\n")
    (plugins / "emp_tk-1.0.dist-info").mkdir()
    (plugins / "emp_tk-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: emp-tk\nVersion: 1.0\n"
    )
    (plugins / "emp_tk-1.0.dist-info" / "entry_points.txt").write_text(
        "[emp_worker]\ntk = emp_tk\n"
    )
    listing = json.loads(run(binary, env, "plugins", "list", "--json").stdout)
    [tk] = [p for p in listing["plugins"] if p["name"] == "emp-tk"]
    assert (tk["origin"], tk["status"], tk["error"]) == (
        "installed",
        "error",
        "ModuleNotFoundError: No module named 'tkinter'",
    )


def test_a_plugin_that_needs_another_version_of_a_bundled_library_is_refused(
    binary: Binary, env: dict[str, str], tmp_path: Path
) -> None:
    project = tmp_path / "emp-connector-old"
    (project / "emp_connector_old").mkdir(parents=True)
    (project / "emp_connector_old" / "__init__.py").write_text("")
    (project / "pyproject.toml").write_text(
        STDLIB_PLUGIN["pyproject.toml"]
        .replace("emp-connector-stdlib", "emp-connector-old")
        .replace("emp_connector_stdlib", "emp_connector_old")
        .replace('"pluggy>=1.0"', '"pluggy<1.0"')
    )
    done = run(binary, env, "plugins", "install", str(project))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pluggy" in done.stderr
    assert list(Path(env["EMP_PLUGIN_DIR"]).iterdir()) == []  # nothing left installed


def test_a_bundled_plugin_is_not_installed_again(binary: Binary, env: dict[str, str]) -> None:
    done = run(binary, env, "plugins", "install", "emp-connector-simulation")
    version = importlib.metadata.version("emp")
    assert (done.returncode, done.stderr) == (
        2,
        f"emp-worker: emp-connector-simulation {version} is bundled with this worker\n",
    )
    assert not Path(env["EMP_PLUGIN_DIR"]).exists() or not any(
        Path(env["EMP_PLUGIN_DIR"]).iterdir()
    )


def test_the_commands_of_the_page_run_as_written(
    binary: Binary, env: dict[str, str], hub: Cluster, tmp_path: Path
) -> None:
    """docs/binary.md: run, and install the plugin of docs/plugins.md from its folder."""
    from tests.test_docs_examples import DOC as PLUGINS_DOC
    from tests.test_docs_examples import block_after

    text = PLUGINS_DOC.read_text()
    project = tmp_path / "emp-connector-echo"
    (project / "emp_connector_echo").mkdir(parents=True)
    (project / "pyproject.toml").write_text(block_after(text, "`pyproject.toml`:"))
    (project / "emp_connector_echo" / "__init__.py").write_text(
        block_after(text, "`emp_connector_echo/__init__.py`:")
    )
    env |= {"worker": str(binary.path), "EMP_HUB_URL": f"ws://127.0.0.1:{hub.port}"}

    [version, doctor] = doc_blocks("Run")
    shown = subprocess.run(
        ["bash", "-euc", version], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert shown.stdout.startswith("emp-worker "), shown.stderr
    shown = subprocess.run(
        ["bash", "-euc", doctor], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0 and "simulation" in shown.stdout, shown.stdout + shown.stderr

    [install] = doc_blocks("Installing plugins")
    shown = subprocess.run(
        ["bash", "-euc", install], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert re.search(r"emp-connector-echo +1\.0\.0 +installed +loaded +echo", shown.stdout)

    [start] = doc_blocks("Running jobs")
    worker = subprocess.Popen(
        ["bash", "-euc", f"exec {start.strip()}"],
        cwd=tmp_path,
        env={**env, "EMP_WORKER_ID": "w-doc"},
        stdout=(tmp_path / "w-doc.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        hub.wait_for_workers("w-doc")
        job = hub.wait_job(hub.submit(job_type="echo", payload={"text": "hi"}))
        assert (job["status"], job["result"]["echo"]) == ("completed", "hi")
        sim = hub.wait_job(hub.submit(payload={"duration": 0.1}))
        assert sim["status"] == "completed"
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, (tmp_path / "w-doc.log").read_text()
    no_extraction_left(env)


def test_the_benchmark_reports_its_figures(binary: Binary, redis_url: str) -> None:
    """benchmarks/binary.py runs on the built binary (figures only printed, never judged)."""
    options = ["--binary", str(binary.path), "--runs", "1", "--url", redis_url, "--keep-cache"]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.binary", *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    results = report["results"]
    assert results["size_bytes"] == binary.path.stat().st_size
    assert report["conditions"]["cold_cache_dropped"] is False
    assert results["version_cold_s"] > 0 and results["start_to_registered_s"]["median"] > 0
    assert results["extraction_dirs_left"] == []


def test_health_reports_the_version_of_the_root_pyproject(hub: Cluster) -> None:
    assert hub.get("/health/live")["version"] == importlib.metadata.version("emp")
    with (ROOT / "pyproject.toml").open("rb") as f:
        assert tomllib.load(f)["project"]["version"] == importlib.metadata.version("emp")


@pytest.mark.parametrize("plugin", sorted(p.name for p in (ROOT / "plugins").iterdir()))
def test_each_connector_plugin_has_the_one_version(plugin: str) -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        version = tomllib.load(f)["project"]["version"]
    with (ROOT / "plugins" / plugin / "pyproject.toml").open("rb") as f:
        assert tomllib.load(f)["project"]["version"] == version


def test_an_installed_worker_says_its_version_and_the_commit_of_its_checkout() -> None:
    """Outside the binary (this editable install): the commit from git, no build date; and
    `--version` imports none of the worker's heavy modules (it answers at once)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "emp_worker.cli", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    head = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    version = importlib.metadata.version("emp")
    assert done.stdout == f"emp-worker {version} (commit {head}, built unknown)\n"
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
    assert "emp_worker.version" in imported
    assert not imported & {"pydantic", "httpx", "websockets", "emp_worker.worker"}
