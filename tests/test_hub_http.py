"""The hub's HTTP API, against the real app under uvicorn and a real Redis-protocol server."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis.asyncio
import websockets
from fastapi import Response
from pydantic import SecretStr, ValidationError

from emp_hub.app import create_app
from emp_hub.auth import Role, TokenStore
from emp_hub.broker import Broker, BrokerSettings, connect
from emp_hub.hub import open_hub
from emp_hub.routes.api import FastPaths, StrictJSONRequest, _submit_shortcut
from emp_hub.settings import HubSettings
from emp_protocol.capabilities import WorkerCapabilities
from emp_worker.testing import eventually
from tests.hub_server import running_hub

pytestmark = pytest.mark.hub

SIM = WorkerCapabilities(services={"simulation"})


@pytest.fixture
def hub_settings(redis_url: str, namespace: str, redis_client: redis.asyncio.Redis) -> HubSettings:
    """Settings of a hub on the test's namespace (redis_client removes it afterwards)."""
    return HubSettings(
        redis_url=redis_url,
        broker=BrokerSettings(namespace=namespace, live_cache_s=0, max_payload_bytes=10_000),
        max_body_bytes=50_000,
        submit_rate=1000,
        submit_burst=1000,
        maintenance_interval_s=0.2,
    )


@pytest.fixture
async def http(
    base_url: str, redis_client: redis.asyncio.Redis
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        yield client


@pytest.fixture
def broker(redis_client: redis.asyncio.Redis, hub_settings: HubSettings) -> Broker:
    """A broker on the hub's namespace: plays the worker's side in these tests."""
    return Broker(redis_client, hub_settings.broker)


async def run_one(broker: Broker, result: Any = None, steps: int = 0) -> str:
    """Claim the next simulation job, report progress, complete it; returns its id."""
    claim = await eventually(lambda: broker.claim("w1", SIM), within_s=4, what="a job to claim")
    for step in range(1, steps + 1):
        await broker.progress(claim.job.id, claim.token, 100 * step / steps, f"s{step}")
    await broker.complete(claim.job.id, claim.token, result)
    return claim.job.id


async def test_original_rest_flow(http: httpx.AsyncClient, broker: Broker) -> None:
    """The recorded emp-redis REST exchanges: submit, poll, wait, unknown id, missing type."""
    r = await http.post(
        "/api/jobs", json={"job_type": "simulation", "payload": {"prompt": "a red fox"}}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["success"] is True and body["job_id"].startswith("job-rest-")
    assert body["message"] == f"Job submitted successfully with ID: {body['job_id']}"
    job = (await http.get(f"/api/jobs/{body['job_id']}")).json()
    assert job["status"] == "pending" and job["position"] == 0 and job["display_position"] == 1
    assert job["payload"] == {"prompt": "a red fox"} and job["job_type"] == "simulation"

    await run_one(broker, {"status": "success"})
    job = (await http.get(f"/api/jobs/{body['job_id']}")).json()
    assert job["status"] == "completed" and job["result"] == {"status": "success"}
    assert job["worker_id"] == "w1" and job["completed_at"] >= job["claimed_at"]

    waiter = asyncio.create_task(
        http.post(
            "/api/jobs",
            json={
                "job_type": "simulation",
                "payload": {"prompt": "sync"},
                "job_id": "rest-job-2",
                "wait": True,
                "timeout": 30,
            },
        )
    )
    assert await run_one(broker, {"ok": 1}, steps=2) == "rest-job-2"
    r = await waiter
    assert r.status_code == 200
    assert r.json()["status"] == "completed" and r.json()["result"] == {"ok": 1}

    r = await http.get("/api/jobs/does-not-exist")
    assert r.status_code == 404 and r.json() == {"detail": "Job with ID does-not-exist not found"}
    r = await http.post("/api/jobs", json={"payload": {}})
    assert r.status_code == 422 and "job_type" in r.text


@pytest.mark.slow
async def test_wait_times_out_with_the_pending_job(http: httpx.AsyncClient) -> None:
    r = await http.post("/api/jobs", json={"job_type": "nobody", "wait": True, "timeout": 0.5})
    assert r.status_code == 200 and r.json()["status"] == "pending"


async def test_bad_input(http: httpx.AsyncClient) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"job_type": "s", "colour": "red"}, 422, "Extra inputs"),
        ({"job_type": "s", "priority": 5000}, 422, "less than or equal to 1000"),
        ({"job_type": "s", "job_id": "has space"}, 422, "job_id"),
        ({"job_type": "s", "service": "s"}, 422, "exactly once"),
        ({"job_type": "s", "requirements": {"vram": 3}}, 422, "Extra inputs"),
        ({"job_type": "s", "requirements": {"isolation": "strict"}}, 422, "needs a customer"),
        ({"job_type": "s", "payload": {"x": "y" * 20_000}}, 413, "exceeds the cap"),
        ({"job_type": "s", "payload": {"x": "y" * 60_000}}, 413, "request body over"),
    ]
    for body, status, reason in cases:
        r = await http.post("/api/jobs", json=body)
        assert (r.status_code, reason in r.text) == (status, True), (body, r.text)
    r = await http.post(
        "/api/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    await http.post("/api/jobs", json={"job_type": "s", "job_id": "taken"})
    r = await http.post("/api/jobs", json={"job_type": "s", "job_id": "taken"})
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    r = await http.get("/api/jobs", params={"limit": 0})
    assert r.status_code == 422


@pytest.mark.slow
async def test_batch_is_all_or_nothing(http: httpx.AsyncClient) -> None:
    r = await http.post(
        "/api/jobs/batch", json={"jobs": [{"job_type": "s", "priority": p} for p in (1, 2, 3)]}
    )
    assert r.status_code == 200 and len(r.json()["job_ids"]) == 3
    r = await http.post(
        "/api/jobs/batch",
        json={"jobs": [{"job_type": "s", "job_id": "b1"}, {"job_type": "s", "job_id": "b1"}]},
    )
    assert r.status_code == 409
    assert (await http.get("/api/jobs/b1")).status_code == 404
    assert (await http.post("/api/jobs/batch", json={"jobs": []})).status_code == 422


async def test_list_cancel_retry(http: httpx.AsyncClient, broker: Broker) -> None:
    ids = [
        (await http.post("/api/jobs", json={"job_type": "simulation", "customer": c})).json()[
            "job_id"
        ]
        for c in ("acme", "globex", "acme")
    ]
    page = (await http.get("/api/jobs", params={"customer": "acme"})).json()
    assert [j["job_id"] for j in page["jobs"]] == [ids[2], ids[0]]
    page = (await http.get("/api/jobs", params={"limit": 2})).json()
    assert len(page["jobs"]) == 2 and page["next_cursor"] is not None
    rest = (await http.get("/api/jobs", params={"cursor": page["next_cursor"]})).json()
    assert [j["job_id"] for j in rest["jobs"]] == [ids[0]]

    r = await http.post(f"/api/jobs/{ids[1]}/cancel", json={"reason": "no longer needed"})
    assert r.status_code == 200 and r.json() == {"previous_status": "pending", "worker": None}
    assert (await http.post(f"/api/jobs/{ids[1]}/cancel")).status_code == 409
    assert (await http.post("/api/jobs/nope/cancel")).status_code == 404
    cancelled = (await http.get("/api/jobs", params={"status": "cancelled"})).json()["jobs"]
    assert [j["job_id"] for j in cancelled] == [ids[1]]

    claim = await broker.claim("w1", SIM)
    assert claim is not None
    await broker.fail(claim.job.id, claim.token, "fatal", retryable=False)
    r = await http.post(f"/api/jobs/{claim.job.id}/retry")
    assert r.status_code == 200 and r.json()["status"] == "pending"
    assert (await http.post(f"/api/jobs/{claim.job.id}/retry")).status_code == 409


async def test_a_list_reads_the_places_in_line_of_its_pending_jobs_only(
    http: httpx.AsyncClient, broker: Broker, redis_client: redis.asyncio.Redis
) -> None:
    """A page of jobs asks Valkey for the place in line of its pending jobs (in one round
    trip), not of every job listed."""
    ids = [
        (await http.post("/api/jobs", json={"job_type": "simulation"})).json()["job_id"]
        for _ in range(6)
    ]
    done = [await run_one(broker) for _ in range(4)]
    assert done == ids[:4]
    await redis_client.config_resetstat()
    listed = (await http.get("/api/jobs")).json()["jobs"]
    stats = await redis_client.info("commandstats")
    assert stats.get("cmdstat_zrank", {}).get("calls", 0) == 2
    positions = {j["job_id"]: (j["status"], j.get("position")) for j in listed}
    assert positions == {
        **{job_id: ("completed", None) for job_id in ids[:4]},
        ids[4]: ("pending", 0),
        ids[5]: ("pending", 1),
    }


@pytest.mark.slow
async def test_cancel_active_is_announced(
    http: httpx.AsyncClient, broker: Broker, redis_client: redis.asyncio.Redis
) -> None:
    job_id = (await http.post("/api/jobs", json={"job_type": "simulation"})).json()["job_id"]
    claim = await broker.claim("gpu-7", SIM)
    assert claim is not None
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(broker.key("cancel_channel"))
    r = await http.post(f"/api/jobs/{job_id}/cancel")
    assert r.json() == {"previous_status": "active", "worker": "gpu-7"}
    message = await eventually(
        lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1),
        what="a cancel announcement",
    )
    notice = json.loads(message["data"])
    assert notice == {"job_id": job_id, "worker": "gpu-7", "reason": "Manually cancelled"}
    await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_events_stream_and_resume(http: httpx.AsyncClient, broker: Broker) -> None:
    job_id = (await http.post("/api/jobs", json={"job_type": "simulation"})).json()["job_id"]

    async def read_stream(headers: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
        events = []
        async with http.stream("GET", f"/api/jobs/{job_id}/events", headers=headers) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            event_id = None
            async for line in r.aiter_lines():
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: "):
                    assert event_id is not None
                    events.append((event_id, json.loads(line[6:])))
        return events

    reader = asyncio.create_task(read_stream({}))
    await asyncio.sleep(0.2)
    await run_one(broker, {"ok": True}, steps=3)
    events = await asyncio.wait_for(reader, 10)
    kinds = [(e["type"], e.get("status") or e.get("progress")) for _, e in events]
    assert kinds == [
        ("status", "pending"),
        ("status", "active"),
        ("progress", 100 / 3),  # a number, as in GET /api/jobs/{id}
        ("progress", 200 / 3),
        ("progress", 100),
        ("status", "completed"),
    ]
    resumed = await read_stream({"Last-Event-ID": events[3][0]})
    assert [i for i, _ in resumed] == [i for i, _ in events[4:]]


@pytest.mark.slow
async def test_idempotency_key(http: httpx.AsyncClient) -> None:
    body = {"job_type": "s", "idempotency_key": "order-42"}
    first = (await http.post("/api/jobs", json=body)).json()
    second = (await http.post("/api/jobs", json=body)).json()
    assert second["job_id"] == first["job_id"] and second["duplicate"] is True
    assert first["duplicate"] is False
    jobs = (await http.get("/api/jobs")).json()["jobs"]
    assert len(jobs) == 1


@pytest.mark.slow
async def test_idempotency_key_after_a_hub_died_between_key_and_job(
    http: httpx.AsyncClient, broker: Broker, redis_client: redis.asyncio.Redis
) -> None:
    """A submit stores its idempotency key, then the job: a hub killed between the two
    (benchmarks/faults.py --hub-kills hit it) leaves the key naming a job that was never
    stored. The client got no answer and sends the submit again, as the key is for; it
    must get the job submitted, not 404 for the 24 h the key lives."""
    # What the killed hub left behind: the key of an anonymous caller, and no job.
    key = broker.key("idempotency", "anonymous", "order-7")
    await redis_client.set(key, "job-order-7", ex=86_400)
    body = {"job_type": "s", "job_id": "job-order-7", "idempotency_key": "order-7"}
    again = await http.post("/api/jobs", json=body)
    assert again.status_code == 200, again.text
    assert (await http.get("/api/jobs/job-order-7")).json()["status"] == "pending"


@pytest.mark.slow
async def test_operations_endpoints(http: httpx.AsyncClient, broker: Broker) -> None:
    await broker.register_worker("w1", SIM)
    await http.post("/api/jobs", json={"job_type": "a1111", "priority": 2})
    workers = (await http.get("/api/workers")).json()
    assert [w["worker_id"] for w in workers] == ["w1"]
    queues = (await http.get("/api/queues")).json()
    assert queues["unschedulable_jobs"] == 1 and queues["live_workers"] == 1
    assert queues["classes"][0]["by_priority"] == {"2": 1}
    version = importlib.metadata.version("emp")  # the root pyproject.toml's
    assert (await http.get("/health/live")).json() == {"status": "ok", "version": version}
    assert (await http.get("/health/ready")).json() == {"status": "ok", "version": version}
    assert "/api/jobs" in (await http.get("/openapi.json")).json()["paths"]
    assert (await http.get("/docs")).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_api_docs_need_nothing_but_the_hub(http: httpx.AsyncClient, page: str) -> None:
    """The docs pages load every asset from the hub: they work on a hub without internet."""
    html = (await http.get(page)).text
    assert "<html" in html
    assert re.findall(r"\b(?:https?:)?//[\w.-]+", html) == []  # no other host, no CDN
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    spec = re.findall(r"""(?:url|spec-url)[:=]\s*["']([^"']+)["']""", html)
    assert spec == ["/openapi.json"]
    assert len(assets) >= (3 if page == "/docs" else 2), html  # the script, css, icon
    for path in [*assets, *spec]:
        answer = await http.get(path)
        assert answer.status_code == 200, path
        assert len(answer.content) > 100, path


# -- auth ----------------------------------------------------------------------------------


@pytest.fixture
async def tokens(redis_client: redis.asyncio.Redis, namespace: str) -> dict[str, str]:
    store = TokenStore(redis_client, namespace)
    return {
        "admin": await store.create(Role.ADMIN),
        "client": await store.create(Role.CLIENT),
        "acme": await store.create(Role.CLIENT, customer="acme"),
        "globex": await store.create(Role.CLIENT, customer="globex"),
        "worker": await store.create(Role.WORKER),
        "monitor": await store.create(Role.MONITOR),
    }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_tokens_and_roles(tokens: dict[str, str], http: httpx.AsyncClient) -> None:
    body = {"job_type": "s"}
    assert (await http.post("/api/jobs", json=body)).status_code == 401
    r = await http.post("/api/jobs", json=body, headers=bearer("emp_wrong"))
    assert r.status_code == 401 and r.json()["detail"] == "invalid token"
    r = await http.post("/api/jobs", json=body, headers={"Authorization": "Basic x"})
    assert r.status_code == 401
    r = await http.post("/api/jobs", json=body, params={"token": tokens["client"]})
    assert r.status_code == 200
    job_id = r.json()["job_id"]
    for who in ("worker", "monitor"):
        r = await http.post("/api/jobs", json=body, headers=bearer(tokens[who]))
        assert r.status_code == 403, who
    assert (
        await http.get(f"/api/jobs/{job_id}", headers=bearer(tokens["worker"]))
    ).status_code == 403
    assert (
        await http.get(f"/api/jobs/{job_id}", headers=bearer(tokens["monitor"]))
    ).status_code == 200
    assert (await http.get("/api/queues", headers=bearer(tokens["client"]))).status_code == 403
    assert (await http.get("/api/queues", headers=bearer(tokens["monitor"]))).status_code == 200
    r = await http.post(f"/api/jobs/{job_id}/cancel", headers=bearer(tokens["monitor"]))
    assert r.status_code == 403
    assert (await http.get("/health/live")).status_code == 200  # no token needed


@pytest.mark.slow
async def test_customer_scoping(tokens: dict[str, str], http: httpx.AsyncClient) -> None:
    acme, globex = bearer(tokens["acme"]), bearer(tokens["globex"])
    r = await http.post("/api/jobs", json={"job_type": "s"}, headers=acme)
    acme_job = r.json()["job_id"]
    assert (await http.get(f"/api/jobs/{acme_job}", headers=acme)).json()["customer"] == "acme"
    r = await http.post("/api/jobs", json={"job_type": "s", "customer": "globex"}, headers=acme)
    assert r.status_code == 403
    globex_job = (await http.post("/api/jobs", json={"job_type": "s"}, headers=globex)).json()[
        "job_id"
    ]
    for path in (f"/api/jobs/{globex_job}", f"/api/jobs/{globex_job}/events"):
        assert (await http.get(path, headers=acme)).status_code == 404, path
    for path in (f"/api/jobs/{globex_job}/cancel", f"/api/jobs/{globex_job}/retry"):
        assert (await http.post(path, headers=acme)).status_code == 404, path
    listed = (await http.get("/api/jobs", headers=acme)).json()["jobs"]
    assert [j["job_id"] for j in listed] == [acme_job]
    other = await http.get("/api/jobs", params={"customer": "globex"}, headers=acme)
    assert other.json()["jobs"] == []
    admin_view = (await http.get("/api/jobs", headers=bearer(tokens["admin"]))).json()["jobs"]
    assert len(admin_view) == 2


async def test_the_submit_shortcut_takes_the_common_case_and_leaves_the_rest(
    tokens: dict[str, str], hub_settings: HubSettings
) -> None:
    """POST /api/jobs's shortcut (routes/api.py) answers a valid JSON body from a caller
    who may submit, and leaves every other request, untouched, to FastAPI's handler."""
    good = json.dumps({"job_type": "s", "payload": {"n": 1}}).encode()
    client = f"Bearer {tokens['client']}"
    async with open_hub(hub_settings) as hub:
        app = SimpleNamespace(state=SimpleNamespace(hub=hub))

        async def shortcut(
            body: bytes,
            authorization: str = client,
            content_type: str = "application/json",
            query: bytes = b"",
        ) -> Response | None:
            headers = [(b"content-type", content_type.encode())]
            headers.append((b"authorization", authorization.encode()))
            scope = {"type": "http", "method": "POST", "path": "/api/jobs", "app": app}
            scope |= {"headers": headers, "query_string": query}

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            return await _submit_shortcut(StrictJSONRequest(scope, receive))

        taken = await shortcut(good)
        assert taken is not None and taken.status_code == 200
        answer = json.loads(bytes(taken.body))
        assert (await hub.broker.get(answer["job_id"])).payload == {"n": 1}
        before = await hub.broker.stats()
        left = [
            await shortcut(good, authorization=""),
            await shortcut(good, authorization="Bearer emp_wrong"),
            await shortcut(good, authorization=f"Bearer {tokens['monitor']}"),
            await shortcut(good, content_type="application/json; charset=utf-8"),
            await shortcut(good, query=f"token={tokens['client']}".encode()),
            await shortcut(b'{"job_type": "s", "colour": "red"}'),
            await shortcut(b'{"job_type": "s", "priority": NaN}'),
            await shortcut(b"[1]"),
            await shortcut(b"{not json"),
            await shortcut(b""),
        ]
        assert left == [None] * len(left)
        assert await hub.broker.stats() == before  # nothing stored for those


def test_the_shortcuts_come_before_the_router(hub_settings: HubSettings) -> None:
    """FastPaths sits inside the exception handlers (test_rate_limit's 429 comes from the
    shortcut through them) and before the router: a submit reaches its shortcut without
    routing."""
    app = create_app(hub_settings)
    layer: Any = app.build_middleware_stack()
    while not isinstance(layer, FastPaths):
        assert not isinstance(layer, type(app.router)), "no FastPaths before the router"
        layer = layer.app
    assert layer.shortcuts == {("POST", "/api/jobs"): _submit_shortcut}
    inner: Any = layer.app
    while inner is not app.router:  # FastAPI's exit stack for dependencies, then it
        inner = inner.app


async def test_a_request_the_shortcut_leaves_reaches_fastapi_with_its_body(
    http: httpx.AsyncClient,
) -> None:
    """The shortcut has read the body, found a field it does not know, and left the
    request: FastAPI's handler gets the same body and names that field."""
    r = await http.post("/api/jobs", json={"job_type": "s", "colour": "red"})
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "colour"]]


