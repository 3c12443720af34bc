"""Loading plugins: each mistake a plugin author can make, in a real distribution written
into the plugin directory (its module and its .dist-info, as `pip install --target` leaves
them), loaded by `Plugins` in process and by the `emp-worker` command."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import AliasChoices, Field

import emp_worker
from emp_worker import hookimpl
from emp_worker.cli import Refused, make_connectors
from emp_worker.connector import Connector, ConnectorSettings
from emp_worker.plugins import PluginError, Plugins
from emp_worker.settings import WorkerSettings
from tests.test_worker_e2e import _plugin_project, _worker_cli

pytestmark = pytest.mark.worker

ECHO = """
from emp_worker import hookimpl
from emp_worker.connector import Connector


class Echo(Connector):
    name = "{connector}"

    async def run(self, job, ctx):
        return job.payload


@hookimpl
def register_connectors(register):
    register(Echo)
"""


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """EMP_PLUGIN_DIR for the test; sys.path and the plugin modules are put back after."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.setenv("EMP_PLUGIN_DIR", str(folder))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield folder
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(folder)):
            del sys.modules[name]


def add_plugin(
    folder: Path,
    name: str,
    body: str,
    *,
    version: str = "1.2.3",
    requires: tuple[str, ...] = (),
    entry_point: str | None = None,
) -> None:
    """Write a plugin distribution `name` whose module holds `body` into `folder`."""
    package = name.replace("-", "_")
    sys.modules.pop(package, None)  # a module of that name another test imported
    (folder / package).mkdir()
    (folder / package / "__init__.py").write_text(textwrap.dedent(body))
    info = folder / f"{package}-{version}.dist-info"
    info.mkdir()
    metadata = [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}"]
    metadata += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(metadata) + "\n")
    (info / "entry_points.txt").write_text(f"[emp_worker]\n{entry_point or package} = {package}\n")


def infos(plugins: Plugins) -> dict[str, Any]:
    return {i.name: i for i in plugins.infos}


# -- unknown hooks ----------------------------------------------------------------------------

MISSPELLED = """
from emp_worker import hookimpl


@hookimpl
def register_connector(register):
    pass


@hookimpl
def job_finsihed(context, outcome, error):
    pass


@hookimpl
def job_started(context):
    pass
"""


