"""`emp-worker supervisor-config`: a supervisord configuration for this machine.

One program per GPU (NVML's indexes; `--gpus` overrides, `--gpus none` gives one CPU worker),
in a group `emp`, so `supervisorctl stop emp:*` drains every worker. Each program gets its
own `EMP_GPU_INDEX`, `CUDA_VISIBLE_DEVICES` (with `CUDA_DEVICE_ORDER=PCI_BUS_ID`, so CUDA
numbers the GPUs as NVML does) and worker id; the settings shared by all of them (hub URL,
token, connectors) live in one environment file that the worker itself reads
(`EMP_ENV_FILE`, see `load_env_file`): supervisord has no env-file option, and reading it
in the worker needs no shell between supervisord and the worker.

Stopping: `stopsignal=TERM` with `stopwaitsecs` above the drain timeout, so a stop waits
for the running jobs; `stopasgroup`/`killasgroup` because the single-file binary runs as
two processes (a launcher and the worker).

Restarts: `autorestart=unexpected` with `exitcodes=0`: a worker that crashes or is killed
is started again; one that exits 0 (a shutdown asked through the hub, `emp workers
shutdown ID`) stays stopped until `supervisorctl start`.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import socket
import sys
from pathlib import Path

#: How much longer than the drain timeout supervisord waits before it kills a worker: the
#: drain hands back what is left, waits up to 5 s to deliver it, then closes.
STOP_MARGIN_S = 30
#: A worker that stays up this long has started (supervisord's `startsecs`).
START_SECS = 5
#: Failed starts in a row before supervisord gives up (FATAL); it waits 1, 2, 3... s between.
START_RETRIES = 10
LOG_MAX_BYTES = "50MB"
LOG_BACKUPS = 5
GROUP = "emp"


def load_env_file(path: Path) -> dict[str, str]:
    """Read `KEY=VALUE` lines into the environment, where the environment does not set the
    key already (the environment wins, as it does over the TOML file); returns what was set.

    Blank lines and lines starting with `#` are skipped; the value is taken literally
    (no shell expansion), one pair of matching quotes around it is removed.
    """
    added: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key not in os.environ:
            os.environ[key] = added[key] = value
    return added


def default_dirs() -> tuple[Path, Path]:
    """Where logs and supervisord's socket go by default: /var/log/emp and /run/emp for
    root, under $XDG_STATE_HOME/emp otherwise."""
    if os.geteuid() == 0:
        return Path("/var/log/emp"), Path("/run/emp")
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local/state") / "emp"
    return state / "log", state / "run"


def default_binary() -> Path:
    """The running `emp-worker`: the single-file binary itself, or the console script."""
    if getattr(sys, "frozen", False):
        return Path(sys.executable).resolve()
    return Path(sys.argv[0]).resolve()


def gpu_indexes(spec: str | None) -> list[int]:
    """`--gpus`: a comma list of indexes, `none` for no GPU; default: every GPU NVML sees."""
    if spec is None:
        from emp_worker import hardware  # NVML: only when asked (`--version` stays light)

        return list(range(len(hardware.gpus())))
    if spec.strip().lower() in {"none", ""}:
        return []
    try:
        indexes = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--gpus: expected indexes like 0,1 or 'none', got {spec!r}") from None
    if any(i < 0 for i in indexes) or len(set(indexes)) != len(indexes):
        raise ValueError(f"--gpus: expected distinct indexes >= 0, got {spec!r}")
    return indexes


def _value(text: str) -> str:
    """A value in supervisord's config: `%` escaped (it expands `%(name)s`)."""
    if any(c in text for c in "\n\r"):
        raise ValueError(f"a line break in a supervisor setting: {text!r}")
    return text.replace("%", "%%")


def _environment(env: dict[str, str]) -> str:
    for value in env.values():
        if '"' in value:
            raise ValueError(f"a double quote in a supervisor environment value: {value!r}")
    return ",".join(f'{key}="{_value(value)}"' for key, value in env.items())