async def test_a_submit_answers_alike_through_the_shortcut_and_fastapi(
    http: httpx.AsyncClient,
) -> None:
    """The same body sent as `application/json` (the shortcut) and with a charset
    (FastAPI's handler) is stored and answered alike."""
    body = {
        "job_type": "s",
        "payload": {"prompt": "ünïcode", "steps": 2.5},
        "priority": 7,
        "customer": "acme",
        "requirements": {"gpu_memory_gb": 8},
        "urgency": "high",
    }
    seen = []
    for i, content_type in enumerate(["application/json", "application/json; charset=utf-8"]):
        content = json.dumps({**body, "job_id": f"alike-{i}"}).encode()
        r = await http.post("/api/jobs", content=content, headers={"content-type": content_type})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer.pop("job_id") in answer.pop("message")
        assert answer.pop("position") == i  # behind the first
        job = (await http.get(f"/api/jobs/alike-{i}")).json()
        for moving in ("job_id", "id", "seq", "created_at", "position", "display_position"):
            job.pop(moving, None)
        seen.append((r.headers["content-type"], answer, job))
    assert seen[0] == seen[1]


@pytest.mark.slow
async def test_shared_legacy_token(hub_settings: HubSettings) -> None:
    settings = hub_settings.model_copy(update={"auth_token": SecretStr("legacy-test-token")})
    async with running_hub(settings) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/api/jobs")).status_code == 401
        assert (
            await http.get("/api/jobs", params={"token": "legacy-test-token"})
        ).status_code == 200
        assert (await http.get("/api/jobs", headers=bearer("legacy-test-token"))).status_code == 200


