"""Who owns a worker id, and how fast a worker that is gone stops counting.

A worker id belongs to one live process at a time (its `instance` in register_worker): a
second process with the same id is refused, the same process reconnecting takes over at
once, and a socket that never registers changes nothing. A worker whose connection ends
stops counting after the reconnect grace, and the jobs it held go back to pending then.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import redis.asyncio
import websockets

from emp_hub.broker import BrokerSettings
from emp_hub.settings import HubSettings
from tests.hub_server import running_hub
from tests.test_hub_ws import SIM_CAPS, Peer, job, submit

pytestmark = [pytest.mark.slow, pytest.mark.hub]

GRACE_S = 1.0


@pytest.fixture
def hub_settings(redis_url: str, namespace: str, redis_client: redis.asyncio.Redis) -> HubSettings:
    return HubSettings(
        redis_url=redis_url,
        broker=BrokerSettings(
            namespace=namespace, live_cache_s=0, reconnect_grace_s=GRACE_S, retry_base_s=0.05
        ),
        maintenance_interval_s=5,  # the grace, not the periodic pass, must do the work
    )


@asynccontextmanager
async def connection(base_url: str, worker_id: str) -> AsyncIterator[Peer]:
    """An open worker socket, not registered yet."""
    url = base_url.replace("http", "ws") + f"/ws/worker/{worker_id}"
    async with websockets.connect(url) as conn:
        peer = Peer(conn)
        await peer.expect("connection_established")
        yield peer


async def register(
    peer: Peer, worker_id: str, instance: str | None, **fields: Any
) -> dict[str, Any]:
    """Send register_worker; the first answer (worker_registered or error)."""
    if instance is not None:
        fields["instance"] = instance
    await peer.send("register_worker", worker_id=worker_id, capabilities=SIM_CAPS, **fields)
    return await peer.recv()


@asynccontextmanager
async def worker(base_url: str, worker_id: str, instance: str | None) -> AsyncIterator[Peer]:
    """A registered worker socket."""
    async with connection(base_url, worker_id) as peer:
        assert (await register(peer, worker_id, instance))["type"] == "worker_registered"
        await peer.expect("job_notifications_subscribed")
        yield peer


async def closed_code(peer: Peer, wait: float = 5) -> int | None:
    """Read until the hub closes the socket; its close code."""
    try:
        while True:
            await peer.recv(wait)
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


async def live_workers(base_url: str) -> list[str]:
    async with httpx.AsyncClient(base_url=base_url) as http:
        return [w["worker_id"] for w in (await http.get("/api/workers")).json()]


def cut(peer: Peer) -> None:
    """Drop the connection without a close frame, as a killed process or a cut cable."""
    transport = peer.conn.transport
    assert transport is not None
    transport.abort()


async def test_a_second_process_with_the_same_id_is_refused(base_url: str) -> None:
    async with worker(base_url, "w1", instance="first") as first:
        await first.send("request_job", slots=1)
        async with connection(base_url, "w1") as second:
            refused = await register(second, "w1", instance="second")
            assert refused["type"] == "error" and refused["code"] == "worker_id_in_use"
            assert "w1" in refused["error"] and "EMP_WORKER_ID" in refused["error"]
            assert await closed_code(second) == 4409
        # The refused process has gone (cleanly): the first one still works.
        assert await live_workers(base_url) == ["w1"]
        job_id = await submit(base_url)
        assert (await first.expect("job_assigned"))["job_id"] == job_id


async def test_a_socket_that_never_registers_cannot_cut_a_worker_off(base_url: str) -> None:
    async with worker(base_url, "victim", instance="real") as real:
        await real.send("request_job", slots=1)
        async with connection(base_url, "victim"):
            pass  # opened and closed at once
        async with connection(base_url, "victim") as legacy:  # no instance: not the owner
            assert (await register(legacy, "victim", instance=None))["type"] == "error"
        assert await live_workers(base_url) == ["victim"]
        job_id = await submit(base_url)
        assert (await real.expect("job_assigned"))["job_id"] == job_id


async def test_the_same_process_reconnecting_takes_over_at_once(base_url: str) -> None:
    job_id = await submit(base_url)
    async with worker(base_url, "w1", instance="me") as old:
        await old.send("request_job", slots=1)
        token = (await old.expect("job_assigned"))["lease_token"]
        # The old socket is not seen dead yet; the same process comes back on a new one.
        async with connection(base_url, "w1") as new:
            held = [{"job_id": job_id, "lease_token": token}]
            answer = await register(new, "w1", instance="me", jobs=held)
            assert answer["type"] == "worker_registered" and answer["jobs"] == [job_id]
            await new.expect("job_notifications_subscribed")
            assert await closed_code(old) == 4000  # the hub closed the superseded socket
            await new.send("complete_job", job_id=job_id, result={"ok": True})
            await new.expect("job_completed_ack")
            assert (await job(base_url, job_id))["status"] == "completed"
            assert await live_workers(base_url) == ["w1"]


async def test_a_cut_worker_is_gone_after_the_grace_and_its_job_runs_elsewhere(
    base_url: str,
) -> None:
    job_id = await submit(base_url)
    async with worker(base_url, "doomed", instance="d") as doomed:
        await doomed.send("request_job", slots=1)
        assert (await doomed.expect("job_assigned"))["job_id"] == job_id
        async with worker(base_url, "rescue", instance="r") as rescue:
            cut(doomed)
            cut_at = time.monotonic()
            await asyncio.sleep(0.2)
            assert set(await live_workers(base_url)) == {"doomed", "rescue"}  # in its grace
            await rescue.send("request_job", slots=1)
            # The lease is 30 s: only the end of the grace can hand the job over this fast.
            assigned = await rescue.expect("job_assigned", wait=GRACE_S + 3)
            elapsed = time.monotonic() - cut_at
            assert assigned["job_id"] == job_id and elapsed >= GRACE_S
            assert await live_workers(base_url) == ["rescue"]
            record = await job(base_url, job_id)
            assert (record["attempt"], record["orphans"], record["failures"]) == (2, 1, 0)


async def test_a_worker_that_reconnects_within_the_grace_keeps_its_job(base_url: str) -> None:
    job_id = await submit(base_url)
    async with worker(base_url, "w1", instance="me") as first:
        await first.send("request_job", slots=1)
        token = (await first.expect("job_assigned"))["lease_token"]
        cut(first)
    await asyncio.sleep(GRACE_S / 3)
    async with connection(base_url, "w1") as again:
        held = [{"job_id": job_id, "lease_token": token}]
        assert (await register(again, "w1", instance="me", jobs=held))["jobs"] == [job_id]
        await again.expect("job_notifications_subscribed")
        await asyncio.sleep(GRACE_S + 0.5)  # past the grace: still its job
        assert (await job(base_url, job_id))["status"] == "active"
        await again.send("complete_job", job_id=job_id, result=None)
        await again.expect("job_completed_ack")


async def test_a_new_process_waits_out_the_grace_of_the_one_it_replaces(base_url: str) -> None:
    async with worker(base_url, "w1", instance="old") as old:
        cut(old)
    await asyncio.sleep(0.1)
    async with connection(base_url, "w1") as new:
        refused = await register(new, "w1", instance="new")
        assert refused["code"] == "worker_id_in_use" and 0 < refused["retry_after"] <= GRACE_S
    await asyncio.sleep(refused["retry_after"] + 0.1)
    async with worker(base_url, "w1", instance="new"):
        assert await live_workers(base_url) == ["w1"]


async def test_a_departed_worker_no_longer_keeps_a_failed_job_from_its_worker(
    hub_settings: HubSettings,
) -> None:
    """The job avoids the worker that failed it while another live worker could run it;
    once that other one is gone (its grace over), the job comes back at once."""
    settings = hub_settings.model_copy(update={"maintenance_interval_s": 0.1})  # retries
    async with (
        running_hub(settings) as base_url,
        worker(base_url, "other", instance="o") as other,
        worker(base_url, "failer", instance="f") as failer,
    ):
        job_id = await submit(base_url)
        await failer.send("request_job", slots=1)
        assert (await failer.expect("job_assigned"))["job_id"] == job_id
        await failer.send("fail_job", job_id=job_id, error="flaky", retryable=True)
        await failer.expect("job_failed_ack")
        await failer.send("request_job", slots=1)
        await asyncio.sleep(0.5)  # retried, but passed over: "other" could run it
        assert (await job(base_url, job_id))["status"] == "pending"
        cut(other)
        again = await failer.expect("job_assigned", wait=GRACE_S + 3)
        assert again["job_id"] == job_id and again["attempt"] == 2


async def test_a_worker_that_says_goodbye_is_gone_at_once(base_url: str) -> None:
    async with worker(base_url, "w1", instance="me"):
        assert await live_workers(base_url) == ["w1"]
    await asyncio.sleep(0.1)
    assert await live_workers(base_url) == []


async def test_a_hub_that_stops_does_not_count_its_workers_gone(
    hub_settings: HubSettings,
) -> None:
    """A hub shutting down closes its sockets itself (1012): the workers are not gone, and
    their jobs keep their leases while they reconnect to the next hub."""
    async with running_hub(hub_settings) as base_url:
        job_id = await submit(base_url)
        url = base_url.replace("http", "ws") + "/ws/worker/w1"
        conn = await websockets.connect(url)
        peer = Peer(conn)
        await peer.expect("connection_established")
        await register(peer, "w1", instance="me")
        await peer.expect("job_notifications_subscribed")
        await peer.send("request_job", slots=1)
        token = (await peer.expect("job_assigned"))["lease_token"]
    await conn.close()
    await asyncio.sleep(GRACE_S + 0.5)
    async with running_hub(hub_settings) as base_url:
        await asyncio.sleep(0.3)  # a maintenance pass
        assert (await job(base_url, job_id))["status"] == "active"
        async with connection(base_url, "w1") as again:
            held = [{"job_id": job_id, "lease_token": token}]
            assert (await register(again, "w1", instance="me", jobs=held))["jobs"] == [job_id]


async def test_an_id_held_through_another_replica_is_free_once_that_replica_is_gone(
    hub_settings: HubSettings,
) -> None:
    """The holder is connected through replica A; B cannot see its socket. B refuses a new
    process while A is alive (and says when to check again, in case A was just killed),
    and gives it the id as soon as A is gone."""
    async with running_hub(hub_settings) as hub_b:
        async with running_hub(hub_settings) as hub_a, worker(hub_a, "w1", instance="old"):
            async with connection(hub_b, "w1") as new:
                refused = await register(new, "w1", instance="new")
                assert refused["code"] == "worker_id_in_use" and refused["recheck_after"] > 0
            await asyncio.sleep(min(refused["recheck_after"], 1) + 0.1)
            async with connection(hub_b, "w1") as new:  # A is alive: still refused
                assert (await register(new, "w1", instance="new"))["type"] == "error"
        # A stopped (its sockets closed with 1012, the worker not seen gone): free at once.
        async with worker(hub_b, "w1", instance="new"):
            assert await live_workers(hub_b) == ["w1"]
