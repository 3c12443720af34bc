"""The websocket connector on a real hub (emp_hub.testing) against a fake WebSocket service."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import emp_connector_websocket
import pytest
from emp_connector_websocket import (
    WebSocketConnector,
    WebSocketSettings,
    at_path,
    matches,
    render,
)
from fake_ws_service import fake_ws_service
from websockets.asyncio.server import ServerConnection, serve

from emp_hub.testing import connector_hub
from emp_worker.cli import doctor
from emp_worker.connector import Job, JobFailed
from emp_worker.settings import WorkerSettings
from emp_worker.testing import fake_context


def connector(url: str, **values: Any) -> WebSocketConnector:
    """A connector on the fake with quick reconnects."""
    settings = {"url": url, "reconnect_delay": 0.01, "reconnect_attempts": 2, **values}
    return WebSocketConnector(WebSocketSettings.model_validate(settings))


async def progress_of(hub: Any, job_id: str) -> list[float]:
    """The job's progress as the hub showed it, polled until the job ends."""
    seen: list[float] = []
    while True:
        job = await hub.job(job_id)
        seen.append(job["progress"])
        if job["status"] in {"completed", "failed", "cancelled"}:
            return seen
        await asyncio.sleep(0.005)


@pytest.mark.slow
async def test_runs_a_job_with_monotonic_progress_to_100() -> None:
    async with (
        fake_ws_service() as fake,
        connector_hub(connector(fake.url), progress_interval_s=0) as hub,
    ):
        job_id = await hub.submit("websocket", {"prompt": "a fox", "steps": 5, "step_s": 0.05})
        seen = await progress_of(hub, job_id)
        job = await hub.job(job_id)
        assert job["status"] == "completed", job
        # The result frame of job "other" was ignored.
        assert job["result"] == {
            "echo": {"prompt": "a fox", "steps": 5, "step_s": 0.05},
            "steps": 5,
        }
        assert seen == sorted(seen) and seen[-1] == 100
        assert len(set(seen)) > 2  # intermediate reports reached the hub
        assert fake.submissions[job_id] == 1


@pytest.mark.slow
async def test_service_error_fails_the_job_retryable_or_not() -> None:
    async with (
        fake_ws_service() as fake,
        connector_hub(connector(fake.url), broker={"retry_base_s": 0}) as hub,
    ):
        fatal = await hub.run("websocket", {"fail": "bad prompt"}, max_attempts=3)
        assert fatal["status"] == "failed" and "bad prompt" in fatal["error"]
        assert fake.submissions[fatal["job_id"]] == 1  # not retried
    ctx = fake_context("websocket", {"fail": "gpu busy", "retryable": True})
    async with fake_ws_service() as fake:
        with pytest.raises(JobFailed) as failed:
            await connector(fake.url, error_retryable_path="retryable").run(ctx.job, ctx)
    assert failed.value.retryable is True and "gpu busy" in str(failed.value)


@pytest.mark.slow
async def test_a_drop_mid_job_reconnects_and_resends_the_job() -> None:
    async with fake_ws_service() as fake, connector_hub(connector(fake.url)) as hub:
        job = await hub.run("websocket", {"drop": 1})
        assert job["status"] == "completed", job
        assert fake.submissions[job["job_id"]] == 2


@pytest.mark.slow
async def test_service_dying_mid_job_fails_retryable() -> None:
    async with (
        fake_ws_service() as fake,
        connector_hub(connector(fake.url), broker={"retry_base_s": 0}) as hub,
    ):
        job = await hub.run("websocket", {"drop": "always"}, max_attempts=2)
        assert job["status"] == "failed" and "after 2 reconnects" in job["error"], job
        assert job["attempt"] == 2  # the hub retried it: the failure was retryable
        assert fake.submissions[job["job_id"]] == 6  # 1 + 2 reconnects, twice

    # The whole service going away mid-job: nothing hangs.
    async with fake_ws_service() as fake:
        ctx = fake_context("websocket", {"hang": True})
        run = asyncio.create_task(connector(fake.url).run(ctx.job, ctx))
        await asyncio.wait_for(fake.started.wait(), 10)
    with pytest.raises(JobFailed) as failed:
        await asyncio.wait_for(run, 10)
    assert failed.value.retryable is True


