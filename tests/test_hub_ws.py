"""The worker WebSocket (pull model) against the real hub under uvicorn."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest
import redis.asyncio
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.frames import Close

from emp_hub.auth import Role, TokenStore
from emp_hub.routes import legacy_monitor
from emp_hub.settings import HubSettings
from emp_protocol.hub_messages import HubMessage, hub_message
from emp_protocol.messages import MAX_BATCH, PROTOCOL_VERSION
from tests.hub_server import running_hub
from tests.processes import cluster

pytestmark = pytest.mark.hub

SIM_CAPS = {"services": ["simulation"]}


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
    base_url: str,
    worker_id: str,
    caps: dict[str, Any] | None = None,
    token: str | None = None,
    *,
    batch: bool = False,
) -> AsyncIterator[Peer]:
    """A registered worker connection (`batch`: one that reads and sends batches)."""
    url = base_url.replace("http", "ws") + f"/ws/worker/{worker_id}"
    if token:
        url += f"?token={token}"
    async with websockets.connect(url) as conn:
        peer = Peer(conn)
        await peer.expect("connection_established")
        await peer.send(
            "register_worker", worker_id=worker_id, capabilities=caps or SIM_CAPS, batch=batch
        )
        registered = await peer.expect("worker_registered")
        assert registered["status"] == "active" and registered["batch"] is True
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


async def test_a_batching_worker_gets_its_jobs_in_one_frame_and_reports_in_one(
    base_url: str,
) -> None:
    """A worker that said `batch`: the jobs of one claim come in one frame; its reports
    (progress, results, failures) go in one, are applied in order and get no acks."""
    ids = [await submit(base_url, payload={"n": i}) for i in range(3)]
    async with worker(base_url, "wb", batch=True) as w:
        await w.send("request_job", slots=3)
        frame = await w.expect("batch")
        assigned = [hub_message.validate_python(m) for m in frame["messages"]]
        assert [(m.type, getattr(m, "job_id", None)) for m in assigned] == [
            ("job_assigned", i) for i in ids
        ]
        reports = [
            {"type": "update_job_progress", "job_id": ids[0], "progress": 50, "message": "half"},
            {"type": "complete_job", "job_id": ids[0], "result": {"n": 0}},
            {"type": "fail_job", "job_id": ids[1], "error": "bad input", "retryable": False},
            {"type": "update_job_progress", "job_id": ids[2], "progress": 10},
        ]
        await w.send("batch", messages=reports)
        await w.send("worker_heartbeat", status="busy")  # answered after the batch
        assert (await w.expect("worker_heartbeat_ack"))["lost"] == []
    first, second, third = [await job(base_url, i) for i in ids]
    assert (first["status"], first["result"], first["progress"]) == ("completed", {"n": 0}, 100)
    assert (second["status"], second["error"]) == ("failed", "bad input")
    assert third["progress"] == 10 and third["started_at"] is not None
    async with httpx.AsyncClient(base_url=base_url) as http:
        stream = (await http.get(f"/api/jobs/{ids[0]}/events?follow=false")).text
    events = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: ")]
    assert [(e["type"], e.get("progress"), e.get("status")) for e in events][-2:] == [
        ("progress", 50.0, None),
        ("status", None, "completed"),
    ]


async def test_the_attempts_a_batch_ends_are_each_counted_in_the_metrics(base_url: str) -> None:
    """A frame's results are counted per service and outcome once a frame: each job
    counts all the same."""
    ids = [await submit(base_url, payload={"n": i}) for i in range(4)]
    async with worker(base_url, "wb", batch=True) as w:
        await w.send("request_job", slots=4)
        await w.expect("batch")
        reports: list[dict[str, Any]] = [
            {"type": "complete_job", "job_id": i, "result": None} for i in ids[:3]
        ]
        reports.append({"type": "fail_job", "job_id": ids[3], "error": "no", "retryable": False})
        await w.send("batch", messages=reports)
        await w.send("worker_heartbeat", status="busy")  # answered after the batch
        await w.expect("worker_heartbeat_ack")
        async with httpx.AsyncClient(base_url=base_url) as http:
            text = (await http.get("/metrics")).text
    finished = "emp_job_attempts_finished_total"
    assert f'{finished}{{outcome="completed",service="simulation"}} 3.0' in text
    assert f'{finished}{{outcome="failed",service="simulation"}} 1.0' in text


async def test_a_batch_refuses_each_message_it_cannot_take_and_applies_the_others(
    base_url: str,
) -> None:
    """Each item of a batch stands alone: an unknown or invalid message, a nested batch, a
    registration or a job the worker does not hold gets its `error`; the rest is applied."""
    job_id = await submit(base_url)
    async with worker(base_url, "wb", batch=True) as w:
        await w.send("request_job", slots=1)
        assert (await w.expect("job_assigned"))["job_id"] == job_id
        await w.send(
            "batch",
            messages=[
                {"type": "launch_rockets"},
                {"type": "complete_job"},
                {"type": "batch", "messages": []},
                {"type": "register_worker", "capabilities": SIM_CAPS},
                {"type": "complete_job", "job_id": "job-nobody-holds"},
                {"type": "complete_job", "job_id": job_id, "result": 7},
            ],
        )
        errors = [(await w.expect("error"))["error"] for _ in range(5)]
        assert errors == [
            "unknown message type: launch_rockets",
            "invalid complete_job message",
            "a batch cannot hold a batch",
            "register_worker cannot be part of a batch",
            "worker wb does not hold job job-nobody-holds",
        ]
        await w.send("batch", messages=[{"type": "complete_job", "job_id": job_id}])
        assert "does not hold" in (await w.expect("error"))["error"]  # done already
    assert (await job(base_url, job_id))["result"] == 7


async def test_prefetch_is_claimed_when_asked_and_a_new_job_goes_to_a_free_slot(
    base_url: str,
) -> None:
    """`prefetch` is claimed right away when jobs wait, but never parked: with nothing
    pending, a later job goes to a worker with a free slot, not to a busy one's prefetch."""
    ids = [await submit(base_url) for _ in range(2)]
    async with worker(base_url, "busy") as busy, worker(base_url, "free") as free:
        await busy.send("request_job", slots=0, prefetch=3, held=1)
        got = [(await busy.expect("job_assigned"))["job_id"] for _ in ids]
        assert got == ids
        await free.send("request_job", slots=1, held=0)
        await asyncio.sleep(0.2)
        job_id = await submit(base_url)
        assert (await free.expect("job_assigned"))["job_id"] == job_id
        with pytest.raises(TimeoutError):
            await busy.recv(wait=0.3)


