"""Finding, loading and managing worker plugins.

Plugins are distributions with an entry point in the group `emp_worker` (the module holds
`@hookimpl` functions). Each entry point is loaded on its own: one that fails to import is
reported (a log line, `status: error` in `emp-worker plugins list`) and the worker runs
without it, unless `EMP_STRICT_PLUGINS=1`. `EMP_LOAD_PLUGINS` (comma list of distribution
names; empty: none) and `EMP_DISABLE_PLUGINS` choose which load. Plugins installed later
live in the plugin directory (`EMP_PLUGIN_DIR`), appended to sys.path, never prepended,
so they cannot shadow the worker's own packages.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy
from packaging.requirements import Requirement

from emp_worker import hookspecs
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
    hooks: list[str] = field(default_factory=list)
    connectors: list[str] = field(default_factory=list)
    error: str | None = None


def default_plugin_dir() -> Path:
    """Per user: $XDG_DATA_HOME/emp-worker/plugins (~/.local/share/... by default)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "emp-worker" / "plugins"


def plugin_dir() -> Path:
    """`EMP_PLUGIN_DIR`, or the per-user default."""
    configured = os.environ.get("EMP_PLUGIN_DIR")
    return Path(configured).expanduser() if configured else default_plugin_dir()


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


class Plugins:
    """The worker's plugin manager: loads plugins, collects connectors."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("emp_worker")
        self.pm.add_hookspecs(hookspecs)
        self.infos: list[PluginInfo] = []
        self.connectors: dict[str, type[Connector]] = {}
        self._connector_origin: dict[str, str] = {}

    def load(self, *, strict: bool | None = None) -> None:
        """Load every `emp_worker` entry point that the environment allows."""
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
            if (allowed is not None and _normal(dist) not in allowed) or _normal(dist) in disabled:
                self.infos.append(PluginInfo(dist, version, "disabled"))
                continue
            try:
                module = ep.load()
                self.pm.register(module, name=f"{dist}:{ep.name}")
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if strict:
                    raise PluginError(f"plugin {dist} failed to load: {reason}") from exc
                log.error("plugin %s failed to load and is skipped: %s", dist, reason)
                self.infos.append(PluginInfo(dist, version, "error", error=reason))
                continue
            info = PluginInfo(dist, version, "loaded", hooks=self._hooks_of(module))
            self.infos.append(info)
            info.connectors = self._collect_connectors(module, dist)

    def register_builtin(self, module: object, name: str) -> None:
        """Register a plugin module that ships with the worker (not listed)."""
        self.pm.register(module, name=name)
        self._collect_connectors(module, name)

    def _hooks_of(self, module: object) -> list[str]:
        return sorted(h.name for h in self.pm.get_hookcallers(module) or [])

    def _collect_connectors(self, module: object, origin: str) -> list[str]:
        found: list[type[Connector]] = []
        for impl in self.pm.hook.register_connectors.get_hookimpls():
            if impl.plugin is module:
                impl.function(register=found.append)
        for cls in found:
            if not (isinstance(cls, type) and issubclass(cls, Connector) and cls.name):
                raise PluginError(f"{origin} registered {cls!r}, not a named Connector class")
            if cls.name in self.connectors:
                first = self._connector_origin[cls.name]
                raise PluginError(
                    f"two connectors are named {cls.name!r}: from {first} and from {origin}; "
                    "disable one (EMP_DISABLE_PLUGINS)"
                )
            self.connectors[cls.name] = cls
            self._connector_origin[cls.name] = origin
        return sorted(c.name for c in found)


def each_answer(caller: pluggy.HookCaller, **kwargs: Any) -> Iterator[tuple[str, Any]]:
    """Call a hook's implementations one at a time, in pluggy's order (tryfirst ones, then
    the last registered first, trylast ones last): yields (plugin name, answer), the next
    implementation being called only when the next pair is asked for."""
    for impl in reversed(caller.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            raise PluginError(f"plugin {impl.plugin_name}: {caller.name} cannot be a wrapper")
        yield impl.plugin_name, impl.function(*(kwargs[name] for name in impl.argnames))


async def first_answer(caller: pluggy.HookCaller, **kwargs: Any) -> Any:
    """A first-result hook whose implementations may be async: each answer is awaited
    before the next implementation is called; the first that is not None wins."""
    for _plugin, answer in each_answer(caller, **kwargs):
        answer = await maybe_await(answer)
        if answer is not None:
            return answer
    return None


def pip(*args: str) -> None:
    """Run pip of this Python; raises PluginError when it fails."""
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise PluginError(f"pip {' '.join(args)} failed:\n{done.stderr.strip()[-2000:]}")


def install(spec: str, folder: Path | None = None) -> list[str]:
    """Install a plugin (a name, a wheel or a project folder) into the plugin directory.
    Its requirements that the worker already satisfies are not installed again. Returns the
    distributions it added."""
    target = folder or plugin_dir()
    target.mkdir(parents=True, exist_ok=True)
    before = _dists_in(target)
    pip("install", "--upgrade", "--no-deps", "--target", str(target), spec)
    added = sorted(_dists_in(target) - before) or sorted(_dists_in(target))
    missing: list[str] = []
    for dist in importlib.metadata.distributions(path=[str(target)]):
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if not _satisfied(req, target):
                missing.append(str(req))
    if missing:
        pip("install", "--target", str(target), "--upgrade", *missing)
    return added


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
