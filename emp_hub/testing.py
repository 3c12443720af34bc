"""Test a connector against a real hub, or on its own, in your plugin's own tests.

    from emp_hub.testing import connector_hub
    from emp_worker.testing import fake_context

    async def test_my_connector():
        async with connector_hub(MyConnector()) as hub:
            job = await hub.run("my-service", {"prompt": "a fox"})
            assert job["status"] == "completed"

    async def test_my_connector_alone():
        ctx = fake_context("my-service", {"prompt": "a fox"})
        result = await MyConnector().run(ctx.job, ctx)
        assert ctx.reports[-1].percent == 100

`connector_hub` starts an embedded Valkey (in a temporary folder), the real hub app under
uvicorn on a free port, and a real `Worker` running your connector instances, all in the
test's event loop; everything stops when the block ends (a job still running is handed
back at once, not waited for). It needs the hub's extra (`pip install "emp[hub]"`) in the
test environment; the worker itself never imports it. `fake_context` (in
`emp_worker.testing`) needs no hub at all.
See docs/plugins.md, "Testing a connector".
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping
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
    from emp_hub.broker import BrokerSettings
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
        ws_per_message_deflate=False,  # as emp-hub serve
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
    to the hub, until the block ends; then it stops, handing back at once the jobs it still
    runs. `settings` are WorkerSettings fields; with a `token`, it must be one that may list
    the workers (the hub's shared token or an admin's)."""
    worker_settings = WorkerSettings(
        hub_url=hub_url, **{"worker_id": "test-worker", "heartbeat_s": 1, **settings}
    )
    plugins = plugins or Plugins()
    plugins.register_builtin(HubOutputs(worker_settings), HubOutputs.NAME)
    worker = Worker(worker_settings, plugins, connectors)
    task = asyncio.create_task(worker.run())
    given = worker_settings.token
    auth = {"Authorization": f"Bearer {given.get_secret_value()}"} if given else {}
    async with httpx.AsyncClient(base_url=worker_settings.http_url, headers=auth) as http:
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
        worker.stop(now=True)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, worker_settings.drain_timeout_s + 10)
        await HubOutputs.close_in(plugins)


class TestHub:
    """A hub with one worker running your connectors: submit jobs, wait for them, cancel
    them, and call any other endpoint of the HTTP API (docs/api.md) through `http`."""

    __test__ = False  # not a pytest test class

    def __init__(self, url: str, worker: Worker) -> None:
        #: The hub's base URL (http://127.0.0.1:<port>).
        self.url = url
        #: The running Worker (its `stats`, `running` jobs, `worker_id`).
        self.worker = worker
        #: An httpx.AsyncClient on the hub (no token needed):
        #: `await hub.http.get("/api/workers")`.
        self.http = httpx.AsyncClient(base_url=url, timeout=30)

    async def submit(
        self, service: str, payload: dict[str, Any] | None = None, **fields: Any
    ) -> str:
        """Submit a job (`fields` as in POST /api/jobs: priority, requirements, customer,
        max_attempts, job_timeout...); returns its id at once, without waiting."""
        body = {"job_type": service, "payload": payload or {}, **fields}
        response = await self.http.post("/api/jobs", json=body)
        response.raise_for_status()
        job_id: str = response.json()["job_id"]
        return job_id

    async def job(self, job_id: str) -> dict[str, Any]:
        """The job as GET /api/jobs/{id} shows it now (status, progress, result, error,
        attempt, failures...)."""
        response = await self.http.get(f"/api/jobs/{job_id}")
        response.raise_for_status()
        job: dict[str, Any] = response.json()
        return job

    async def wait(self, job_id: str, within_s: float = 60) -> dict[str, Any]:
        """Wait until the job has ended (completed, failed or cancelled) and return it as
        `job()` does; after `within_s` it returns the job as it is then (check `status`)."""
        deadline = time.monotonic() + within_s
        while True:
            job = await self.job(job_id)
            if job["status"] in TERMINAL or time.monotonic() > deadline:
                return job
            await asyncio.sleep(0.05)

    async def run(
        self, service: str, payload: dict[str, Any] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Submit a job and wait for its end: `wait(await submit(...))`."""
        return await self.wait(await self.submit(service, payload, **fields))

    async def cancel(self, job_id: str, reason: str = "cancelled by the test") -> None:
        """Cancel a job (POST /api/jobs/{id}/cancel): a pending one is removed, a running
        one's connector is told (`ctx.cancelled`, `Connector.cancel`)."""
        response = await self.http.post(f"/api/jobs/{job_id}/cancel", json={"reason": reason})
        response.raise_for_status()

    async def download(self, url: str) -> bytes:
        """An output's content (its `url` from the job's result)."""
        response = await self.http.get(url)
        response.raise_for_status()
        return response.content


def _plugin_name(plugin: object) -> str:
    return str(getattr(plugin, "__name__", type(plugin).__name__))


@asynccontextmanager
async def connector_hub(
    *connectors: Connector,
    plugins: Iterable[object] = (),
    broker: BrokerSettings | Mapping[str, Any] | None = None,
    **worker_settings: Any,
) -> AsyncIterator[TestHub]:
    """An embedded Valkey, a real hub and a worker running `connectors`.

    `plugins`: plugin objects (modules, or objects with `@hookimpl` methods) the worker
    calls as it calls installed plugins; the connectors they register run too (made from
    the environment, as `emp-worker run` makes them) unless an instance of one is among
    `connectors`. `broker`: BrokerSettings (or a dict of its fields), e.g.
    `{"retry_base_s": 0.05, "lease_s": 2}` for quick retries and lease expiries.
    `worker_settings`: WorkerSettings fields (`worker_id`, `progress_interval_s`...)."""
    from emp_hub.broker import BrokerSettings
    from emp_hub.embedded import EmbeddedValkey
    from emp_hub.settings import HubSettings

    if not isinstance(broker, BrokerSettings):
        broker = BrokerSettings.model_validate({"namespace": "connector-test", **(broker or {})})
    registry = Plugins()
    for plugin in plugins:
        registry.register_builtin(plugin, _plugin_name(plugin))
    given = {c.name for c in connectors}
    made = [cls() for name, cls in sorted(registry.connectors.items()) if name not in given]
    with tempfile.TemporaryDirectory() as tmp, EmbeddedValkey(Path(tmp) / "valkey") as valkey:
        settings = HubSettings(
            redis_url=valkey.url,
            output_dir=Path(tmp) / "outputs",
            maintenance_interval_s=0.2,  # due retries and expired leases come back quickly
            broker=broker,
        )
        async with (
            running_hub(settings) as url,
            running_worker(url, [*connectors, *made], registry, **worker_settings) as worker,
        ):
            hub = TestHub(url, worker)
            try:
                yield hub
            finally:
                await hub.http.aclose()
