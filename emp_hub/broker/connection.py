"""The Redis client the broker runs on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import AbstractBackoff, ExponentialWithJitterBackoff

from emp_hub.broker.lane import Arg, Lane

T = TypeVar("T")

#: Connections one process may open to Redis. When all are busy, a command waits for one
#: (up to POOL_WAIT_S) instead of failing: redis-py's default pool (100) raised "Too many
#: connections" as soon as a few hundred workers registered at once.
MAX_CONNECTIONS = 1000
POOL_WAIT_S = 20
#: How long a command keeps retrying while Redis cannot be reached (backoff from 50 ms,
#: doubling, at most 0.5 s a wait, with jitter). A server back within it (a restart, the
#: embedded server restarted after a crash) goes unnoticed; past it the command fails, and
#: the hub answers 503 (so a request sees an outage after about RETRY_S, 2 s at most).
RETRY_S = 1.0
#: Opening a connection (TCP, TLS) gives up after this long: a server that drops packets
#: fails as fast as one that refuses them.
CONNECT_TIMEOUT_S = 1.0
#: What a command raises once Redis stayed unreachable past RETRY_S.
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class RetryFor(Retry):
    """redis-py's Retry bounded by time rather than by a count: it retries the supported
    errors with the backoff until `seconds` have passed since the first failure."""

    def __init__(self, backoff: AbstractBackoff, seconds: float) -> None:
        super().__init__(backoff, retries=-1)
        self.seconds = seconds

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        """Run `do` until it succeeds or the time is up (then its last error is raised)."""
        deadline: float | None = None
        failures = 0
        while True:
            try:
                return await do()
            except self._supported_errors as error:
                if is_retryable is not None and not is_retryable(error):
                    raise
                failures += 1
                await (fail(error, failures) if with_failure_count else fail(error))
                if deadline is None:
                    deadline = time.monotonic() + self.seconds
                delay = self._backoff.compute(failures)
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)


class Client(redis.asyncio.Redis):
    """redis-py's asyncio client with a `lane` to the same server (lane.py), on which the
    broker runs its scripts and `on_lane` its callers' commands; closing the client closes
    the lane."""

    lane: Lane | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Close the lane, then the client (its pool, when it owns it)."""
        if self.lane is not None:
            await self.lane.aclose()
        await super().aclose(close_connection_pool)


async def on_lane(client: redis.asyncio.Redis, *args: Arg) -> Any:
    """Run a command that never blocks on the client's lane when it has one (emp's
    `Client`), else through redis-py: for a command on every request's path, as the
    token lookup is (a lane's round trip is the shorter, lane.py)."""
    lane = client.lane if isinstance(client, Client) else None
    if lane is None:
        return await client.execute_command(*args)  # type: ignore[no-untyped-call]
    return await lane.execute(*args)


def connect(
    url: str, *, retry_s: float = RETRY_S, max_connections: int = MAX_CONNECTIONS
) -> Client:
    """An asyncio Redis client for the broker: responses decoded as text, commands retried
    with backoff for `retry_s` while the server restarts or fails over, a pool that makes a
    command wait for a free connection rather than fail, and a lane for the scripts (not
    over TLS: they go through the pool there)."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        decode_responses=True,
        retry=RetryFor(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retry_s),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        health_check_interval=30,
        # Above the longest blocking read the hub makes (XREAD BLOCK of up to 15 s).
        socket_timeout=30,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
    )
    client = Client(connection_pool=pool)
    client.auto_close_connection_pool = True  # as Redis.from_pool: it owns the pool
    client.lane = Lane.for_pool(pool)
    return client