async def test_jobs_on_their_way_count_against_a_repeated_request(base_url: str) -> None:
    """A worker asking again before the jobs of its last request arrived (`held` is what it
    had when it asked): the hub counts the jobs it assigned since, and claims no more."""
    for _ in range(8):
        await submit(base_url)
    async with worker(base_url, "w1") as w:
        for _ in range(3):
            await w.send("request_job", slots=1, prefetch=2, held=0)
        got = [await w.expect("job_assigned") for _ in range(3)]
        with pytest.raises(TimeoutError):
            await w.recv(wait=0.5)
        await w.send("complete_job", job_id=got[0]["job_id"])
        await w.expect("job_completed_ack")
        await w.send("request_job", slots=0, prefetch=1, held=2)  # one more, once
        await w.send("request_job", slots=0, prefetch=1, held=2)
        await w.expect("job_assigned")
        with pytest.raises(TimeoutError):
            await w.recv(wait=0.5)


@pytest.mark.slow
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


async def test_a_submit_claims_for_a_parked_worker_in_its_own_script(base_url: str) -> None:
    """A job submitted while a worker waits for work is claimed for it by the submit's own
    script, not by a second call after a wake-up: the answer already says it is active,
    and the worker has it."""
    async with worker(base_url, "w1") as w, httpx.AsyncClient(base_url=base_url) as http:
        await w.send("request_job", slots=1)
        first = await submit(base_url)  # a class this hub has not seen: claimed after a wake
        assert (await w.expect("job_assigned", wait=2))["job_id"] == first
        await w.send("complete_job", job_id=first, result={})
        await w.expect("job_completed_ack")
        await w.send("request_job", slots=1)
        await asyncio.sleep(0.3)  # parked
        answer = (await http.post("/api/jobs", json={"job_type": "simulation"})).json()
        assert (answer["status"], answer["position"]) == ("active", None), answer
        assigned = await w.expect("job_assigned", wait=2)
        assert assigned["job_id"] == answer["job_id"] and assigned["attempt"] == 1
        # Its slot is taken: the next job waits, in line.
        second = (await http.post("/api/jobs", json={"job_type": "simulation"})).json()
        assert (second["status"], second["position"]) == ("pending", 0), second


