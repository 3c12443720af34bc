"""`emp-worker`: run a worker, check a machine, manage plugins.

emp-worker run [--config FILE] [--hub URL] [--connectors a,b]
emp-worker doctor [--json]
emp-worker plugins list [--json] | install NAME|PATH | uninstall NAME
emp-worker supervisor-config [--gpus 0,1|none] [--env-file FILE] [-o FILE] ...
emp-worker --version

`EMP_ENV_FILE`: a KEY=VALUE file read before anything else (the environment wins).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emp_protocol import logs
from emp_protocol.logs import LOG_FORMATS
from emp_worker import supervisor
from emp_worker.version import version_line

# The worker's modules (pydantic, httpx, websockets) are imported when a command needs them:
# `emp-worker --version` and `--help` answer without them.
if TYPE_CHECKING:
    from collections.abc import Callable

    from emp_worker.connector import Connector
    from emp_worker.plugins import Plugins
    from emp_worker.settings import WorkerSettings


#: The worker's text log lines.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Refused(Exception):
    """A problem the user can fix: printed without a traceback, exit status 2."""


def load_settings(config: str | None) -> WorkerSettings:
    """The worker settings (environment, then the TOML file)."""
    from pydantic import ValidationError

    from emp_worker.settings import WorkerSettings

    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise Refused(f"no such config file: {config}")
        WorkerSettings.config_file = path
    try:
        return WorkerSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise Refused(f"invalid worker settings: {problems}") from exc


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop to run on (EMP_WORKER_LOOP): uvloop when it is importable (`auto`;
    it is a dependency on Linux and macOS), else asyncio's own."""
    log = logging.getLogger("emp_worker")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError as exc:
            if choice == "uvloop":
                raise Refused(
                    f"EMP_WORKER_LOOP=uvloop, but uvloop is not installed: {exc}"
                ) from exc
            log.debug("event loop: asyncio (uvloop is not installed)")
        else:
            log.debug("event loop: uvloop")
            return uvloop.new_event_loop
    else:
        log.debug("event loop: asyncio (EMP_WORKER_LOOP=asyncio)")
    return asyncio.new_event_loop


def load_plugins(settings: WorkerSettings) -> Plugins:
    """Every allowed plugin, plus the built-in output store (uploads to the hub)."""
    from emp_worker.plugins import PluginError, Plugins
    from emp_worker.worker import HubOutputs

    plugins = Plugins()
    try:
        plugins.load()
    except PluginError as exc:
        raise Refused(str(exc)) from exc
    plugins.register_builtin(HubOutputs(settings), HubOutputs.NAME)
    return plugins


