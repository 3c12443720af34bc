"""Test a connector against a real hub, in your plugin's own tests.

    from emp_hub.testing import connector_hub

    async def test_my_connector():
        async with connector_hub(MyConnector()) as hub:
            job = await hub.run("my-service", {"prompt": "a fox"})
            assert job["status"] == "completed"

`connector_hub` starts an embedded Valkey (in a temporary folder), the real hub app under
uvicorn on a free port, and a real `Worker` running your connector instances, all in the
test's event loop; everything stops when the block ends. It needs the hub's extra
(`pip install "emp[hub]"`) in the test environment; the worker itself never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from emp_protocol.jobs import TERMINAL
from emp_worker.connector import Connector
from emp_worker.plugins import Plugins
from emp_worker.settings import WorkerSettings
from emp_worker.worker import HubOutputs, Worker

if TYPE_CHECKING:
    from emp_hub.settings import HubSettings


@asynccontextmanager
async def running_hub(settings: HubSettings) -> AsyncIterator[str]:
    """Serve the hub app under uvicorn on a free port until the block ends; yields its
    base URL (http://127.0.0.1:<port>)."""
    import uvicorn

    from emp_hub.app import create_app
    from emp_hub.embedded import free_port

    port = free_port()
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=3,
        ws_max_size=settings.ws_max_bytes,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def running_worker(
    hub_url: str, connectors: list[Connector], plugins: Plugins | None = None, **settings: Any
) -> AsyncIterator[Worker]:
    """A Worker with these connector instances (and `plugins`, none by default), connected
    to the hub, until the block ends (then it drains as on SIGTERM). `settings` are
    WorkerSettings fields."""
    worker_settings = WorkerSettings(
        hub_url=hub_url, **{"worker_id": "test-worker", "heartbeat_s": 1, **settings}
    )
    plugins = plugins or Plugins()
    plugins.register_builtin(HubOutputs(worker_settings), "emp-worker:hub-outputs")
    worker = Worker(worker_settings, plugins, connectors)
    task = asyncio.create_task(worker.run())
    async with httpx.AsyncClient(base_url=worker_settings.http_url) as http:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            workers = (await http.get("/api/workers")).json()
            if any(w["worker_id"] == worker.worker_id for w in workers):
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
    try:
        yield worker
    finally:
        worker.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, worker_settings.drain_timeout_s + 10)


class TestHub:
    """A hub with one worker running your connectors: submit jobs, wait for them."""

    __test__ = False  # not a pytest test class

    def __init__(self, url: str, worker: Worker) -> None:
        self.url = url
        self.worker = worker
        self.http = httpx.AsyncClient(base_url=url, timeout=30)

    async def submit(
        self, service: str, payload: dict[str, Any] | None = None, **fields: Any
    ) -> str:
        """Submit a job (fields as in POST /api/jobs); its id."""
        body = {"job_type": service, "payload": payload or {}, **fields}
        response = await self.http.post("/api/jobs", json=body)
        response.raise_for_status()
        job_id: str = response.json()["job_id"]
        return job_id

    async def wait(self, job_id: str, within_s: float = 60) -> dict[str, Any]:
        """Wait until the job has ended (or `within_s`); the job as the API shows it."""
        deadline = time.monotonic() + within_s
        while True:
            job: dict[str, Any] = (await self.http.get(f"/api/jobs/{job_id}")).json()
            if job["status"] in TERMINAL or time.monotonic() > deadline:
                return job
            await asyncio.sleep(0.05)

    async def run(
        self, service: str, payload: dict[str, Any] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Submit a job and wait for its end."""
        return await self.wait(await self.submit(service, payload, **fields))

    async def download(self, url: str) -> bytes:
        """An output's content (its `url` from the job's result)."""
        response = await self.http.get(url)
        response.raise_for_status()
        return response.content


@asynccontextmanager
async def connector_hub(*connectors: Connector, **worker_settings: Any) -> AsyncIterator[TestHub]:
    """An embedded Valkey, a real hub and a worker running `connectors`."""
    from emp_hub.broker import BrokerSettings
    from emp_hub.embedded import EmbeddedValkey
    from emp_hub.settings import HubSettings

    with tempfile.TemporaryDirectory() as tmp, EmbeddedValkey(Path(tmp) / "valkey") as valkey:
        settings = HubSettings(
            redis_url=valkey.url,
            output_dir=Path(tmp) / "outputs",
            broker=BrokerSettings(namespace="connector-test"),
        )
        async with (
            running_hub(settings) as url,
            running_worker(url, list(connectors), **worker_settings) as worker,
        ):
            hub = TestHub(url, worker)
            try:
                yield hub
            finally:
                await hub.http.aclose()
