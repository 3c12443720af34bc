"""Shared parts of the supervisor and installer tests: a stand-in for the single-file worker
binary, a real supervisord, and the search for processes left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.processes import eventually_sync

BIN = Path(sys.executable).parent

LAUNCHER = '''#!{python}
"""A stand-in for the single-file emp-worker: like PyInstaller's onefile launcher, it runs
the worker as a child process, forwards TERM/INT/HUP to it and exits as the child did.
It forwards a signal 0.2 s late, so a worker that got the same signal from its process group
(supervisord's stopasgroup) sees two deliveries, not one the kernel merged.
Release {tag}: its workers carry the tag `{tag}`, which the hub shows."""
import os, signal, subprocess, sys, time

child = subprocess.Popen(
    [{worker!r}, *sys.argv[1:]], env={{**os.environ, "EMP_TAGS": {tag!r}}}
)
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda signum, frame: (time.sleep(0.2), child.send_signal(signum)))
status = child.wait()
if status < 0:
    signal.signal(-status, signal.SIG_DFL)
    os.kill(os.getpid(), -status)
sys.exit(status)
'''


def fake_worker_binary(path: Path, tag: str) -> Path:
    """Write an executable that behaves as the emp-worker binary of release `tag`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(LAUNCHER.format(python=sys.executable, worker=str(BIN / "emp-worker"), tag=tag))
    path.chmod(0o755)
    return path


def processes_mentioning(marker: str) -> list[str]:
    """`pid: command` of every process whose environment or command line holds `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if marker.encode() in environ or marker.encode() in cmdline:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{proc.name}: {command}")
    return found


def children(pid: int) -> list[int]:
    """The direct children of a process."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@dataclass
class Supervisord:
    """A running `supervisord -n -c CONFIG` and its `supervisorctl`."""

    config: Path
    popen: subprocess.Popen[bytes]
    log_dir: Path

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `supervisorctl -c CONFIG ARGS`."""
        return subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def states(self) -> dict[str, str]:
        """Program name -> state (RUNNING, STARTING, STOPPED...)."""
        out = self.ctl("status").stdout
        return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}

    def wait_states(self, wanted: dict[str, str], timeout: float = 60) -> None:
        """Until the programs are in these states."""

        def reached() -> dict[str, str] | None:
            assert self.popen.poll() is None, self.log()
            states = self.states()
            return states if states == wanted else None

        what = f"states {wanted}"
        eventually_sync(reached, within_s=timeout, every_s=0.2, what=what, log=self.log)

    def pid(self, program: str) -> int:
        """The pid of a running program."""
        return int(self.ctl("pid", program).stdout.strip())

    def log(self) -> str:
        """supervisord's log and the programs' logs."""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted(self.log_dir.glob("*.log"))
        )


@contextmanager
def supervisord(
    config: Path, log_dir: Path, env: dict[str, str], output: Path | None = None
) -> Iterator[Supervisord]:
    """supervisord in the foreground on `config` (what it prints goes to `output`, by default
    log_dir/supervisord.out); stopped (its programs drained) at the end."""
    output = output or log_dir / "supervisord.out"
    popen = subprocess.Popen(
        [str(BIN / "supervisord"), "-n", "-c", str(config)],
        env=env,
        stdout=output.open("wb"),
        stderr=subprocess.STDOUT,
    )
    running = Supervisord(config, popen, log_dir)
    try:

        def answers() -> bool:
            assert popen.poll() is None, output.read_text()
            return running.ctl("pid").returncode == 0

        eventually_sync(answers, within_s=30, every_s=0.1, what="supervisorctl", log=running.log)
        yield running
    finally:
        if popen.poll() is None:
            popen.terminate()
            try:
                popen.wait(120)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
