"""Redis down under a running hub: every route that needs it answers 503 at once, with
`Retry-After` and a reason; a WebSocket is closed with 1013 (try again later); the hub
recovers when the server is back. The hub is a real `emp-hub serve` process over a private
embedded Valkey that the test stops and starts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
import websockets.sync.client
from websockets.sync.client import ClientConnection

from emp_hub.auth import Role, TokenStore
from emp_hub.broker import connect
from emp_hub.embedded import EmbeddedValkey
from tests.processes import cluster

pytestmark = pytest.mark.slow

UNAVAILABLE = {"detail": "the hub's Redis is unavailable; retry later"}


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[EmbeddedValkey]:
    """A private server (stopped and started by the test)."""
    server = EmbeddedValkey(tmp_path / "valkey")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def admin_token(url: str, namespace: str) -> str:
    """A created token: the hub then looks every caller up in Redis."""

    async def create() -> str:
        client = connect(url)
        try:
            return await TokenStore(client, namespace).create(Role.ADMIN)
        finally:
            await client.aclose()

    return asyncio.run(create())


def closed_with(conn: ClientConnection) -> tuple[int, str]:
    """Read until the hub closes the connection; its close code and reason."""
    try:
        while True:
            conn.recv(timeout=10)
    except websockets.ConnectionClosed as closed:
        frame = closed.rcvd
    assert frame is not None, "closed without a close frame"
    return frame.code, frame.reason


@contextlib.contextmanager
def registered_worker(url: str, auth: dict[str, str]) -> Iterator[ClientConnection]:
    """A worker connection for the service "sim", registered (no work requested yet)."""
    worker_id = url.rpartition("/")[2]
    caps = {"services": ["sim"]}
    with websockets.sync.client.connect(url, additional_headers=auth, open_timeout=10) as conn:
        conn.send(
            json.dumps({"type": "register_worker", "worker_id": worker_id, "capabilities": caps})
        )
        while json.loads(conn.recv(timeout=10))["type"] != "worker_registered":
            pass
        yield conn


def next_of(conn: ClientConnection, type_: str) -> dict[str, Any]:
    """The next message of this type (others are skipped)."""
    while True:
        message: dict[str, Any] = json.loads(conn.recv(timeout=15))
        if message["type"] == type_:
            return message


def test_redis_down_answers_503_and_1013_fast_then_recovers(
    valkey: EmbeddedValkey, namespace: str, tmp_path: Path
) -> None:
    token = admin_token(valkey.url, namespace)
    auth = {"Authorization": f"Bearer {token}"}
    with contextlib.ExitStack() as stack:
        hub = stack.enter_context(cluster(valkey.url, namespace, tmp_path))
        ws = hub.url.replace("http", "ws", 1)
        submitted = httpx.post(f"{hub.url}/api/jobs", json={"job_type": "sim"}, headers=auth)
        job_id = submitted.json()["job_id"]
        patient = stack.enter_context(registered_worker(f"{ws}/ws/worker/patient", auth))
        beating = stack.enter_context(registered_worker(f"{ws}/ws/worker/beating", auth))
        client = stack.enter_context(
            websockets.sync.client.connect(
                f"{ws}/ws/client/c0", additional_headers=auth, open_timeout=10
            )
        )

        valkey.stop()
        requests = [
            ("POST", "/api/jobs", {"job_type": "sim"}),
            ("POST", "/api/jobs/batch", {"jobs": [{"job_type": "sim"}]}),
            ("GET", f"/api/jobs/{job_id}", None),
            ("GET", "/api/jobs", None),
            ("POST", f"/api/jobs/{job_id}/cancel", {}),
            ("GET", "/api/workers", None),
            ("GET", "/api/queues", None),
            ("GET", "/metrics", None),
        ]
        for method, path, body in requests:
            started = time.monotonic()
            response = httpx.request(method, hub.url + path, json=body, headers=auth, timeout=30)
            elapsed = time.monotonic() - started
            assert response.status_code == 503, (path, response.text)
            assert response.json() == UNAVAILABLE, path
            assert int(response.headers["retry-after"]) >= 1, path
            # A correctness bound, not a benchmark: the old client retried for about 8 s.
            assert elapsed < 3, (path, elapsed)
        assert httpx.get(f"{hub.url}/health/ready", timeout=30).status_code == 503
        assert httpx.get(f"{hub.url}/health/live", timeout=30).status_code == 200

        for route in ("worker/w1", "client/c1", "monitor/m1"):
            with websockets.sync.client.connect(
                f"{ws}/ws/{route}", additional_headers=auth, open_timeout=10
            ) as conn:
                assert closed_with(conn) == (1013, UNAVAILABLE["detail"]), route
        # A connected peer whose message needs Redis is told to come back later too;
        # one asking for work stays connected and gets it once Redis is back.
        beating.send(json.dumps({"type": "worker_heartbeat", "worker_id": "beating"}))
        assert closed_with(beating)[0] == 1013
        client.send(json.dumps({"type": "submit_job", "job_type": "sim"}))
        assert closed_with(client)[0] == 1013
        patient.send(json.dumps({"type": "request_job", "slots": 1}))
        time.sleep(2)  # its claim fails meanwhile
        assert hub.hub is not None and "Traceback" not in hub.hub.text()

        valkey.start()  # same port, same password, same data (AOF)
        assert next_of(patient, "job_assigned")["job_id"] == job_id
        assert httpx.get(f"{hub.url}/health/ready", timeout=30).status_code == 200
        again = httpx.post(f"{hub.url}/api/jobs", json={"job_type": "sim"}, headers=auth)
        assert again.status_code == 200, again.text
        with registered_worker(f"{ws}/ws/worker/w1", auth):
            pass
