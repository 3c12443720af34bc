"""The REST connector against a fake REST service, through a real hub and worker and alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from emp_connector_rest import Instance, RestConnector, RestInstance, RestSettings, lookup
from fake_rest import PNG, fake_rest, free_url
from pydantic import ValidationError

from emp_hub.testing import connector_hub
from emp_worker.cli import doctor
from emp_worker.connector import Health, JobFailed
from emp_worker.settings import WorkerSettings
from emp_worker.testing import eventually, fake_context


def instance(name: str = "rest", **values: Any) -> Instance:
    settings = {"retries": 2, "retry_backoff_s": 0.01, "poll_interval": 0.02, **values}
    return Instance(name=name, settings=RestInstance.model_validate(settings))


def connector(*instances: Instance) -> RestConnector:
    return RestConnector(RestSettings(), list(instances))


def async_instance(url: str, name: str = "tasks", **values: Any) -> Instance:
    fields = {
        "base_url": url,
        "submit_endpoint": "/tasks",
        "status_endpoint": "/tasks/{id}",
        "cancel_endpoint": "/tasks/{id}/cancel",
        "id_path": "data.task_id",
        "status_path": "state",
        "progress_path": "pct",
        "result_path": "output",
        "error_path": "problem",
    }
    return instance(name, **{**fields, **values})


@pytest.mark.slow
async def test_sync_json_response_is_the_result() -> None:
    async with fake_rest() as fake:
        rest = connector(instance(base_url=fake.url, endpoint="/echo", api_key="k1"))
        async with connector_hub(rest) as hub:
            job = await hub.run("rest", {"prompt": "a fox"})
            assert job["status"] == "completed", job
            assert job["result"]["echo"] == {"prompt": "a fox"}
            assert job["result"]["auth"] == "Bearer k1"
            assert job["progress"] == 100
            # The original job type of the sync connector is served too.
            job = await hub.run("rest_sync", {"n": 1})
            assert job["result"]["echo"] == {"n": 1}


async def test_steered_payload_method_path_query_headers_and_result_path() -> None:
    async with fake_rest() as fake:
        rest = connector(
            instance(
                base_url=fake.url,
                api_key="secret",
                auth_header="X-Api-Key",
                auth_scheme="",
                result_path="echo",
            )
        )
        ctx = fake_context(
            "rest",
            {
                "method": "put",
                "path": "/echo",
                "query": {"q": "1"},
                "headers": {"X-Extra": "yes"},
                "body": {"a": [1, 2]},
            },
        )
        assert await rest.run(ctx.job, ctx) == {"a": [1, 2]}
        assert fake.calls == ["PUT /echo"]
        ctx = fake_context("rest", {"path": "/echo", "body": None, "paths": {"result": ""}})
        answer = await rest.run(ctx.job, ctx)
        assert answer["auth"] == "secret" and answer["echo"] is None


@pytest.mark.slow
async def test_binary_response_is_an_output_downloadable_from_the_hub() -> None:
    async with fake_rest() as fake:
        rest = connector(instance(base_url=fake.url, endpoint="/image", method="GET"))
        async with connector_hub(rest) as hub:
            job = await hub.run("rest", {})
            assert job["status"] == "completed", job
            [image] = job["result"]["outputs"]
            assert image["content_type"] == "image/png"
            assert await hub.download(image["url"]) == PNG


async def test_retries_5xx_then_succeeds_or_fails_retryable() -> None:
    async with fake_rest() as fake:
        rest = connector(instance(base_url=fake.url, endpoint="/echo"))
        fake.fail_next = [503, 429]
        ctx = fake_context("rest", {"x": 1})
        assert (await rest.run(ctx.job, ctx))["echo"] == {"x": 1}
        assert fake.calls == ["POST /echo"] * 3
        fake.fail_next = [502, 502, 502]
        with pytest.raises(JobFailed) as failed:
            await rest.run(ctx.job, ctx)
        assert failed.value.retryable and "HTTP 502" in str(failed.value)
        assert "after 3 tries" in str(failed.value)


@pytest.mark.slow
async def test_4xx_fails_not_retryable_with_the_service_error() -> None:
    async with fake_rest() as fake:
        rest = connector(instance(base_url=fake.url, endpoint="/echo"))
        async with connector_hub(rest) as hub:
            fake.fail_next = [422]
            job = await hub.run("rest", {}, max_attempts=3)
            assert job["status"] == "failed" and job["attempt"] == 1, job
            assert "HTTP 422: failing on demand (422)" in job["error"]


async def test_malformed_and_oversized_and_text_responses() -> None:
    async with fake_rest() as fake:
        base = {"base_url": fake.url, "method": "GET"}
        broken = connector(instance(endpoint="/broken", **base))
        ctx = fake_context("rest")
        with pytest.raises(JobFailed, match="not JSON") as failed:
            await broken.run(ctx.job, ctx)
        assert failed.value.retryable is False
        big = connector(instance(endpoint="/big", max_response_bytes=1000, **base))
        with pytest.raises(JobFailed, match="over 1000 bytes"):
            await big.run(ctx.job, ctx)
        text = connector(instance(endpoint="/text", **base))
        assert await text.run(ctx.job, ctx) == {"text": "hello"}
        empty = connector(instance(base_url=fake.url, endpoint="/empty", method="DELETE"))
        assert await empty.run(ctx.job, ctx) == {"status_code": 204}


@pytest.mark.slow
async def test_timeout_is_a_retryable_failure() -> None:
    async with fake_rest() as fake:
        rest = connector(instance(base_url=fake.url, endpoint="/slow?s=2", timeout=0.1, retries=1))
        ctx = fake_context("rest")
        with pytest.raises(JobFailed, match="ReadTimeout") as failed:
            await rest.run(ctx.job, ctx)
        assert failed.value.retryable


@pytest.mark.slow
async def test_async_submit_poll_result_with_monotonic_progress() -> None:
    async with fake_rest(step=20) as fake:
        rest = connector(async_instance(fake.url))
        async with connector_hub(rest, progress_interval_s=0) as hub:
            job_id = await hub.submit("tasks", {"prompt": "a fox"})
            seen: list[float] = []
            while (job := await hub.job(job_id))["status"] not in {"completed", "failed"}:
                seen.append(job["progress"] or 0)
                await asyncio.sleep(0.01)
            assert job["status"] == "completed", job
            assert job["result"] == {"answer": {"prompt": "a fox"}}
            assert job["progress"] == 100
            assert seen == sorted(seen) and len(set(seen)) > 2


async def test_async_paths_overridden_per_job_and_a_result_endpoint() -> None:
    async with fake_rest(step=50) as fake:
        rest = connector(
            async_instance(fake.url, id_path="wrong", result_endpoint="/tasks/{id}/result")
        )
        ctx = fake_context("tasks", {"body": {"p": 1}, "paths": {"id": "data.task_id"}})
        assert await rest.run(ctx.job, ctx) == {"answer": {"p": 1}, "id": "t1"}
        assert [r.percent for r in ctx.reports] == [0, 50, 100]
        ctx = fake_context("tasks", {"p": 2})  # the instance's wrong id path
        with pytest.raises(JobFailed, match="no job id at 'wrong'") as failed:
            await rest.run(ctx.job, ctx)
        assert failed.value.retryable is False


async def test_async_progress_scaled_by_progress_max() -> None:
    async with fake_rest(step=25) as fake:  # pct 25, 50, 75, then done
        rest = connector(async_instance(fake.url, progress_max=200))
        ctx = fake_context("tasks", {"p": 1})
        assert await rest.run(ctx.job, ctx) == {"answer": {"p": 1}}
        assert [r.percent for r in ctx.reports] == [0, 12.5, 25, 37.5, 100]


async def test_async_failed_status_fails_with_the_service_error() -> None:
    async with fake_rest(step=25, fail_task=True) as fake:
        rest = connector(async_instance(fake.url))
        ctx = fake_context("tasks", {"p": 1})
        with pytest.raises(JobFailed, match="t1 failed: the model exploded") as failed:
            await rest.run(ctx.job, ctx)
        assert failed.value.retryable is False


async def test_async_timeout_is_retryable() -> None:
    async with fake_rest(step=1) as fake:
        rest = connector(async_instance(fake.url, async_timeout=0.1))
        ctx = fake_context("tasks", {})
        with pytest.raises(JobFailed, match=r"not done after 0\.1 s") as failed:
            await rest.run(ctx.job, ctx)
        assert failed.value.retryable


@pytest.mark.slow
async def test_cancel_calls_the_services_cancel_endpoint() -> None:
    async with fake_rest(step=1) as fake:
        rest = connector(async_instance(fake.url))
        async with connector_hub(rest) as hub:
            job_id = await hub.submit("tasks", {"p": 1})
            await eventually(
                lambda: job_id in hub.worker.running and "t1" in fake.tasks,
                within_s=5,
                what="task t1 running",
            )
            await hub.cancel(job_id)
            job = await hub.wait(job_id, within_s=10)
            assert job["status"] == "cancelled", job
            await eventually(
                lambda: "POST /tasks/t1/cancel" in fake.calls, within_s=5, what="the cancel call"
            )
            assert fake.tasks["t1"].state == "cancelled" and rest.remote == {}


@pytest.mark.slow
async def test_service_down_at_start_the_job_waits_until_it_is_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The service down: health and doctor say so, the worker does not offer `rest` (the
    job stays pending, the hub says why); once the service answers, the job runs."""
    url = free_url()
    rest = connector(instance(base_url=url, endpoint="/echo"))
    health = await rest.health()
    assert health.ok is False and "rest: unreachable (ConnectError)" in health.detail
    monkeypatch.setenv("EMP_REST_BASE_URL", url)
    monkeypatch.setenv("EMP_REST_ENDPOINT", "/echo")
    settings = WorkerSettings(hub_url="ws://127.0.0.1:9", connectors=["rest"], worker_id="d")
    report, healthy = await doctor(settings)
    entry = report["connectors"]["rest"]
    assert not healthy and not entry["ok"] and "unreachable" in entry["detail"]
    assert "its services (rest, rest_sync) are not offered" in entry["detail"]
    assert "rest" not in report["capabilities"]["services"]
    async with connector_hub(rest, health_interval_s=0.1) as hub:
        job_id = await hub.submit("rest", {"prompt": "a fox"})
        pending = await hub.wait(job_id, within_s=0.5)
        assert pending["status"] == "pending", pending
        assert "no live worker offers service 'rest'" in pending["unschedulable"]
        async with fake_rest(port=int(url.rsplit(":", 1)[1])):
            job = await hub.wait(job_id, within_s=20)
            assert job["status"] == "completed" and job["attempt"] == 1, job
            assert await rest.health() == Health(ok=True, detail="rest: HTTP 200")
            report, _ = await doctor(settings)
            assert report["connectors"]["rest"]["ok"]
            assert "rest" in report["capabilities"]["services"]


