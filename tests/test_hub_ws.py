"""The worker WebSocket (pull model) against the real hub under uvicorn."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import redis.asyncio
import websockets
from websockets.asyncio.client import ClientConnection

from emp_hub.auth import Role, TokenStore
from emp_hub.broker import BrokerSettings
from emp_hub.settings import HubSettings
from tests.hub_server import running_hub

pytestmark = pytest.mark.hub

SIM_CAPS = {"services": ["simulation"]}


@pytest.fixture
def hub_settings(redis_url: str, namespace: str, redis_client: redis.asyncio.Redis) -> HubSettings:
    return HubSettings(
        redis_url=redis_url,
        broker=BrokerSettings(namespace=namespace, live_cache_s=0),
        maintenance_interval_s=0.2,
    )


@pytest.fixture
async def base_url(hub_settings: HubSettings) -> AsyncIterator[str]:
    async with running_hub(hub_settings) as url:
        yield url


class Peer:
    """A WebSocket peer that reads messages in order, with a timeout."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn

    async def send(self, type_: str, **fields: Any) -> None:
        await self.conn.send(json.dumps({"type": type_, **fields}))

    async def recv(self, wait: float = 5) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(self.conn.recv(), wait))
        return message

    async def expect(self, type_: str, wait: float = 5) -> dict[str, Any]:
        message = await self.recv(wait)
        assert message["type"] == type_, message
        return message


@asynccontextmanager
async def worker(
    base_url: str, worker_id: str, caps: dict[str, Any] | None = None, token: str | None = None
) -> AsyncIterator[Peer]:
    """A registered worker connection."""
    url = base_url.replace("http", "ws") + f"/ws/worker/{worker_id}"
    if token:
        url += f"?token={token}"
    async with websockets.connect(url) as conn:
        peer = Peer(conn)
        await peer.expect("connection_established")
        await peer.send("register_worker", worker_id=worker_id, capabilities=caps or SIM_CAPS)
        assert (await peer.expect("worker_registered"))["status"] == "active"
        await peer.expect("job_notifications_subscribed")
        yield peer


async def submit(base_url: str, **body: Any) -> str:
    async with httpx.AsyncClient(base_url=base_url) as http:
        r = await http.post("/api/jobs", json={"job_type": "simulation", **body})
        assert r.status_code == 200, r.text
        job_id: str = r.json()["job_id"]
        return job_id


async def job(base_url: str, job_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url) as http:
        body: dict[str, Any] = (await http.get(f"/api/jobs/{job_id}")).json()
        return body


async def test_parked_request_is_woken_by_a_submit(base_url: str) -> None:
    async with worker(base_url, "w1") as w:
        await w.send("request_job", slots=1)
        await asyncio.sleep(0.3)  # parked: nothing to do yet
        started = time.perf_counter()
        job_id = await submit(base_url, payload={"n": 1}, priority=3)
        assigned = await w.expect("job_assigned", wait=2)
        latency = time.perf_counter() - started
        assert assigned["job_id"] == job_id and assigned["params"] == {"n": 1}
        assert assigned["attempt"] == 1 and assigned["lease_token"]
        assert latency < SAFETY_WAKE_LIMIT  # woken by pub/sub, not by the safety timer
        await w.send("update_job_progress", job_id=job_id, progress=50, message="half")
        await w.send("complete_job", job_id=job_id, result={"ok": True})
        assert (await w.expect("job_completed_ack"))["job_id"] == job_id
        done = await job(base_url, job_id)
        assert (done["status"], done["result"], done["worker_id"]) == (
            "completed",
            {"ok": True},
            "w1",
        )


SAFETY_WAKE_LIMIT = 2.0


