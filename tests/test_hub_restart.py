"""A hub killed (SIGKILL) and started again while a worker is connected loses no job: the
worker reconnects, keeps the job it was running, and the queued jobs are still there."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import redis.asyncio
import websockets

from emp_hub.embedded import free_port
from emp_worker.testing import eventually

pytestmark = [pytest.mark.slow, pytest.mark.hub]


@asynccontextmanager
async def hub_process(redis_url: str, namespace: str, port: int) -> AsyncIterator[Any]:
    """`emp-hub serve` in a process of its own; yields the process."""
    env = {
        **os.environ,
        "EMP_REDIS_URL": redis_url,
        "EMP_BROKER__NAMESPACE": namespace,
        "EMP_LOG_LEVEL": "warning",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "emp_hub.cli", "serve", "--port", str(port), env=env
    )
    try:
        async with httpx.AsyncClient() as http:

            async def ready() -> bool:
                try:
                    return (await http.get(f"http://127.0.0.1:{port}/health/ready")).is_success
                except httpx.TransportError:
                    return False

            await eventually(ready, within_s=15, every_s=0.05, what="the hub ready")
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def recv_type(conn: websockets.ClientConnection, type_: str) -> dict[str, Any]:
    """The next message of this type (others, like welcomes, are skipped)."""
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(conn.recv(), 10))
        if message["type"] == type_:
            return message


async def test_hub_killed_and_restarted_loses_no_job(
    redis_url: str, namespace: str, redis_client: redis.asyncio.Redis
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ws_url = f"ws://127.0.0.1:{port}/ws/worker/w1"
    register = {
        "type": "register_worker",
        "worker_id": "w1",
        "capabilities": {"services": ["simulation"]},
    }
    async with hub_process(redis_url, namespace, port) as hub:
        async with httpx.AsyncClient(base_url=base) as http:
            running = (await http.post("/api/jobs", json={"job_type": "simulation"})).json()
            queued = (await http.post("/api/jobs", json={"job_type": "simulation"})).json()
        conn = await websockets.connect(ws_url)
        await conn.send(json.dumps(register))
        await conn.send(json.dumps({"type": "request_job", "slots": 1}))
        assigned = await recv_type(conn, "job_assigned")
        assert assigned["job_id"] == running["job_id"]
        hub.send_signal(signal.SIGKILL)
        await hub.wait()
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(conn.recv(), 10)

    async with hub_process(redis_url, namespace, port):
        async with websockets.connect(ws_url) as conn:
            held = [{"job_id": assigned["job_id"], "lease_token": assigned["lease_token"]}]
            await conn.send(json.dumps({**register, "jobs": held}))
            assert (await recv_type(conn, "worker_registered"))["jobs"] == [running["job_id"]]
            await conn.send(
                json.dumps(
                    {
                        "type": "complete_job",
                        "job_id": running["job_id"],
                        "result": {"survived": True},
                    }
                )
            )
            await recv_type(conn, "job_completed_ack")
            await conn.send(json.dumps({"type": "request_job", "slots": 1}))
            assert (await recv_type(conn, "job_assigned"))["job_id"] == queued["job_id"]
        async with httpx.AsyncClient(base_url=base) as http:
            job = (await http.get(f"/api/jobs/{running['job_id']}")).json()
    assert (job["status"], job["result"], job["attempt"]) == ("completed", {"survived": True}, 1)
