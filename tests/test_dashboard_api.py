"""The dashboard's endpoints (/api/me, /api/overview, /api/jobs/retry, the oldest pending
job's age in /api/queues, events without following) and its files, served by the hub."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio
from emp_connector_simulation import SimulationConnector, SimulationSettings

from emp_hub.auth import Role, TokenStore
from emp_hub.broker import Broker, BrokerSettings, JobSpec
from emp_hub.series import BUCKET_S, WINDOW_BUCKETS, Series
from emp_hub.settings import HubSettings
from emp_hub.testing import running_worker
from emp_protocol.capabilities import WorkerCapabilities
from emp_protocol.jobs import TERMINAL
from emp_worker.testing import eventually
from tests.hub_server import running_hub

pytestmark = pytest.mark.hub

SIM = WorkerCapabilities(services={"simulation"})


@pytest.fixture
def hub_settings(namespace: str, redis_url: str, redis_client: redis.asyncio.Redis) -> HubSettings:
    return HubSettings(
        redis_url=redis_url,
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
        "globex": await store.create(Role.CLIENT, customer="globex"),
    }


@pytest.fixture
async def http(
    hub_settings: HubSettings, tokens: dict[str, str]
) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        running_hub(hub_settings) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        yield client


@pytest.fixture
def broker(redis_client: redis.asyncio.Redis, hub_settings: HubSettings) -> Broker:
    """Plays the worker's side."""
    return Broker(redis_client, hub_settings.broker)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_me_names_the_calling_token(http: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    answers = [(await http.get("/api/me", headers=bearer(tokens[w]))).json() for w in tokens]
    assert answers[:3] == [
        {"name": "ops", "role": "admin", "customer": None},
        {"name": "watch", "role": "monitor", "customer": None},
        {"name": "acme-app", "role": "client", "customer": "acme"},
    ]
    assert (await http.get("/api/me")).status_code == 401


async def test_overview_counts_jobs_workers_and_the_unschedulable(
    http: httpx.AsyncClient, tokens: dict[str, str], broker: Broker
) -> None:
    admin = bearer(tokens["admin"])
    for service in ("simulation", "simulation", "nobody"):
        r = await http.post("/api/jobs", json={"job_type": service}, headers=admin)
        assert r.status_code == 200
    await broker.register_worker("w1", SIM)
    await eventually(lambda: broker.claim("w1", SIM), within_s=4, what="a claim")
    r = await http.get("/api/overview", headers=bearer(tokens["monitor"]))
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["jobs"] == {
        "pending": 2,
        "active": 1,
        "delayed": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert view["workers"] == {"live": 1, "busy": 1}
    [stuck] = view["unschedulable"]
    assert (stuck["service"], stuck["pending"]) == ("nobody", 1)
    assert "nobody" in stuck["reason"]
    series = view["series"]
    assert series["bucket_s"] == BUCKET_S and len(series["buckets"]) == WINDOW_BUCKETS
    assert series["buckets"][-1]["t"] == int(time.time()) // BUCKET_S * BUCKET_S
    assert (await http.get("/api/overview", headers=bearer(tokens["acme"]))).status_code == 403


async def test_the_series_sums_every_replica_and_expires(
    redis_client: redis.asyncio.Redis, broker: Broker
) -> None:
    now = 1_800_000_000.0
    replicas = [Series(clock=lambda: now), Series(clock=lambda: now)]
    replicas[0].count("completed")
    replicas[0].started(2.0)
    replicas[1].count("completed")
    replicas[1].count("failed")
    replicas[1].started(4.0)
    for replica in replicas:
        await replica.flush(redis_client, broker.keys)
        assert replica.pending == {}
    await replicas[0].flush(redis_client, broker.keys)  # nothing new: nothing written
    view = await replicas[0].read(redis_client, broker.keys)
    last = view.buckets[-1]
    assert (last.t, last.completed, last.failed, last.started) == (now - now % 60, 2, 1, 2)
    assert last.start_mean_s == pytest.approx(3.0)
    assert all(b.completed == 0 and b.start_mean_s is None for b in view.buckets[:-1])
    key = broker.key("series", str(last.t))
    assert 0 < await redis_client.ttl(key) <= BUCKET_S * (WINDOW_BUCKETS + 2)


async def test_queues_give_the_age_of_the_oldest_pending_job_per_priority(
    http: httpx.AsyncClient,
    tokens: dict[str, str],
    redis_client: redis.asyncio.Redis,
    hub_settings: HubSettings,
) -> None:
    earlier = Broker(redis_client, hub_settings.broker, clock=lambda: time.time() - 100)
    await earlier.submit(JobSpec(service="simulation", priority=5))
    admin = bearer(tokens["admin"])
    for priority in (5, 0):
        body = {"job_type": "simulation", "priority": priority}
        assert (await http.post("/api/jobs", json=body, headers=admin)).status_code == 200
    [cls] = (await http.get("/api/queues", headers=admin)).json()["classes"]
    assert cls["by_priority"] == {"5": 2, "0": 1}
    ages = cls["oldest_age_s_by_priority"]
    assert set(ages) == {"5", "0"}
    assert 100 <= ages["5"] < 130
    assert 0 <= ages["0"] < 30
    assert cls["oldest_age_s"] == ages["5"]


async def _dead(broker: Broker, customer: str | None = None) -> str:
    """A job that failed for good."""
    submitted = await broker.submit(JobSpec(service="simulation", customer=customer))
    await broker.register_worker("w1", SIM)
    claim = await eventually(lambda: broker.claim("w1", SIM), within_s=4, what="a claim")
    assert claim.job.id == submitted.id
    await broker.fail(claim.job.id, claim.token, "boom", retryable=False)
    return submitted.id


async def test_retry_a_selection_checks_each_job(
    http: httpx.AsyncClient, tokens: dict[str, str], broker: Broker
) -> None:
    mine = await _dead(broker, "acme")
    theirs = await _dead(broker, "globex")
    pending = (await broker.submit(JobSpec(service="other", customer="acme"))).id
    body = {"job_ids": [mine, theirs, pending, "job-unknown"]}
    r = await http.post("/api/jobs/retry", json=body, headers=bearer(tokens["acme"]))
    assert r.status_code == 200, r.text
    outcomes = [(o["job_id"], o["ok"], o["status_code"]) for o in r.json()["results"]]
    assert outcomes == [
        (mine, True, 200),
        (theirs, False, 404),
        (pending, False, 409),
        ("job-unknown", False, 404),
    ]
    assert r.json()["results"][0]["status"] == "pending"
    assert (await broker.get(theirs)).status.value == "failed"
    refused = await http.post("/api/jobs/retry", json=body, headers=bearer(tokens["monitor"]))
    assert refused.status_code == 403
    assert (
        await http.post("/api/jobs/retry", json={"job_ids": []}, headers=bearer(tokens["admin"]))
    ).status_code == 422


async def test_events_without_following_end_at_once(
    http: httpx.AsyncClient, tokens: dict[str, str]
) -> None:
    admin = bearer(tokens["admin"])
    job_id = (await http.post("/api/jobs", json={"job_type": "nobody"}, headers=admin)).json()[
        "job_id"
    ]
    r = await http.get(
        f"/api/jobs/{job_id}/events", params={"follow": "false"}, headers=admin, timeout=5
    )
    assert r.status_code == 200
    [data] = re.findall(r"^data: (.*)$", r.text, re.M)  # the one event so far, then the end
    assert json.loads(data)["status"] == "pending"


async def test_the_dashboard_is_served_by_the_hub_alone(http: httpx.AsyncClient) -> None:
    """Every file the page loads comes from the hub (no CDN): it works without internet."""
    root = await http.get("/")
    assert root.status_code in (302, 307) and root.headers["location"] == "dashboard/"
    bare = await http.get("/dashboard")
    assert bare.status_code in (302, 307) and bare.headers["location"] == "dashboard/"
    html = (await http.get("/dashboard/")).text
    assert "<html" in html
    seen: set[str] = set()
    todo = re.findall(r"""(?:src|href)=["']([^"':]+)["']""", html)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        r = await http.get(f"/dashboard/{name}")
        assert r.status_code == 200, name
        hosts = set(re.findall(r"\b(?:https?:)?//[\w.-]+\.\w+", r.text))
        assert hosts <= {"http://www.w3.org"}, name  # the SVG namespace, never fetched
        todo += re.findall(r"""from ["']\./([^"']+)["']""", r.text)
    assert {"app.js", "api.js", "dom.js", "live.js", "pages.js", "style.css"} <= seen


@pytest.mark.slow
async def test_the_hub_counts_its_jobs_into_the_series(
    hub_settings: HubSettings, redis_client: redis.asyncio.Redis, broker: Broker
) -> None:
    """A real worker's jobs: completed, failed for good and started, with their
    submit-to-start time; a replica that stops adds what it counted last."""
    connector = SimulationConnector(SimulationSettings(duration=0, steps=1))
    async with (
        running_hub(hub_settings) as url,
        running_worker(url, [connector], worker_id="w-series"),
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        for payload in ({}, {}, {"fail": "fatal"}):
            body = {"job_type": "simulation", "payload": payload, "wait": True, "timeout": 20}
            assert (await http.post("/api/jobs", json=body)).json()["status"] in TERMINAL
    view = await Series().read(redis_client, broker.keys)
    totals = {
        name: sum(getattr(b, name) for b in view.buckets)
        for name in ("completed", "failed", "started")
    }
    assert totals == {"completed": 2, "failed": 1, "started": 3}
    means = [b.start_mean_s for b in view.buckets if b.start_mean_s is not None]
    assert means and all(0 <= m < 5 for m in means)