def test_a_misspelled_hook_is_reported_and_the_plugin_loads(
    plugin_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_plugin(plugin_dir, "emp-typos", MISSPELLED)
    plugins = Plugins()
    with caplog.at_level(logging.WARNING, "emp_worker.plugins"):
        plugins.load(strict=False)
    typos = infos(plugins)["emp-typos"]
    assert (typos.status, typos.hooks) == ("loaded", ["job_started"])
    assert typos.unknown_hooks == ["job_finsihed", "register_connector"]
    assert "emp-typos: unknown hook register_connector (did you mean register_connectors?)" in (
        caplog.text
    )
    assert "unknown hook job_finsihed (did you mean job_finished?)" in caplog.text


def test_a_misspelled_hook_is_refused_when_strict(plugin_dir: Path) -> None:
    add_plugin(plugin_dir, "emp-typos", MISSPELLED)
    with pytest.raises(PluginError, match=r"plugin emp-typos: unknown hook job_finsihed \(did "):
        Plugins().load(strict=True)


@pytest.mark.slow
def test_plugins_list_shows_unknown_hooks(plugin_dir: Path) -> None:
    add_plugin(plugin_dir, "emp-typos", MISSPELLED)
    env = {"EMP_PLUGIN_DIR": str(plugin_dir)}
    listed = json.loads(_worker_cli(env, "plugins", "list", "--json").stdout)
    typos = next(p for p in listed["plugins"] if p["name"] == "emp-typos")
    assert typos["unknown_hooks"] == ["job_finsihed", "register_connector"]
    text = _worker_cli(env, "plugins", "list").stdout
    assert "unknown hook register_connector (did you mean register_connectors?)" in text
    strict = _worker_cli({**env, "EMP_STRICT_PLUGINS": "1"}, "doctor")
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert "plugin emp-typos: unknown hook job_finsihed" in strict.stderr


# -- register_connectors that raises ----------------------------------------------------------

RAISES = """
from emp_worker import hookimpl


@hookimpl
def register_connectors(register):
    raise RuntimeError("no licence server")
"""


def test_register_connectors_that_raises_skips_that_plugin(plugin_dir: Path) -> None:
    add_plugin(plugin_dir, "emp-raises", RAISES)
    add_plugin(plugin_dir, "emp-connector-echo", ECHO.format(connector="echo"))
    plugins = Plugins()
    plugins.load(strict=False)
    raises = infos(plugins)["emp-raises"]
    assert (raises.status, raises.error) == (
        "error",
        "register_connectors raised RuntimeError: no licence server",
    )
    assert infos(plugins)["emp-connector-echo"].status == "loaded"
    assert "echo" in plugins.connectors
    with pytest.raises(PluginError, match="plugin emp-raises failed to load: register_connectors"):
        Plugins().load(strict=True)


def test_registering_something_that_is_not_a_connector_skips_that_plugin(
    plugin_dir: Path,
) -> None:
    add_plugin(
        plugin_dir,
        "emp-not-a-class",
        """
        from emp_worker import hookimpl


        @hookimpl
        def register_connectors(register):
            register("echo")
        """,
    )
    plugins = Plugins()
    plugins.load(strict=False)
    broken = infos(plugins)["emp-not-a-class"]
    assert broken.status == "error" and "not a named Connector class" in str(broken.error)


# -- two connectors with one name -------------------------------------------------------------


@pytest.mark.slow
def test_plugins_list_shows_both_sides_of_a_connector_clash(plugin_dir: Path) -> None:
    add_plugin(plugin_dir, "emp-echo-one", ECHO.format(connector="echo"))
    add_plugin(plugin_dir, "emp-echo-two", ECHO.format(connector="echo"))
    env = {"EMP_PLUGIN_DIR": str(plugin_dir)}
    listed = _worker_cli(env, "plugins", "list", "--json")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    states = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
    clash = "two connectors are named 'echo': from emp-echo-one and from emp-echo-two"
    for name in ("emp-echo-one", "emp-echo-two"):
        assert states[name]["status"] == "error" and clash in states[name]["error"]
    text = _worker_cli(env, "plugins", "list")
    assert text.returncode == 0 and text.stdout.count(clash) == 2, text.stderr
    for command in ("doctor", "run"):
        refused = _worker_cli({**env, "EMP_HUB_URL": "ws://127.0.0.1:9"}, command)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert refused.stderr.strip().splitlines()[-1].startswith(f"emp-worker: {clash}")


# -- a plugin that fails to import ------------------------------------------------------------


def test_an_import_failure_has_its_traceback_at_debug(
    plugin_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_plugin(plugin_dir, "emp-connector-echo", "import emp_no_such_sdk\n", entry_point="echo")
    with caplog.at_level(logging.DEBUG, "emp_worker.plugins"):
        Plugins().load(strict=False)
    [summary] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert summary.exc_info is None
    assert "emp-connector-echo failed to load" in summary.getMessage()
    assert "ModuleNotFoundError: No module named 'emp_no_such_sdk'" in summary.getMessage()
    [detail] = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert "emp-connector-echo" in detail.getMessage()
    assert "import emp_no_such_sdk" in caplog.text  # the traceback's source line


def test_asking_for_the_connector_of_a_plugin_that_failed_says_why(plugin_dir: Path) -> None:
    add_plugin(plugin_dir, "emp-connector-echo", "import emp_no_such_sdk\n", entry_point="echo")
    plugins = Plugins()
    plugins.load(strict=False)
    with pytest.raises(Refused) as refused:
        make_connectors(WorkerSettings(connectors=["echo"]), plugins)
    assert str(refused.value) == (
        "connector echo: plugin emp-connector-echo failed to load: "
        "ModuleNotFoundError: No module named 'emp_no_such_sdk'"
    )
    run = _worker_cli({"EMP_PLUGIN_DIR": str(plugin_dir), "EMP_CONNECTORS": "echo"}, "run")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "connector echo: plugin emp-connector-echo failed to load" in run.stderr


def test_asking_for_the_connector_of_a_disabled_plugin_says_so(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_plugin(plugin_dir, "emp-connector-echo", ECHO.format(connector="echo"))
    monkeypatch.setenv("EMP_DISABLE_PLUGINS", "emp-connector-echo")
    plugins = Plugins()
    plugins.load(strict=False)
    with pytest.raises(Refused) as refused:
        make_connectors(WorkerSettings(connectors=["echo"]), plugins)
    assert str(refused.value) == (
        "connector echo: plugin emp-connector-echo is not loaded "
        "(EMP_LOAD_PLUGINS, EMP_DISABLE_PLUGINS)"
    )


def test_an_unknown_connector_lists_the_plugins_that_did_not_load(plugin_dir: Path) -> None:
    add_plugin(plugin_dir, "emp-gpu-tools", "import emp_no_such_sdk\n")
    plugins = Plugins()
    plugins.load(strict=False)
    with pytest.raises(Refused, match="unknown connector echo; installed: ") as refused:
        make_connectors(WorkerSettings(connectors=["echo"]), plugins)
    assert "not loaded: emp-gpu-tools (ModuleNotFoundError: " in str(refused.value)


# -- connector settings -----------------------------------------------------------------------


class StepSettings(ConnectorSettings):
    step: int = Field(default=1, gt=0)
    url: str = Field(
        default="http://localhost",
        pattern=r"^https?://",
        validation_alias=AliasChoices("EMP_STEPPER_URL", "STEPPER_API_URL", "url"),
    )


class Stepper(Connector):
    name = "stepper"
    Settings = StepSettings


def stepper_plugins() -> Plugins:
    @hookimpl
    def register_connectors(register: Any) -> None:
        register(Stepper)

    plugins = Plugins()
    plugins.register_builtin(SimpleNamespace(register_connectors=register_connectors), "steps")
    return plugins


def test_invalid_connector_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMP_STEPPER_STEP", "0")
    monkeypatch.setenv("STEPPER_API_URL", "ftp://x")  # an older name, kept by an alias
    with pytest.raises(Refused) as refused:
        make_connectors(WorkerSettings(connectors=["stepper"]), stepper_plugins())
    message = str(refused.value)
    assert message.startswith("connector stepper: invalid settings: EMP_STEPPER_STEP: Input ")
    assert "; STEPPER_API_URL: String should match pattern" in message


# -- versions ---------------------------------------------------------------------------------


def test_the_plugin_api_version_is_exported() -> None:
    major, minor = emp_worker.PLUGIN_API.split(".")
    assert (int(major), int(minor)) >= (1, 0)
    assert "PLUGIN_API" in emp_worker.__all__


def test_a_plugin_for_another_emp_is_refused(plugin_dir: Path) -> None:
    # Importing the refused plugin would fail differently: it must not be imported at all.
    add_plugin(plugin_dir, "emp-connector-x", "raise ImportError('imported')\n", version="1.2")
    (plugin_dir / "emp_connector_x-1.2.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: emp-connector-x\nVersion: 1.2\n"
        "Requires-Dist: emp>=2.0\nRequires-Dist: emp[hub]>=0.1; extra == 'test'\n"
    )
    add_plugin(
        plugin_dir,
        "emp-connector-echo",
        ECHO.format(connector="echo"),
        requires=(f"emp<={emp_worker.__version__}", "emp[hub]>=0.1", "pluggy>=1"),
    )
    plugins = Plugins()
    plugins.load(strict=False)
    refused = infos(plugins)["emp-connector-x"]
    expected = f"emp-connector-x 1.2 requires emp>=2.0; this is emp {emp_worker.__version__}"
    assert (refused.status, refused.error) == ("error", expected)
    assert infos(plugins)["emp-connector-echo"].status == "loaded"
    with pytest.raises(PluginError, match=expected):
        Plugins().load(strict=True)


@pytest.mark.slow
def test_installing_a_plugin_for_another_emp_installs_no_emp(tmp_path: Path) -> None:
    project = _plugin_project(tmp_path / "src", "emp-connector-future", ECHO.format(connector="x"))
    pyproject = project / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace(
            'version = "1.2.3"', 'version = "1.2.3"\ndependencies = ["emp>=2.0"]'
        )
    )
    env = {"EMP_PLUGIN_DIR": str(tmp_path / "plugins")}
    installed = _worker_cli(env, "plugins", "install", str(project))
    assert installed.returncode == 0, installed.stderr
    assert not list((tmp_path / "plugins").glob("emp-*.dist-info"))  # the worker is not copied
    listed = json.loads(_worker_cli(env, "plugins", "list", "--json").stdout)
    future = next(p for p in listed["plugins"] if p["name"] == "emp-connector-future")
    assert (future["status"], future["error"]) == (
        "error",
        f"emp-connector-future 1.2.3 requires emp>=2.0; this is emp {emp_worker.__version__}",
    )