async def test_service_dying_mid_job_fails_retryable_without_hanging() -> None:
    async with fake_rest(step=1) as fake:
        rest = connector(async_instance(fake.url))
        ctx = fake_context("tasks", {})
        run = asyncio.create_task(rest.run(ctx.job, ctx))
        await eventually(
            lambda: "t1" in fake.tasks and fake.tasks["t1"].polls >= 2,
            within_s=5,
            what="two polls of t1",
        )
        await fake.stop()
        with pytest.raises(JobFailed) as failed:
            await asyncio.wait_for(run, 10)
        assert failed.value.retryable and "status:" in str(failed.value)


@pytest.mark.slow
async def test_service_dying_mid_job_through_the_hub_is_retried_then_fails() -> None:
    async with fake_rest(step=1) as fake:
        rest = connector(async_instance(fake.url))
        async with connector_hub(rest, broker={"retry_base_s": 0}) as hub:
            job_id = await hub.submit("tasks", {}, max_attempts=2)
            await eventually(
                lambda: "t1" in fake.tasks and fake.tasks["t1"].polls >= 2,
                within_s=5,
                what="two polls of t1",
            )
            await fake.stop()
            job = await hub.wait(job_id, within_s=30)
            assert (job["status"], job["attempt"], job["failures"]) == ("failed", 2, 2), job
            assert "ConnectError" in job["error"] and hub.worker.running == {}


