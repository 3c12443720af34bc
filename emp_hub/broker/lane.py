"""A multiplexed connection to Redis for the broker's scripts.

redis-py takes a connection from its pool for every command, checks it (connected, nothing
left unread), and gives it back, with a lock, a condition and a timeout on the way: a
trivial script took 0.05 to 0.07 ms more than on a lane on a 2-core VM, and 0.23 to 0.31
ms more after a 5 ms pause (benchmarks/lane.py). A `Lane` is one connection that every
caller of the process shares: a command is written at once, and the replies are read in
turn by one task (Redis answers in the order it was asked) and handed to their callers.
Nothing is checked out or back, and a caller cancelled meanwhile costs nothing: its reply
is read and dropped.

One slow command holds the replies behind it, so a lane is only for commands that never
block: the broker's scripts (scripts.py) and the token lookup of an authenticated request
(auth.py, by `connection.on_lane`). Blocking reads, pub/sub and everything else go
through redis-py as before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis.asyncio
import redis.exceptions
from redis._parsers.base import BaseParser
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

#: A command's arguments, encoded as redis-py encodes them.
Arg = str | bytes | int | float


class _ErrorReply(Exception):
    """An error reply as the reader gives it; turned into redis-py's exception for it."""


def _error(message: str) -> Exception:
    """redis-py's exception for an error reply (NoScriptError for "NOSCRIPT ...")."""
    error: Exception = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
    return error


