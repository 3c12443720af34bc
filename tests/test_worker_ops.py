"""An admin drains, resumes and shuts down workers (`POST /api/workers/{id}/drain|resume|
shutdown`, `emp workers ...`): the hub assigns a drained or stopping worker nothing, on
whichever replica it is connected and whichever replica took the call; the state is kept
in Redis, so it survives reconnects and hub restarts; a shutdown makes `emp-worker run`
finish its job and exit 0."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio
import websockets

from emp_client import Client, WorkerNotFound
from emp_client.cli import main
from emp_hub.auth import Role, TokenStore
from emp_hub.broker import Broker, BrokerSettings
from emp_hub.settings import HubSettings
from emp_hub.testing import running_worker
from emp_protocol.capabilities import WorkerCapabilities
from emp_worker.testing import eventually
from tests.hub_server import running_hub
from tests.processes import Cluster, cluster, eventually_sync
from tests.test_hub_ws import Peer, submit, worker
from tests.test_worker import Sleepy

pytestmark = pytest.mark.hub

LEGACY_CAPS = {"version": "1.0.0", "supported_job_types": ["simulation"], "cpu": True}


async def act(base_url: str, worker_id: str, action: str, token: str | None = None) -> Any:
    """POST an action; the response."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=base_url, headers=headers) as http:
        return await http.post(f"/api/workers/{worker_id}/{action}")


async def views(base_url: str) -> dict[str, dict[str, Any]]:
    """GET /api/workers, by worker id."""
    async with httpx.AsyncClient(base_url=base_url) as http:
        return {w["worker_id"]: w for w in (await http.get("/api/workers")).json()}


async def job_status(base_url: str, job_id: str) -> str:
    async with httpx.AsyncClient(base_url=base_url) as http:
        status: str = (await http.get(f"/api/jobs/{job_id}")).json()["status"]
        return status


async def next_of(peer: Peer, type_: str, wait: float = 5) -> dict[str, Any]:
    """The next message of this type (stats broadcasts and others skipped)."""
    deadline = time.monotonic() + wait
    while True:
        message = await peer.recv(max(0.01, deadline - time.monotonic()))
        if message["type"] == type_:
            return message


async def nothing_assigned(peer: Peer, worker_id: str) -> None:
    """The hub handled everything the worker sent (a heartbeat's answer comes after) and
    sends it no job, not even once a claim would have gone through."""
    await peer.send("worker_heartbeat", worker_id=worker_id, status="idle")
    await peer.expect("worker_heartbeat_ack")
    try:
        message = await peer.recv(0.5)
    except TimeoutError:
        return
    pytest.fail(f"the hub sent {message}")


async def test_drain_lets_the_running_job_finish_and_assigns_nothing_until_resumed(
    base_url: str,
) -> None:
    monitor_url = base_url.replace("http", "ws") + "/ws/monitor/m1"
    async with worker(base_url, "w1") as w, websockets.connect(monitor_url) as monitor_conn:
        monitor = Peer(monitor_conn)
        await monitor.expect("connection_established")
        running = await submit(base_url)
        await w.send("request_job", slots=2)
        assert (await w.expect("job_assigned"))["job_id"] == running
        before = (await views(base_url))["w1"]
        assert (before["state"], before["jobs"]) == ("active", [running])
        assert abs(before["last_heartbeat"] - time.time()) < 5

        answer = await act(base_url, "w1", "drain")
        assert answer.status_code == 200, answer.text
        assert (answer.json()["state"], answer.json()["jobs"]) == ("draining", [running])
        control = await w.expect("worker_control")
        assert (control["worker_id"], control["action"]) == ("w1", "drain")
        waiting = await submit(base_url)  # the free slot is still parked: nothing comes
        await nothing_assigned(w, "w1")
        await w.send("complete_job", job_id=running, result={"ok": True})
        await w.expect("job_completed_ack")
        assert await job_status(base_url, running) == "completed"
        after = (await views(base_url))["w1"]
        assert (after["state"], after["jobs"]) == ("drained", [])
        await w.send("request_job", slots=2)  # even a worker that asks gets nothing
        await nothing_assigned(w, "w1")
        assert await job_status(base_url, waiting) == "pending"
        again = await act(base_url, "w1", "drain")  # idempotent
        assert (again.status_code, again.json()["state"]) == (200, "drained")
        await w.expect("worker_control")

        resumed = await act(base_url, "w1", "resume")
        assert (resumed.status_code, resumed.json()["state"]) == (200, "active")
        assert (await w.expect("worker_control"))["action"] == "resume"
        assert (await w.expect("job_assigned"))["job_id"] == waiting

        states = [(await next_of(monitor, "worker_state"))["state"] for _ in range(3)]
        assert states == ["draining", "drained", "active"]