@pytest.mark.slow
async def test_rate_limit(hub_settings: HubSettings) -> None:
    settings = hub_settings.model_copy(update={"submit_rate": 0.5, "submit_burst": 3})
    async with running_hub(settings) as url, httpx.AsyncClient(base_url=url) as http:
        codes = [
            (await http.post("/api/jobs", json={"job_type": "s"})).status_code for _ in range(4)
        ]
        assert codes == [200, 200, 200, 429]
        r = await http.post("/api/jobs", json={"job_type": "s"})
        assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 2
        r = await http.post("/api/jobs/batch", json={"jobs": [{"job_type": "s"}] * 2})
        assert r.status_code == 429  # within the burst, over what is left of it
        assert (await http.get("/api/jobs")).status_code == 200  # reads are not limited


@pytest.mark.slow
async def test_event_stream_outlives_quiet_periods(
    hub_settings: HubSettings, broker: Broker
) -> None:
    """Nothing happens for several keep-alive periods: the stream sends its keep-alive
    comments and still delivers what comes after."""
    settings = hub_settings.model_copy(update={"events_keepalive_s": 0.2})
    async with running_hub(settings) as url, httpx.AsyncClient(base_url=url) as http:
        job_id = (await http.post("/api/jobs", json={"job_type": "simulation"})).json()["job_id"]

        async def later() -> None:
            await asyncio.sleep(1)
            await run_one(broker, {"late": True})

        worker = asyncio.create_task(later())
        seen, keepalives = [], 0
        async with http.stream("GET", f"/api/jobs/{job_id}/events") as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]).get("status"))
                keepalives += line == ": keep-alive"
        await worker
    assert seen == ["pending", "active", "completed"]
    assert keepalives >= 3


