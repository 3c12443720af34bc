"""The Python client and the emp CLI against the real hub."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio

from emp_hub.auth import Role, TokenStore
from emp_hub.broker import Broker, BrokerSettings
from emp_hub.client import AuthError, Client, HubUnreachable, JobNotFound, Rejected
from emp_hub.client_cli import main
from emp_hub.settings import HubSettings
from emp_worker.capabilities import WorkerCapabilities
from tests.hub_server import running_hub

pytestmark = pytest.mark.hub

SIM = WorkerCapabilities(services={"sim"})


@pytest.fixture
def hub_settings(redis_url: str, namespace: str, redis_client: redis.asyncio.Redis) -> HubSettings:
    return HubSettings(redis_url=redis_url, broker=BrokerSettings(namespace=namespace))


@pytest.fixture
async def base_url(hub_settings: HubSettings) -> AsyncIterator[str]:
    async with running_hub(hub_settings) as url:
        yield url


async def work_one(broker: Broker, *, fail: bool = False) -> str:
    """Play a worker: claim the next job, report progress, finish it."""
    for _ in range(300):
        claim = await broker.claim("w1", SIM)
        if claim is not None:
            for p in (25, 50, 75):
                await broker.progress(claim.job.id, claim.token, p, f"step {p}")
                await asyncio.sleep(0.02)
            if fail:
                await broker.fail(claim.job.id, claim.token, "bad prompt", retryable=False)
            else:
                await broker.complete(claim.job.id, claim.token, {"image": "out.png"})
            return claim.job.id
        await asyncio.sleep(0.02)
    raise AssertionError("nothing to claim")


async def test_client_round_trip(
    base_url: str, hub_settings: HubSettings, redis_client: redis.asyncio.Redis
) -> None:
    broker = Broker(redis_client, hub_settings.broker)
    async with Client(base_url) as emp:
        job_id = await emp.submit("sim", {"prompt": "a cat"}, priority=4)
        assert (await emp.get(job_id))["status"] == "pending"
        worker = asyncio.create_task(work_one(broker))
        events = [e async for e in emp.events(job_id)]
        assert [e.get("status") or e["progress"] for e in events] == [
            "pending",
            "active",
            "25",
            "50",
            "75",
            "completed",
        ]
        assert all(e["id"] for e in events)
        await worker
        job = await emp.wait(job_id)
        assert job["result"] == {"image": "out.png"}
        assert [j["job_id"] for j in (await emp.jobs(status="completed"))["jobs"]] == [job_id]
        with pytest.raises(JobNotFound, match="nope"):
            await emp.get("nope")
        with pytest.raises(Rejected, match="priority"):
            await emp.submit("sim", priority=5000)
        failing = await emp.submit("sim")
        await work_one(broker, fail=True)
        assert (await emp.retry(failing))["status"] == "pending"
        assert (await emp.cancel(failing))["previous_status"] == "pending"
        assert (await emp.queues())["pending"] == 0


async def test_client_errors_are_friendly(
    hub_settings: HubSettings, redis_client: redis.asyncio.Redis, namespace: str
) -> None:
    async with Client("http://127.0.0.1:1") as emp:
        with pytest.raises(HubUnreachable, match=r"cannot reach the hub at http://127\.0\.0\.1:1"):
            await emp.get("x")
    await TokenStore(redis_client, namespace).create(Role.ADMIN)
    async with running_hub(hub_settings) as url, Client(url, token="emp_wrong") as emp:
        with pytest.raises(AuthError, match="invalid token"):
            await emp.submit("sim")


async def test_cli(
    base_url: str,
    hub_settings: HubSettings,
    redis_client: redis.asyncio.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker = Broker(redis_client, hub_settings.broker)

    def emp(*args: str) -> int:
        return main(["--hub", base_url, *args])

    assert await asyncio.to_thread(emp, "submit", "sim", "--payload", '{"n": 1}') == 0
    job_id = capsys.readouterr().out.strip()
    assert job_id.startswith("job-rest-")
    assert await asyncio.to_thread(emp, "status", job_id) == 0
    assert "pending" in capsys.readouterr().out
    assert await asyncio.to_thread(emp, "cancel", job_id) == 0
    assert "was pending" in capsys.readouterr().out

    worker = asyncio.create_task(work_one(broker))
    assert await asyncio.to_thread(emp, "submit", "sim", "--wait", "--priority", "9") == 0
    await worker
    out = capsys.readouterr().out
    assert "completed" in out and "100%" in out and '"image": "out.png"' in out

    assert await asyncio.to_thread(emp, "jobs", "--status", "completed") == 0
    assert "completed" in capsys.readouterr().out
    assert await asyncio.to_thread(emp, "queues") == 0
    assert await asyncio.to_thread(emp, "workers") == 0
    capsys.readouterr()
    assert await asyncio.to_thread(emp, "status", "nope") == 1
    assert "emp: Job with ID nope not found" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["--hub", "http://127.0.0.1:1", "jobs"]) == 1
    assert "cannot reach the hub" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        await asyncio.to_thread(emp, "submit", "sim", "--payload", "[1]")
    assert "must be a JSON object" in capsys.readouterr().err


async def test_a_waiting_job_says_why_no_worker_can_run_it(
    base_url: str,
    hub_settings: HubSettings,
    redis_client: redis.asyncio.Redis,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = Broker(redis_client, hub_settings.broker)
    await broker.register_worker("w-simulation", WorkerCapabilities(services={"simulation"}))
    why = "no live worker offers service 'sim' (the 1 live worker(s) offer: simulation)"
    async with httpx.AsyncClient(base_url=base_url) as http:
        submitted = (await http.post("/api/jobs", json={"job_type": "sim"})).json()
        assert submitted["unschedulable"] == why
        job = (await http.get(f"/api/jobs/{submitted['job_id']}")).json()
        assert job["unschedulable"] == why
        waited = await http.post(
            "/api/jobs", json={"job_type": "sim", "wait": True, "timeout": 0.3}
        )
        assert (waited.json()["status"], waited.json()["unschedulable"]) == ("pending", why)
        fine = await http.post("/api/jobs", json={"job_type": "simulation"})
        assert fine.json()["unschedulable"] is None
    await broker.cancel(submitted["job_id"])
    await broker.cancel(waited.json()["job_id"])
    await broker.cancel(fine.json()["job_id"])

    monkeypatch.setattr("emp_hub.client_cli.WAITING_CHECK_S", 0.1)

    async def late_worker() -> str:
        await asyncio.sleep(1)  # the CLI says why it waits meanwhile
        return await work_one(broker)

    worker = asyncio.create_task(late_worker())
    cli = ["--hub", base_url, "submit", "sim", "--wait"]
    assert await asyncio.to_thread(main, cli) == 0
    await worker
    out = capsys.readouterr().out
    assert f"waits: {why}" in " ".join(out.split()) and "completed" in out
