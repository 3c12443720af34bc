"""emp-hub migrate-emp-redis on data laid out as the emp-redis reference describes (the
recorded Redis dumps in tests/fixtures/emp-redis/, plus pending jobs of every shape)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio

from emp_hub.broker import Broker, JobStatus, connect
from emp_hub.cli import main
from emp_hub.migrate import migrate
from emp_protocol.capabilities import WorkerCapabilities

pytestmark = pytest.mark.hub

FIXTURES = Path(__file__).parent / "fixtures" / "emp-redis"
SIM = WorkerCapabilities(services={"simulation"})


def old_url(redis_url: str) -> str:
    """Database 1 of the test server holds the old deployment's keys."""
    return redis_url.rsplit("/", 1)[0] + "/1"


@pytest.fixture
async def old(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """The old deployment: the recorded dumps plus pending jobs of every shape."""
    client = connect(old_url(redis_url))
    written: list[str] = []
    for dump in ("happy_rest", "sim_failure", "unsupported_cancel"):
        for key, entry in json.loads((FIXTURES / f"{dump}.redis.json").read_text())["keys"].items():
            if entry["type"] == "hash":
                await client.hset(key, mapping=entry["value"])
                written.append(key)
    pending = [  # id, priority, created_at: the order must be b, d, a, c
        ("mig-a", "0", "100.0"),
        ("mig-b", "5", "300.0"),
        ("mig-c", "0", "200.0"),
        ("mig-d", "5", "400.0"),
    ]
    for job_id, priority, created in pending:
        await client.hset(
            f"job:{job_id}",
            mapping={
                "id": job_id,
                "job_type": "simulation",
                "priority": priority,
                "status": "pending",
                "created_at": created,
                "job_request_payload": json.dumps({"job": job_id}),
            },
        )
    await client.hset(
        "job:mig-old-shape",
        mapping={  # an older record: type and params
            "type": "simulation",
            "params": '{"old": true}',
            "status": "processing",
            "priority": "0",
            "created_at": "500.0",
            "worker_id": "gone",
        },
    )
    await client.hset(
        "job:mig-weird",
        mapping={
            "id": "mig-weird",
            "job_type": "simulation",
            "status": "exploded",
            "created_at": "1",
        },
    )
    await client.zadd("job_priority_queue", {"mig-a": 1.0})  # stale: must be ignored
    written += [f"job:{i}" for i, _, _ in pending] + [
        "job:mig-old-shape",
        "job:mig-weird",
        "job_priority_queue",
    ]
    try:
        yield client
    finally:
        await client.delete(*written)
        await client.aclose()


async def snapshot(client: redis.asyncio.Redis) -> dict[str, object]:
    out: dict[str, object] = {}
    async for key in client.scan_iter(match="job*"):
        kind = await client.type(key)
        out[key] = await (client.hgetall(key) if kind == "hash" else client.zrange(key, 0, -1))
    return out


async def test_migration(
    old: redis.asyncio.Redis, redis_client: redis.asyncio.Redis, namespace: str
) -> None:
    from emp_hub.broker import BrokerSettings

    broker = Broker(redis_client, BrokerSettings(namespace=namespace))
    before = await snapshot(old)

    dry = await migrate(old, broker, dry_run=True)
    assert (dry.scanned, dry.pending, dry.requeued_running, dry.finished) == (11, 4, 1, 5)
    assert dry.unreadable == ["mig-weird: unknown status 'exploded'"]
    assert (await broker.stats()).pending == 0

    report = await migrate(old, broker)
    assert report.imported == 10 and report.skipped_existing == 0
    order = []
    while (claim := await broker.claim("w", SIM)) is not None:
        order.append(claim.job.id)
    assert order == ["mig-b", "mig-d", "mig-a", "mig-c", "mig-old-shape"]
    assert (await broker.get("mig-old-shape")).payload == {"old": True}
    assert (await broker.get("mig-b")).payload == {"job": "mig-b"}

    done = await broker.get("rest-job-2")
    assert done.status is JobStatus.COMPLETED and done.result["status"] == "success"
    assert done.created_at == pytest.approx(1795926932.0300791)
    assert done.client_id == "rest-api-client"
    assert (await broker.get("fail-job-2")).client_id == "client-1"
    assert (await broker.get("nst-job-1")).status is JobStatus.CANCELLED
    assert await redis_client.ttl(broker.key("job", "rest-job-2")) > 0
    history = await broker.list_jobs(status=JobStatus.COMPLETED, limit=10)
    assert {j.id for j in history.jobs} >= {"rest-job-2", "fail-job-2"}

    assert await snapshot(old) == before  # the old keys are untouched
    again = await migrate(old, broker)
    assert again.imported == 0 and again.skipped_existing == 10


def test_migration_command(
    old: redis.asyncio.Redis,
    redis_url: str,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    redis_client: redis.asyncio.Redis,
) -> None:
    monkeypatch.setenv("EMP_REDIS_URL", redis_url)
    monkeypatch.setenv("EMP_BROKER__NAMESPACE", namespace)
    assert main(["migrate-emp-redis", "--from", old_url(redis_url), "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "scanned 11 old jobs: 4 pending, 1 running (queued again), 5 finished" in out.out
    assert "would import 10" in out.out and "unknown status 'exploded'" in out.err
    assert main(["migrate-emp-redis", "--from", old_url(redis_url)]) == 0
    assert "imported 10, skipped 0 already here" in capsys.readouterr().out