SAFETY_WAKE_LIMIT = 2.0


@pytest.mark.slow
async def test_slots_take_jobs_in_priority_order(base_url: str) -> None:
    ids = {p: await submit(base_url, priority=p) for p in (1, 5, 3)}
    async with worker(base_url, "w1") as w:
        await w.send("request_job", slots=2)
        got = [(await w.expect("job_assigned"))["job_id"] for _ in range(2)]
        assert got == [ids[5], ids[3]]
        await w.send("request_job", slots=1)
        assert (await w.expect("job_assigned"))["job_id"] == ids[1]


@pytest.mark.slow
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
        assert (await w.expect("error"))["error"] == "Invalid JSON format"
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


@pytest.mark.slow
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


class TypedPeer(Peer):
    """A worker-route peer that checks every frame the hub sends against the models of
    emp_protocol.hub_messages: it must parse, and read back to the very same JSON."""

    def __init__(self, conn: ClientConnection) -> None:
        super().__init__(conn)
        self.seen: set[str] = set()

    async def recv(self, wait: float = 5) -> dict[str, Any]:
        raw = await super().recv(wait)
        for message in [raw, *raw.get("messages", [])]:  # a batch, and what it carries
            assert hub_message.validate_python(message).model_dump(mode="json") == message
        self.seen.add(raw["type"])
        return raw


@pytest.mark.slow
async def test_every_message_to_a_worker_is_a_hub_message(base_url: str) -> None:
    """Every message type the hub sends a worker, each as a model describes it exactly."""
    url = base_url.replace("http", "ws") + "/ws/worker/"
    async with (
        websockets.connect(url + "w1") as c1,
        websockets.connect(url + "w1") as c2,
        websockets.connect(url + "old") as c3,
    ):
        w, other, old = TypedPeer(c1), TypedPeer(c2), TypedPeer(c3)
        for peer in (w, other, old):
            greeting = await peer.expect("connection_established")
        assert greeting["protocol_version"] == PROTOCOL_VERSION
        await w.send("register_worker", worker_id="w1", instance="one", capabilities=SIM_CAPS)
        await w.expect("worker_registered")
        await w.expect("job_notifications_subscribed")
        await other.send("register_worker", instance="two", capabilities=SIM_CAPS, dry_run=True)
        assert (await other.expect("error"))["code"] == "worker_id_in_use"
        await w.send("launch_rockets")
        assert "details" not in await w.expect("error")
        await w.send("worker_heartbeat", status="busy")
        assert (await w.expect("worker_heartbeat_ack"))["lost"] == []
        ids = [await submit(base_url) for _ in range(4)]
        await w.send("request_job", slots=4)
        assert [(await w.expect("job_assigned"))["job_id"] for _ in ids] == ids
        await w.send("complete_job", job_id=ids[0], result={"ok": True})
        await w.expect("job_completed_ack")
        await w.send("fail_job", job_id=ids[1], error="CUDA out of memory")
        assert (await w.expect("job_failed_ack"))["status"] == "delayed"
        await w.send("release_job", job_id=ids[2])
        await w.expect("job_released")
        async with httpx.AsyncClient(base_url=base_url) as http:
            await http.post(f"/api/jobs/{ids[3]}/cancel", json={"reason": "user gave up"})
        await w.expect("cancel_job")
        async with httpx.AsyncClient(base_url=base_url) as http:
            await http.post("/api/workers/w1/drain")
        assert (await w.expect("worker_control"))["action"] == "drain"
        legacy = {"supported_job_types": ["simulation"]}
        await old.send("register_worker", worker_id="old", capabilities=legacy, dry_run=True)
        await old.expect("worker_id_available")
        await old.send("register_worker", worker_id="old", capabilities=legacy)
        await old.expect("worker_registered")
        await old.expect("job_notifications_subscribed")
        await old.expect("job_available")  # the released job
        async with worker(base_url, "wb", batch=True) as batching:
            wb = TypedPeer(batching.conn)
            more = [await submit(base_url) for _ in range(2)]
            await wb.send("request_job", slots=2)
            assigned = (await wb.expect("batch"))["messages"]
            assert [m["job_id"] for m in assigned] == more
    kinds = {cls.model_fields["type"].default for cls in get_args(get_args(HubMessage)[0])}
    assert w.seen | other.seen | old.seen | wb.seen == kinds


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# -- hostile input, frame cap, rate limits, revocation -------------------------------------