def test_the_redis_read_timeout_outlasts_the_longest_blocking_read() -> None:
    """The stream's XREAD blocks up to 15 s: a socket timeout below that would cut it."""
    client = connect("redis://127.0.0.1:1")
    assert client.connection_pool.connection_kwargs["socket_timeout"] > 15
    with pytest.raises(ValidationError, match="less than or equal to 15"):
        HubSettings(events_keepalive_s=16)


async def test_outputs(
    hub_settings: HubSettings,
    redis_client: redis.asyncio.Redis,
    namespace: str,
    broker: Broker,
    tmp_path: Any,
) -> None:
    """Uploaded by the worker holding the job, downloaded by whoever may read the job."""
    store = TokenStore(redis_client, namespace)
    worker_token = await store.create(Role.WORKER)
    acme = await store.create(Role.CLIENT, customer="acme")
    globex = await store.create(Role.CLIENT, customer="globex")
    settings = hub_settings.model_copy(update={"output_dir": tmp_path})
    async with running_hub(settings) as url, httpx.AsyncClient(base_url=url) as http:
        job_id = (
            await http.post("/api/jobs", json={"job_type": "simulation"}, headers=bearer(acme))
        ).json()["job_id"]
        claim = await broker.claim("w1", SIM)
        assert claim is not None
        png = b"\x89PNG\r\n\x1a\n" + bytes(100)
        put = f"/api/jobs/{job_id}/outputs/image-0.png"
        r = await http.put(
            put, content=png, headers={**bearer(worker_token), "X-Lease-Token": claim.token}
        )
        assert r.status_code == 201
        ref = r.json()
        assert (ref["size"], ref["content_type"], ref["url"]) == (108, "image/png", put)
        r = await http.put(
            put, content=b"x", headers={**bearer(worker_token), "X-Lease-Token": "stale"}
        )
        assert r.status_code == 409
        r = await http.put(
            put, content=b"x", headers={**bearer(acme), "X-Lease-Token": claim.token}
        )
        assert r.status_code == 403  # a client cannot upload
        r = await http.put(
            f"/api/jobs/{job_id}/outputs/..evil",
            content=b"x",
            headers={**bearer(worker_token), "X-Lease-Token": claim.token},
        )
        assert r.status_code == 422
        got = await http.get(put, headers=bearer(acme))
        assert got.content == png and got.headers["content-type"] == "image/png"
        listed = (await http.get(f"/api/jobs/{job_id}/outputs", headers=bearer(acme))).json()
        assert listed == [ref]
        assert (await http.get(put, headers=bearer(globex))).status_code == 404
        missing = await http.get(f"/api/jobs/{job_id}/outputs/nope.png", headers=bearer(acme))
        assert missing.status_code == 404