def make_connectors(settings: WorkerSettings, plugins: Plugins) -> list[Connector]:
    """Instances of the enabled connectors (all installed ones when none are named)."""
    from pydantic import ValidationError

    names = settings.connectors or sorted(plugins.connectors)
    if not names:
        raise Refused(
            "no connector is installed; install one with `emp-worker plugins install "
            "emp-connector-simulation` (or a path to it)"
        )
    unknown = [n for n in names if n not in plugins.connectors]
    if unknown:
        raise Refused(plugins.unknown_connectors(unknown))
    connectors = []
    for name in names:
        cls = plugins.connectors[name]
        try:
            connectors.append(cls())
        except ValidationError as exc:
            problems = "; ".join(
                f"{setting_variable(cls, e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise Refused(f"connector {name}: invalid settings: {problems}") from exc
    return connectors


def setting_variable(cls: type[Connector], loc: tuple[int | str, ...]) -> str:
    """The environment variable a connector's invalid setting came from (`EMP_<NAME>_STEP`;
    for a field with aliases, the one that is set): connector settings are read from the
    environment only."""
    from pydantic import AliasChoices

    if not loc:
        return "settings"
    key = str(loc[0])
    for field_name, info in cls.Settings.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        names = [c for c in choices if isinstance(c, str) and c != field_name]
        if key != field_name and key not in names:
            continue
        if not names:
            return f"{cls.env_prefix()}{field_name.upper()}"
        present = {n.upper() for n in os.environ}
        return next((n for n in names if n.upper() in present), names[0])
    return key


async def run_worker(settings: WorkerSettings) -> int:
    """`emp-worker run`."""
    from emp_worker.worker import HubOutputs, Worker

    plugins = load_plugins(settings)
    worker = Worker(settings, plugins, make_connectors(settings, plugins))
    logging.getLogger("emp_worker").info(
        "worker %s: %s, %d slot(s)",
        worker.worker_id,
        ", ".join(sorted(worker.by_service)),
        worker.capacity,
        extra={"worker_id": worker.worker_id},
    )
    try:
        status = await worker.run()
    finally:
        await HubOutputs.close_in(plugins)
    ignore_late_stop_signals()
    return status


def ignore_late_stop_signals() -> None:
    """From here on the process only exits: a stop signal that comes now (the second copy
    of the TERM a launcher forwards after supervisord signalled the whole process group)
    must not kill it and turn its exit status 0 into "terminated by SIGTERM"."""
    loop = asyncio.get_running_loop()
    stops = {signal.SIGTERM, signal.SIGINT}
    # Held back while the handler changes: between asyncio's handler and SIG_IGN the
    # disposition is briefly the default one, which kills.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        for sig in stops:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)  # else closing the loop restores the default
                signal.signal(sig, signal.SIG_IGN)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


async def doctor(settings: WorkerSettings) -> tuple[dict[str, Any], bool]:
    """What this worker would offer, and whether the hub and its connectors answer."""
    import httpx

    from emp_worker import __version__
    from emp_worker.worker import Worker

    plugins = load_plugins(settings)
    report: dict[str, Any] = {"version": __version__, "hub": {"url": settings.hub_url}}
    healthy = True
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            response = await http.get(f"{settings.http_url}/health/live")
        report["hub"].update(ok=response.status_code == 200, detail=f"HTTP {response.status_code}")
    except httpx.HTTPError as exc:
        report["hub"].update(ok=False, detail=f"unreachable: {exc or type(exc).__name__}")
    healthy &= report["hub"]["ok"]
    report["hub_checks"] = {}
    try:
        connectors = make_connectors(settings, plugins)
        report["connectors"] = {}
    except Refused as exc:
        report["connectors"] = {"error": str(exc)}
        connectors, healthy = [], False
    worker = Worker(settings, plugins, connectors)
    await worker.check_health()  # as `run` does: a connector that is down is not offered
    for connector in connectors:
        health = worker.health[connector.name]
        detail = health.detail
        if not health.ok:
            services = ", ".join(sorted(connector.capabilities().services)) or "none"
            detail += f"; its services ({services}) are not offered until it is healthy"
        report["connectors"][connector.name] = {"ok": health.ok, "detail": detail}
        healthy &= health.ok
    if report["hub"]["ok"]:  # the token, the protocol version, the worker id
        report["hub_checks"] = await worker.probe()
        healthy &= all(check["ok"] for check in report["hub_checks"].values())
    report["worker_id"] = worker.worker_id
    report["capabilities"] = worker.capabilities().model_dump(mode="json")
    report["plugins"] = [dataclasses.asdict(i) for i in plugins.infos]
    return report, healthy


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain text table (the worker binary carries no table library)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(lines)


def show_doctor(report: dict[str, Any]) -> str:
    """The doctor report as readable text."""
    caps = report["capabilities"]
    gpus = ", ".join(
        f"{g['name']} ({g['memory_gb']} GB, driver {g['driver']})" for g in caps["gpus"]
    )
    rows = [
        ["worker id", report["worker_id"]],
        ["version", report["version"]],
        ["services", ", ".join(caps["services"]) or "-"],
        ["models", "; ".join(f"{s}: {', '.join(m)}" for s, m in caps["models"].items()) or "-"],
        ["gpu", gpus or "none detected"],
        [
            "cpu / ram / disk",
            f"{caps['cpu_cores']} cores / {caps['ram_gb']} GB / {caps['disk_gb']} GB free",
        ],
        ["region / tags", f"{caps['region'] or '-'} / {', '.join(caps['tags']) or '-'}"],
        ["customers", caps["customer_access"]["isolation"]],
    ]
    hub = report["hub"]
    checks = [["hub", hub["url"], "ok" if hub["ok"] else "FAILED", hub["detail"]]]
    for name, entry in report["hub_checks"].items():
        checks.append(
            [name.replace("_", " "), "", "ok" if entry["ok"] else "FAILED", entry["detail"]]
        )
    connectors = report["connectors"]
    if "error" in connectors:
        checks.append(["connectors", "", "FAILED", connectors["error"]])
    for name, entry in connectors.items():
        if name != "error":
            checks.append(["connector", name, "ok" if entry["ok"] else "FAILED", entry["detail"]])
    return "\n\n".join(
        [
            table(rows, ["capability", "value"]),
            table(checks, ["check", "target", "status", "detail"]),
        ]
    )


def plugins_list(as_json: bool) -> str:
    """`emp-worker plugins list`."""
    from emp_worker.plugins import Plugins, plugin_dir, unknown_hook

    plugins = Plugins()
    plugins.load(strict=False, listing=True)
    if as_json:
        infos = [dataclasses.asdict(i) for i in plugins.infos]
        return json.dumps({"plugin_dir": str(plugin_dir()), "plugins": infos}, indent=2)
    if not plugins.infos:
        return f"no plugins installed (plugin directory: {plugin_dir()})"
    rows = [
        [
            i.name,
            i.version,
            i.origin,
            i.status
            + (f": {i.error}" if i.error else "")
            + "".join(f"; {unknown_hook(h)}" for h in i.unknown_hooks),
            ", ".join(i.connectors) or "-",
            ", ".join(i.hooks) or "-",
        ]
        for i in plugins.infos
    ]
    return table(rows, ["plugin", "version", "from", "status", "connectors", "hooks"])


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = argparse.ArgumentParser(
        prog="emp-worker",
        description="A worker of the emp job broker: pulls jobs from a hub and runs them "
        "through connector plugins. Settings come from EMP_* variables (see "
        "docs/configuration.md) and an optional TOML file.",
    )
    top.add_argument("--version", action="version", version=version_line())
    top.add_argument("--log-level", default=os.environ.get("EMP_LOG_LEVEL", "info"))
    top.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("EMP_LOG_FORMAT", "text"),
        help="text (the default), or json: one JSON object a line (EMP_LOG_FORMAT)",
    )
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="connect to the hub and run jobs until stopped")
    for p in (run, sub.add_parser("doctor", help="show capabilities, check hub and connectors")):
        p.add_argument("--config", help="a TOML file with worker settings")
        p.add_argument("--hub", help="the hub's URL (overrides EMP_HUB_URL)")
        p.add_argument("--connectors", help="connectors to enable, comma separated")
        if p is not run:
            p.add_argument("--json", action="store_true", help="print JSON")
    plugins = sub.add_parser("plugins", help="list, install or remove plugins")
    what = plugins.add_subparsers(dest="action", required=True)
    what.add_parser("list", help="installed plugins and their state").add_argument(
        "--json", action="store_true"
    )
    what.add_parser("install", help="install into the plugin directory").add_argument(
        "spec", help="a distribution name, a wheel, or a project folder"
    )
    what.add_parser("uninstall", help="remove from the plugin directory").add_argument("name")
    supervisor.add_parser(sub)
    return top


