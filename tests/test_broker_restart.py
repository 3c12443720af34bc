"""The broker survives a restart of its Redis server: the script cache is gone (NOSCRIPT,
scripts reload by themselves) and the data comes back from the AOF.

These tests always use an embedded Valkey of their own, since they stop and kill it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio
import redis.exceptions

from emp_hub.broker import Broker, BrokerSettings, JobSpec, JobStatus
from emp_hub.broker.connection import connect
from emp_hub.broker.scripts import source
from emp_hub.embedded import EmbeddedValkey, redis_url_or_embedded
from emp_protocol.capabilities import WorkerCapabilities

pytestmark = pytest.mark.broker

SIM = WorkerCapabilities(services={"sim"})


async def test_restart_keeps_jobs_and_reloads_scripts(tmp_path: Path) -> None:
    server = EmbeddedValkey(tmp_path / "valkey")
    server.start()
    client = connect(server.url)
    try:
        broker = Broker(client, BrokerSettings(namespace="restart"))
        jobs = await broker.submit_many([JobSpec(service="sim", priority=i % 3) for i in range(30)])
        order = [j.id for j in sorted(jobs, key=lambda j: (-j.priority, j.seq))]
        claim = await broker.claim("w", SIM)
        assert claim is not None and claim.job.id == order[0]

        server.stop()
        server.start()
        sha = client.register_script(source("claim")).sha
        assert await client.script_exists(sha) == [False]  # the script cache is gone

        assert (await broker.get(order[0])).status is JobStatus.ACTIVE
        await broker.complete(claim.job.id, claim.token, {"ok": True})  # the lease survived
        taken = []
        while (c := await broker.claim("w", SIM)) is not None:
            taken.append(c.job.id)
        assert taken == order[1:]
        assert await client.script_exists(sha) == [True]
    finally:
        await client.aclose()
        server.stop()


@pytest.mark.slow
async def test_crash_keeps_what_was_synced(tmp_path: Path) -> None:
    """kill -9 of the server: AOF (fsync every second) keeps what is older than a second."""
    server = EmbeddedValkey(tmp_path / "valkey")
    server.start()
    client = connect(server.url)
    try:
        broker = Broker(client, BrokerSettings(namespace="crash"))
        jobs = await broker.submit_many([JobSpec(service="sim") for _ in range(10)])
        await asyncio.sleep(1.5)
        server.kill()
        server.start()
        assert [(await broker.get(j.id)).status for j in jobs] == [JobStatus.PENDING] * 10
        assert (await broker.stats()).pending == 10
    finally:
        await client.aclose()
        server.stop()


async def test_embedded_default_starts_and_stops(tmp_path: Path) -> None:
    with redis_url_or_embedded(None, tmp_path / "data") as url:
        client = connect(url)
        assert await client.ping()
        assert (await client.config_get("appendonly"))["appendonly"] == "yes"
        await client.aclose()
    plain = redis.asyncio.Redis.from_url(url)  # no retries: fail fast, the server is gone
    with pytest.raises(redis.exceptions.ConnectionError):
        await plain.ping()
    await plain.aclose()
    with redis_url_or_embedded("redis://example:1/0", tmp_path) as given:
        assert given == "redis://example:1/0"
