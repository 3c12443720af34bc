"""The Redis client the broker runs on."""

from __future__ import annotations

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

#: Connections one process may open to Redis. When all are busy, a command waits for one
#: (up to POOL_WAIT_S) instead of failing: redis-py's default pool (100) raised "Too many
#: connections" as soon as a few hundred workers registered at once.
MAX_CONNECTIONS = 1000
POOL_WAIT_S = 20


def connect(
    url: str, *, retries: int = 12, max_connections: int = MAX_CONNECTIONS
) -> redis.asyncio.Redis:
    """An asyncio Redis client for the broker: responses decoded as text, commands retried
    with backoff (by default for about 10 s) while the server restarts or fails over, and a
    pool that makes a command wait for a free connection rather than fail."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        decode_responses=True,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=retries),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        health_check_interval=30,
        # Above the longest blocking read the hub makes (XREAD BLOCK of up to 15 s).
        socket_timeout=30,
        socket_connect_timeout=5,
    )
    return redis.asyncio.Redis.from_pool(pool)