def main(argv: list[str] | None = None) -> None:
    """Entry point of `emp-worker`."""
    if env_file := os.environ.get("EMP_ENV_FILE"):
        try:
            supervisor.load_env_file(Path(env_file))
        except (OSError, ValueError) as exc:
            print(f"emp-worker: EMP_ENV_FILE: {exc}", file=sys.stderr)
            sys.exit(2)
    args = parser().parse_args(argv)
    if args.log_format not in LOG_FORMATS:  # from EMP_LOG_FORMAT: argparse checks only flags
        print(
            f"emp-worker: EMP_LOG_FORMAT must be text or json, not {args.log_format!r}",
            file=sys.stderr,
        )
        sys.exit(2)
    # Secrets are redacted: Authorization headers (in websockets' debug lines), a token=
    # or a password in a URL.
    logs.configure(args.log_level.upper(), args.log_format, TEXT_FORMAT)
    if logging.getLogger().level > logging.DEBUG:  # one line per output upload is noise
        logging.getLogger("httpx").setLevel(logging.WARNING)
    from emp_worker.plugins import PluginError
    from emp_worker.worker import WorkerRefused

    try:
        sys.exit(dispatch(args))
    except (Refused, WorkerRefused, PluginError) as exc:
        print(f"emp-worker: {exc}", file=sys.stderr)
        sys.exit(2)