def strict_json(text: str | bytes) -> dict[str, Any]:
    """Parse a frame as strict JSON (no NaN or Infinity, which browsers cannot parse)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    message: dict[str, Any] = json.loads(text, parse_constant=refuse)
    return message


class HubErrors(logging.Handler):
    """What the hub logs at ERROR or above (tracebacks included)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __str__(self) -> str:
        return "\n".join(self.format(r) for r in self.records)


@pytest.fixture
def hub_errors(base_url: str) -> Iterator[HubErrors]:
    """The hub's errors while the test runs (attached once the hub has started: uvicorn's
    logging setup replaces the handlers of its loggers)."""
    handler = HubErrors()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "emp_hub")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


async def socket(base_url: str, route: str, token: str | None = None) -> ClientConnection:
    """A connection to /ws/<route>, past its welcome (and a monitor's first stats)."""
    query = f"?token={token}" if token else ""
    conn = await websockets.connect(base_url.replace("http", "ws") + f"/ws/{route}{query}")
    assert strict_json(await conn.recv())["type"] == "connection_established"
    if route.startswith("monitor/"):
        assert strict_json(await asyncio.wait_for(conn.recv(), 5))["type"] == "stats_broadcast"
    return conn


async def closing(conn: ClientConnection, doing: Awaitable[None] | None = None) -> Close:
    """Read (and drop) messages, or do `doing`, until the hub closes the socket; the close
    frame it sent."""

    async def read_on() -> None:
        while True:
            await asyncio.wait_for(conn.recv(), 5)

    with pytest.raises(websockets.ConnectionClosed) as closed:
        await (doing or read_on())
    assert closed.value.rcvd is not None, closed.value
    return closed.value.rcvd


async def next_reply(conn: ClientConnection) -> dict[str, Any]:
    """The next message that is not a periodic broadcast, as strict JSON."""
    while True:
        message = strict_json(await asyncio.wait_for(conn.recv(), 5))
        if message["type"] not in {"stats_broadcast", "worker_status"}:
            return message


#: A message each socket answers, and the answer: the connection still works.
PINGS: dict[str, tuple[dict[str, Any], str]] = {
    "worker": (
        {"type": "register_worker", "capabilities": SIM_CAPS, "subscribe_to_jobs": False},
        "worker_registered",
    ),
    "client": ({"type": "stay_alive"}, "response_job_status"),
    "monitor": ({"type": "stay_alive"}, "stay_alive_response"),
}
ROUTES = ["worker/w-x", "client/c-x", "monitor/m-x"]


async def still_there(conn: ClientConnection, route: str, **padding: str) -> None:
    """The socket answers its ping."""
    ping, answer = PINGS[route.split("/")[0]]
    await conn.send(json.dumps({**ping, **padding}))
    assert (await next_reply(conn))["type"] == answer


@pytest.mark.slow
@pytest.mark.parametrize("route", ROUTES)
async def test_a_binary_frame_is_an_error_and_the_socket_stays(
    base_url: str, hub_errors: HubErrors, route: str
) -> None:
    """Frames are JSON text: a binary one gets an `error`, not a dropped connection."""
    conn = await socket(base_url, route)
    try:
        await conn.send(json.dumps({"type": "stay_alive"}).encode())
        error = await next_reply(conn)
        assert error["type"] == "error" and "binary" in error["error"], error
        await still_there(conn, route)
    finally:
        await conn.close()
    assert not hub_errors.records, str(hub_errors)


@pytest.mark.slow
async def test_invalid_capabilities_are_an_error_and_other_jobs_go_on(
    base_url: str, hub_errors: HubErrors
) -> None:
    """register_worker with capabilities that do not validate: an `error` with details that
    are plain JSON; the socket stays, and a job another worker holds is untouched."""
    job_id = await submit(base_url)
    async with worker(base_url, "good") as good:
        await good.send("request_job", slots=1)
        await good.expect("job_assigned")
        conn = await socket(base_url, "worker/bad")
        try:
            bad = {"type": "register_worker", "capabilities": {"services": "notalist"}}
            await conn.send(json.dumps(bad))
            error = await next_reply(conn)
            assert error["type"] == "error", error
            assert error["error"] == "invalid register_worker message", error
            loc = ["register_worker", "capabilities", "services"]  # the union tag first
            assert error["details"][0]["loc"] == loc, error
            await conn.send(json.dumps({"type": "register_worker", "capabilities": SIM_CAPS}))
            assert (await next_reply(conn))["type"] == "worker_registered"
        finally:
            await conn.close()
        assert (await job(base_url, job_id))["status"] == "active"
        await good.send("complete_job", job_id=job_id, result={"ok": 1})
        await good.expect("job_completed_ack")
    assert not hub_errors.records, str(hub_errors)