@pytest.mark.slow
async def test_service_down_at_start_the_job_waits_until_it_is_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The service down: health and doctor say so, the worker does not offer `websocket`
    (the job stays pending, the hub says why); once the service answers, the job runs."""
    async with fake_ws_service() as fake:
        url = fake.url
    port = int(url.rsplit(":", 1)[1])
    down = connector(url, connect_timeout=2)
    health = await down.health()
    assert health.ok is False and "cannot connect" in health.detail
    monkeypatch.setenv("EMP_WEBSOCKET_URL", url)
    settings = WorkerSettings(hub_url="ws://127.0.0.1:9", connectors=["websocket"], worker_id="d")
    report, healthy = await doctor(settings)
    entry = report["connectors"]["websocket"]
    assert not healthy and not entry["ok"] and "cannot connect" in entry["detail"]
    assert "its services (websocket) are not offered" in entry["detail"]
    assert "websocket" not in report["capabilities"]["services"]
    async with connector_hub(down, health_interval_s=0.1) as hub:
        job_id = await hub.submit("websocket", {"prompt": "a fox", "steps": 1})
        pending = await hub.wait(job_id, within_s=0.5)
        assert pending["status"] == "pending", pending
        assert "no live worker offers service 'websocket'" in pending["unschedulable"]
        async with fake_ws_service(port=port):
            job = await hub.wait(job_id, within_s=20)
            assert job["status"] == "completed" and job["attempt"] == 1, job
            assert (await down.health()).ok
            report, _ = await doctor(settings)
            assert report["connectors"]["websocket"]["ok"]
            assert "websocket" in report["capabilities"]["services"]


async def test_health_when_up() -> None:
    async with fake_ws_service() as fake:
        assert (await connector(fake.url).health()).ok is True


@pytest.mark.slow
async def test_cancel_sends_the_cancel_frame() -> None:
    cancel = {"type": "cancel", "job_id": "{job_id}"}
    async with (
        fake_ws_service() as fake,
        connector_hub(connector(fake.url, cancel_template=cancel)) as hub,
    ):
        job_id = await hub.submit("websocket", {"hang": True})
        await asyncio.wait_for(fake.started.wait(), 10)
        await hub.cancel(job_id)
        job = await hub.wait(job_id)
        assert job["status"] == "cancelled", job
        await asyncio.wait_for(fake.cancel_seen.wait(), 10)
        assert fake.cancelled == [job_id] and not fake.running


async def test_malformed_frames() -> None:
    async with fake_ws_service() as fake:
        # Non-JSON frames and progress without a number are ignored; the job completes.
        ctx = fake_context("websocket", {"junk": True})
        result = await connector(fake.url).run(ctx.job, ctx)
        assert result["steps"] == 3 and ctx.reports[-1].percent == 100
        # A result frame without the result fails the job, not retryable.
        ctx = fake_context("websocket", {"no_result": True})
        with pytest.raises(JobFailed) as failed:
            await connector(fake.url).run(ctx.job, ctx)
        assert failed.value.retryable is False and "malformed result" in str(failed.value)


async def test_idle_timeout_counts_as_a_drop() -> None:
    async with fake_ws_service() as fake:
        ctx = fake_context("websocket", {"hang": True})
        with pytest.raises(JobFailed) as failed:
            await connector(fake.url, idle_timeout=0.1, reconnect_attempts=1).run(ctx.job, ctx)
        assert "no frame for 0.1 s" in str(failed.value) and failed.value.retryable
        assert fake.submissions[ctx.job.id] == 2


async def test_configured_frame_shapes_and_auth() -> None:
    settings = {
        "job_template": {"op": "run", "meta": {"id": "job:{job_id}"}, "job_id": "{job_id}"},
        "progress_match": "type=progress",
        "progress_path": "progress",
        "progress_scale": 50,
        "auth_token": "s3cret",
    }
    async with fake_ws_service() as fake:
        service = connector(fake.url, **settings)
        # The fake only answers `type: job` frames: this template sends something else,
        # so check the rendering and the auth header instead of a whole job.
        assert service.settings.job_template["op"] == "run"
        await service.health()
    assert fake.headers == ["Bearer s3cret"]
    job = Job(id="j1", service="ws", payload={"a": 1}, attempt=2)
    assert render(settings["job_template"], job) == {
        "op": "run",
        "meta": {"id": "job:j1"},
        "job_id": "j1",
    }
    assert render({"p": "{payload}", "n": "{attempt}/{service}"}, job) == {
        "p": {"a": 1},
        "n": "2/ws",
    }


def test_paths_and_matches() -> None:
    frame = {"type": "progress", "data": {"percent": 40, "items": [{"ok": True}]}}
    assert at_path(frame, "data.percent") == 40
    assert at_path(frame, "data.items.0.ok") is True
    assert at_path(frame, "") is frame
    assert matches(frame, "type=progress") and matches(frame, "data.items.0.ok=true")
    assert not matches(frame, "type=result") and not matches(frame, "missing=x")
    assert not matches(frame, "")


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMP_WEBSOCKET_URL", "ws://svc:9000/ws")
    monkeypatch.setenv("WORKER_CONNECTION_TIMEOUT", "7.5")
    monkeypatch.setenv("EMP_WEBSOCKET_SERVICES", "tts,asr")
    monkeypatch.setenv("EMP_WEBSOCKET_CANCEL_TEMPLATE", '{"type": "stop", "id": "{job_id}"}')
    service = WebSocketConnector()
    assert service.settings.url == "ws://svc:9000/ws"
    assert service.settings.connect_timeout == 7.5
    assert service.capabilities().services == {"tts", "asr"}
    assert service.settings.cancel_template == {"type": "stop", "id": "{job_id}"}
    with pytest.raises(ValueError, match="path=value"):
        WebSocketSettings.model_validate({"result_match": "done"})


async def test_scaled_progress_on_its_own() -> None:
    async with fake_ws_service() as fake:
        ctx = fake_context("websocket", {"steps": 3})
        await connector(fake.url, progress_scale=50).run(ctx.job, ctx)
    percents = [r.percent for r in ctx.reports]
    # 25, 50, 75 of 50 -> 50, 99 (capped below 100 until the result), 99, then 100.
    assert percents == [50, 99, 99, 100]


@pytest.mark.slow
async def test_a_timed_out_job_sends_the_cancel_frame() -> None:
    cancel = {"type": "cancel", "job_id": "{job_id}"}
    async with (
        fake_ws_service() as fake,
        connector_hub(connector(fake.url, cancel_template=cancel)) as hub,
    ):
        job = await hub.run("websocket", {"hang": True}, job_timeout=0.5, max_attempts=1)
        assert job["status"] == "failed" and "timed out" in job["error"], job
        await asyncio.wait_for(fake.cancel_seen.wait(), 10)
        assert fake.cancelled == [job["job_id"]]


@pytest.mark.slow
async def test_two_jobs_at_once() -> None:
    async with (
        fake_ws_service() as fake,
        connector_hub(connector(fake.url, concurrency=2)) as hub,
    ):
        ids = [await hub.submit("websocket", {"steps": 4, "step_s": 0.1}) for _ in range(2)]
        jobs = [await hub.wait(job_id) for job_id in ids]
        assert [job["status"] for job in jobs] == ["completed", "completed"]
        # They overlapped: each started before the other ended.
        assert jobs[0]["started_at"] < jobs[1]["completed_at"]
        assert jobs[1]["started_at"] < jobs[0]["completed_at"]
        assert sorted(fake.completed) == sorted(ids)


async def tts_service(conn: ServerConnection) -> None:
    """The service of docs/connectors/websocket.md's example."""
    async for raw in conn:
        frame = json.loads(raw)
        job_id, text = frame["id"], frame["args"]["text"]
        if text == "fail":
            failed = {"event": "failed", "id": job_id, "reason": "no voice", "transient": True}
            await conn.send(json.dumps(failed))
            continue
        for fraction in (0.25, 0.5, 0.75):
            progress = {"event": "progress", "id": job_id, "data": {"fraction": fraction}}
            await conn.send(json.dumps(progress))
        done = {"event": "done", "id": job_id, "data": {"audio_url": f"https://x/{text}.wav"}}
        await conn.send(json.dumps(done))


