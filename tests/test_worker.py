"""The worker's parts, in process: settings, plugins, progress throttling, and the runtime
against the real hub app (cancel, timeout, signals, capability changes)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis.asyncio

from emp_hub.broker import BrokerSettings
from emp_hub.settings import HubSettings
from emp_hub.testing import TestHub, running_hub, running_worker
from emp_protocol.hub_messages import CancelJob
from emp_protocol.messages import CompleteJob, RequestJob, UpdateJobProgress, WorkerHeartbeat
from emp_worker import hookimpl
from emp_worker import worker as worker_module
from emp_worker.connector import Connector, Job, JobContext
from emp_worker.plugins import PluginError, Plugins
from emp_worker.settings import WorkerSettings
from emp_worker.testing import eventually, fake_context
from emp_worker.worker import WorkerRefused

pytestmark = pytest.mark.worker


# -- settings -------------------------------------------------------------------------------


def test_original_worker_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_ID", "legacy-7")
    monkeypatch.setenv("WORKER_CONNECTORS", "simulation, comfyui")
    monkeypatch.setenv("WORKER_REDIS_WS_URL", "wss://hub.example.com/")
    monkeypatch.setenv("WORKER_WEBSOCKET_AUTH_TOKEN", "secret")
    monkeypatch.setenv("WORKER_HEARTBEAT_INTERVAL", "7")
    settings = WorkerSettings()
    assert (settings.worker_id, settings.connectors, settings.heartbeat_s) == (
        "legacy-7",
        ["simulation", "comfyui"],
        7,
    )
    assert settings.hub_url == "wss://hub.example.com"
    assert settings.http_url == "https://hub.example.com"
    assert settings.token is not None and settings.token.get_secret_value() == "secret"


def test_seconds_end_in_s_and_the_names_before_still_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every setting in seconds is EMP_..._S (as on the hub); the names before the rename
    work in the environment and in the TOML file, and the new name wins."""
    monkeypatch.setenv("EMP_DRAIN_TIMEOUT", "5")
    monkeypatch.setenv("EMP_RECONNECT_MAX", "9")
    monkeypatch.setenv("EMP_RECONNECT_MAX_S", "3")
    config = tmp_path / "worker.toml"
    config.write_text("progress_interval = 2\nhealth_interval_s = 4\n")
    monkeypatch.setattr(WorkerSettings, "config_file", config)
    settings = WorkerSettings()
    assert (settings.drain_timeout_s, settings.reconnect_max_s) == (5, 3)
    assert (settings.progress_interval_s, settings.health_interval_s) == (2, 4)
    seconds = [name for name in WorkerSettings.model_fields if name.endswith("_s")]
    for name in seconds:
        alias = WorkerSettings.model_fields[name].validation_alias
        assert alias is not None and f"EMP_{name.upper()}" in alias.choices, name  # type: ignore[union-attr]


def test_original_host_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_REDIS_API_HOST", "10.0.0.5")
    monkeypatch.setenv("WORKER_REDIS_API_PORT", "9000")
    monkeypatch.setenv("WORKER_USE_SSL", "true")
    assert WorkerSettings().hub_url == "wss://10.0.0.5:9000"


def test_toml_file_under_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('hub_url = "http://hub:8001"\nregion = "eu"\ntags = ["a", "b"]\n')
    monkeypatch.setenv("EMP_REGION", "us")
    monkeypatch.setattr(WorkerSettings, "config_file", config)
    settings = WorkerSettings()
    assert (settings.hub_url, settings.region, settings.tags) == ("ws://hub:8001", "us", ["a", "b"])