@pytest.mark.slow
async def test_a_client_submit_with_an_infinite_priority_is_an_error(
    base_url: str, hub_errors: HubErrors
) -> None:
    conn = await socket(base_url, "client/c-inf")
    try:
        await conn.send('{"type": "submit_job", "message_id": "inf-1", "job_type": "simulation",')
        assert (await next_reply(conn))["error"] == "Invalid JSON format"
        for priority in ("1e400", '"high"', "5000"):
            frame = (
                '{"type": "submit_job", "message_id": "inf-1", "job_type": "simulation", '
                f'"priority": {priority}}}'
            )
            await conn.send(frame)
            error = await next_reply(conn)
            assert error["type"] == "error", error
            assert error["error"].startswith("Invalid submit_job: priority: "), error
            assert [d["loc"] for d in error["details"]] == [["priority"]], error
        await conn.send(json.dumps({"type": "submit_job", "message_id": "inf-1", "job_type": "x"}))
        assert (await next_reply(conn))["type"] == "job_accepted"
    finally:
        await conn.close()
    assert (await job(base_url, "inf-1"))["priority"] == 0
    assert not hub_errors.records, str(hub_errors)


@pytest.mark.slow
@pytest.mark.parametrize("route", ROUTES)
async def test_a_frame_over_the_cap_closes_with_1009(hub_settings: HubSettings, route: str) -> None:
    """EMP_MAX_WS_MESSAGE_SIZE_MB applies to the hub the tests run (as to `emp-hub
    serve`): a larger frame closes the socket with 1009 (message too big)."""
    hub_settings.max_ws_message_size_mb = 1
    async with running_hub(hub_settings) as base_url:
        conn = await socket(base_url, route)
        padding = "x" * (2**20 // 2)
        await still_there(conn, route, padding=padding)  # half the cap: fine
        await conn.send(json.dumps({"type": "stay_alive", "padding": padding * 3}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await next_reply(conn)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


@pytest.mark.slow
def test_serve_caps_frames_at_16_mib_by_default(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """`emp-hub serve` with the default settings refuses a 17 MiB frame (1009)."""

    async def send_big(url: str) -> None:
        async with websockets.connect(url + "/ws/client/big", max_size=None) as conn:
            assert strict_json(await conn.recv())["type"] == "connection_established"
            big = json.dumps({"type": "stay_alive", "padding": "x" * 17 * 2**20})
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await send_then_recv(conn, big)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009

    with cluster(redis_url, namespace, tmp_path) as hub:
        asyncio.run(send_big(hub.url.replace("http", "ws")))


async def send_then_recv(conn: websockets.ClientConnection, frame: str) -> str | bytes:
    """Send `frame`, then read the next reply. Uncompressed (the hub declines deflate), a
    frame over the cap is refused while it is still being sent: the send may see the close."""
    await conn.send(frame)
    return await asyncio.wait_for(conn.recv(), 10)


@pytest.mark.slow
async def test_every_submit_path_spends_one_allowance(
    hub_settings: HubSettings, redis_client: redis.asyncio.Redis, namespace: str
) -> None:
    """HTTP and the client WebSocket share a token's rate limit: once it is spent, a
    submit_job is refused with an `error` naming the wait, and no job is made."""
    token = await TokenStore(redis_client, namespace).create(Role.CLIENT)
    hub_settings.submit_rate, hub_settings.submit_burst = 0.01, 3
    auth = {"Authorization": f"Bearer {token}"}
    async with (
        running_hub(hub_settings) as base_url,
        httpx.AsyncClient(base_url=base_url, headers=auth) as http,
    ):
        for _ in range(2):
            r = await http.post("/api/jobs", json={"job_type": "simulation"})
            assert r.status_code == 200, r.text
        conn = await socket(base_url, "client/c-rate", token)
        try:
            for n in (1, 2):
                submit_job = {"type": "submit_job", "message_id": f"r-{n}", "job_type": "sim"}
                await conn.send(json.dumps(submit_job))
                reply = await next_reply(conn)
                if n == 1:
                    assert reply["type"] == "job_accepted", reply
                else:
                    assert reply["type"] == "error", reply
                    assert reply["error"].startswith("too many submissions for this token")
                    assert re.search(r"retry in \d+ s", reply["error"]), reply
        finally:
            await conn.close()
        assert (await http.get("/api/jobs/r-2")).status_code == 404
        r = await http.post("/api/jobs", json={"job_type": "simulation"})
        assert r.status_code == 429, r.text


@pytest.mark.slow
@pytest.mark.parametrize("route", ROUTES)
async def test_sockets_of_a_revoked_token_close(
    hub_settings: HubSettings, redis_client: redis.asyncio.Redis, namespace: str, route: str
) -> None:
    """A revoked token's open sockets close (1008, "token revoked") within the token
    refresh interval; another token's socket stays."""
    store = TokenStore(redis_client, namespace)
    role = {"worker": Role.WORKER, "client": Role.CLIENT, "monitor": Role.MONITOR}
    doomed = await store.create(role[route.split("/")[0]])
    other = await store.create(Role.ADMIN)
    hub_settings.token_refresh_s = 0.2
    async with running_hub(hub_settings) as base_url:
        conn = await socket(base_url, route, doomed)
        stays = await socket(base_url, "client/c-stays", other)
        try:
            [record] = [r for r in await store.list() if r.role is not Role.ADMIN]
            assert await store.revoke(record.id)
            close = await closing(conn)
            assert (close.code, close.reason) == (1008, "token revoked")
            await stays.send(json.dumps({"type": "stay_alive"}))
            assert (await next_reply(stays))["type"] == "response_job_status"
        finally:
            await conn.close()
            await stays.close()


async def submit_on(conn: ClientConnection) -> None:
    """Submit jobs one after the other, for about 5 s at most."""
    for _ in range(1000):
        await conn.send(json.dumps({"type": "submit_job", "job_type": "sim"}))
        assert (await next_reply(conn))["type"] in {"job_accepted", "error"}
        await asyncio.sleep(0.005)


@pytest.mark.slow
async def test_a_client_keeps_submitting_until_its_token_is_revoked(
    hub_settings: HubSettings, redis_client: redis.asyncio.Redis, namespace: str
) -> None:
    """A client submitting while its token is revoked: the socket closes (1008) and the
    hub logs no error."""
    store = TokenStore(redis_client, namespace)
    token = await store.create(Role.CLIENT, name="busy")
    hub_settings.token_refresh_s = 0.2
    async with running_hub(hub_settings) as base_url:
        handler = HubErrors()
        logging.getLogger("uvicorn.error").addHandler(handler)
        try:
            conn = await socket(base_url, "client/c-busy", token)
            [record] = await store.list()
            revoke = asyncio.create_task(store.revoke(record.id))
            close = await closing(conn, submit_on(conn))
            assert await revoke
            assert (close.code, close.reason) == (1008, "token revoked")
        finally:
            logging.getLogger("uvicorn.error").removeHandler(handler)
        assert not handler.records, str(handler)


@pytest.mark.slow
async def test_a_monitor_gets_stats_at_once_with_the_original_capabilities(
    base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A monitor's first stats_broadcast comes on connect (not an interval later), and a
    worker's `capabilities` there keep the original `supported_job_types`, which the
    original monitor page reads."""
    monkeypatch.setattr(legacy_monitor, "STATS_INTERVAL_S", 60.0)
    legacy = {"version": "1.0.0", "supported_job_types": ["simulation"], "cpu": True}
    async with worker(base_url, "w1"), worker(base_url, "legacy-1", legacy):
        url = base_url.replace("http", "ws") + "/ws/monitor/m1"
        async with websockets.connect(url) as conn:
            assert strict_json(await conn.recv())["type"] == "connection_established"
            stats = strict_json(await asyncio.wait_for(conn.recv(), 5))
    assert stats["type"] == "stats_broadcast", stats
    for worker_id in ("w1", "legacy-1"):
        entry = stats["workers"][worker_id]
        assert entry["supported_job_types"] == ["simulation"], entry
        assert entry["capabilities"]["supported_job_types"] == ["simulation"], entry
        assert entry["capabilities"]["services"] == ["simulation"], entry


@pytest.mark.slow
async def test_more_assignments_than_a_batch_holds_go_in_several_frames(base_url: str) -> None:
    """A worker may ask for 1 slot and 1,000 prefetched jobs, and a `batch` carries at most
    MAX_BATCH (1,000) messages: the hub splits the claim's assignments into frames of at
    most that many (one frame of 1,001 was refused by the worker, which left its jobs
    active and unheard of until their leases ran out)."""
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        for n in (600, 401):
            r = await http.post("/api/jobs/batch", json={"jobs": [{"job_type": "simulation"}] * n})
            assert r.status_code == 200, r.text
            ids += r.json()["job_ids"]
    async with worker(base_url, "wb", batch=True) as batching:
        wb = TypedPeer(batching.conn)  # checks each frame against the protocol's models
        await wb.send("request_job", slots=1, prefetch=1000)
        got: list[str] = []
        while len(got) < len(ids):
            raw = await wb.recv()  # a batch, or one message alone (the last one here)
            assigned = raw.get("messages", [raw])
            assert len(assigned) <= MAX_BATCH
            got += [m["job_id"] for m in assigned if m["type"] == "job_assigned"]
    assert sorted(got) == sorted(ids)


@pytest.mark.slow
async def test_a_monitor_sees_a_drained_worker_as_not_accepting_jobs(
    base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drained worker takes no job, so a monitor's stats_broadcast says it is not
    accepting jobs; resumed, it is again."""
    monkeypatch.setattr(legacy_monitor, "STATS_INTERVAL_S", 60.0)

    async def accepting() -> dict[str, bool]:
        url = base_url.replace("http", "ws") + "/ws/monitor/m1"
        async with websockets.connect(url) as conn:
            assert strict_json(await conn.recv())["type"] == "connection_established"
            stats = strict_json(await asyncio.wait_for(conn.recv(), 5))
        return {w: entry["is_accepting_jobs"] for w, entry in stats["workers"].items()}

    async with (
        worker(base_url, "w1"),
        worker(base_url, "w2"),
        httpx.AsyncClient(base_url=base_url) as http,
    ):
        assert await accepting() == {"w1": True, "w2": True}
        (await http.post("/api/workers/w1/drain")).raise_for_status()
        assert await accepting() == {"w1": False, "w2": True}
        (await http.post("/api/workers/w1/resume")).raise_for_status()
        assert await accepting() == {"w1": True, "w2": True}


@pytest.mark.slow
async def test_sockets_without_a_token_close_once_the_hub_has_tokens(
    hub_settings: HubSettings, redis_client: redis.asyncio.Redis, namespace: str
) -> None:
    """On an open hub (no token anywhere) sockets need none; once a token is created,
    HTTP wants one at once, and the sockets opened without one close (1008)."""
    hub_settings.token_refresh_s = 0.2
    async with running_hub(hub_settings) as base_url:
        conn = await socket(base_url, "client/c-open")
        try:
            await TokenStore(redis_client, namespace).create(Role.ADMIN)
            close = await closing(conn)
            assert (close.code, close.reason) == (1008, "token revoked")
        finally:
            await conn.close()


@pytest.mark.slow
async def test_a_worker_of_another_protocol_version_is_refused(base_url: str) -> None:
    """A worker that says another protocol version gets an error naming both and is
    closed; one of this version, and an original worker (which says none), register."""
    conn = await socket(base_url, "worker/w-future")
    register = {"type": "register_worker", "capabilities": SIM_CAPS}
    await conn.send(json.dumps({**register, "protocol_version": PROTOCOL_VERSION + 1}))
    refusal = strict_json(await asyncio.wait_for(conn.recv(), 5))
    assert (refusal["type"], refusal["code"]) == ("error", "protocol_version")
    assert refusal["error"] == (
        f"this worker speaks protocol {PROTOCOL_VERSION + 1}; this hub speaks protocol "
        f"{PROTOCOL_VERSION}: upgrade the older one"
    )
    assert (await closing(conn)).code == 4426
    async with httpx.AsyncClient(base_url=base_url) as http:
        assert (await http.get("/api/workers")).json() == []
    for version in ({"protocol_version": PROTOCOL_VERSION}, {}):
        conn = await socket(base_url, "worker/w-now")
        await conn.send(json.dumps({**register, **version}))
        assert strict_json(await asyncio.wait_for(conn.recv(), 5))["type"] == "worker_registered"
        await conn.close()