async def test_a_job_only_drained_workers_could_run_is_unschedulable_and_says_why(
    base_url: str,
) -> None:
    async with worker(base_url, "w1") as w:
        assert (await act(base_url, "w1", "drain")).json()["state"] == "drained"
        await w.expect("worker_control")
        job_id = await submit(base_url)
        async with httpx.AsyncClient(base_url=base_url) as http:
            job = (await http.get(f"/api/jobs/{job_id}")).json()
            queues = (await http.get("/api/queues")).json()
        assert job["unschedulable"] == (
            "the only live worker(s) that can run it are drained or stopping: w1 "
            "(`emp workers resume ID` takes one back)"
        )
        [cls] = queues["classes"]
        assert (cls["unschedulable"], cls["matching_workers"]) == (True, 0)
        assert queues["unschedulable_jobs"] == 1

        assert (await act(base_url, "w1", "resume")).json()["state"] == "active"
        async with httpx.AsyncClient(base_url=base_url) as http:
            assert (await http.get(f"/api/jobs/{job_id}")).json().get("unschedulable") is None


async def test_an_original_worker_drained_gets_no_offers(base_url: str) -> None:
    async with worker(base_url, "legacy-1", LEGACY_CAPS) as w:
        assert (await act(base_url, "legacy-1", "drain")).json()["state"] == "drained"
        await w.expect("worker_control")  # it does not know it; the hub stops offering
        job_id = await submit(base_url)
        await nothing_assigned(w, "legacy-1")
        assert await job_status(base_url, job_id) == "pending"
        assert (await act(base_url, "legacy-1", "resume")).json()["state"] == "active"
        await w.expect("worker_control")
        assert (await w.expect("job_available"))["job_id"] == job_id


async def test_only_admins_act_and_only_on_live_workers(
    hub_settings: HubSettings, redis_client: redis.asyncio.Redis, namespace: str
) -> None:
    tokens = TokenStore(redis_client, namespace)
    admin = await tokens.create(Role.ADMIN)
    monitor = await tokens.create(Role.MONITOR)
    client = await tokens.create(Role.CLIENT)
    async with running_hub(hub_settings) as base_url, worker(base_url, "w1", token=admin):
        for action in ("drain", "resume", "shutdown"):
            for token in (monitor, client):
                refused = await act(base_url, "w1", action, token)
                assert refused.status_code == 403
                assert refused.json()["detail"] == "this needs a token with role admin"
            missing = await act(base_url, "nope", action, admin)
            assert missing.status_code == 404
            assert missing.json()["detail"] == (
                "worker nope is not connected (GET /api/workers lists the live ones)"
            )
        async with httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {monitor}"}
        ) as http:
            [listed] = (await http.get("/api/workers")).json()
        assert listed["state"] == "active"  # nothing changed
        assert (await act(base_url, "w1", "drain", admin)).json()["state"] == "drained"


async def test_a_stopping_worker_is_not_drained_or_resumed(base_url: str) -> None:
    async with worker(base_url, "w1") as w:
        job_id = await submit(base_url)
        await w.send("request_job", slots=1)
        await w.expect("job_assigned")
        stopping = await act(base_url, "w1", "shutdown")
        assert (stopping.json()["state"], stopping.json()["jobs"]) == ("stopping", [job_id])
        assert (await w.expect("worker_control"))["action"] == "shutdown"
        for action in ("drain", "resume"):
            refused = await act(base_url, "w1", action)
            assert refused.status_code == 409 and "shutting down" in refused.json()["detail"]
        assert (await act(base_url, "w1", "shutdown")).json()["state"] == "stopping"


@pytest.mark.slow
async def test_the_action_reaches_a_worker_on_another_replica(hub_settings: HubSettings) -> None:
    async with (
        running_hub(hub_settings) as hub_a,
        running_hub(hub_settings) as hub_b,
        worker(hub_b, "w-b") as w,
    ):
        assert (await act(hub_a, "w-b", "drain")).json()["state"] == "drained"
        assert (await w.expect("worker_control", wait=3))["action"] == "drain"
        job_id = await submit(hub_a)
        await w.send("request_job", slots=1)
        await nothing_assigned(w, "w-b")
        assert (await views(hub_b))["w-b"]["state"] == "drained"
        assert (await act(hub_a, "w-b", "resume")).json()["state"] == "active"
        assert (await w.expect("worker_control", wait=3))["action"] == "resume"
        assert (await w.expect("job_assigned", wait=3))["job_id"] == job_id