def test_default_worker_id_from_host_and_gpu_index() -> None:
    settings = WorkerSettings(gpu_index=3)
    assert settings.effective_worker_id(has_gpu=True).endswith("-gpu3")
    assert settings.effective_worker_id(has_gpu=False).endswith("-cpu")
    assert WorkerSettings(worker_id="w").effective_worker_id(has_gpu=True) == "w"


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="hub_url"):
        WorkerSettings(hub_url="ftp://nowhere")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EMP_CUSTOMERS_ALLOWED", "acme, bad name!"),
        ("EMP_CUSTOMERS_DENIED", "-x"),
        ("EMP_TAGS", "gpu,a b"),
        ("EMP_REGION", "eu west"),
    ],
)
def test_names_the_hub_would_refuse_are_refused_naming_the_variable(
    variable: str, value: str, tmp_path: Path
) -> None:
    """Customer names, tags and the region are names to the hub (letters, digits, `._:/@+-`):
    a worker with another one says which variable at once, instead of a traceback later
    (`emp-worker doctor` printed one)."""
    env = {**os.environ, variable: value, "EMP_PLUGIN_DIR": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "emp_worker.cli", "doctor", "--connectors", "simulation"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert f"invalid worker settings: {variable}" in run.stderr, run.stderr


# -- plugins --------------------------------------------------------------------------------


class Named(Connector):
    name = "twin"


def plugin_module(cls: type[Connector]) -> Any:
    @hookimpl
    def register_connectors(register: Any) -> None:
        register(cls)

    return SimpleNamespace(register_connectors=register_connectors)


def test_two_connectors_with_one_name_are_an_error() -> None:
    plugins = Plugins()
    plugins.register_builtin(plugin_module(Named), "dist-one")
    with pytest.raises(PluginError, match="'twin': from dist-one and from dist-two"):
        plugins.register_builtin(plugin_module(type("Other", (Named,), {})), "dist-two")


def test_load_plugins_empty_loads_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMP_LOAD_PLUGINS", "")
    plugins = Plugins()
    plugins.load()
    assert plugins.connectors == {}
    assert {i.name: i.status for i in plugins.infos}["emp-connector-simulation"] == "disabled"


def test_disable_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMP_DISABLE_PLUGINS", "emp_connector_simulation")
    plugins = Plugins()
    plugins.load()
    assert "simulation" not in plugins.connectors


async def test_progress_is_throttled_and_the_latest_report_follows() -> None:
    """The first report goes at once; those within the interval after it are held, and
    only the latest of them is sent when the interval is up."""
    ctx = fake_context(progress_interval_s=0.2)
    for percent in (0, 10, 20):
        await ctx.progress(percent, f"at {percent}")
    assert [r.percent for r in ctx.reports] == [0]
    await asyncio.sleep(0.3)
    assert [(r.percent, r.message) for r in ctx.reports] == [(0, "at 0"), (20, "at 20")]
    await ctx.progress(30)  # within the interval of the one just sent: held
    await ctx.progress(100)
    assert [r.percent for r in ctx.reports] == [0, 20]
    await asyncio.sleep(0.3)
    assert [r.percent for r in ctx.reports] == [0, 20, 100]


async def test_a_held_progress_report_is_dropped_when_the_job_ends() -> None:
    """A job that reports 100% and ends within the interval: its result says 100%, so the
    held report is not sent after it (nor any later one)."""
    ctx = fake_context(progress_interval_s=0.2)
    await ctx.progress(0, "started", "started")
    await ctx.progress(100, "done")
    ctx.end()
    await asyncio.sleep(0.3)
    await ctx.progress(50)
    assert [(r.percent, r.stage) for r in ctx.reports] == [(0, "started")]


def test_a_hub_message_the_worker_cannot_read_is_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A newer hub's message type is skipped quietly, an invalid message with a warning;
    neither ends the connection (the old code failed on a job_assigned without a field)."""
    caplog.set_level(logging.DEBUG, "emp_worker")
    assert worker_module.read_hub_message('{"type": "launch_rockets"}') is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert worker_module.read_hub_message('{"type": "job_assigned", "job_id": "j"}') is None
    assert worker_module.read_hub_message("{not json") is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "lease_token" in warnings[0]
    cancel = worker_module.read_hub_message('{"type": "cancel_job", "job_id": "j", "reason": "r"}')
    assert isinstance(cancel, CancelJob) and cancel.job_id == "j"


# -- the runtime against the hub --------------------------------------------------------------


class Sleepy(Connector):
    """Sleeps as long as the payload says; records what happened."""

    name = "sleepy"

    def __init__(self) -> None:
        super().__init__()
        self.cancelled: list[str] = []
        self.saw_cancel_event: list[str] = []

    async def run(self, job: Job, ctx: JobContext) -> Any:
        try:
            await asyncio.sleep(float(job.payload.get("seconds", 0)))
        finally:
            if ctx.cancelled.is_set():
                self.saw_cancel_event.append(job.id)
        return {"slept": job.payload.get("seconds", 0)}

    async def cancel(self, job: Job) -> None:
        self.cancelled.append(job.id)


def test_a_stopped_worker_asks_for_nothing_when_a_job_ends() -> None:
    """Draining (or drained by an admin), a worker's request after a job ends asks for no
    slot and no prefetch (it asked for a prefetch of its whole capacity: the hub claimed a
    job for a worker about to exit, seen as a job handed back with attempt 1)."""
    settings = WorkerSettings(hub_url="ws://127.0.0.1:1", worker_id="w", prefetch=8)
    worker = worker_module.Worker(settings, Plugins(), [Sleepy()])
    worker.pace = 0.01  # its jobs are short: it would prefetch

    def asked(request: RequestJob | None) -> tuple[int, int, int | None] | None:
        return None if request is None else (request.slots, request.prefetch, request.held)

    assert asked(worker.work_request()) == (1, 8, 0)
    for stop in ("draining", "paused"):
        setattr(worker, stop, True)
        assert worker.work_request(top_up=True) is None
        assert asked(worker.work_request()) == (0, 0, 0)
        setattr(worker, stop, False)


@pytest.fixture
async def hub_url(
    redis_url: str, namespace: str, redis_client: redis.asyncio.Redis, tmp_path: Path
) -> AsyncIterator[str]:
    settings = HubSettings(
        redis_url=redis_url,
        output_dir=tmp_path / "outputs",
        maintenance_interval_s=0.2,
        broker=BrokerSettings(namespace=namespace, lease_s=5, live_cache_s=0),
    )
    async with running_hub(settings) as url:
        yield url


async def wait_status(hub: TestHub, job_id: str, status: str) -> dict[str, Any]:
    """Until the job has this status; the job."""

    async def job_if_there() -> dict[str, Any] | None:
        job: dict[str, Any] = (await hub.http.get(f"/api/jobs/{job_id}")).json()
        return job if job["status"] == status else None

    return await eventually(job_if_there, every_s=0.05, what=f"{job_id} {status}")


@pytest.mark.slow
async def test_cancel_interrupts_the_connector(hub_url: str) -> None:
    sleepy = Sleepy()
    async with running_worker(hub_url, [sleepy]) as worker:
        hub = TestHub(hub_url, worker)
        job_id = await hub.submit("sleepy", {"seconds": 30})
        await wait_status(hub, job_id, "active")
        await hub.http.post(f"/api/jobs/{job_id}/cancel", json={"reason": "stop"})
        await eventually(lambda: sleepy.saw_cancel_event, within_s=5, what="the cancel event")
        assert sleepy.cancelled == [job_id] and sleepy.saw_cancel_event == [job_id]
        assert worker.stats.cancelled == 1 and not worker.running
        await hub.http.aclose()


@pytest.mark.slow
async def test_timeout_interrupts_the_connector_and_fails_the_attempt(hub_url: str) -> None:
    sleepy = Sleepy()
    async with running_worker(hub_url, [sleepy]) as worker:
        hub = TestHub(hub_url, worker)
        job_id = await hub.submit("sleepy", {"seconds": 30}, job_timeout=0.5, max_attempts=1)
        job = await hub.wait(job_id)
        assert (job["status"], job["error"]) == ("failed", "timed out after 0.5 s")
        assert sleepy.cancelled == [job_id] and sleepy.saw_cancel_event == [job_id]
        await hub.http.aclose()


@pytest.mark.slow
async def test_a_second_signal_hands_back_at_once(
    hub_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "SAME_SIGNAL_S", 0.05)
    async with running_worker(hub_url, [Sleepy()], drain_timeout_s=60) as worker:
        hub = TestHub(hub_url, worker)
        job_id = await hub.submit("sleepy", {"seconds": 30})
        await wait_status(hub, job_id, "active")
        worker.on_signal()
        worker.on_signal()  # the same stop twice at once: still draining
        await asyncio.sleep(0.3)
        assert job_id in worker.running
        worker.on_signal()  # a real second signal
        job = await wait_status(hub, job_id, "pending")
        assert (job["failures"], job["orphans"]) == (0, 0)
        await asyncio.wait_for(worker.done.wait(), 10)

        async def no_workers() -> bool:  # it said goodbye holding nothing: no longer live
            return bool((await hub.http.get("/api/workers")).json() == [])

        await eventually(no_workers, within_s=5, what="no live worker")
        await hub.http.aclose()


async def test_a_result_makes_its_queued_progress_report_moot(hub_url: str) -> None:
    """A job that ends before its "started" report has left the worker sends its result
    alone (the hub stamps started_at with the result); a longer job's report goes first."""
    async with running_worker(hub_url, [Sleepy()]) as worker:
        hub = TestHub(hub_url, worker)
        kinds = {}
        for seconds in (0, 0.3):
            job = await hub.run("sleepy", {"seconds": seconds})
            assert job["status"] == "completed" and job["started_at"] is not None
            stream = await hub.http.get(f"/api/jobs/{job['job_id']}/events?follow=false")
            events = [
                json.loads(line[5:])
                for line in stream.text.splitlines()
                if line.startswith("data:")
            ]
            kinds[seconds] = [e["type"] for e in events]
        assert "progress" not in kinds[0] and kinds[0][-1] == "status", kinds
        assert kinds[0.3].count("progress") == 1, kinds
        await hub.http.aclose()


async def test_a_newer_message_makes_the_queued_ones_it_replaces_moot(hub_url: str) -> None:
    """Waiting for the next frame: a newer request_job replaces the one queued, a job's
    result its queued progress reports (not another job's); their senders are told they
    went (the newer message says it)."""
    async with running_worker(hub_url, [Sleepy()]) as worker:
        assert worker.batching
        await worker.send(WorkerHeartbeat(worker_id=worker.worker_id))  # the queue is empty
        first = worker._post(RequestJob(slots=1))
        progress = worker._post(UpdateJobProgress(job_id="j1", progress=0))
        other = worker._post(UpdateJobProgress(job_id="j2", progress=0))
        second = worker._post(RequestJob(slots=0))
        result = worker._post(CompleteJob(job_id="j1", result=None))
        assert first.done() and progress.done() and first.result() and progress.result()
        waiting = worker.pending_messages()
        assert [type(m).__name__ for m in waiting] == [
            "UpdateJobProgress",
            "RequestJob",
            "CompleteJob",
        ]
        assert isinstance(waiting[1], RequestJob) and waiting[1].slots == 0
        for sent in (other, second, result):
            assert await asyncio.wait_for(sent, 2) is True
        assert worker.pending_messages() == []
        assert worker._queued_progress == {} and worker._queued_request is None


async def test_a_sender_that_gave_up_leaves_the_frame_to_the_others(hub_url: str) -> None:
    """A sender cancelled while its message waits for the next frame (a job stopped in the
    middle of a report) does not stop the frame: the messages after it go, and their
    senders are told (the flusher died on the cancelled one's result, and later senders
    waited forever)."""
    async with running_worker(hub_url, [Sleepy()]) as worker:
        assert worker.batching
        first = asyncio.create_task(worker.send(WorkerHeartbeat(worker_id=worker.worker_id)))
        second = asyncio.create_task(worker.send(WorkerHeartbeat(worker_id=worker.worker_id)))
        await asyncio.sleep(0)  # both wait for the frame
        first.cancel()
        assert await asyncio.wait_for(second, 2) is True
        assert await asyncio.wait_for(worker.send(RequestJob(slots=0)), 2) is True


async def test_capability_changes_reach_the_hub(hub_url: str) -> None:
    tags = ["blue"]

    @hookimpl
    def worker_capabilities() -> dict[str, Any]:
        return {"tags": list(tags)}

    plugins = Plugins()
    plugins.register_builtin(SimpleNamespace(worker_capabilities=worker_capabilities), "colour")
    async with (
        running_worker(hub_url, [Sleepy()], plugins=plugins, capabilities_refresh_s=0.1) as worker,
        httpx.AsyncClient(base_url=hub_url) as http,
    ):

        async def hub_tags() -> list[str]:
            [w] = (await http.get("/api/workers")).json()
            return list(w["capabilities"]["tags"])

        assert await hub_tags() == ["blue"]
        tags[0] = "green"

        async def green() -> bool:
            return await hub_tags() == ["green"]

        await eventually(green, within_s=5, what="the tag green")
        assert worker.worker_id == "test-worker"


class Faulty:
    """A plugin whose every hook raises."""

    @hookimpl
    def job_started(self, context: JobContext) -> None:
        raise RuntimeError("plugin bug")

    @hookimpl
    def job_finished(self, context: JobContext, outcome: str, error: str | None) -> None:
        raise RuntimeError("plugin bug")

    @hookimpl
    def worker_capabilities(self) -> dict[str, Any]:
        raise RuntimeError("plugin bug")


async def test_a_plugin_hook_that_raises_leaves_the_job_and_other_plugins_alone(
    hub_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, str]] = []

    @hookimpl
    def job_started(context: JobContext) -> None:
        seen.append(("started", context.job.id))

    @hookimpl
    def job_finished(context: JobContext, outcome: str, error: str | None) -> None:
        seen.append((outcome, context.job.id))

    @hookimpl
    def worker_capabilities() -> dict[str, Any]:
        return {"tags": ["blue"]}

    plugins = Plugins()
    plugins.register_builtin(
        SimpleNamespace(
            job_started=job_started,
            job_finished=job_finished,
            worker_capabilities=worker_capabilities,
        ),
        "emp-counting",
    )
    plugins.register_builtin(Faulty(), "emp-faulty")  # registered last: called first
    async with running_worker(hub_url, [Sleepy()], plugins=plugins) as worker:
        hub = TestHub(hub_url, worker)
        job = await hub.run("sleepy", {"seconds": 0})
        await hub.http.aclose()
    assert job["status"] == "completed", job
    assert seen == [("started", job["job_id"]), ("completed", job["job_id"])]
    assert "blue" in worker.capabilities().tags
    for hook in ("job_started", "job_finished", "worker_capabilities"):
        assert f"plugin emp-faulty: {hook} raised RuntimeError: plugin bug" in caplog.text
    assert "raise RuntimeError" in caplog.text  # with its traceback


async def test_a_worker_of_another_protocol_version_is_refused(
    hub_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "PROTOCOL_VERSION", 2)
    with pytest.raises(WorkerRefused, match="speaks protocol 2; this hub speaks protocol 1"):
        async with running_worker(hub_url, [Sleepy()]):
            pass


def test_an_async_hook_other_than_store_output_is_reported_not_silently_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    @hookimpl
    async def job_started(context: JobContext) -> None:
        ran.append(context.job.id)  # pragma: no cover - an async job_started never runs

    plugins = Plugins()
    plugins.register_builtin(SimpleNamespace(job_started=job_started), "emp-async")
    assert plugins.call("job_started", context=fake_context()) == []
    assert "plugin emp-async: job_started raised PluginError: job_started is async" in caplog.text
    assert ran == []
