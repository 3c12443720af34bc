"""Unmodified emp-redis peers against our hub: the recorded frames of the original worker
and client (tests/fixtures/emp-redis/*.jsonl, copied from the reference recordings) are
replayed, and every reply must have the recorded type, order and fields (minus the
original's bugs, as the reference lists them)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio
import websockets

from emp_hub.broker import BrokerSettings
from emp_hub.settings import HubSettings
from tests.hub_server import running_hub
from tests.replay import VARYING, check_reply, recorded

pytestmark = pytest.mark.hub


def client_submits(scenario: str) -> list[dict[str, Any]]:
    """The jobs the recorded client submitted, in order."""
    return [
        r["msg"]
        for r in recorded(scenario, "client")
        if r["dir"] == "to_hub" and r["msg"].get("type") == "submit_job"
    ]


@pytest.fixture
async def base_url(
    redis_url: str, namespace: str, redis_client: redis.asyncio.Redis
) -> AsyncIterator[str]:
    settings = HubSettings(redis_url=redis_url, broker=BrokerSettings(namespace=namespace))
    async with running_hub(settings) as url:
        yield url


async def replay_worker(url: str, frames: list[dict[str, Any]], ids: dict[str, str]) -> None:
    """Play the recorded original worker; recorded job ids map to ours by its offers."""
    async with websockets.connect(url) as conn:
        for frame in frames:
            msg = frame["msg"]
            if frame["dir"] == "to_hub":
                out = dict(msg)
                if "job_id" in out:
                    out["job_id"] = ids.get(out["job_id"], out["job_id"])
                await conn.send(json.dumps(out))
                continue
            got = json.loads(await conn.recv())
            if msg["type"] == "job_available":
                ids.setdefault(msg["job_id"], got.get("job_id", ""))
            check_reply(got, msg, ids)


async def test_original_client_and_worker(base_url: str) -> None:
    """Both recorded peers of happy_ws at once: the client submits and follows two jobs,
    the original worker runs them."""
    worker_frames = recorded("happy_ws", "worker")
    client_frames = recorded("happy_ws", "client")
    ids: dict[str, str] = {}
    ws = base_url.replace("http", "ws")
    worker = asyncio.create_task(
        replay_worker(f"{ws}/ws/worker/{worker_frames[0]['msg']['worker_id']}", worker_frames, ids)
    )
    async with websockets.connect(f"{ws}/ws/client/client-1") as conn:
        for frame in client_frames:
            msg = frame["msg"]
            if frame["dir"] == "to_hub":
                await conn.send(json.dumps(msg))
                continue
            if msg["type"] == "update_job_progress" and msg["progress"] == -1:
                continue  # keep-alives are not forwarded to clients
            got = json.loads(await asyncio.wait_for(conn.recv(), 10))
            if msg["type"] == "job_accepted":
                ids.setdefault(msg["job_id"], got["job_id"])
            check_reply(got, msg, ids)
    await asyncio.wait_for(worker, 10)


@pytest.mark.slow
async def test_original_client_extras(base_url: str) -> None:
    """stay_alive, stats subscriptions, status requests, errors, id reuse."""
    url = base_url.replace("http", "ws") + "/ws/client/client-x"
    async with websockets.connect(url) as conn:

        async def ask(message: dict[str, Any] | str) -> dict[str, Any]:
            await conn.send(message if isinstance(message, str) else json.dumps(message))
            reply: dict[str, Any] = json.loads(await asyncio.wait_for(conn.recv(), 5))
            return reply

        assert json.loads(await conn.recv())["type"] == "connection_established"
        assert (await ask({"type": "stay_alive"}))["job_id"] == "keep-alive"
        assert (await ask({"type": "subscribe_stats", "enabled": True}))["channels"] == ["stats"]
        assert "monitors only" in (await ask({"type": "request_stats"}))["error"]
        assert (await ask({"type": "request_job_status", "job_id": "nope"}))["error"] == (
            "Job nope not found"
        )
        assert (await ask({"type": "request_job_status"}))["error"] == (
            "Missing job_id in request_job_status request"
        )
        assert (await ask({"type": "no_such_message_type"}))["error"] == (
            "Unsupported message type: no_such_message_type"
        )
        assert (await ask("this is not json"))["error"] == "Invalid JSON format"
        job = {"type": "submit_job", "message_id": "x-1", "job_type": "nobody", "payload": {}}
        accepted = await ask(job)
        assert (accepted["type"], accepted["position"], accepted["notified_workers"]) == (
            "job_accepted",
            1,
            0,
        )
        assert "already exists" in (await ask(job))["error"]  # the original said nothing
        status = await ask({"type": "request_job_status", "job_id": "x-1"})
        assert (status["type"], status["status"]) == ("response_job_status", "pending")
        cancelled = await ask({"type": "cancel_job", "job_id": "x-1", "reason": "nobody"})
        assert cancelled["message"] == "Job cancelled: nobody"
        again = await ask({"type": "cancel_job", "job_id": "x-1"})
        assert again["type"] == "error" and "terminal state" in again["error"]
        assert (await ask({"type": "cancel_job"}))[
            "error"
        ] == "Missing job_id in cancel_job request"
        with pytest.raises(TimeoutError):  # answered once, not twice as the original did
            await asyncio.wait_for(conn.recv(), 0.5)


@pytest.mark.slow
async def test_original_worker_runs_jobs(base_url: str) -> None:
    frames = recorded("happy_ws", "worker")
    submits = iter(client_submits("happy_ws"))
    ids: dict[str, str] = {}  # recorded job id -> ours
    worker_id = frames[0]["msg"]["worker_id"]
    url = base_url.replace("http", "ws") + f"/ws/worker/{worker_id}"
    async with websockets.connect(url) as conn, httpx.AsyncClient(base_url=base_url) as http:
        for frame in frames:
            msg = frame["msg"]
            if frame["dir"] == "to_hub":
                out = dict(msg)
                if "job_id" in out:
                    out["job_id"] = ids[out["job_id"]]
                await conn.send(json.dumps(out))
                continue
            if msg["type"] == "job_available":
                # The recorded client submitted the job just before this offer.
                sub = next(submits)
                r = await http.post(
                    "/api/jobs",
                    json={
                        "job_type": sub["job_type"],
                        "payload": sub["payload"],
                        "priority": sub["priority"],
                        "job_id": sub.get("message_id"),
                    },
                )
                ids[msg["job_id"]] = r.json()["job_id"]
            got = json.loads(await conn.recv())
            assert got["type"] == msg["type"], (got, msg)
            missing = set(msg) - set(got)
            assert not missing, f"{msg['type']} lacks {missing}"
            for key, value in msg.items():
                if key == "job_id":
                    assert got[key] == ids[value]
                elif key not in VARYING:
                    assert got[key] == value, (key, got, msg)
        for recorded_id, ours in ids.items():
            job = (await http.get(f"/api/jobs/{ours}")).json()
            assert job["status"] == "completed", (recorded_id, job)
            assert job["result"]["status"] == "success"


@pytest.mark.slow
async def test_unclaimed_offer_returns_to_the_queue(base_url: str) -> None:
    """An original worker that ignores an offer does not keep the job (it went to another
    worker in the original, or was offered twice)."""
    from emp_hub import dispatch

    dispatch.OFFER_S, before = 0.5, dispatch.OFFER_S
    try:
        caps = {"version": "1.0.0", "supported_job_types": ["simulation"]}
        url = base_url.replace("http", "ws") + "/ws/worker/silent"
        async with websockets.connect(url) as conn, httpx.AsyncClient(base_url=base_url) as http:
            await conn.send(
                json.dumps({"type": "register_worker", "worker_id": "silent", "capabilities": caps})
            )
            job_id = (await http.post("/api/jobs", json={"job_type": "simulation"})).json()[
                "job_id"
            ]
            seen: list[dict[str, Any]] = []
            while len([m for m in seen if m["type"] == "job_available"]) < 2:
                seen.append(json.loads(await conn.recv()))
            offers = [m["job_id"] for m in seen if m["type"] == "job_available"]
            assert offers == [job_id, job_id]  # withdrawn, then offered again
            await conn.send(json.dumps({"type": "claim_job", "job_id": "other"}))
            assert "not offered" in json.loads(await conn.recv())["error"]
            await conn.send(json.dumps({"type": "claim_job", "job_id": job_id}))
            assert json.loads(await conn.recv())["type"] == "job_assigned"
            job = (await http.get(f"/api/jobs/{job_id}")).json()
            assert (job["status"], job["worker_id"], job["orphans"]) == ("active", "silent", 0)
    finally:
        dispatch.OFFER_S = before


@pytest.mark.slow
async def test_original_monitor(
    base_url: str, redis_client: redis.asyncio.Redis, namespace: str
) -> None:
    """The recorded monitor's requests, stats, and copies of every job's messages."""
    from emp_hub.broker import Broker
    from emp_protocol.capabilities import WorkerCapabilities

    ws = base_url.replace("http", "ws")
    async with websockets.connect(f"{ws}/ws/monitor/mon-1") as mon:

        async def next_of(kind: str) -> dict[str, Any]:
            while True:
                message: dict[str, Any] = json.loads(await asyncio.wait_for(mon.recv(), 5))
                if message["type"] == kind:
                    return message

        await next_of("connection_established")
        await mon.send(json.dumps({"type": "subscribe", "channels": []}))
        stats = await next_of("stats_broadcast")
        assert set(stats) >= {"connections", "workers", "system", "message_id"}
        assert stats["connections"]["monitors"] == ["mon-1"]
        assert (await next_of("subscription_confirmed"))["channels"] == []
        await mon.send(json.dumps({"type": "stay_alive"}))
        await next_of("stay_alive_response")
        await mon.send(json.dumps({"type": "request_stats"}))
        assert (await next_of("error"))["error"] == "Unsupported message type: request_stats"
        await mon.send("not json either")
        assert (await next_of("error"))["error"] == "Invalid JSON format"

        async with httpx.AsyncClient(base_url=base_url) as http:
            await http.post("/api/jobs", json={"job_type": "simulation", "job_id": "m-1"})
        assert (await next_of("stats_broadcast"))["system"]["queues"]["total"] == 1
        broker = Broker(redis_client, BrokerSettings(namespace=namespace))
        claim = await broker.claim("w1", WorkerCapabilities(services={"simulation"}))
        assert claim is not None
        started = await next_of("response_job_status")
        assert (started["job_id"], started["status"], started["client_id"]) == (
            "m-1",
            "processing",
            None,
        )
        await broker.progress("m-1", claim.token, 50, "half", "processing")
        assert (await next_of("update_job_progress"))["progress"] == 50
        await broker.complete("m-1", claim.token, {"ok": True})
        assert (await next_of("complete_job"))["result"] == {"ok": True}