@pytest.mark.slow
async def test_a_worker_reads_outputs_as_the_job_it_runs(
    hub_settings: HubSettings,
    redis_client: redis.asyncio.Redis,
    namespace: str,
    broker: Broker,
    tmp_path: Any,
) -> None:
    """A worker token reads an output only as a job it holds (X-Job-Id, X-Lease-Token), and
    only the outputs of that job's customer's jobs; other roles read as before."""
    store = TokenStore(redis_client, namespace)
    worker_token = await store.create(Role.WORKER)
    admin = await store.create(Role.ADMIN)
    acme = await store.create(Role.CLIENT, customer="acme")
    settings = hub_settings.model_copy(update={"output_dir": tmp_path})
    async with running_hub(settings) as url, httpx.AsyncClient(base_url=url) as http:

        async def submit(customer: str | None) -> str:
            body = {"job_type": "simulation", **({"customer": customer} if customer else {})}
            job_id: str = (await http.post("/api/jobs", json=body, headers=bearer(admin))).json()[
                "job_id"
            ]
            return job_id

        async def produce(customer: str | None) -> str:
            """A completed job of `customer` with an output out.png; its URL."""
            job_id = await submit(customer)
            claim = await broker.claim("w1", SIM)
            assert claim is not None and claim.job.id == job_id
            out = f"/api/jobs/{job_id}/outputs/out.png"
            lease = {**bearer(worker_token), "X-Lease-Token": claim.token}
            assert (await http.put(out, content=b"png", headers=lease)).status_code == 201
            await broker.complete(job_id, claim.token, {})
            return out

        ours, theirs, nobodys = await produce("acme"), await produce("globex"), await produce(None)
        reader_id = await submit("acme")
        claim = await broker.claim("w1", SIM)
        assert claim is not None and claim.job.id == reader_id
        as_job = {"X-Job-Id": reader_id, "X-Lease-Token": claim.token}
        got = await http.get(ours, headers={**bearer(worker_token), **as_job})
        assert (got.status_code, got.content) == (200, b"png")
        for other in (theirs, nobodys):
            r = await http.get(other, headers={**bearer(worker_token), **as_job})
            assert r.status_code == 404 and f"that job {reader_id} may read" in r.json()["detail"]
        r = await http.get(ours, headers=bearer(worker_token))
        assert r.status_code == 403 and "X-Job-Id" in r.json()["detail"]
        stale = {**as_job, "X-Lease-Token": "stale"}
        assert (await http.get(ours, headers={**bearer(worker_token), **stale})).status_code == 409
        assert (await http.get(ours, headers={**bearer(acme), **as_job})).status_code == 403
        assert (await http.get(ours, headers=bearer(acme))).content == b"png"
        assert (await http.get(theirs, headers=bearer(acme))).status_code == 404


