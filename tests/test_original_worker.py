"""An unmodified emp-redis worker against our hub: the recorded frames of the original
worker (tests/fixtures/emp-redis/happy_ws.jsonl, copied from the reference recordings) are
replayed, and every reply must have the recorded type, order and fields."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio
import websockets

from emp_hub.broker import BrokerSettings
from emp_hub.settings import HubSettings
from tests.hub_server import running_hub

pytestmark = pytest.mark.hub

FIXTURES = Path(__file__).parent / "fixtures" / "emp-redis"
#: Fields whose values differ by nature between runs.
VARYING = {"timestamp", "message", "worker_id", "message_id"}


def recorded(scenario: str, conn: str) -> list[dict[str, Any]]:
    """The frames of one connection of a recorded scenario, in order."""
    lines = (FIXTURES / f"{scenario}.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return [r for r in rows if r["conn"] == conn and "_event" not in r["msg"]]


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


async def test_unclaimed_offer_returns_to_the_queue(base_url: str) -> None:
    """An original worker that ignores an offer does not keep the job (it went to another
    worker in the original, or was offered twice)."""
    from emp_hub import ws

    ws.OFFER_S, before = 0.5, ws.OFFER_S
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
        ws.OFFER_S = before