@pytest.mark.slow
async def test_two_jobs_at_once_with_concurrency_two() -> None:
    async with fake_rest() as fake:
        rest = RestConnector(
            RestSettings(concurrency=2),
            [instance(base_url=fake.url, endpoint="/slow?s=0.5", method="GET")],
        )
        async with connector_hub(rest) as hub:
            ids = [await hub.submit("rest", {}) for _ in range(2)]
            jobs = [await hub.wait(job_id) for job_id in ids]
            assert [j["result"] for j in jobs] == [{"slow": True}] * 2
            assert fake.most_in_flight == 2


@pytest.mark.slow
async def test_named_instances_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    async with fake_rest(step=100) as fake:
        monkeypatch.setenv("EMP_REST_INSTANCES", "echo, tasks")
        monkeypatch.setenv("EMP_REST_ECHO_BASE_URL", fake.url)
        monkeypatch.setenv("EMP_REST_ECHO_ENDPOINT", "/echo")
        monkeypatch.setenv("EMP_REST_ECHO_SERVICES", "echo,llm")
        monkeypatch.setenv("EMP_REST_ECHO_HEADERS", '{"X-Extra": "from settings"}')
        monkeypatch.setenv("EMP_REST_TASKS_BASE_URL", fake.url)
        monkeypatch.setenv("EMP_REST_TASKS_SUBMIT_ENDPOINT", "/tasks")
        monkeypatch.setenv("EMP_REST_TASKS_STATUS_ENDPOINT", "/tasks/{id}")
        monkeypatch.setenv("EMP_REST_TASKS_ID_PATH", "data.task_id")
        monkeypatch.setenv("EMP_REST_TASKS_STATUS_PATH", "state")
        monkeypatch.setenv("EMP_REST_TASKS_RESULT_PATH", "output.answer")
        monkeypatch.setenv("EMP_REST_TASKS_POLL_INTERVAL", "0.02")
        rest = RestConnector()
        assert rest.capabilities().services == {"echo", "llm", "tasks"}
        async with connector_hub(rest) as hub:
            answer = (await hub.run("llm", {"a": 1}))["result"]
            assert (answer["echo"], answer["extra"]) == ({"a": 1}, "from settings")
            assert (await hub.run("tasks", {"b": 2}))["result"] == {"b": 2}


