"""Finding, loading and managing worker plugins.

Plugins are distributions with an entry point in the group `emp_worker` (the module holds
`@hookimpl` functions). Each entry point is loaded on its own: one that cannot load (it
fails to import, requires another `emp`, or its `register_connectors` raises) is reported
(a log line, `status: error` in `emp-worker plugins list`) and the worker runs without it,
unless `EMP_STRICT_PLUGINS=1`; an unknown hook (a misspelled name) is reported the same
way. Hooks are called through `Plugins.call` (at load, `_call`), which isolates each
plugin's implementation; `store_output` and `fetch_output`, first-result chains, are the
worker's own
(docs/plugins.md, "When a plugin fails"). `EMP_LOAD_PLUGINS`
(comma list of distribution names; empty: none) and `EMP_DISABLE_PLUGINS` choose which
load. Plugins installed later
live in the plugin directory (`EMP_PLUGIN_DIR`), appended to sys.path, never prepended,
so they cannot shadow the worker's own packages. In the single-file worker (a PyInstaller
binary: `sys.frozen`) pip runs in-process and installs binary wheels only, constrained to
the versions of the distributions bundled with it (docs/binary.md).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy
from packaging.requirements import Requirement
from pluggy import HookImpl

from emp_worker import __version__, hookspecs
from emp_worker.connector import Connector, maybe_await

log = logging.getLogger("emp_worker.plugins")

GROUP = "emp_worker"


class PluginError(Exception):
    """A plugin could not be loaded (strict mode), or two connectors share a name."""


@dataclass
class PluginInfo:
    """One plugin as `emp-worker plugins list` shows it."""

    name: str
    version: str
    status: str  # "loaded", "error", "disabled"
    #: Where it came from: "bundled" (in the single-file worker), "installed" (the plugin
    #: directory) or "environment" (the worker's Python environment).
    origin: str = "environment"
    hooks: list[str] = field(default_factory=list)
    connectors: list[str] = field(default_factory=list)
    error: str | None = None
    #: `@hookimpl` functions whose name is no hook: never called.
    unknown_hooks: list[str] = field(default_factory=list)
    #: The last failure of each hook called while running (`job_started`...): hook -> error.
    hook_errors: dict[str, str] = field(default_factory=dict)


def default_plugin_dir() -> Path:
    """Per user: $XDG_DATA_HOME/emp-worker/plugins (~/.local/share/... by default)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "emp-worker" / "plugins"


def plugin_dir() -> Path:
    """`EMP_PLUGIN_DIR`, or the per-user default."""
    configured = os.environ.get("EMP_PLUGIN_DIR")
    return Path(configured).expanduser() if configured else default_plugin_dir()


def bundle_dir() -> Path | None:
    """Where the single-file worker unpacked itself (None outside a binary)."""
    folder = getattr(sys, "_MEIPASS", None) if getattr(sys, "frozen", False) else None
    return Path(folder) if folder else None


def origin(dist: importlib.metadata.Distribution | None) -> str:
    """Where a distribution was found: "bundled", "installed" or "environment"."""
    if dist is None:
        return "environment"
    home = Path(str(dist.locate_file(""))).resolve()
    bundle = bundle_dir()
    if bundle is not None and home == bundle.resolve():
        return "bundled"
    if home == plugin_dir().expanduser().resolve():
        return "installed"
    return "environment"


def use_plugin_dir(path: Path | None = None) -> Path:
    """Append the plugin directory to sys.path (once); returns it."""
    folder = path or plugin_dir()
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    importlib.invalidate_caches()
    return folder