def pack(args: Sequence[Arg]) -> bytes:
    """A command in the Redis protocol (RESP), its arguments encoded as redis-py does."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, bool):  # an int, but redis-py refuses it: so does the lane
            raise redis.exceptions.DataError(f"Invalid input of type: 'bool' ({arg!r})")
        elif isinstance(arg, int | float):
            data = repr(arg).encode()
        else:
            raise redis.exceptions.DataError(f"Invalid input of type: {type(arg).__name__!r}")
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


@dataclass(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    #: The callers waiting for a reply, oldest first, with when each was sent.
    pending: collections.deque[tuple[asyncio.Future[Any], float]] = field(
        default_factory=collections.deque
    )
    task: asyncio.Task[None] | None = None
    watchdog: asyncio.TimerHandle | None = None
    closed: bool = False


class Lane:
    """One connection to Redis shared by every caller in the process; see the module."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        decode: bool = True,
        retry: Retry | None = None,
        connect_timeout: float = 1.0,
        timeout: float = 30.0,
        name: str = "emp-lane",
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self._auth = [a for a in (username, password) if a is not None]
        self._db = db
        self._encoding = "utf-8" if decode else None
        self._retry = retry or Retry(NoBackoff(), 0)
        self.connect_timeout = connect_timeout
        #: A reply not in after this long: the connection is given up (TimeoutError).
        self.timeout = timeout
        self.name = name
        self._conn: _Connection | None = None
        self._opening = asyncio.Lock()

    @classmethod
    def for_pool(cls, pool: redis.asyncio.ConnectionPool) -> Lane | None:
        """A lane to the server of a redis-py pool, with its credentials, database,
        timeouts and retry policy; None for a server it cannot reach alike (TLS)."""
        kw = pool.connection_kwargs
        common: dict[str, Any] = {
            "username": kw.get("username"),
            "password": kw.get("password"),
            "db": int(kw.get("db") or 0),
            "decode": bool(kw.get("decode_responses")),
            "retry": kw.get("retry"),
            "connect_timeout": kw.get("socket_connect_timeout") or 1.0,
            "timeout": kw.get("socket_timeout") or 30.0,
        }
        if pool.connection_class is redis.asyncio.UnixDomainSocketConnection:
            return cls(path=kw["path"], **common)
        if pool.connection_class is redis.asyncio.Connection:
            return cls(host=kw.get("host", "localhost"), port=int(kw.get("port", 6379)), **common)
        return None

    @property
    def address(self) -> str:
        """Where the lane connects to."""
        return self.path or f"{self.host}:{self.port}"

    async def execute(self, *args: Arg) -> Any:
        """Run one command; its reply, or redis-py's exception for its error reply. A lost
        connection is opened again, and the command retried, as the retry policy says."""
        return await self._retry.call_with_retry(lambda: self._execute(args), self._failed)

    async def _execute(self, args: Sequence[Arg]) -> Any:
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connection()
        return await self._send(conn, pack(args))

    async def _send(self, conn: _Connection, command: bytes) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        conn.pending.append((future, time.monotonic()))
        conn.writer.write(command)  # no await between the two: replies come in this order
        if conn.watchdog is None:
            conn.watchdog = asyncio.get_running_loop().call_later(self.timeout, self._watch, conn)
        return await future

    async def _failed(self, error: Exception) -> None:
        """A try failed: nothing to do, as its connection was closed where it failed (the
        next try opens a new one)."""

    async def _connection(self) -> _Connection:
        async with self._opening:
            if self._conn is None or self._conn.closed:
                self._conn = await self._open()
            return self._conn

    async def _open(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.path is not None:
                    reader, writer = await asyncio.open_unix_connection(self.path)
                else:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise redis.exceptions.ConnectionError(
                f"Error connecting to {self.address}: {exc or type(exc).__name__}"
            ) from None
        conn = _Connection(reader, writer)
        conn.task = asyncio.create_task(self._read(conn), name=f"{self.name} reader")
        try:
            if self._auth:
                await self._send(conn, pack(["AUTH", *self._auth]))
            if self._db:
                await self._send(conn, pack(["SELECT", self._db]))
            await self._send(conn, pack(["CLIENT", "SETNAME", self.name]))
        except BaseException as exc:  # a refusal (a wrong password), a loss, a cancel
            self._drop(conn, exc)
            if isinstance(exc, redis.exceptions.ResponseError):
                raise redis.exceptions.ConnectionError(f"{self.address}: {exc}") from None
            raise
        return conn

    async def _read(self, conn: _Connection) -> None:
        """Read replies and hand each to the oldest caller waiting (until the end)."""
        parser = hiredis.Reader(encoding=self._encoding, replyError=_ErrorReply)
        try:
            while True:
                data = await conn.reader.read(65536)
                if not data:
                    raise redis.exceptions.ConnectionError("Connection closed by server.")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    future, _ = conn.pending.popleft()
                    if future.done():  # its caller was cancelled
                        continue
                    if isinstance(reply, _ErrorReply):
                        future.set_exception(_error(str(reply)))
                    else:
                        future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # lost, or a reply nobody asked for
            self._drop(conn, exc)

    def _watch(self, conn: _Connection) -> None:
        """The oldest reply waited for is overdue: give the connection up."""
        conn.watchdog = None
        if conn.closed or not conn.pending:
            return
        waited = time.monotonic() - conn.pending[0][1]
        if waited >= self.timeout:
            self._drop(conn, redis.exceptions.TimeoutError("Timeout reading from Redis"))
        else:
            conn.watchdog = asyncio.get_running_loop().call_later(
                self.timeout - waited, self._watch, conn
            )

    def _drop(self, conn: _Connection, error: BaseException) -> None:
        """Close a connection; its callers still waiting get a ConnectionError (or the
        TimeoutError that ended it)."""
        if self._conn is conn:
            self._conn = None
        if conn.closed:
            return
        conn.closed = True
        if conn.watchdog is not None:
            conn.watchdog.cancel()
        if conn.task is not None and conn.task is not asyncio.current_task():
            conn.task.cancel()
        conn.writer.close()
        if not isinstance(error, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            error = redis.exceptions.ConnectionError(f"{self.address}: {error}")
        while conn.pending:
            future, _ = conn.pending.popleft()
            if not future.done():
                future.set_exception(error)

    async def aclose(self) -> None:
        """Close the connection (a later command opens a new one, as redis-py does)."""
        conn = self._conn
        if conn is None:
            return
        self._drop(conn, redis.exceptions.ConnectionError("the lane was closed"))
        if conn.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await conn.task
        with contextlib.suppress(OSError):
            await conn.writer.wait_closed()