def files_under(root: Path) -> list[str]:
    """Every file below `root`, as paths relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
async def test_output_size_caps(
    hub_settings: HubSettings, redis_client: redis.asyncio.Redis, broker: Broker, tmp_path: Path
) -> None:
    """A file over EMP_MAX_OUTPUT_BYTES, or one that takes the job's files over
    EMP_OUTPUT_QUOTA_BYTES, is refused with 413 naming the setting, whether its size was
    declared or streamed, and leaves nothing on disk. The per-file cap, not the request body
    cap, applies to outputs: they stream to disk."""
    settings = hub_settings.model_copy(
        update={"output_dir": tmp_path, "max_output_bytes": 60_000, "output_quota_bytes": 100_000}
    )
    assert settings.max_body_bytes < 60_000
    async with running_hub(settings) as url, httpx.AsyncClient(base_url=url) as http:
        job_id = (await http.post("/api/jobs", json={"job_type": "simulation"})).json()["job_id"]
        claim = await broker.claim("w1", SIM)
        assert claim is not None
        lease = {"X-Lease-Token": claim.token}

        async def chunked(size: int) -> AsyncIterator[bytes]:
            for _ in range(size // 1000):
                yield bytes(1000)

        def put(name: str, body: bytes | AsyncIterator[bytes]) -> Any:
            return http.put(f"/api/jobs/{job_id}/outputs/{name}", content=body, headers=lease)

        for body in (bytes(60_001), chunked(61_000)):
            r = await put("big.bin", body)
            assert r.status_code == 413, r.text
            assert "EMP_MAX_OUTPUT_BYTES" in r.json()["detail"]
            assert files_under(tmp_path) == []
        assert (await put("a.bin", bytes(60_000))).status_code == 201  # over max_body_bytes
        assert (await put("a.bin", bytes(50_000))).status_code == 201  # replaced, not added
        for body in (bytes(50_001), chunked(51_000)):
            r = await put("b.bin", body)
            assert r.status_code == 413, r.text
            assert "EMP_OUTPUT_QUOTA_BYTES" in r.json()["detail"]
        assert (await put("b.bin", chunked(50_000))).status_code == 201
        listed = (await http.get(f"/api/jobs/{job_id}/outputs")).json()
        assert [(o["name"], o["size"]) for o in listed] == [("a.bin", 50_000), ("b.bin", 50_000)]
        assert [Path(f).name for f in files_under(tmp_path)] == [
            "a.bin",
            "a.bin.meta",
            "b.bin",
            "b.bin.meta",
        ]


@pytest.mark.slow
async def test_outputs_follow_the_job_retention(
    hub_settings: HubSettings, redis_client: redis.asyncio.Redis, tmp_path: Path
) -> None:
    """When a finished job's retention runs out, maintenance removes its files as well."""
    settings = hub_settings.model_copy(
        update={
            "output_dir": tmp_path,
            "broker": hub_settings.broker.model_copy(update={"retention_s": 1}),
        }
    )
    broker = Broker(redis_client, settings.broker)
    async with running_hub(settings) as url, httpx.AsyncClient(base_url=url) as http:
        ids = (
            await http.post("/api/jobs/batch", json={"jobs": [{"job_type": "simulation"}] * 2})
        ).json()["job_ids"]
        claims = await broker.claim_many("w1", SIM, 2)
        for c in claims:
            r = await http.put(
                f"/api/jobs/{c.job.id}/outputs/out.png",
                content=b"png",
                headers={"X-Lease-Token": c.token},
            )
            assert r.status_code == 201
        assert len(files_under(tmp_path)) == 4
        done, running = claims
        await broker.complete(done.job.id, done.token, None)
        await eventually(
            lambda: len(files_under(tmp_path)) == 2, every_s=0.1, what="two output files left"
        )
        left = files_under(tmp_path)
        assert [Path(f).name for f in left] == ["out.png", "out.png.meta"]
        r = await http.get(f"/api/jobs/{running.job.id}/outputs/out.png")
        assert r.status_code == 200 and r.content == b"png"
        assert set(ids) == {done.job.id, running.job.id}
        assert await redis_client.zcard(broker.key("outputs_expired")) == 0


@pytest.mark.slow
async def test_classes_and_metrics_stay_bounded(
    hub_settings: HubSettings, redis_client: redis.asyncio.Redis, broker: Broker
) -> None:
    """200 jobs with tags no other job has, and 200 services: /metrics exports a bounded
    number of series; once drained, the classes leave the list and /api/queues."""
    settings = hub_settings.model_copy(
        update={
            "metrics_max_queue_series": 10,
            "metrics_max_services": 5,
            "broker": hub_settings.broker.model_copy(update={"class_idle_s": 0.5}),
        }
    )
    tags = [f"once-{i}" for i in range(200)]
    jobs: list[dict[str, Any]] = [
        {"job_type": "simulation", "requirements": {"tags": [t]}} for t in tags
    ]
    jobs += [{"job_type": f"service-{i}", "priority": i % 7} for i in range(200)]
    async with running_hub(settings) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.post("/api/jobs/batch", json={"jobs": jobs})).status_code == 200
        text = (await http.get("/metrics")).text
        depth = [x for x in text.splitlines() if x.startswith("emp_queue_depth{")]
        assert len(depth) == 10
        assert 'requirement_class="_other"' in text
        assert sum(float(x.split()[-1]) for x in depth) == 400
        submitted = [x for x in text.splitlines() if x.startswith("emp_jobs_submitted_total{")]
        assert len(submitted) == 6 and 'service="_other"' in text
        assert sum(float(x.split()[-1]) for x in submitted) == 400

        drainer = WorkerCapabilities(services={"simulation"}, tags=set(tags))
        while claims := await broker.claim_many("w1", drainer, 50):
            for c in claims:
                await broker.complete(c.job.id, c.token, None)
        classes = broker.key("classes")

        async def all_classes() -> bool:  # the 200 services, still pending
            return await redis_client.hlen(classes) == 200

        await eventually(all_classes, every_s=0.1, what="200 classes")
        assert await redis_client.hlen(classes) == 200
        queues = (await http.get("/api/queues")).json()
        assert {c["requirements"]["service"] for c in queues["classes"]} == {
            f"service-{i}" for i in range(200)
        }


