"""Monitors never stall a replica: the bus's listener only queues job events for them (each
monitor's outbox has its own sender), and the dashboard's live feed only counts them."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import time
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import pytest
import redis.asyncio
import websockets

from emp_hub import events
from emp_hub.auth import Role, TokenStore
from emp_hub.broker import Broker, BrokerSettings, JobSpec
from emp_hub.routes import feed
from emp_hub.settings import HubSettings
from emp_protocol.capabilities import WorkerCapabilities
from emp_worker.testing import eventually
from tests.hub_server import running_hub
from tests.test_hub_ws import SAFETY_WAKE_LIMIT, Peer, submit, worker

pytestmark = pytest.mark.hub

BULK = WorkerCapabilities(services={"bulk"})


@pytest.fixture
def broker(redis_client: redis.asyncio.Redis, namespace: str) -> Broker:
    """The test's own broker on the hub's Redis: it runs jobs as a worker on another
    replica would (their events reach the hub through Redis)."""
    return Broker(redis_client, BrokerSettings(namespace=namespace))


class Warnings(logging.Handler):
    """The emp_hub warnings logged meanwhile."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def run_jobs(
    broker: Broker, count: int, *, result_bytes: int = 0, prefix: str = "bulk"
) -> list[str]:
    """Submit `count` jobs (client `c-<i % 3>`), claim them all, report progress on each
    and complete each with {"n": i} (and `result_bytes` of padding)."""
    specs = [
        JobSpec(id=f"{prefix}-{i}", service="bulk", client_id=f"c-{i % 3}") for i in range(count)
    ]
    await broker.submit_many(specs)
    claims = await broker.claim_many("w-bulk", BULK, count)
    assert len(claims) == count
    for claim in claims:
        await broker.progress(claim.job.id, claim.token, 50, "half")
    for claim in claims:
        n = int(claim.job.id.rpartition("-")[2])
        await broker.complete(claim.job.id, claim.token, {"n": n, "pad": "x" * result_bytes})
    return [spec.id or "" for spec in specs]