@pytest.mark.slow
async def test_the_documented_example() -> None:
    example = {
        "services": "tts",
        "job_template": {"op": "synthesize", "id": "{job_id}", "args": "{payload}"},
        "job_id_path": "id",
        "progress_match": "event=progress",
        "progress_path": "data.fraction",
        "progress_scale": 1,
        "result_match": "event=done",
        "result_path": "data",
        "error_match": "event=failed",
        "error_path": "reason",
        "error_retryable_path": "transient",
    }
    async with serve(tts_service, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        tts = connector(f"ws://127.0.0.1:{port}", **example)
        async with connector_hub(tts) as hub:
            job = await hub.run("tts", {"text": "hello", "voice": "alto"})
            assert job["status"] == "completed", job
            assert job["result"] == {"audio_url": "https://x/hello.wav"}
        ctx = fake_context("tts", {"text": "fail"})
        with pytest.raises(JobFailed) as failed:
            await tts.run(ctx.job, ctx)
        assert failed.value.retryable is True and "no voice" in str(failed.value)
        ctx = fake_context("tts", {"text": "hi"})
        await tts.run(ctx.job, ctx)
        assert [r.percent for r in ctx.reports] == [25, 50, 75, 100]


@pytest.mark.slow
async def test_loaded_as_a_plugin_with_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with fake_ws_service() as fake:
        monkeypatch.setenv("EMP_WEBSOCKET_URL", fake.url)
        monkeypatch.setenv("EMP_WEBSOCKET_SERVICES", "echo")
        async with connector_hub(plugins=[emp_connector_websocket]) as hub:
            job = await hub.run("echo", {"text": "hi"})
            assert job["status"] == "completed", job
            assert job["result"]["echo"] == {"text": "hi"}
