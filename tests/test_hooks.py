"""The hooks mean what their docs say (docs/hooks.md): each test builds a plugin with one
mistake or one edge of a hook, and runs it in a real worker on a real hub
(emp_worker.testing.connector_hub), or in a Worker alone where no job is needed."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from functools import partial
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from emp_hub.testing import TestHub, connector_hub
from emp_worker import hookimpl, hookspecs
from emp_worker.connector import (
    CapabilityExtras,
    Connector,
    ConnectorCapabilities,
    Health,
    Job,
    JobContext,
    JobFailed,
    OutputRef,
)
from emp_worker.hookspecs import Outcome
from emp_worker.plugins import PluginError, Plugins
from emp_worker.settings import WorkerSettings
from emp_worker.testing import eventually, fake_context
from emp_worker.worker import Worker

pytestmark = pytest.mark.worker

DOCS = Path(__file__).parent.parent / "docs"


class Writer(Connector):
    """Writes one output; fails, sleeps or waits to be stopped as the payload says."""

    name = "writer"

    def __init__(self) -> None:
        super().__init__()
        self.interrupted: list[str] = []

    async def run(self, job: Job, ctx: JobContext) -> Any:
        if job.payload.get("fail"):
            raise JobFailed("asked to fail", retryable=False)
        if job.payload.get("fail_first") and job.attempt == 1:
            raise JobFailed("first attempt fails")
        try:
            await asyncio.sleep(float(job.payload.get("seconds", 0)))
        except asyncio.CancelledError:
            self.interrupted.append(job.id)
            raise
        await ctx.output("out.txt", b"written", "text/plain")
        return {"attempt": job.attempt}


async def until_running(hub: TestHub, job_id: str) -> None:
    """Wait until the worker runs the job."""
    await eventually(lambda: job_id in hub.worker.running, what=f"{job_id} running")


# -- store_output ---------------------------------------------------------------------------


class AsyncPass:
    """An async store_output that looks at every output and stores none."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    async def store_output(
        self, context: JobContext, name: str, data: bytes, content_type: str
    ) -> OutputRef | None:
        await asyncio.sleep(0)
        self.seen.append(name)
        return None


class SyncPass:
    """A plain store_output that stores nothing."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    def store_output(
        self, context: JobContext, name: str, data: bytes, content_type: str
    ) -> OutputRef | None:
        self.seen.append(name)
        return None


class MemoryStore:
    """An async store_output that keeps outputs in memory (and answers)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    @hookimpl
    async def store_output(
        self, context: JobContext, name: str, data: bytes, content_type: str
    ) -> OutputRef:
        self.files[name] = data
        return OutputRef(name=name, size=len(data), content_type=content_type, url="mem://x")


@pytest.mark.slow
async def test_an_async_store_output_that_passes_lets_the_next_one_store() -> None:
    """An async implementation answering None passes to the next (here a plain one that
    passes too, then the default upload), as a plain one does."""
    first, second = AsyncPass(), SyncPass()
    # pluggy calls the last registered first: AsyncPass, then SyncPass, then the upload.
    async with connector_hub(Writer(), plugins=[second, first]) as hub:
        job = await hub.run("writer")
        assert job["status"] == "completed", job
        [out] = job["result"]["outputs"]
        assert await hub.download(out["url"]) == b"written"
    assert first.seen == second.seen == ["out.txt"]


@pytest.mark.slow
async def test_the_first_async_answer_wins() -> None:
    memory, later = MemoryStore(), SyncPass()
    async with connector_hub(Writer(), plugins=[later, memory]) as hub:
        job = await hub.run("writer")
        assert job["status"] == "completed", job
        assert job["result"]["outputs"][0]["url"] == "mem://x"
    assert memory.files == {"out.txt": b"written"} and later.seen == []


@pytest.mark.slow
async def test_a_store_output_wrapper_is_an_error_naming_the_plugin() -> None:
    class Wrapping:
        @hookimpl(wrapper=True)
        def store_output(
            self, context: JobContext, name: str, data: bytes, content_type: str
        ) -> Generator[None, OutputRef | None, OutputRef | None]:
            return (yield)

    async with connector_hub(Writer(), plugins=[Wrapping()]) as hub:
        job = await hub.run("writer", max_attempts=1)
    assert job["status"] == "failed"
    assert "plugin Wrapping: store_output cannot be a wrapper" in job["error"]


# -- worker_capabilities --------------------------------------------------------------------


def worker_with(answer: object, name: str = "colour-plugin") -> Worker:
    """A Worker whose one plugin's worker_capabilities answers `answer`."""

    class Colour:
        @hookimpl
        def worker_capabilities(self) -> object:
            return answer

    plugins = Plugins()
    plugins.register_builtin(Colour(), name)
    return Worker(WorkerSettings(worker_id="caps", tags=["local"]), plugins, [Writer()])


def test_capability_extras_are_merged() -> None:
    extras = CapabilityExtras(tags=["blue"], region="eu", models={"writer": ["m1"]})
    caps = worker_with(extras)._caps
    assert caps.tags == {"blue", "local"} and caps.region == "eu"
    assert caps.models == {"writer": {"m1"}}
    # A dict is read through the same model.
    assert worker_with({"tags": ["blue"]})._caps.tags == {"blue", "local"}