@pytest.mark.slow
async def test_the_sdk_and_the_cli(base_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    def emp(*args: str) -> int:
        return main(["--hub", base_url, *args])

    async with worker(base_url, "w1") as w:
        job_id = await submit(base_url)
        await w.send("request_job", slots=1)
        await w.expect("job_assigned")
        assert await asyncio.to_thread(emp, "workers") == 0
        header, row = capsys.readouterr().out.splitlines()[:2]
        assert header.split() == ["worker", "state", "services", "gpus", "jobs", "heartbeat"]
        assert row.split()[:3] == ["w1", "active", "simulation"]
        assert row.split()[4] == job_id and row.endswith("s ago")

        assert await asyncio.to_thread(emp, "workers", "drain", "w1") == 0
        assert capsys.readouterr().out == (
            "worker w1 draining: 1 job running will finish; it takes no new jobs\n"
        )
        assert await asyncio.to_thread(emp, "workers") == 0
        assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["w1", "draining"]
        await w.send("complete_job", job_id=job_id, result=None)
        await next_of(w, "job_completed_ack")  # after the worker_control
        assert await asyncio.to_thread(emp, "workers", "drain", "w1") == 0
        assert capsys.readouterr().out == (
            "worker w1 drained: no job running; it takes no new jobs\n"
        )
        assert await asyncio.to_thread(emp, "workers", "resume", "w1") == 0
        assert capsys.readouterr().out == (
            "worker w1 active: it takes jobs again (0 jobs running)\n"
        )
        assert await asyncio.to_thread(emp, "workers", "shutdown", "w1") == 0
        assert capsys.readouterr().out == (
            "worker w1 stopping: 0 jobs running; it exits once they are done\n"
        )
        assert await asyncio.to_thread(emp, "workers", "resume", "nope") == 1
        err = capsys.readouterr().err
        assert err == (
            "emp: worker nope is not connected (GET /api/workers lists the live ones); "
            "`emp workers` lists the live workers\n"
        )
        with pytest.raises(SystemExit) as usage:
            emp("workers", "drain")
        assert usage.value.code == 2 and "required: worker_id" in capsys.readouterr().err
        async with Client(base_url) as client:
            assert (await client.shutdown_worker("w1"))["state"] == "stopping"
            with pytest.raises(WorkerNotFound, match="nope"):
                await client.drain_worker("nope")


@pytest.fixture
def hub_processes(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Cluster]:
    """A hub process in the test's namespace (removed afterwards)."""
    with cluster(redis_url, namespace, tmp_path) as running:
        yield running


def state_of(hub: Cluster, worker_id: str) -> str | None:
    """The worker's state as /api/workers shows it; None while it is not live."""
    listed = {w["worker_id"]: w for w in hub.get("/api/workers")}
    return listed[worker_id]["state"] if worker_id in listed else None


def heartbeats_pass(hub: Cluster) -> None:
    """Until the (only) worker was heard from twice more (heartbeats every 0.5 s): what it
    sent before has been handled, and a job it could have claimed would be its own by now."""
    since = hub.get("/api/workers")[0]["last_heartbeat"]
    eventually_sync(
        lambda: hub.get("/api/workers")[0]["last_heartbeat"] > since + 0.9,
        within_s=10,
        what="two more heartbeats",
    )


@pytest.mark.slow
def test_shutdown_lets_a_real_worker_finish_its_job_and_exit_0(
    hub_processes: Cluster,
) -> None:
    hub = hub_processes
    proc = hub.start_worker("w-stop", EMP_SIMULATION_DURATION="1.5")
    hub.wait_for_workers("w-stop")
    job_id = hub.submit()
    hub.wait_job(job_id, {"active"})
    stopping = hub.post("/api/workers/w-stop/shutdown")
    assert (stopping["state"], stopping["jobs"]) == ("stopping", [job_id])
    assert proc.wait(30) == 0, proc.text()
    assert hub.wait_job(job_id)["status"] == "completed"
    assert "the hub asks this worker to shut down" in proc.text()
    assert state_of(hub, "w-stop") is None  # its clean goodbye
    later = hub.submit(payload={"duration": 0.05})
    hub.start_worker("w-stop")  # its state went with the goodbye: it is active again
    assert hub.wait_job(later)["status"] == "completed"


@pytest.mark.slow
def test_a_drained_worker_stays_drained_across_a_hub_restart(hub_processes: Cluster) -> None:
    hub = hub_processes
    proc = hub.start_worker("w-cordon")
    hub.wait_for_workers("w-cordon")
    assert hub.post("/api/workers/w-cordon/drain")["state"] == "drained"
    assert hub.hub is not None
    hub.hub.stop()
    hub.start_hub(**{k: v for k, v in hub.hub_env.items() if k.startswith("EMP_")})
    job_id = hub.submit(payload={"duration": 0.05})

    def reconnected() -> bool:
        assert proc.popen.poll() is None, proc.text()
        return "connected to" in proc.text().rsplit("reconnecting", 1)[-1]

    eventually_sync(reconnected, within_s=20, what="the worker reconnected", log=proc.text)
    assert state_of(hub, "w-cordon") == "drained"
    heartbeats_pass(hub)
    assert hub.get(f"/api/jobs/{job_id}")["status"] == "pending"
    # A new process (which knows nothing of the drain) is told at once, and gets nothing.
    proc.stop()
    assert proc.wait() == 0
    fresh = hub.start_worker("w-cordon")
    eventually_sync(
        lambda: "the hub drained this worker" in fresh.text(),
        within_s=20,
        what="the new process told it is drained",
        log=fresh.text,
    )
    assert state_of(hub, "w-cordon") == "drained"
    heartbeats_pass(hub)
    assert hub.get(f"/api/jobs/{job_id}")["status"] == "pending"
    assert hub.post("/api/workers/w-cordon/resume")["state"] == "active"
    assert hub.wait_job(job_id)["status"] == "completed"


@pytest.mark.slow
async def test_a_real_worker_obeys_drain_and_resume(base_url: str) -> None:
    """emp_worker's Worker: drained, it asks for nothing; resumed, it runs what waits."""
    async with running_worker(base_url, [Sleepy()], worker_id="w-real", heartbeat_s=0.2) as real:
        assert (await act(base_url, "w-real", "drain")).json()["state"] == "drained"
        await eventually(lambda: real.paused, within_s=5, what="the worker drained")
        job_id = await submit(base_url, job_type="sleepy")
        submitted = time.time()

        async def heard_since() -> bool:
            heard = (await views(base_url))["w-real"]["last_heartbeat"]
            return bool(heard > submitted + 0.5)

        await eventually(heard_since, within_s=5, what="heartbeats after the submit")
        assert await job_status(base_url, job_id) == "pending"
        assert (await act(base_url, "w-real", "resume")).json()["state"] == "active"

        async def done() -> bool:
            return await job_status(base_url, job_id) == "completed"

        await eventually(done, within_s=5, what="the job ran")
        assert not real.paused


async def test_the_state_is_kept_while_the_worker_is_heard_from_and_expires_after(
    redis_client: redis.asyncio.Redis, namespace: str
) -> None:
    """Each heartbeat renews the state for worker_state_ttl_s; a worker that stays gone
    loses it then. A clean goodbye ends a shutdown, not a drain."""
    broker = Broker(redis_client, BrokerSettings(namespace=namespace, worker_state_ttl_s=100))
    key = broker.key("worker_state", "w1")
    caps = WorkerCapabilities(services={"simulation"})
    await broker.register_worker("w1", caps, instance="i", connection="c1")
    await broker.set_worker_state("w1", "drain")
    assert await redis_client.ttl(key) == 100
    await redis_client.expire(key, 5)  # as if it had not been heard from for a while
    await broker.touch_worker("w1")
    assert await redis_client.ttl(key) == 100
    assert (await broker.worker_details(["w1"]))["w1"].action == "drain"
    assert await broker.unregister_worker("w1", "c1")  # a clean goodbye: still drained
    assert await broker.worker_state("w1") == "drain"

    await broker.register_worker("w1", caps, instance="i", connection="c2")
    await broker.set_worker_state("w1", "shutdown")
    assert await broker.unregister_worker("w1", "c2")
    assert await broker.worker_state("w1") is None  # the next start is active
    await broker.set_worker_state("w1", "drain")
    await broker.set_worker_state("w1", None)  # resume
    assert await redis_client.exists(key) == 0