def test_original_setting_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REST_BASE_URL", "http://svc:8000")
    monkeypatch.setenv("REST_ENDPOINT", "/generate")
    monkeypatch.setenv("REST_TIMEOUT", "12")
    monkeypatch.setenv("REST_API_KEY", "k")
    monkeypatch.setenv("REST_ASYNC_SUBMIT_ENDPOINT", "/submit")
    monkeypatch.setenv("REST_ASYNC_STATUS_ENDPOINT", "/status/{id}")
    monkeypatch.setenv("REST_ASYNC_RESULT_ENDPOINT", "/result/{id}")
    monkeypatch.setenv("REST_ASYNC_TIMEOUT", "60")
    monkeypatch.setenv("REST_ASYNC_POLL_INTERVAL", "0.5")
    [only] = RestConnector().instances
    s = only.settings
    assert (s.base_url, s.endpoint, s.timeout, s.api_key) == (
        "http://svc:8000",
        "/generate",
        12,
        "k",
    )
    assert (s.submit_endpoint, s.status_endpoint, s.result_endpoint) == (
        "/submit",
        "/status/{id}",
        "/result/{id}",
    )
    assert (s.async_timeout, s.poll_interval, s.is_async) == (60, 0.5, True)
    assert only.services == ["rest", "rest_async"]
    monkeypatch.setenv("EMP_REST_MODE", "sync")
    monkeypatch.setenv("EMP_REST_TIMEOUT", "5")  # ours wins over the original name
    [only] = RestConnector().instances
    assert only.services == ["rest", "rest_sync"] and only.settings.timeout == 5


def test_lookup_dotted_paths() -> None:
    data = {"a": {"b": [{"c": 1}, {"c": 2}]}}
    assert lookup(data, "a.b.1.c") == 2 and lookup(data, "a.b.-1.c") == 2
    assert lookup(data, "") is data and lookup(data, "a.x.c") is None
    assert lookup(data, "a.b.5") is None


def test_an_invalid_setting_is_named_by_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMP_REST_INSTANCES", "a")
    monkeypatch.setenv("EMP_REST_A_TIMEOUT", "soon")
    with pytest.raises(ValidationError) as invalid:
        RestConnector()
    [error] = invalid.value.errors()
    assert error["loc"] == ("EMP_REST_A_TIMEOUT",) and "valid number" in error["msg"]
    monkeypatch.delenv("EMP_REST_INSTANCES")
    monkeypatch.setenv("REST_ASYNC_POLL_INTERVAL", "-1")
    with pytest.raises(ValidationError) as invalid:
        RestConnector()
    assert invalid.value.errors()[0]["loc"] == ("REST_ASYNC_POLL_INTERVAL",)


async def test_unconfigured_it_offers_nothing() -> None:
    # Installed next to other connectors (all run when EMP_CONNECTORS is unset), a REST
    # connector with no service configured takes no jobs and does not fail `doctor`.
    rest = RestConnector()
    assert rest.instances == [] and rest.capabilities().services == set()
    assert rest.concurrency == 0 and (await rest.health()).ok