def render(
    *,
    binary: Path,
    gpus: list[int],
    drain_timeout_s: float,
    log_dir: Path,
    run_dir: Path,
    env_file: Path | None = None,
    worker_config: Path | None = None,
    id_prefix: str | None = None,
    programs_only: bool = False,
) -> str:
    """The configuration text."""
    prefix = id_prefix or socket.gethostname().split(".")[0] or "worker"
    shared: dict[str, str] = {}
    if env_file is not None:
        shared["EMP_ENV_FILE"] = str(env_file)
    if worker_config is not None:
        shared["EMP_CONFIG"] = str(worker_config)
    programs: dict[str, dict[str, str]] = {}
    for index in gpus:
        programs[f"gpu{index}"] = {
            **shared,
            "EMP_GPU_INDEX": str(index),
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": str(index),
            "EMP_WORKER_ID": f"{prefix}-gpu{index}",
        }
    if not programs:
        programs["cpu"] = {**shared, "EMP_WORKER_ID": f"{prefix}-cpu"}
    stop_wait = math.ceil(drain_timeout_s) + STOP_MARGIN_S
    described = f"{len(gpus)} GPU(s)" if gpus else "no GPU: one CPU worker"
    lines = [
        f"; Written by `emp-worker supervisor-config`: {described}.",
        f"; Control: supervisorctl -c <this file> status | stop {GROUP}:* | start {GROUP}:*",
        "; A stop drains: the worker finishes its running jobs (EMP_DRAIN_TIMEOUT_S) and exits 0.",
        "",
    ]
    if not programs_only:
        lines += [
            "[supervisord]",
            f"logfile={_value(str(log_dir / 'supervisord.log'))}",
            "logfile_maxbytes=10MB",
            f"logfile_backups={LOG_BACKUPS}",
            f"pidfile={_value(str(run_dir / 'supervisord.pid'))}",
            f"childlogdir={_value(str(log_dir))}",
            "",
            "[unix_http_server]",
            f"file={_value(str(run_dir / 'supervisor.sock'))}",
            "chmod=0700",
            "",
            "[supervisorctl]",
            f"serverurl=unix://{_value(str(run_dir / 'supervisor.sock'))}",
            "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "",
        ]
    lines += [f"[group:{GROUP}]", f"programs={','.join(programs)}", ""]
    for name, env in programs.items():
        lines += [
            f"[program:{name}]",
            f"command={_value(shlex.join([str(binary), 'run']))}",
            f"environment={_environment(env)}",
            "autostart=true",
            "autorestart=unexpected",
            "exitcodes=0",
            f"startsecs={START_SECS}",
            f"startretries={START_RETRIES}",
            "stopsignal=TERM",
            f"stopwaitsecs={stop_wait}",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={_value(str(log_dir / f'{name}.log'))}",
            f"stdout_logfile_maxbytes={LOG_MAX_BYTES}",
            f"stdout_logfile_backups={LOG_BACKUPS}",
            "",
        ]
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `supervisor-config` command line."""
    p = sub.add_parser(
        "supervisor-config",
        help="print (or write) a supervisord config: one worker per GPU",
        description="A supervisord configuration for this machine: one worker program per "
        "GPU (NVML), or one CPU worker without a GPU.",
    )
    p.add_argument("--binary", help="the emp-worker to run (default: this one)")
    p.add_argument(
        "--gpus",
        help="GPU indexes, comma separated (e.g. 0,1), or 'none' for one CPU worker "
        "(default: every GPU NVML sees)",
    )
    p.add_argument(
        "--env-file",
        help="KEY=VALUE file with the shared settings (hub URL, token, connectors); "
        "each worker reads it at start (EMP_ENV_FILE)",
    )
    p.add_argument("--config", help="a worker TOML file, passed on as EMP_CONFIG")
    p.add_argument("--log-dir", help="logs (default: /var/log/emp, or ~/.local/state/emp/log)")
    p.add_argument(
        "--run-dir",
        help="supervisord's socket and pid (default: /run/emp, or ~/.local/state/emp/run)",
    )
    p.add_argument("--id-prefix", help="worker ids are <prefix>-gpu<N> (default: host name)")
    p.add_argument(
        "--programs-only",
        action="store_true",
        help="only the [group] and [program] sections, for an existing supervisord's conf.d",
    )
    p.add_argument("-o", "--output", help="write to this file (default: print)")


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(text)
    temp.replace(path)