@pytest.mark.parametrize(
    ("answer", "field"),
    [
        ({"tags": "blue"}, "tags"),  # once the tags b, l, u, e
        ({"tag": ["blue"]}, "tag"),  # a misspelt key, once ignored
        ({"models": {"writer": "m1"}}, "models"),
        ({"region": "two words"}, "region"),
        (["blue"], "CapabilityExtras"),
    ],
)
def test_an_invalid_capability_answer_names_the_plugin(answer: object, field: str) -> None:
    with pytest.raises(PluginError, match="colour-plugin") as refused:
        worker_with(answer)
    assert "worker_capabilities" in str(refused.value) and field in str(refused.value)


async def test_an_invalid_answer_at_a_refresh_keeps_the_capabilities_of_before(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answers: list[object] = [{"tags": ["blue"]}]

    class Changing:
        @hookimpl
        def worker_capabilities(self) -> object:
            answer = answers[-1]
            answers.append({"tags": "blue"})  # every later answer is invalid
            return answer

    plugins = Plugins()
    plugins.register_builtin(Changing(), "changing-plugin")
    settings = WorkerSettings(worker_id="caps", capabilities_refresh_s=0.01)
    worker = Worker(settings, plugins, [Writer()])
    refresher = asyncio.create_task(worker._refresh_capabilities())
    await eventually(lambda: len(answers) > 3, what="more answers")
    refresher.cancel()
    assert len(answers) > 3  # it went on refreshing after the invalid answers
    assert worker._caps.tags == {"blue"}
    assert "plugin changing-plugin: worker_capabilities answered {'tags': 'blue'}" in caplog.text


# -- job_started / job_finished --------------------------------------------------------------


class Outcomes:
    """Records every job_started and job_finished call."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.finished: dict[str, tuple[str, str | None]] = {}

    @hookimpl
    def job_started(self, context: JobContext) -> None:
        self.started.append(context.job.id)

    @hookimpl
    def job_finished(self, context: JobContext, outcome: Outcome, error: str | None) -> None:
        self.finished[context.job.id] = (outcome, error)


@pytest.mark.slow
async def test_job_finished_outcomes_are_the_documented_literal() -> None:
    recorder, writer = Outcomes(), Writer()
    async with connector_hub(writer, plugins=[recorder], drain_timeout_s=60) as hub:
        done = await hub.submit("writer")
        failed = await hub.submit("writer", {"fail": True})
        timed_out = await hub.submit("writer", {"seconds": 30}, job_timeout=0.3, max_attempts=1)
        for job_id in (done, failed, timed_out):
            await hub.wait(job_id)
        cancelled = await hub.submit("writer", {"seconds": 30})
        await until_running(hub, cancelled)
        await hub.cancel(cancelled)
        assert (await hub.wait(cancelled))["status"] == "cancelled"
        left_running = await hub.submit("writer", {"seconds": 30})
        await until_running(hub, left_running)
    # Leaving the block handed the running job back at once (drain_timeout_s=60 would
    # have let it run its 30 s).
    outcomes = {job_id: outcome for job_id, (outcome, _) in recorder.finished.items()}
    assert outcomes == {
        done: "completed",
        failed: "failed",
        timed_out: "timed_out",
        cancelled: "cancelled",
        left_running: "released",
    }
    assert set(outcomes.values()) <= set(get_args(Outcome))
    assert writer.interrupted == [timed_out, cancelled, left_running]
    assert sorted(recorder.started) == sorted(outcomes)


def test_every_outcome_is_documented() -> None:
    values = get_args(Outcome)
    assert set(values) == {"completed", "failed", "cancelled", "timed_out", "lost", "released"}
    hooks = (DOCS / "hooks.md").read_text()
    section = hooks[hooks.index("## `job_finished`") :]
    section = section[: section.index("\n## ", 1)]
    for value in values:
        assert f"`{value}`" in section, value
        assert value in (hookspecs.job_finished.__doc__ or ""), value


def test_connector_capabilities_have_no_unread_field() -> None:
    with pytest.raises(ValidationError, match="features"):
        ConnectorCapabilities.model_validate({"services": ["s"], "features": ["batch"]})


# -- the testing helper ----------------------------------------------------------------------


@pytest.mark.slow
async def test_connector_hub_takes_broker_settings() -> None:
    """Quick retries for a plugin's retry test: the broker's settings reach the hub."""
    async with connector_hub(Writer(), broker={"retry_base_s": 0, "max_attempts": 4}) as hub:
        job = await hub.run("writer", {"fail_first": True})
        assert (job["status"], job["attempt"], job["max_attempts"]) == ("completed", 2, 4)


@pytest.mark.slow
async def test_connector_hub_runs_the_connectors_a_plugin_registers() -> None:
    class Plugin:
        @hookimpl
        def register_connectors(self, register: Any) -> None:
            register(Writer)

    async with connector_hub(plugins=[Plugin()]) as hub:
        assert (await hub.run("writer"))["status"] == "completed"


async def test_fake_context_records_what_a_connector_did() -> None:
    ctx = fake_context("writer", {"seconds": 0})
    assert await Writer().run(ctx.job, ctx) == {"attempt": 1}
    assert ctx.files == {"out.txt": b"written"}
    assert [o.name for o in ctx.outputs] == ["out.txt"] and not ctx.cancelled.is_set()
    await ctx.progress(0, "started")
    await ctx.progress(50)
    assert [(r.percent, r.message) for r in ctx.reports] == [(0, "started"), (50, "")]


# -- connector health -------------------------------------------------------------------------


class Flaky(Connector):
    """A connector whose service is up or down as the test says; its job waits for `go`."""

    name = "flaky"

    def __init__(self) -> None:
        super().__init__()
        self.up = False
        self.raises = False
        self.go = asyncio.Event()

    async def health(self) -> Health:
        if self.raises:
            raise RuntimeError("the health probe broke")
        return Health(ok=self.up, detail="up" if self.up else "service unreachable")

    async def run(self, job: Job, ctx: JobContext) -> Any:
        await self.go.wait()
        return {"ran": True}


async def offered(hub: TestHub) -> list[str]:
    [worker] = (await hub.http.get("/api/workers")).json()
    return list(worker["capabilities"]["services"])


@pytest.mark.slow
async def test_a_connector_that_is_down_is_not_offered_and_a_running_job_is_left_alone() -> None:
    """Down at start: its service is not offered (the job waits, the hub says why); up:
    offered, the job runs; down again (or its health check raising) while a job runs: the
    service is withdrawn, the running job finishes all the same."""
    flaky = Flaky()
    async with connector_hub(flaky, health_interval_s=0.05) as hub:
        assert await offered(hub) == []
        assert hub.worker.health["flaky"] == Health(ok=False, detail="service unreachable")
        job_id = await hub.submit("flaky")
        pending = await hub.wait(job_id, within_s=0.3)
        assert pending["status"] == "pending"
        assert pending["unschedulable"].startswith("no live worker offers service 'flaky'")
        flaky.up = True
        await until_running(hub, job_id)
        assert await offered(hub) == ["flaky"]
        flaky.raises = True  # down while the job runs

        async def withdrawn() -> bool:
            return await offered(hub) == []

        await eventually(withdrawn, what="flaky withdrawn")
        assert "RuntimeError: the health probe broke" in hub.worker.health["flaky"].detail
        flaky.go.set()
        job = await hub.wait(job_id)
        assert job["status"] == "completed" and job["result"] == {"ran": True}


# -- the built-in output store ----------------------------------------------------------------


@pytest.mark.slow
async def test_uploads_and_fetches_reuse_one_connection_to_the_hub(tmp_path: Path) -> None:
    """The worker's uploads (and hub fetches) go over kept-alive connections: through a
    proxy that counts connections, six outputs of three jobs and an input open one
    connection (a new connection per upload cost more than the rest of the upload)."""
    import httpx

    from emp_hub.broker import BrokerSettings
    from emp_hub.embedded import EmbeddedValkey, free_port
    from emp_hub.settings import HubSettings
    from emp_hub.testing import running_hub, running_worker

    class Twice(Connector):
        name = "twice"

        async def run(self, job: Job, ctx: JobContext) -> Any:
            for name in ("a.txt", "b.txt"):
                await ctx.output(name, name.encode(), "text/plain")
            if "input" in job.payload:
                return {"input": (await ctx.fetch(job.payload["input"])).data.decode()}
            return {}

    opened = 0

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal opened
        opened += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", hub_port)
        await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer))

    with EmbeddedValkey(tmp_path / "valkey") as valkey:
        settings = HubSettings(
            redis_url=valkey.url,
            output_dir=tmp_path / "outputs",
            broker=BrokerSettings(namespace="reuse"),
        )
        async with running_hub(settings) as url:
            hub_port = int(url.rsplit(":", 1)[1])
            port = free_port()
            server = await asyncio.start_server(proxy, "127.0.0.1", port)
            async with (
                server,
                running_worker(f"http://127.0.0.1:{port}", [Twice()]),
                httpx.AsyncClient(base_url=url) as http,
            ):
                before = opened  # the WebSocket, and running_worker's wait for it

                async def completed(job_id: str) -> dict[str, Any] | None:
                    job: dict[str, Any] = (await http.get(f"/api/jobs/{job_id}")).json()
                    return job if job["status"] == "completed" else None

                jobs: list[dict[str, Any]] = []
                for n in range(3):
                    payload = {"input": jobs[0]["result"]["outputs"][0]} if n == 2 else {}
                    body = {"job_type": "twice", "payload": payload}
                    job_id = (await http.post("/api/jobs", json=body)).json()["job_id"]
                    jobs.append(await eventually(partial(completed, job_id), what=f"{job_id} done"))
                assert [len(j["result"]["outputs"]) for j in jobs] == [2, 2, 2]
                assert jobs[2]["result"]["input"] == "a.txt"
                assert opened - before == 1