def _names(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {_normal(n) for n in value.split(",") if n.strip()}


def _normal(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def unknown_hook(name: str) -> str:
    """`unknown hook NAME`, with the closest real hook when there is one."""
    hooks = [h for h in vars(hookspecs) if hasattr(getattr(hookspecs, h), "emp_worker_spec")]
    close = difflib.get_close_matches(name, hooks, n=1)
    return f"unknown hook {name}" + (f" (did you mean {close[0]}?)" if close else "")


def _unsupported_emp(dist: importlib.metadata.Distribution) -> str | None:
    """Why a plugin distribution cannot run on this emp (its Requires-Dist on `emp`)."""
    for text in dist.requires or []:
        req = Requirement(text)
        if _normal(req.name) != "emp":
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if not req.specifier.contains(__version__, prereleases=True):
            name = dist.metadata["Name"]
            return f"{name} {dist.version} requires {req}; this is emp {__version__}"
    return None


class Plugins:
    """The worker's plugin manager: loads plugins, collects connectors, calls hooks."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("emp_worker")
        self.pm.add_hookspecs(hookspecs)
        self.infos: list[PluginInfo] = []
        self.connectors: dict[str, type[Connector]] = {}
        self._connector_origin: dict[str, str] = {}
        self._info_of: dict[str, PluginInfo] = {}  # pluggy's plugin name -> its info
        self._entry_points: dict[str, PluginInfo] = {}  # entry-point name -> its plugin
        self._clashes: list[str] = []

    def load(self, *, strict: bool | None = None, listing: bool = False) -> None:
        """Load every `emp_worker` entry point that the environment allows. A plugin that
        cannot load is skipped (`status: error`), or raises PluginError when strict; two
        connectors with one name raise PluginError after loading, unless `listing` (then
        both plugins show the clash as their error)."""
        if strict is None:
            strict = os.environ.get("EMP_STRICT_PLUGINS", "") not in {"", "0", "false"}
        use_plugin_dir()
        allowed, disabled = _names("EMP_LOAD_PLUGINS"), _names("EMP_DISABLE_PLUGINS") or set()
        seen: set[tuple[str, str]] = set()
        for ep in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else ep.name
            version = ep.dist.version if ep.dist is not None else "?"
            if (dist, ep.value) in seen:  # the same distribution found twice on sys.path
                continue
            seen.add((dist, ep.value))
            info = PluginInfo(dist, version, "loaded", origin(ep.dist))
            self.infos.append(info)
            self._entry_points.setdefault(ep.name, info)
            if (allowed is not None and _normal(dist) not in allowed) or _normal(dist) in disabled:
                info.status = "disabled"
                continue
            try:
                self._load(ep, info, strict)
            except _Skipped as exc:
                info.status, info.error = "error", str(exc)
                if strict:
                    raise PluginError(
                        exc.refusal or f"plugin {dist} failed to load: {exc}"
                    ) from exc
                log.warning("plugin %s failed to load and is skipped: %s", dist, exc)
                if exc.__cause__ is not None:
                    log.debug("plugin %s failed to load", dist, exc_info=exc.__cause__)
        if self._clashes and not listing:
            raise PluginError(self._clashes[0])

    def _load(self, ep: importlib.metadata.EntryPoint, info: PluginInfo, strict: bool) -> None:
        """Check, import and register one entry point; _Skipped says why it cannot run."""
        incompatible = ep.dist is not None and _unsupported_emp(ep.dist)
        if incompatible:
            raise _Skipped(incompatible, refusal=incompatible)
        name = f"{info.name}:{ep.name}"
        try:
            module = ep.load()
            self.pm.register(module, name=name)
        except Exception as exc:
            raise _Skipped(_reason(exc)) from exc
        info.unknown_hooks, info.hooks = self._hooks_of(module)
        problems = ", ".join(unknown_hook(h) for h in info.unknown_hooks)
        try:
            if problems and strict:
                raise _Skipped(problems, refusal=f"plugin {info.name}: {problems}")
            info.connectors = self._collect_connectors(module, info.name)
        except _Skipped:
            self.pm.unregister(module)
            raise
        self._info_of[name] = info
        for hook in info.unknown_hooks:
            log.warning("plugin %s: %s: it is never called", info.name, unknown_hook(hook))

    def register_builtin(self, module: object, name: str) -> None:
        """Register a plugin module that ships with the worker (not listed)."""
        self.pm.register(module, name=name)
        clashes = len(self._clashes)
        try:
            self._collect_connectors(module, name)
        except _Skipped as exc:
            raise PluginError(f"{name}: {exc}") from exc
        if len(self._clashes) > clashes:
            raise PluginError(self._clashes[-1])

    def _hooks_of(self, module: object) -> tuple[list[str], list[str]]:
        """The module's unknown hooks, and its hooks."""
        callers = self.pm.get_hookcallers(module) or []
        unknown = sorted(h.name for h in callers if not h.has_spec())
        return unknown, sorted(h.name for h in callers if h.has_spec())

    def _implementations(self, hook: str, plugin: object | None = None) -> list[HookImpl]:
        """A hook's implementations in pluggy's call order (of one plugin, if given); hook
        wrappers are not part of the contract."""
        caller: pluggy.HookCaller = getattr(self.pm.hook, hook)
        found = reversed(caller.get_hookimpls())
        return [
            i
            for i in found
            if (plugin is None or i.plugin is plugin) and not (i.wrapper or i.hookwrapper)
        ]

    def call(self, hook: str, /, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call each plugin's implementation of `hook` on its own, in pluggy's order. One
        that raises is logged with its plugin's name and traceback and left out; the others
        run all the same. Returns (plugin, answer) for each answer that is not None."""
        answers: list[tuple[str, Any]] = []
        for impl in self._implementations(hook):
            info = self._info_of.get(impl.plugin_name)
            plugin = info.name if info is not None else impl.plugin_name
            try:
                answer = _call(impl, kwargs)
                if inspect.isawaitable(answer):  # never awaited, it would never run
                    if inspect.iscoroutine(answer):
                        answer.close()
                    raise PluginError(f"{hook} is async; only store_output and fetch_output may be")
            except Exception as exc:
                log.error("plugin %s: %s raised %s", plugin, hook, _reason(exc), exc_info=exc)
                if info is not None:
                    info.hook_errors[hook] = _reason(exc)
                continue
            if answer is not None:
                answers.append((plugin, answer))
        return answers

    def _collect_connectors(self, module: object, origin: str) -> list[str]:
        """Call the plugin's register_connectors; a clash is recorded on both plugins."""
        found: list[type[Connector]] = []
        for impl in self._implementations("register_connectors", module):
            try:
                _call(impl, {"register": found.append})
            except Exception as exc:
                raise _Skipped(f"register_connectors raised {_reason(exc)}") from exc
        for cls in found:
            if not (isinstance(cls, type) and issubclass(cls, Connector) and cls.name):
                raise _Skipped(f"it registered {cls!r}, not a named Connector class")
        for cls in found:
            if cls.name in self.connectors:
                first = self._connector_origin[cls.name]
                clash = (
                    f"two connectors are named {cls.name!r}: from {first} and from {origin}; "
                    "disable one (EMP_DISABLE_PLUGINS)"
                )
                self._clashes.append(clash)
                for info in self.infos:
                    if info.name in {first, origin}:
                        info.status, info.error = "error", clash
                continue
            self.connectors[cls.name] = cls
            self._connector_origin[cls.name] = origin
        return sorted(c.name for c in found)

    def unknown_connectors(self, names: list[str]) -> str:
        """Why these connectors are not here: the plugin that should bring one did not load
        (its entry point or its distribution `emp-connector-<name>` is named after it), or
        the list of those installed and of the plugins that did not load."""
        for name in names:
            info = self._entry_points.get(name) or next(
                (i for i in self.infos if _normal(i.name) == f"emp-connector-{_normal(name)}"),
                None,
            )
            if info is not None and info.status == "error":
                return f"connector {name}: plugin {info.name} failed to load: {info.error}"
            if info is not None and info.status == "disabled":
                return (
                    f"connector {name}: plugin {info.name} is not loaded "
                    "(EMP_LOAD_PLUGINS, EMP_DISABLE_PLUGINS)"
                )
        known = ", ".join(sorted(self.connectors)) or "none"
        failed = [f"{i.name} ({i.error})" for i in self.infos if i.status == "error"]
        return f"unknown connector {', '.join(names)}; installed: {known}" + (
            f"; not loaded: {', '.join(failed)}" if failed else ""
        )


class _Skipped(Exception):
    """Why a plugin is not loaded; `refusal` is the whole message, when strict, if the
    usual "plugin X failed to load: ..." does not fit."""

    def __init__(self, reason: str, refusal: str | None = None) -> None:
        super().__init__(reason)
        self.refusal = refusal


def _call(impl: HookImpl, kwargs: dict[str, Any]) -> Any:
    """One hook implementation, given the arguments it names (as pluggy passes them)."""
    args = [kwargs[name] for name in impl.argnames]
    return impl.function(*args, **{k: kwargs[k] for k in impl.kwargnames if k in kwargs})


def each_answer(caller: pluggy.HookCaller, **kwargs: Any) -> Iterator[tuple[str, Any]]:
    """Call a hook's implementations one at a time, in pluggy's order (tryfirst ones, then
    the last registered first, trylast ones last): yields (plugin name, answer), the next
    implementation being called only when the next pair is asked for."""
    for impl in reversed(caller.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            raise PluginError(f"plugin {impl.plugin_name}: {caller.name} cannot be a wrapper")
        yield impl.plugin_name, _call(impl, kwargs)


async def first_answer(caller: pluggy.HookCaller, **kwargs: Any) -> Any:
    """A first-result hook whose implementations may be async: each answer is awaited
    before the next implementation is called; the first that is not None wins."""
    for _plugin, answer in each_answer(caller, **kwargs):
        answer = await maybe_await(answer)
        if answer is not None:
            return answer
    return None


def pip(*args: str) -> None:
    """Run pip for this Python; raises PluginError when it fails. In the single-file worker
    pip runs in-process (it is bundled; the binary is no Python to start pip with) and
    writes its own messages."""
    if bundle_dir() is not None:
        from pip._internal.cli.main import main as pip_main

        os.environ.setdefault("PIP_ROOT_USER_ACTION", "ignore")  # root on a GPU box: fine
        code = pip_main(["--disable-pip-version-check", "--quiet", *args])
        if code != 0:
            raise PluginError(f"pip {' '.join(args)} failed (exit status {code})")
        return
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise PluginError(f"pip {' '.join(args)} failed:\n{done.stderr.strip()[-2000:]}")


def bundled_versions() -> dict[str, str]:
    """The distributions bundled with the single-file worker: name -> version."""
    bundle = bundle_dir()
    if bundle is None:
        return {}
    return {
        _normal(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions(path=[str(bundle)])
    }


def install(spec: str, folder: Path | None = None) -> list[str]:
    """Install a plugin (a name, a wheel or a project folder) into the plugin directory.
    Its requirements that the worker already satisfies are not installed again. Returns the
    distributions it added.

    In the single-file worker: binary wheels only, for this interpreter (pip runs in it),
    with the bundled distributions' versions as constraints; a project folder is built into
    a wheel first by a Python found outside (`EMP_BUILD_PYTHON`, else `python3`); a
    bundled distribution is never installed."""
    target = folder or plugin_dir()
    target.mkdir(parents=True, exist_ok=True)
    bundled = bundled_versions()
    if not bundled:
        return _install(spec, target, [])
    if not Path(spec).exists() and _normal(spec) in bundled:
        raise PluginError(f"{spec} {bundled[_normal(spec)]} is bundled with this worker")
    with tempfile.TemporaryDirectory(prefix="emp-plugin-") as tmp:
        constraints = Path(tmp) / "bundled.txt"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(bundled.items())))
        if Path(spec).is_dir():
            spec = build_wheel(Path(spec), Path(tmp))
        added = _install(spec, target, ["--only-binary=:all:", "--constraint", str(constraints)])
    again = [d for d in _dists_in(target) if _normal(d) in bundled]
    for name in again:  # a requirement the worker carries (same version: the constraints)
        uninstall(name, target)
    refused = [n for n in added if n in again]
    if refused:
        raise PluginError(f"{', '.join(refused)} is bundled with this worker")
    return added


def _install(spec: str, target: Path, options: list[str]) -> list[str]:
    before = _dists_in(target)
    pip("install", "--upgrade", "--no-deps", *options, "--target", str(target), spec)
    added = sorted(_dists_in(target) - before) or sorted(_dists_in(target))
    missing: list[str] = []
    for dist in importlib.metadata.distributions(path=[str(target)]):
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if _normal(req.name) == "emp":  # never the worker itself: checked at load
                continue
            if not _satisfied(req, target):
                missing.append(str(req))
    if missing:
        try:
            pip("install", *options, "--target", str(target), "--upgrade", *missing)
        except PluginError:  # the plugin cannot run without them: take it out again
            for name in sorted(_dists_in(target) - before):
                uninstall(name, target)
            raise
    return added


def build_wheel(project: Path, out: Path) -> str:
    """Build a project folder into a wheel with a Python outside the binary (the binary
    carries no build backends); the wheel's path."""
    python = os.environ.get("EMP_BUILD_PYTHON") or shutil.which("python3")
    if not python:
        raise PluginError(
            f"building {project} into a wheel needs Python 3 with pip (set EMP_BUILD_PYTHON);"
            " or build the wheel elsewhere (pip wheel --no-deps DIR) and install that"
        )
    command = [python, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out)]
    command.append(str(project.resolve()))  # a path, never read as a name on the index
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    wheels = sorted(out.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise PluginError(f"building {project} into a wheel failed:\n{done.stderr.strip()[-2000:]}")
    return str(wheels[0])


def uninstall(name: str, folder: Path | None = None) -> None:
    """Remove a plugin distribution from the plugin directory."""
    target = folder or plugin_dir()
    for dist in importlib.metadata.distributions(path=[str(target)]):
        if _normal(dist.metadata["Name"]) != _normal(name):
            continue
        for file in dist.files or []:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                path.unlink()
        _prune(target)
        return
    raise PluginError(f"no plugin named {name} in {target}")


def _dists_in(folder: Path) -> set[str]:
    return {d.metadata["Name"] for d in importlib.metadata.distributions(path=[str(folder)])}


def _satisfied(req: Requirement, target: Path) -> bool:
    for path in (None, [str(target)]):
        try:
            found = (
                importlib.metadata.distribution(req.name)
                if path is None
                else next(
                    d
                    for d in importlib.metadata.distributions(path=path)
                    if _normal(d.metadata["Name"]) == _normal(req.name)
                )
            )
        except (importlib.metadata.PackageNotFoundError, StopIteration):
            continue
        if req.specifier.contains(found.version, prereleases=True):
            return True
    return False


def _prune(folder: Path) -> None:
    """Remove the empty folders an uninstall left."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