async def stuck_monitor(base_url: str, monitor_id: str) -> socket.socket:
    """A monitor connection that reads the hub's answer to its handshake, then nothing:
    its receive buffer is small, so the hub's sends to it soon wait."""
    host, _, port = base_url.removeprefix("http://").partition(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, int(port)))
    handshake = (
        f"GET /ws/monitor/{monitor_id} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, handshake.encode())
    answer = await asyncio.wait_for(loop.sock_recv(sock, 1024), 5)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return sock


@pytest.mark.slow
async def test_a_monitor_that_stops_reading_delays_no_job_on_another_replica(
    hub_settings: HubSettings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A monitor that reads nothing while megabytes of job messages are due: its replica
    still hears the other replica's work announcement and assigns the job at once (not
    at the safety timer's wake), and the monitor's outbox drops its oldest events past
    its limit, with a warning naming it."""
    monkeypatch.setattr(events, "OUTBOX_LIMIT", 50)
    warnings = Warnings()
    logging.getLogger("emp_hub").addHandler(warnings)
    try:
        async with (
            running_hub(hub_settings) as hub_a,
            running_hub(hub_settings) as hub_b,
            worker(hub_a, "w-a") as w,
        ):
            stuck = await stuck_monitor(hub_a, "m-stuck")
            try:
                # ~25 MB of complete_job messages for it: far more than its socket buffers.
                await run_jobs(broker, 150, result_bytes=500_000)
                await run_jobs(broker, 100, prefix="more")
                await w.send("request_job", slots=1)
                started = time.perf_counter()
                job_id = await submit(hub_b, payload={"via": "b"})
                assigned = await w.expect("job_assigned", wait=10)
                latency = time.perf_counter() - started
                assert assigned["job_id"] == job_id
                assert latency < SAFETY_WAKE_LIMIT, latency
            finally:
                stuck.close()
    finally:
        logging.getLogger("emp_hub").removeHandler(warnings)
    dropped = [line for line in warnings.lines if "monitor m-stuck is too far behind" in line]
    assert dropped, warnings.lines
    assert "dropped its" in dropped[0] and "limit 50" in dropped[0], dropped


@pytest.mark.slow
async def test_a_monitor_gets_every_jobs_messages_in_order_with_client_and_result(
    base_url: str, broker: Broker
) -> None:
    """300 jobs' events at once: the monitor gets each job's messages, in order, each with
    the submitting client's id; complete_job with the job's result and worker."""
    url = base_url.replace("http", "ws") + "/ws/monitor/m-1"
    async with websockets.connect(url, max_size=None) as conn:
        monitor = Peer(conn)
        await monitor.expect("connection_established")
        await monitor.expect("stats_broadcast")  # subscribed by now
        job_ids = await run_jobs(broker, 300)
        heard: dict[str, list[dict[str, Any]]] = {job_id: [] for job_id in job_ids}
        completed = 0
        while completed < len(job_ids):
            message = await monitor.recv(wait=10)
            if message["type"] == "stats_broadcast":
                continue
            heard[message["job_id"]].append(message)
            completed += message["type"] == "complete_job"
    for i, job_id in enumerate(job_ids):
        messages = heard[job_id]
        assert [m["type"] for m in messages] == [
            "response_job_status",
            "update_job_progress",
            "complete_job",
        ], messages
        assert {m["client_id"] for m in messages} == {f"c-{i % 3}"}, messages
        assert {m["worker_id"] for m in messages} == {"w-bulk"}, messages
        assert messages[0]["status"] == "processing"
        assert messages[1]["progress"] == 50 and messages[1]["message"] == "half"
        assert messages[2]["result"] == {"n": i, "pad": ""}


async def feed_events(
    http: httpx.AsyncClient, headers: dict[str, str]
) -> AsyncGenerator[tuple[float, str, str]]:
    """The feed's events and comments as they come: (time, event name or "", data)."""
    async with http.stream("GET", "/api/dashboard/feed", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        name, data = "", ""
        async for line in response.aiter_lines():
            if line.startswith(":"):
                yield time.monotonic(), "", line
            elif line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line == "" and name:
                yield time.monotonic(), name, data
                name, data = "", ""


@pytest.mark.slow
async def test_the_feed_says_what_changed_at_most_twice_a_second(
    hub_settings: HubSettings, broker: Broker, redis_client: redis.asyncio.Redis, namespace: str
) -> None:
    """A burst of job events comes as a few `changes` events, 500 ms apart at least, that
    count every job event by status and name some of the jobs; a worker's report sets
    `workers`."""
    store = TokenStore(redis_client, namespace)
    monitor = await store.create(Role.MONITOR, name="watch")
    client = await store.create(Role.CLIENT, name="c")
    worker_token = await store.create(Role.WORKER, name="w")
    hub_settings.token_refresh_s = 0.2
    async with running_hub(hub_settings) as base_url, httpx.AsyncClient(base_url=base_url) as http:
        refused = await http.get(
            "/api/dashboard/feed", headers={"Authorization": f"Bearer {client}"}
        )
        assert refused.status_code == 403
        changes: list[tuple[float, dict[str, Any]]] = []
        stream = feed_events(http, {"Authorization": f"Bearer {monitor}"})
        first = await anext(stream)
        assert first[1] == "" and first[2].startswith(":")  # open: said at once

        async def collect() -> None:
            async for at, name, data in stream:
                if name == "changes":
                    changes.append((at, json.loads(data)))

        reader = asyncio.create_task(collect())
        try:
            await run_jobs(broker, 200)
            async with worker(base_url, "w-f", token=worker_token) as w:
                await w.send("worker_status", status="idle")

                def done() -> bool:
                    totals = sum(c["statuses"].get("completed", 0) for _, c in changes)
                    return totals == 200 and any(c["workers"] for _, c in changes)

                await eventually(done, what="every job's events and the worker's report")
        finally:
            reader.cancel()
    times = [at for at, _ in changes]
    assert all(b - a >= 0.45 for a, b in itertools.pairwise(times)), times
    totals: dict[str, int] = {}
    for _, c in changes:
        for status, n in c["statuses"].items():
            totals[status] = totals.get(status, 0) + n
    assert totals["pending"] == totals["active"] == totals["completed"] == 200, totals
    assert sum(c["jobs"] for _, c in changes) == 200 * 4  # pending, active, progress, completed
    assert all(len(c["job_ids"]) <= 50 for _, c in changes)
    assert "bulk-0" in {job_id for _, c in changes for job_id in c["job_ids"]}


@pytest.mark.slow
async def test_the_feed_says_it_is_alive_when_nothing_changes(
    base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keep-alive comment every KEEPALIVE_S when nothing happens."""
    monkeypatch.setattr(feed, "KEEPALIVE_S", 0.3)
    async with httpx.AsyncClient(base_url=base_url) as http:
        stream = feed_events(http, {})
        opened = await anext(stream)
        ticks = [await asyncio.wait_for(anext(stream), 5) for _ in range(2)]
        await stream.aclose()
    assert [t[2] for t in ticks] == [": keep-alive", ": keep-alive"]
    assert ticks[1][0] - opened[0] >= 0.5