def supervisor_config(args: argparse.Namespace) -> int:
    """`emp-worker supervisor-config`: the drain timeout comes from the settings (with the
    env file's, if one is given)."""
    env_file = Path(args.env_file).absolute() if args.env_file else None
    if env_file is not None and not env_file.exists():
        print(
            f"emp-worker: note: {env_file} does not exist (yet): the workers need it to start",
            file=sys.stderr,
        )
    elif env_file is not None:
        try:
            supervisor.load_env_file(env_file)
        except (OSError, ValueError) as exc:
            raise Refused(f"--env-file: {exc}") from exc
    settings = load_settings(args.config)
    log_dir, run_dir = supervisor.default_dirs()
    log_dir = Path(args.log_dir).absolute() if args.log_dir else log_dir
    run_dir = Path(args.run_dir).absolute() if args.run_dir else run_dir
    try:
        text = supervisor.render(
            binary=Path(args.binary).absolute() if args.binary else supervisor.default_binary(),
            gpus=supervisor.gpu_indexes(args.gpus),
            drain_timeout_s=settings.drain_timeout_s,
            log_dir=log_dir,
            run_dir=run_dir,
            env_file=env_file,
            worker_config=Path(args.config).absolute() if args.config else None,
            id_prefix=args.id_prefix,
            programs_only=args.programs_only,
        )
    except ValueError as exc:
        raise Refused(str(exc)) from exc
    if args.output:  # ready to start: supervisord does not create these folders
        for folder in (log_dir, run_dir):
            folder.mkdir(parents=True, exist_ok=True)
        supervisor.write_atomically(Path(args.output), text)
    else:
        print(text, end="")
    return 0


def dispatch(args: argparse.Namespace) -> int:
    """Run one command; returns the exit status."""
    from emp_worker.plugins import PluginError, install, plugin_dir, uninstall

    if args.command == "plugins":
        if args.action == "list":
            print(plugins_list(args.json))
        elif args.action == "install":
            try:
                added = install(args.spec)
            except PluginError as exc:
                raise Refused(str(exc)) from exc
            print(f"installed {', '.join(added)} into {plugin_dir()}")
        else:
            try:
                uninstall(args.name)
            except PluginError as exc:
                raise Refused(str(exc)) from exc
            print(f"removed {args.name}")
        return 0
    if args.command == "supervisor-config":
        return supervisor_config(args)
    if args.hub:
        os.environ["EMP_HUB_URL"] = args.hub
    if args.connectors:
        os.environ["EMP_CONNECTORS"] = args.connectors
    settings = load_settings(args.config)
    with asyncio.Runner(loop_factory=loop_factory(settings.worker_loop)) as runner:
        if args.command == "run":
            return runner.run(run_worker(settings))
        report, healthy = runner.run(doctor(settings))
    print(json.dumps(report, indent=2) if args.json else show_doctor(report))
    return 0 if healthy else 1


if __name__ == "__main__":
    main()
