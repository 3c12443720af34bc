"""The Redis client the broker runs on."""

from __future__ import annotations

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff


def connect(url: str, *, retries: int = 12) -> redis.asyncio.Redis:
    """An asyncio Redis client for the broker: responses decoded as text, and commands
    retried with backoff (by default for about 10 s) while the server restarts or fails
    over."""
    return redis.asyncio.Redis.from_url(
        url,
        decode_responses=True,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=retries),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        health_check_interval=30,
        # Above the longest blocking read the hub makes (XREAD BLOCK of up to 15 s).
        socket_timeout=30,
        socket_connect_timeout=5,
    )