async def test_slots_take_jobs_in_priority_order(base_url: str) -> None:
    ids = {p: await submit(base_url, priority=p) for p in (1, 5, 3)}
    async with worker(base_url, "w1") as w:
        await w.send("request_job", slots=2)
        got = [(await w.expect("job_assigned"))["job_id"] for _ in range(2)]
        assert got == [ids[5], ids[3]]
        await w.send("request_job", slots=1)
        assert (await w.expect("job_assigned"))["job_id"] == ids[1]


async def test_jobs_go_only_to_matching_workers(base_url: str) -> None:
    flux = {"services": ["comfyui"], "models": {"comfyui": ["flux"]}}
    async with worker(base_url, "plain") as plain, worker(base_url, "gpu", flux) as gpu:
        await plain.send("request_job", slots=1)
        await gpu.send("request_job", slots=1)
        job_id = await submit(
            base_url, job_type=None, service="comfyui", requirements={"models": ["flux"]}
        )
        assert (await gpu.expect("job_assigned"))["job_id"] == job_id
        with pytest.raises(TimeoutError):
            await plain.recv(wait=0.5)


async def test_failure_retry_and_release(base_url: str) -> None:
    job_id = await submit(base_url, max_attempts=1)
    async with worker(base_url, "w1") as w:
        await w.send("request_job", slots=1)
        await w.expect("job_assigned")
        await w.send("fail_job", job_id=job_id, error="CUDA out of memory", retryable=False)
        ack = await w.expect("job_failed_ack")
        assert (ack["status"], ack["error"]) == ("failed", "CUDA out of memory")
        other = await submit(base_url)
        await w.send("request_job", slots=1)
        await w.expect("job_assigned")
        await w.send("release_job", job_id=other)
        await w.expect("job_released")
        assert (await job(base_url, other))["status"] == "pending"


async def test_bad_messages_leave_the_connection_usable(base_url: str) -> None:
    async with worker(base_url, "w1") as w:
        await w.conn.send("{not json")
        assert (await w.expect("error"))["error"] == "message is not JSON"
        await w.send("launch_rockets")
        assert (await w.expect("error"))["error"] == "unknown message type: launch_rockets"
        await w.send("update_job_progress", job_id="x", progress=500)
        assert (await w.expect("error"))["error"] == "invalid update_job_progress message"
        await w.send("complete_job", job_id="not-mine", result={})
        assert "does not hold job not-mine" in (await w.expect("error"))["error"]
        await w.conn.send(json.dumps([1, 2]))
        assert "JSON object" in (await w.expect("error"))["error"]
        job_id = await submit(base_url)
        await w.send("request_job", slots=1)
        assert (await w.expect("job_assigned"))["job_id"] == job_id


async def test_cancel_reaches_the_worker(base_url: str) -> None:
    job_id = await submit(base_url)
    async with worker(base_url, "w1") as w:
        await w.send("request_job", slots=1)
        await w.expect("job_assigned")
        async with httpx.AsyncClient(base_url=base_url) as http:
            r = await http.post(f"/api/jobs/{job_id}/cancel", json={"reason": "user gave up"})
            assert r.json()["worker"] == "w1"
        notice = await w.expect("cancel_job", wait=3)
        assert (notice["job_id"], notice["reason"]) == (job_id, "user gave up")
        await w.send("complete_job", job_id=job_id, result={})
        assert "does not hold" in (await w.expect("error"))["error"]
        assert (await job(base_url, job_id))["status"] == "cancelled"


async def test_heartbeat_and_reconnect_keep_the_job(base_url: str) -> None:
    job_id = await submit(base_url)
    async with worker(base_url, "w1") as w:
        await w.send("request_job", slots=1)
        token = (await w.expect("job_assigned"))["lease_token"]
        await w.send("worker_heartbeat", worker_id="w1", status="busy", load=1)
        assert (await w.expect("worker_heartbeat_ack"))["lost"] == []
    url = base_url.replace("http", "ws") + "/ws/worker/w1"
    async with websockets.connect(url) as conn:
        w = Peer(conn)
        await w.expect("connection_established")
        await w.send(
            "register_worker",
            worker_id="w1",
            capabilities=SIM_CAPS,
            jobs=[{"job_id": job_id, "lease_token": token}, {"job_id": "gone", "lease_token": "x"}],
        )
        assert (await w.expect("worker_registered"))["jobs"] == [job_id]
        await w.expect("job_notifications_subscribed")
        await w.send("complete_job", job_id=job_id, result={"after": "reconnect"})
        await w.expect("job_completed_ack")


