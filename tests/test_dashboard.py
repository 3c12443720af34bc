"""The dashboard in a real browser: Debian's chromium (EMP_TEST_CHROMIUM to use another),
driven by Playwright, against a real hub and real simulation workers."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio
from emp_connector_simulation import SimulationConnector, SimulationSettings
from playwright.async_api import Browser, Page, async_playwright
from pydantic import SecretStr

from emp_hub.auth import Role, TokenStore
from emp_hub.broker import Broker, BrokerSettings, JobSpec
from emp_hub.settings import HubSettings
from emp_hub.testing import running_worker
from emp_protocol.capabilities import WorkerCapabilities
from emp_worker.testing import eventually
from emp_worker.worker import Worker
from tests.hub_server import running_hub

pytestmark = [pytest.mark.slow, pytest.mark.hub]

#: The hub's shared token: an admin's, which the workers use too.
SHARED = "emp_dashboard-test-shared-token"


def chromium_path() -> str:
    """The chromium to drive; a clear failure (not a skip) when there is none."""
    path = os.environ.get("EMP_TEST_CHROMIUM", "/usr/bin/chromium")
    if not (shutil.which(path) or Path(path).is_file()):
        pytest.fail(
            f"no chromium at {path}: the dashboard's browser tests need it "
            "(apt-get install chromium, as .ci/run does, or set EMP_TEST_CHROMIUM)"
        )
    return path


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    path = chromium_path()
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=path, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def hub_settings(
    namespace: str, redis_url: str, redis_client: redis.asyncio.Redis, tmp_path: Path
) -> HubSettings:
    return HubSettings(
        redis_url=redis_url,
        auth_token=SecretStr(SHARED),
        output_dir=tmp_path / "outputs",
        broker=BrokerSettings(namespace=namespace, live_cache_s=0),
        submit_rate=1000,
        submit_burst=1000,
        maintenance_interval_s=0.2,
    )


@pytest.fixture
async def tokens(redis_client: redis.asyncio.Redis, namespace: str) -> dict[str, str]:
    store = TokenStore(redis_client, namespace)
    return {
        "admin": await store.create(Role.ADMIN, name="ops"),
        "monitor": await store.create(Role.MONITOR, name="watch"),
        "acme": await store.create(Role.CLIENT, name="acme-app", customer="acme"),
    }


@pytest.fixture
async def hub(hub_settings: HubSettings, tokens: dict[str, str]) -> AsyncIterator[str]:
    async with running_hub(hub_settings) as url:
        yield url


@pytest.fixture
async def http(hub: str) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {SHARED}"}
    async with httpx.AsyncClient(base_url=hub, headers=headers, timeout=30) as client:
        yield client


def simulation(**settings: Any) -> SimulationConnector:
    return SimulationConnector(SimulationSettings(**{"duration": 0.2, "steps": 2, **settings}))


def worker(hub: str, worker_id: str, **settings: Any) -> AbstractAsyncContextManager[Worker]:
    """A real worker running the simulation connector, on the shared token."""
    return running_worker(hub, [simulation(**settings)], worker_id=worker_id, token=SHARED)


async def submit(http: httpx.AsyncClient, service: str = "simulation", **fields: Any) -> str:
    r = await http.post("/api/jobs", json={"job_type": service, **fields})
    assert r.status_code == 200, r.text
    job_id: str = r.json()["job_id"]
    return job_id


async def job(http: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    answer: dict[str, Any] = (await http.get(f"/api/jobs/{job_id}")).json()
    return answer


async def status_is(http: httpx.AsyncClient, job_id: str, *statuses: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        found = await job(http, job_id)
        return found if found["status"] in statuses else None

    found: dict[str, Any] = await eventually(
        check, within_s=15, every_s=0.05, what=f"job {job_id} {statuses}"
    )
    return found


async def open_as(browser: Browser, hub: str, token: str, route: str) -> Page:
    """Sign in with `token` and open `route` (#/...); returns when the page has its data."""
    page = await browser.new_page()
    page.set_default_timeout(15_000)
    await page.goto(f"{hub}/dashboard/")
    await page.fill("#sign-in input[name=token]", token)
    await page.click("#sign-in button[type=submit]")
    await page.wait_for_selector("main[data-ready]")
    await go(page, route)
    return page


async def go(page: Page, route: str) -> None:
    """Open another route and wait until it has rendered its data."""
    name = route.split("?")[0].split("/")[1]
    name = "job" if route.startswith("#/jobs/") else name
    await page.evaluate("(hash) => { location.hash = hash }", route)
    await page.wait_for_selector(f"main[data-ready='{name}']")


async def stat(page: Page, name: str) -> str:
    return await page.inner_text(f"[data-stat='{name}'] b")


async def test_the_overview_updates_when_a_job_is_submitted(
    browser: Browser, hub: str, tokens: dict[str, str], http: httpx.AsyncClient
) -> None:
    page = await open_as(browser, hub, tokens["monitor"], "#/overview")
    assert await stat(page, "pending") == "0"
    await page.evaluate("() => { window.notReloaded = true }")
    await submit(http, "nobody")  # no worker runs it: it stays pending, unschedulable
    await page.wait_for_function(
        "() => document.querySelector(\"[data-stat='pending'] b\").textContent === '1'"
    )
    assert await page.evaluate("() => window.notReloaded") is True
    await page.wait_for_selector("text=no worker is connected")
    counts = await page.evaluate("() => window.empDashboard.counts()")
    assert counts["messages"] >= 1 and counts["flushes"] <= counts["messages"]


async def test_a_burst_of_job_events_makes_few_repaints(
    browser: Browser, hub: str, tokens: dict[str, str], http: httpx.AsyncClient
) -> None:
    """Live changes are coalesced: at most one repaint per 500 ms, however many come."""
    counts = "() => ({...window.empDashboard.counts(), t: performance.now()})"
    async with worker(hub, "w-fast", duration=0, steps=1, concurrency=16):
        page = await open_as(browser, hub, tokens["monitor"], "#/overview")
        await page.wait_for_selector("#live-state[data-state='live']")  # the feed is open
        before = await page.evaluate(counts)
        jobs = [{"job_type": "simulation"}] * 300
        assert (await http.post("/api/jobs/batch", json={"jobs": jobs})).status_code == 200
        await page.wait_for_function(
            "() => document.querySelector(\"[data-stat='completed'] b\").textContent === '300'",
            timeout=60_000,
        )
        after = await page.evaluate(counts)
    events = after["events"] - before["events"]
    flushes = after["flushes"] - before["flushes"]
    # Each job: pending, active, completed, and a "started" progress event unless its
    # result replaced the report in the worker's frame (a job this short); the feed
    # counts them all.
    assert events >= 900, (events, flushes)
    assert flushes <= (after["t"] - before["t"]) / 500 + 2, (events, flushes)


async def test_cancel_on_a_job_page_reaches_the_worker(
    browser: Browser, hub: str, tokens: dict[str, str], http: httpx.AsyncClient
) -> None:
    async with worker(hub, "w-cancel", duration=60, steps=60) as running:
        job_id = await submit(http)
        await status_is(http, job_id, "active")
        page = await open_as(browser, hub, tokens["admin"], f"#/jobs/{job_id}")
        await page.click("button[data-action=cancel]")
        await status_is(http, job_id, "cancelled")
        await eventually(lambda: running.stats.cancelled == 1, what="the worker's cancel")
        await page.wait_for_selector("dl.fields .status-cancelled")
        assert await page.query_selector("button[data-action=cancel]") is None


async def test_a_monitor_sees_no_actions_and_its_action_calls_are_refused(
    browser: Browser,
    hub: str,
    tokens: dict[str, str],
    http: httpx.AsyncClient,
    redis_client: redis.asyncio.Redis,
    hub_settings: HubSettings,
) -> None:
    failed = await _dead(Broker(redis_client, hub_settings.broker))
    pending = await submit(http, "nobody")
    page = await open_as(browser, hub, tokens["monitor"], f"#/jobs/{pending}")
    assert await page.query_selector_all("button[data-action]") == []
    await go(page, f"#/jobs/{failed}")
    assert await page.query_selector_all("button[data-action]") == []
    await go(page, "#/dead")
    assert await page.query_selector(f"[data-job='{failed}']") is not None
    assert await page.query_selector_all("button[data-action], input[data-select]") == []
    async with worker(hub, "w-seen"):
        await go(page, "#/workers")
        await page.wait_for_selector("[data-worker='w-seen']")
        assert await page.query_selector_all("button[data-action]") == []
    refused = await page.evaluate(
        """async ([id, token]) => {
            const r = await fetch(`/api/jobs/${id}/cancel`, {
                method: "POST", headers: {Authorization: `Bearer ${token}`}});
            return r.status;
        }""",
        [pending, tokens["monitor"]],
    )
    assert refused == 403
    assert (await job(http, pending))["status"] == "pending"


async def test_the_workers_page_shows_a_slice_and_filters(
    browser: Browser,
    hub: str,
    tokens: dict[str, str],
    redis_client: redis.asyncio.Redis,
    hub_settings: HubSettings,
) -> None:
    """Many workers: a page of 100 in the DOM, and the filter box narrows them."""
    broker = Broker(redis_client, hub_settings.broker)
    for i in range(250):
        caps = WorkerCapabilities(services={"sdxl" if i % 2 else "flux"})
        await broker.register_worker(f"w-{i:03}", caps)
    page = await open_as(browser, hub, tokens["monitor"], "#/workers")
    assert len(await page.query_selector_all("[data-worker]")) == 100
    assert "1-100 of 250" in await page.inner_text(".pager")
    await page.fill("input.filter", "w-24 flux")
    await page.wait_for_function("() => document.querySelectorAll('[data-worker]').length < 100")
    shown = await page.eval_on_selector_all(
        "[data-worker]", "rows => rows.map(r => r.dataset.worker)"
    )
    assert shown == ["w-240", "w-242", "w-244", "w-246", "w-248"]


async def test_an_image_output_previews_on_the_job_page(
    browser: Browser, hub: str, tokens: dict[str, str], http: httpx.AsyncClient
) -> None:
    async with worker(hub, "w-png", output_image=True):
        job_id = await submit(http)
        await status_is(http, job_id, "completed")
    page = await open_as(browser, hub, tokens["admin"], f"#/jobs/{job_id}")
    await page.wait_for_function(
        "() => { const img = document.querySelector('img.output');"
        " return img && img.complete && img.naturalWidth > 0 }"
    )
    assert await page.evaluate("() => document.querySelector('img.output').naturalWidth") == 64
    assert await page.query_selector("details.json summary") is not None


async def test_a_customer_token_sees_only_its_customer(
    browser: Browser, hub: str, tokens: dict[str, str], http: httpx.AsyncClient
) -> None:
    mine = {await submit(http, "nobody", customer="acme") for _ in range(2)}
    theirs = await submit(http, "nobody", customer="globex")
    page = await open_as(browser, hub, tokens["acme"], "#/jobs")
    shown = await page.eval_on_selector_all("[data-job]", "rows => rows.map(r => r.dataset.job)")
    assert set(shown) == mine
    routes = await page.eval_on_selector_all("#nav a", "links => links.map(a => a.dataset.route)")
    assert routes == ["jobs", "dead"]
    newer = await submit(http, "nobody", customer="acme")  # the page polls: it comes
    await page.wait_for_selector(f"[data-job='{newer}']")
    await page.evaluate("(id) => { location.hash = `#/jobs/${id}` }", theirs)
    await page.wait_for_selector("#message.error >> text=404")
    await go(page, "#/jobs?customer=globex")
    assert await page.query_selector_all("[data-job]") == []


async def _dead(broker: Broker) -> str:
    """A job of the service 'batch' (no worker runs it) that failed for good."""
    submitted = await broker.submit(JobSpec(service="batch"))
    caps = WorkerCapabilities(services={"batch"})
    await broker.register_worker("w-batch", caps)
    claim = await eventually(lambda: broker.claim("w-batch", caps), what="a claim")
    await broker.fail(claim.job.id, claim.token, "boom", retryable=False)
    await broker.unregister_worker("w-batch")
    return submitted.id


async def test_the_dead_letter_page_retries_a_selection(
    browser: Browser,
    hub: str,
    tokens: dict[str, str],
    http: httpx.AsyncClient,
    redis_client: redis.asyncio.Redis,
    hub_settings: HubSettings,
) -> None:
    broker = Broker(redis_client, hub_settings.broker)
    first, second, third = [await _dead(broker) for _ in range(3)]
    page = await open_as(browser, hub, tokens["admin"], "#/dead")
    for job_id in (first, third):
        await page.check(f"input[data-select='{job_id}']")
    await page.click("button[data-action=retry-selected]")
    await page.wait_for_selector("#message.info >> text=Retried 2 job(s)")
    assert [(await job(http, j))["status"] for j in (first, second, third)] == [
        "pending",
        "failed",
        "pending",
    ]
    await page.wait_for_function("() => document.querySelectorAll('[data-job]').length === 1")


async def test_drain_on_the_workers_page_stops_new_assignments(
    browser: Browser, hub: str, tokens: dict[str, str], http: httpx.AsyncClient
) -> None:
    """Needs the worker-management endpoints (POST /api/workers/{id}/drain): it cannot pass
    before they are merged."""
    async with worker(hub, "w-drained"), worker(hub, "w-open"):
        page = await open_as(browser, hub, tokens["admin"], "#/workers")
        await page.click("[data-worker='w-drained'] button[data-action=drain]")
        await page.wait_for_selector("#message:not([hidden])")  # what the hub answered
        said = await page.inner_text("#message")
        assert await page.get_attribute("#message", "class") == "message info", said
        await page.wait_for_selector(
            "[data-worker='w-drained'] :is(.status-draining, .status-drained)"
        )
        jobs = [await submit(http) for _ in range(4)]
        done = [await status_is(http, j, "completed") for j in jobs]
        assert {j["worker_id"] for j in done} == {"w-open"}
        await page.click("[data-worker='w-drained'] button[data-action=resume]")
        await page.wait_for_selector("[data-worker='w-drained'] .status-active")