# -- hostile and malformed input --------------------------------------------------------------


def is_json(response: httpx.Response) -> bool:
    try:
        response.json()
    except ValueError:
        return False
    return True


@pytest.mark.slow
async def test_non_finite_numbers_are_refused_naming_the_field(http: httpx.AsyncClient) -> None:
    """NaN, Infinity and numbers too large for a double (1e400) are not JSON: 422 with the
    field's place, never a 500; nothing is submitted."""
    cases = [
        (b'{"job_type": "s", "job_timeout": NaN}', ["body", "job_timeout"]),
        (b'{"job_type": "s", "requirements": {"ram_gb": NaN}}', ["body", "requirements", "ram_gb"]),
        (b'{"job_type": "s", "priority": NaN}', ["body", "priority"]),
        (b'{"job_type": "s", "timeout": Infinity}', ["body", "timeout"]),
        (b'{"job_type": "s", "job_timeout": 1e400}', ["body", "job_timeout"]),
        (b'{"job_type": "s", "priority": -Infinity}', ["body", "priority"]),
        (b'{"job_type": "s", "payload": {"xs": [1, NaN]}}', ["body", "payload", "xs", 1]),
    ]
    for body, loc in cases:
        r = await http.post("/api/jobs", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and is_json(r), (body, r.status_code, r.text)
        assert [e["loc"] for e in r.json()["detail"]] == [loc], (body, r.text)
        assert "finite" in r.json()["detail"][0]["msg"]
    r = await http.post(
        "/api/jobs/batch",
        content=b'{"jobs": [{"job_type": "s"}, {"job_type": "s", "job_timeout": NaN}]}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "jobs", 1, "job_timeout"]
    assert (await http.get("/api/jobs")).json()["jobs"] == []
    assert (await http.post("/api/jobs", json={"job_type": "s", "job_timeout": 1.5})).is_success


def chunked(size: int) -> Any:
    """A request body of `size` bytes sent chunked (no Content-Length)."""

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // 10_000):
            yield b"x" * 10_000

    return body()


@pytest.mark.slow
async def test_chunked_body_over_the_limit_is_413(
    hub_settings: HubSettings, broker: Broker, tmp_path: Any
) -> None:
    """A body over EMP_MAX_BODY_BYTES (50,000 here) sent without Content-Length gets the same
    413 and JSON reason as a declared one, on every route that reads a JSON body; the output
    upload of the worker holding the job, under its own cap, too; the job is untouched."""
    settings = hub_settings.model_copy(update={"output_dir": tmp_path, "max_output_bytes": 50_000})
    async with running_hub(settings) as url, httpx.AsyncClient(base_url=url) as http:
        job_id = (await http.post("/api/jobs", json={"job_type": "simulation"})).json()["job_id"]
        claim = await broker.claim("w1", SIM)
        assert claim is not None
        json_type = {"content-type": "application/json"}
        for method, path, headers in [
            ("POST", "/api/jobs", json_type),
            ("POST", "/api/jobs/batch", json_type),
            ("POST", f"/api/jobs/{job_id}/cancel", json_type),
            ("PUT", f"/api/jobs/{job_id}/outputs/big.bin", {"X-Lease-Token": claim.token}),
        ]:
            r = await http.request(method, path, content=chunked(200_000), headers=headers)
            assert r.status_code == 413, (path, r.status_code, r.text)
            if method == "PUT":
                assert "EMP_MAX_OUTPUT_BYTES" in r.json()["detail"]
            else:
                assert r.json() == {"detail": "request body over 50000 bytes"}, path
        assert (await http.get(f"/api/jobs/{job_id}")).json()["status"] == "active"
        assert (await http.get(f"/api/jobs/{job_id}/outputs")).json() == []
        assert (await http.get("/api/jobs")).json()["jobs"][0]["job_id"] == job_id


@pytest.mark.slow
async def test_garbage_last_event_id_is_422(http: httpx.AsyncClient) -> None:
    job_id = (await http.post("/api/jobs", json={"job_type": "s"})).json()["job_id"]
    for bad in ("garbage", "1-2-3", "-", "0-x", "99999999999999999999-0"):
        r = await http.get(f"/api/jobs/{job_id}/events", headers={"Last-Event-ID": bad})
        assert r.status_code == 422 and "last-event-id" in r.text.lower(), (bad, r.text)
        r = await http.get(f"/api/jobs/{job_id}/events", params={"after": bad})
        assert r.status_code == 422, bad


ORIGINAL_IDS = [
    "job-4714fa1b-432d-456b-8ac7-ba59b900f463",  # a WebSocket submit's default id
    "job-rest-207e70c8-6308-45d5-a11a-c44f5995aac8",  # a REST submit's default id
    "extra-job-1-697e064e-6d36-4c17-ac6f-2067c61f083a",
    "ack-1795926929",
    "rest-job-2",
    "user@example.com:render_1.png+2=3",
]


@pytest.mark.slow
async def test_job_ids_are_reachable(http: httpx.AsyncClient, base_url: str) -> None:
    """Ids that cannot be used in a URL path ('/', '.', '..', '?', '#', '%') are refused at
    submit, on every way in, with the allowed characters named; the original's ids pass."""
    for job_id in ORIGINAL_IDS:
        r = await http.post("/api/jobs", json={"job_type": "s", "job_id": job_id})
        assert r.status_code == 200, (job_id, r.text)
        assert (await http.get(f"/api/jobs/{job_id}")).json()["job_id"] == job_id
    for bad in ("a/b", "..", ".", "a?b", "a#b", "a%2Fb", "a b", "é", "x" * 201, ""):
        r = await http.post("/api/jobs", json={"job_type": "s", "job_id": bad})
        assert r.status_code == 422, (bad, r.text)
        assert "letters, digits" in r.text and r.json()["detail"][0]["loc"] == ["body", "job_id"]
        r = await http.post("/api/jobs/batch", json={"jobs": [{"job_type": "s", "job_id": bad}]})
        assert r.status_code == 422 and "letters, digits" in r.text, bad
    ws_url = base_url.replace("http", "ws") + "/ws/client/c1"
    async with websockets.connect(ws_url) as conn:
        assert json.loads(await conn.recv())["type"] == "connection_established"
        submit = {"type": "submit_job", "job_type": "s", "payload": {}, "message_id": "a/b"}
        await conn.send(json.dumps(submit))
        error = json.loads(await conn.recv())
        assert error["type"] == "error" and "letters, digits" in error["error"], error
        await conn.send(json.dumps({**submit, "message_id": "ws-ok-1"}))
        assert json.loads(await conn.recv())["type"] == "job_accepted"
    ids = {j["job_id"] for j in (await http.get("/api/jobs", params={"limit": 100})).json()["jobs"]}
    assert ids == {*ORIGINAL_IDS, "ws-ok-1"}


@pytest.mark.slow
async def test_largest_documented_batch_fits_the_default_burst(
    hub_settings: HubSettings,
) -> None:
    """With the default rate limit, a batch of the documented maximum (10,000) is accepted."""
    defaults = HubSettings.model_fields
    settings = hub_settings.model_copy(
        update={
            "submit_rate": defaults["submit_rate"].default,
            "submit_burst": defaults["submit_burst"].default,
            "max_body_bytes": 16 * 2**20,
        }
    )
    async with running_hub(settings) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        r = await http.post("/api/jobs/batch", json={"jobs": [{"job_type": "s"}] * 10_000})
        assert r.status_code == 200, r.text
        assert len(r.json()["job_ids"]) == 10_000
        r = await http.post("/api/jobs/batch", json={"jobs": [{"job_type": "s"}] * 10_001})
        assert r.status_code == 422  # over the documented maximum


@pytest.mark.slow
async def test_batch_larger_than_the_burst_says_so(hub_settings: HubSettings) -> None:
    """A batch that can never pass the rate limit is refused at once, plainly (not 429)."""
    settings = hub_settings.model_copy(update={"submit_rate": 1000, "submit_burst": 3})
    async with running_hub(settings) as url, httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/api/jobs/batch", json={"jobs": [{"job_type": "s"}] * 5})
        assert r.status_code == 413 and "Retry-After" not in r.headers
        detail = r.json()["detail"]
        assert "batch of 5 jobs exceeds the burst of 3" in detail and "EMP_SUBMIT_BURST" in detail
        assert "split" in detail
        r = await http.post("/api/jobs/batch", json={"jobs": [{"job_type": "s"}] * 3})
        assert r.status_code == 200


# -- list memory ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_lists_are_summaries(hub_settings: HubSettings, broker: Broker) -> None:
    """A list leaves out payload and result unless asked (`include`); then each is capped
    (EMP_LIST_FIELD_MAX_BYTES), a cut one replaced by a marker. GET of the job has all."""
    settings = hub_settings.model_copy(update={"list_field_max_bytes": 1000})
    async with running_hub(settings) as url, httpx.AsyncClient(base_url=url) as http:
        small = (
            await http.post("/api/jobs", json={"job_type": "simulation", "payload": {"n": 1}})
        ).json()["job_id"]
        big_payload = {"prompt": "x" * 5000}
        big = (
            await http.post("/api/jobs", json={"job_type": "simulation", "payload": big_payload})
        ).json()["job_id"]
        await run_one(broker, {"image": "y" * 3000})  # small's result is large
        listed = (await http.get("/api/jobs")).json()["jobs"]
        assert [j["job_id"] for j in listed] == [big, small]
        for job in listed:
            assert "payload" not in job and "result" not in job, job
            assert job["job_type"] == "simulation" and job["status"] in ("completed", "pending")
        listed = (await http.get("/api/jobs", params={"include": "payload,result"})).json()["jobs"]
        by_id = {j["job_id"]: j for j in listed}
        assert by_id[small]["payload"] == {"n": 1} and by_id[big]["result"] is None
        cut = by_id[big]["payload"]
        size = len(json.dumps(big_payload, separators=(",", ":")))  # as the broker keeps it
        assert cut["truncated"] is True and cut["bytes"] == size
        assert cut["cap"] == 1000 and cut["get"] == f"/api/jobs/{big}"
        assert by_id[small]["result"]["truncated"] is True
        only = (await http.get("/api/jobs", params={"include": "payload"})).json()["jobs"]
        assert all("payload" in j and "result" not in j for j in only)
        assert (await http.get("/api/jobs", params={"include": "secrets"})).status_code == 422
        whole = (await http.get(f"/api/jobs/{big}")).json()
        assert whole["payload"] == big_payload
        assert (await http.get(f"/api/jobs/{small}")).json()["result"] == {"image": "y" * 3000}
