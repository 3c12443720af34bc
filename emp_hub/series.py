"""The dashboard's time series: jobs completed and failed, and submit-to-start latency, in
one-minute buckets over the last hour, for the whole deployment.

Each replica counts in memory (nothing per job in Redis) and adds its counts to one Redis
hash per bucket every few seconds (`flush`: one pipeline of HINCRBY/HINCRBYFLOAT, the keys
expiring after the window), so the buckets sum every replica's work. `read` gives the
window's buckets, oldest first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import redis.asyncio
from pydantic import BaseModel, Field

from emp_hub.broker import REDIS_DOWN
from emp_hub.broker.keys import Keys

log = logging.getLogger("emp_hub")

#: Seconds per bucket.
BUCKET_S = 60
#: Buckets kept and shown: an hour.
WINDOW_BUCKETS = 60
#: Seconds between two flushes of a replica's counts.
FLUSH_S = 5.0
#: The counted fields: jobs completed, jobs failed for good (dead-lettered), jobs started
#: (assigned to a worker) and the sum of their submit-to-start seconds.
FIELDS = ("completed", "failed", "started", "start_s")


class Bucket(BaseModel):
    """One minute of the whole deployment's work."""

    t: int = Field(description="The bucket's start, Unix seconds (a multiple of bucket_s).")
    completed: int = 0
    failed: int = Field(default=0, description="Jobs that failed for good (no retry left).")
    started: int = Field(default=0, description="Jobs assigned to a worker.")
    start_mean_s: float | None = Field(
        default=None, description="Mean submit-to-start seconds of the jobs started."
    )


class SeriesView(BaseModel):
    """The last hour, oldest bucket first; the last one is still filling."""

    bucket_s: int
    buckets: list[Bucket]


class Series:
    """This replica's counts not yet added to Redis, per bucket."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.pending: dict[int, dict[str, float]] = {}

    def _bucket(self) -> dict[str, float]:
        start = int(self.clock()) // BUCKET_S * BUCKET_S
        counts = self.pending.get(start)
        if counts is None:
            counts = self.pending[start] = {}
        return counts

    def count(self, field: str, n: int = 1) -> None:
        """`n` more jobs `completed` or `failed`."""
        counts = self._bucket()
        counts[field] = counts.get(field, 0) + n

    def started(self, latency_s: float) -> None:
        """A job started, `latency_s` after its submission."""
        counts = self._bucket()
        counts["started"] = counts.get("started", 0) + 1
        counts["start_s"] = counts.get("start_s", 0.0) + max(0.0, latency_s)

    async def flush(self, client: redis.asyncio.Redis, keys: Keys) -> None:
        """Add the counts to the buckets' hashes in Redis (one pipeline); on an error they
        are kept for the next flush."""
        taken, self.pending = self.pending, {}
        if not taken:
            return
        ttl = BUCKET_S * (WINDOW_BUCKETS + 2)
        try:
            async with client.pipeline(transaction=False) as pipe:
                for start, counts in taken.items():
                    key = keys("series", str(start))
                    for name, value in counts.items():
                        if name == "start_s":
                            pipe.hincrbyfloat(key, name, value)
                        else:
                            pipe.hincrby(key, name, int(value))
                    pipe.expire(key, ttl)
                await pipe.execute()
        except BaseException:
            for start, counts in taken.items():  # back, for the next flush
                mine = self.pending.setdefault(start, {})
                for name, value in counts.items():
                    mine[name] = mine.get(name, 0) + value
            raise

    async def read(self, client: redis.asyncio.Redis, keys: Keys) -> SeriesView:
        """The window's buckets from Redis (what every replica flushed), oldest first."""
        last = int(self.clock()) // BUCKET_S * BUCKET_S
        starts = [last - BUCKET_S * i for i in reversed(range(WINDOW_BUCKETS))]
        async with client.pipeline(transaction=False) as pipe:
            for start in starts:
                pipe.hgetall(keys("series", str(start)))
            rows: list[dict[str, str]] = await pipe.execute()
        buckets = []
        for start, row in zip(starts, rows, strict=True):
            started = int(row.get("started", 0))
            total = float(row.get("start_s", 0))
            buckets.append(
                Bucket(
                    t=start,
                    completed=int(row.get("completed", 0)),
                    failed=int(row.get("failed", 0)),
                    started=started,
                    start_mean_s=total / started if started else None,
                )
            )
        return SeriesView(bucket_s=BUCKET_S, buckets=buckets)


async def flush_until(
    stop: asyncio.Event, series: Series, client: redis.asyncio.Redis, keys: Keys
) -> None:
    """Flush every FLUSH_S seconds until `stop`, and once more then."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), FLUSH_S)
        try:
            await series.flush(client, keys)
        except REDIS_DOWN as exc:
            log.warning("series flush skipped: %s", exc)
        except Exception:  # nothing must end the loop
            log.exception("series flush failed")
        if stop.is_set():
            return