async def test_original_worker_registration_shape(base_url: str) -> None:
    """Capabilities in the original shape mark an original worker: it gets offers."""
    legacy = {"version": "1.0.0", "supported_job_types": ["simulation"], "cpu": True}
    async with worker(base_url, "legacy-1", legacy) as w:
        job_id = await submit(base_url)
        offer = await w.expect("job_available")
        assert offer["job_id"] == job_id and offer["job_request_payload"] == {}
        await w.send("claim_job", worker_id="legacy-1", job_id=job_id, claim_timeout=30)
        assert (await w.expect("job_assigned"))["job_id"] == job_id


async def test_worker_socket_needs_a_worker_token(
    hub_settings: HubSettings, redis_client: redis.asyncio.Redis, namespace: str
) -> None:
    store = TokenStore(redis_client, namespace)
    worker_token = await store.create(Role.WORKER)
    client_token = await store.create(Role.CLIENT)
    async with running_hub(hub_settings) as base_url:
        ws_url = base_url.replace("http", "ws") + "/ws/worker/w1"
        for token in ("wrong", client_token):
            async with websockets.connect(f"{ws_url}?token={token}") as conn:
                first = json.loads(await conn.recv())
                assert first["type"] == "error"
                assert first["error"].startswith("Authentication failed")
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await conn.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        async with websockets.connect(
            ws_url, additional_headers={"Authorization": f"Bearer {worker_token}"}
        ) as conn:
            assert json.loads(await conn.recv())["type"] == "connection_established"


async def test_two_hubs_share_one_redis(hub_settings: HubSettings) -> None:
    """A job submitted on one replica runs on a worker of the other; a cancel on the first
    reaches the worker on the second."""
    async with (
        running_hub(hub_settings) as hub_a,
        running_hub(hub_settings) as hub_b,
        worker(hub_b, "w-b") as w,
    ):
        await w.send("request_job", slots=1)
        job_id = await submit(hub_a, payload={"via": "a"})
        assigned = await w.expect("job_assigned", wait=3)
        assert assigned["job_id"] == job_id
        async with httpx.AsyncClient(base_url=hub_a) as http:
            await http.post(f"/api/jobs/{job_id}/cancel")
        assert (await w.expect("cancel_job", wait=3))["job_id"] == job_id


async def test_progress_reaches_followers_on_another_replica(
    hub_settings: HubSettings, redis_client: redis.asyncio.Redis, namespace: str
) -> None:
    """A client and a monitor on one replica follow a job run by a worker on the other:
    its progress, result and the worker's status reach them; once the job ended, nobody
    is subscribed to its channel any more."""
    async with (
        running_hub(hub_settings) as hub_a,
        running_hub(hub_settings) as hub_b,
        worker(hub_b, "w-b") as w,
        websockets.connect(hub_a.replace("http", "ws") + "/ws/client/c-a") as client_conn,
        websockets.connect(hub_a.replace("http", "ws") + "/ws/monitor/m-a") as monitor_conn,
    ):
        client, monitor = Peer(client_conn), Peer(monitor_conn)
        await client.expect("connection_established")
        await monitor.expect("connection_established")
        await w.send("request_job", slots=1)
        await client.send("submit_job", message_id="x-1", job_type="simulation", payload={})
        assert (await client.expect("job_accepted"))["job_id"] == "x-1"
        assigned = await w.expect("job_assigned", wait=3)
        assert (await client.expect("response_job_status"))["status"] == "processing"
        channel = "{" + namespace + "}:jev:x-1"
        assert (await redis_client.pubsub_numsub(channel))[0][1] == 1  # hub A only
        await w.send("worker_status", status="busy")
        await w.send(
            "update_job_progress", job_id="x-1", progress=40, message="step 2", status="running"
        )
        progress = await client.expect("update_job_progress")
        assert (progress["progress"], progress["worker_id"]) == (40, "w-b")
        await w.send("complete_job", job_id=assigned["job_id"], result={"ok": 1})
        assert (await client.expect("complete_job"))["result"] == {"ok": 1}
        heard: list[dict[str, Any]] = []
        while not heard or heard[-1]["type"] != "complete_job":
            message = await monitor.recv()
            if message["type"] != "stats_broadcast":
                heard.append(message)
        assert [m["type"] for m in heard] == [
            "response_job_status",
            "worker_status",
            "update_job_progress",
            "complete_job",
        ]
        assert heard[1]["worker_id"] == "w-b" and heard[0]["client_id"] == "c-a"
        await asyncio.sleep(0.2)
        assert (await redis_client.pubsub_numsub(channel))[0][1] == 0


