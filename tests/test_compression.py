"""WebSocket compression (permessage-deflate) is off on every socket: the hub (`emp-hub serve`
and the test helper `running_hub`) declines it when a client offers it, and the worker does
not offer it. A client that offers it (browsers, older workers, websockets' default) still
connects and talks, uncompressed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio
import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.sync.client import connect

from emp_hub.broker import BrokerSettings
from emp_hub.embedded import free_port
from emp_hub.settings import HubSettings
from emp_worker.plugins import Plugins
from emp_worker.settings import WorkerSettings
from emp_worker.testing import eventually
from emp_worker.worker import Worker
from tests.hub_server import running_hub
from tests.processes import Cluster

pytestmark = pytest.mark.hub

ROUTES = ["/ws/worker/w1", "/ws/client/c1", "/ws/monitor/m1"]
DEFLATE = "permessage-deflate"


def _declined(headers: Headers) -> bool:
    """Whether a handshake answer turned compression down (no extension accepted)."""
    return DEFLATE not in headers.get("Sec-WebSocket-Extensions", "")


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_emp_hub_serve_declines_deflate_on_every_route(
    redis_url: str, namespace: str, tmp_path: Path, workers: str
) -> None:
    """A real `emp-hub serve` (one process, or `--workers 2`) answers a handshake offering
    permessage-deflate without it, on the worker, client and monitor routes; the socket
    works (the worker route greets)."""
    hub = Cluster(redis_url, namespace, tmp_path)
    hub.start_hub("--workers", workers)
    try:
        ws = hub.url.replace("http", "ws")
        for route in ROUTES:
            with connect(ws + route, compression="deflate", open_timeout=10) as conn:
                offered = conn.request.headers if conn.request else Headers()
                assert DEFLATE in offered.get("Sec-WebSocket-Extensions", "")
                assert conn.response is not None and _declined(conn.response.headers), route
                if route.startswith("/ws/worker/"):
                    greeting = json.loads(conn.recv(timeout=10))
                    assert greeting["type"] == "connection_established"
    finally:
        hub.stop()


@pytest.fixture
def hub_settings(redis_url: str, namespace: str, redis_client: redis.asyncio.Redis) -> HubSettings:
    return HubSettings(redis_url=redis_url, broker=BrokerSettings(namespace=namespace))


async def test_running_hub_declines_deflate_and_a_legacy_client_still_talks(
    hub_settings: HubSettings,
) -> None:
    """The test helper's hub declines deflate too; a legacy worker offering it registers,
    gets a job of 1 MiB payload and completes it, uncompressed."""
    async with running_hub(hub_settings) as url:
        ws = url.replace("http", "ws")
        for route in ROUTES:
            async with websockets.connect(ws + route, compression="deflate") as conn:
                assert conn.response is not None and _declined(conn.response.headers), route
        async with websockets.connect(
            ws + "/ws/worker/legacy", compression="deflate", max_size=None
        ) as conn:
            assert json.loads(await conn.recv())["type"] == "connection_established"
            registration = {
                "type": "register_worker",
                "worker_id": "legacy",
                "capabilities": {"services": ["noop"]},
            }
            await conn.send(json.dumps(registration))
            await conn.send(json.dumps({"type": "request_job", "slots": 1}))
            async with httpx.AsyncClient(base_url=url) as http:
                body = {"job_type": "noop", "payload": {"blob": "x" * (1 << 20)}}
                job_id = (await http.post("/api/jobs", json=body)).json()["job_id"]
                while (message := json.loads(await conn.recv()))["type"] != "job_assigned":
                    pass
                assert message["job_id"] == job_id
                assert len(message["params"]["blob"]) == 1 << 20
                complete = {
                    "type": "complete_job",
                    "job_id": job_id,
                    "lease_token": message["lease_token"],
                    "result": {"ok": 1},
                }
                await conn.send(json.dumps(complete))

                async def completed() -> bool:
                    job = (await http.get(f"/api/jobs/{job_id}")).json()
                    return bool(job["status"] == "completed")

                await eventually(completed, what="the legacy worker's job completed")


@pytest.fixture
async def recording_server() -> AsyncIterator[tuple[str, list[Request]]]:
    """A WebSocket server that records each handshake request and refuses it (403)."""
    requests: list[Request] = []

    def record(connection: ServerConnection, request: Request) -> Response:
        requests.append(request)
        return connection.respond(403, "recorded\n")

    port = free_port()
    async with serve(lambda _: asyncio.sleep(0), "127.0.0.1", port, process_request=record):
        yield f"http://127.0.0.1:{port}", requests


async def test_the_worker_does_not_offer_deflate(
    recording_server: tuple[str, list[Request]],
) -> None:
    """The worker's socket (the one `emp-worker run` and `doctor` open) offers no
    extension."""
    url, requests = recording_server
    worker = Worker(WorkerSettings(hub_url=url, worker_id="w1"), Plugins(), [])
    checks = await worker.probe()
    assert not checks["token"]["ok"]  # refused by the recorder: it only listens
    assert [r.path for r in requests] == ["/ws/worker/w1"]
    assert "Sec-WebSocket-Extensions" not in requests[0].headers