async def test_metrics(base_url: str) -> None:
    async with worker(base_url, "w1") as w:
        await w.send("request_job", slots=1)
        job_id = await submit(base_url)
        await w.expect("job_assigned")
        await w.send("complete_job", job_id=job_id, result=None)
        await w.expect("job_completed_ack")
        await submit(base_url, job_type="a1111", priority=4)
        async with httpx.AsyncClient(base_url=base_url) as http:
            text = (await http.get("/metrics")).text
    assert 'emp_jobs_submitted_total{service="simulation"} 1.0' in text
    assert 'emp_job_attempts_finished_total{outcome="completed",service="simulation"} 1.0' in text
    assert "emp_claim_seconds_count" in text and "emp_submit_to_start_seconds_bucket" in text
    assert "emp_unschedulable_jobs 1.0" in text and "emp_connected_workers 1.0" in text
    assert 'priority="4",requirement_class=' in text


async def test_one_job_wakes_one_parked_worker(base_url: str) -> None:
    """No thundering herd: a single new job wakes a single idle worker, not all of them."""
    async with (
        worker(base_url, "w0") as w0,
        worker(base_url, "w1") as w1,
        worker(base_url, "w2") as w2,
        httpx.AsyncClient(base_url=base_url) as http,
    ):
        peers = [w0, w1, w2]
        for w in peers:
            await w.send("request_job", slots=1)
        await asyncio.sleep(0.3)

        def claims(text: str) -> float:
            line = next(x for x in text.splitlines() if x.startswith("emp_claim_seconds_count"))
            return float(line.split()[1])

        before = claims((await http.get("/metrics")).text)
        await submit(base_url)
        got = await asyncio.gather(*(w.recv(wait=1) for w in peers), return_exceptions=True)
        assert sum(isinstance(g, dict) and g["type"] == "job_assigned" for g in got) == 1
        assert claims((await http.get("/metrics")).text) - before == 1


@pytest.mark.parametrize("route", ["worker/w1", "client/c1", "monitor/m1"])
async def test_every_socket_refuses_a_bad_token(
    hub_settings: HubSettings, redis_client: redis.asyncio.Redis, namespace: str, route: str
) -> None:
    """As the original did (invalid_token recording): an error message, then the close."""
    await TokenStore(redis_client, namespace).create(Role.ADMIN)
    async with running_hub(hub_settings) as base_url:
        for query in ("", "?token=wrong"):
            url = base_url.replace("http", "ws") + f"/ws/{route}{query}"
            async with websockets.connect(url) as conn:
                first = json.loads(await conn.recv())
                assert first["type"] == "error"
                assert first["error"] == "Authentication failed: Invalid token"
                with pytest.raises(websockets.ConnectionClosed):
                    await conn.recv()
