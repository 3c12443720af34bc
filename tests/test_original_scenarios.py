"""The recorded emp-redis scenarios replayed against our hub, every connection of each:
the original worker(s), client and monitor send their recorded frames and get the recorded
replies, minus the original's bugs (see tests/replay.py and the reference's list). Where our
hub goes another way on purpose, the step says why."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio
import websockets

from emp_hub.broker import BrokerSettings
from emp_hub.settings import HubSettings
from tests.hub_server import running_hub
from tests.replay import Peer, conn_ids, recorded, scenario

pytestmark = [pytest.mark.slow, pytest.mark.hub]

TOKEN = "legacy-test-token"  # the recordings' shared token (WEBSOCKET_AUTH_TOKEN)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def hub_url(
    redis_url: str, namespace: str, redis_client: redis.asyncio.Redis
) -> AsyncIterator[str]:
    """A hub with the original's shared token, short retries and short leases."""
    settings = HubSettings(
        redis_url=redis_url,
        auth_token=TOKEN,
        maintenance_interval_s=0.1,
        broker=BrokerSettings(namespace=namespace, retry_base_s=0.3, lease_s=2.0),
    )
    async with running_hub(settings) as url:
        yield url


async def play_n(peer: Peer, kind: str, n: int) -> None:
    """Play on until `n` more replies of this type have come and been checked."""
    for _ in range(n):
        await peer.play(until=kind)


def job_story(messages: list[dict[str, Any]], job_id: str) -> list[tuple[str, Any]]:
    """What a client or monitor heard of one job: (type, status or progress) in order,
    keep-alives left out."""
    story = []
    for m in messages:
        if m.get("job_id") != job_id or m["type"] in {"job_accepted", "error"}:
            continue
        if m["type"] == "update_job_progress":
            if m["progress"] != -1:
                story.append((m["type"], m["progress"]))
        else:
            story.append((m["type"], m.get("status")))
    return story


def recorded_story(name: str, conn: str, job_id: str) -> list[tuple[str, Any]]:
    """The same, from the recording (duplicates of the original left out)."""
    peer = Peer(name, conn)
    return job_story([f["msg"] for f in peer.frames if f["dir"] == "from_hub"], job_id)


async def drain(peer: Peer, quiet_s: float = 0.3) -> None:
    """Receive until the connection has been quiet for a moment."""
    while True:
        try:
            await asyncio.wait_for(peer.receive(), quiet_s)
        except TimeoutError:
            return


def check_first_stats(name: str, monitor: Peer, worker_id: str) -> None:
    """A monitor's first stats_broadcast comes at once on connect (the original's came
    when it subscribed, then every few seconds: ours comes both times), and describes the
    worker as the recorded one did: every recorded field, the original capabilities'
    `supported_job_types` among ours."""
    heard = [m for m in monitor.got if m["type"] != "worker_status"]
    kinds = [m["type"] for m in heard]
    assert kinds == [
        "connection_established",
        "stats_broadcast",  # on connect
        "stats_broadcast",  # the answer to subscribe
        "subscription_confirmed",
    ], kinds
    [want] = [
        f["msg"]
        for f in recorded(name, "monitor")
        if f["dir"] == "from_hub" and f["msg"]["type"] == "stats_broadcast"
    ][:1]
    want_worker = want["workers"][worker_id]
    got = heard[1]["workers"][worker_id]
    assert set(got) >= set(want_worker), (got, want_worker)
    assert got["supported_job_types"] == want_worker["supported_job_types"]
    caps = want_worker["capabilities"]
    assert got["capabilities"]["supported_job_types"] == caps["supported_job_types"], got


async def opening(
    hub_url: str, name: str, worker_id: str | None = None, ids: dict[str, str] | None = None
) -> tuple[Peer, Peer, Peer]:
    """How every recorded scenario begins: a worker registers, a monitor subscribes, a
    client connects and submits its first job. Returns (worker, monitor, client)."""
    ids = {} if ids is None else ids
    worker = await Peer(name, "worker", worker_id, ids).connect(hub_url, TOKEN)
    await worker.play(until="worker_heartbeat_ack")
    monitor = await Peer(name, "monitor", ids=ids).connect(hub_url, TOKEN)
    await monitor.play(until="subscription_confirmed")
    check_first_stats(name, monitor, worker.conn_id)
    client = await Peer(name, "client", ids=ids).connect(hub_url, TOKEN)
    await client.play(until="job_accepted")
    return worker, monitor, client


async def test_sim_failure(hub_url: str) -> None:
    """A worker fails a job; the hub queues it for a retry; force_retry_job; a cancel; a
    second job fails and another worker completes it."""
    name = "sim_failure"
    ids: dict[str, str] = {}
    failing_id, healthy_id = conn_ids(name, "worker")
    failing, monitor, client = await opening(hub_url, name, failing_id, ids)
    await failing.play(until="job_failed_ack")
    await play_n(client, "update_job_progress", 3)
    client.skip(why="the original forwarded fail_job for a job it requeued", until="fail_job")
    await client.expect("update_job_progress", job_id="fail-job-1", status="retrying")

    async with httpx.AsyncClient(base_url=hub_url, headers=AUTH) as http:
        job = (await http.get("/api/jobs/fail-job-1")).json()
        assert (job["status"], job["client_id"], job["failures"]) in {
            ("delayed", "client-1", 1),
            ("pending", "client-1", 1),
        }
        await client.play(until="response_job_status")  # force_retry_job: history cleared

        # The job is queued for any worker now, and offered to the idle one at once (the
        # original waited for its next heartbeat, then refused the claim).
        await failing.expect("job_available", job_id="fail-job-1")
        failing.skip(why="offered at once, and the claim succeeds", until="error")
        await failing.send({"type": "claim_job", "job_id": "fail-job-1", "claim_timeout": 30})
        await failing.expect("job_assigned", job_id="fail-job-1")
        await client.expect("response_job_status", job_id="fail-job-1", status="processing")

        await client.play(until="response_job_status")  # cancel_job: answered once
        # The original never told the worker; ours does.
        await failing.expect("cancel_job", job_id="fail-job-1")
        await failing.send({"type": "worker_status", "status": "idle"})  # done with it
        job = (await http.get("/api/jobs/fail-job-1")).json()
        assert job["status"] == "cancelled"

        await client.play(until="job_accepted")  # fail-job-2
        await failing.play(until="job_failed_ack")
        await play_n(client, "update_job_progress", 3)
        client.skip(why="the original forwarded fail_job for a job it requeued", until="fail_job")
        await client.expect("update_job_progress", job_id="fail-job-2", status="retrying")

        healthy = await Peer(name, "worker", healthy_id, ids).connect(hub_url, TOKEN)
        await healthy.play(until="job_notifications_subscribed")
        # Ours answers the heartbeat first: the job comes when its retry is due (0.3 s),
        # to the healthy worker alone, once (the original offered it twice and refused
        # the second claim: "... is not idle").
        await healthy.expect("worker_heartbeat_ack")
        await healthy.play(until="job_available")
        await healthy.send_next()  # claim_job
        healthy.skip(why="one offer, one claim; the ack came first", count=3)
        await healthy.play(until="job_assigned")
        await healthy.send_next(4)  # busy, progress 0, 0, 25
        healthy.skip(why="no second claim, so no refusal")
        await healthy.play(until="job_completed_ack")
        await client.play()  # to the end: processing, progress, complete_job
        job = (await http.get("/api/jobs/fail-job-2")).json()
        assert (job["status"], job["worker_id"], job["failures"]) == ("completed", healthy_id, 1)

    await drain(monitor)
    heard = monitor.got
    # What the monitor heard of the job is what the original's monitor heard, with "will
    # retry" in place of the original's premature fail_job.
    assert job_story(heard, "fail-job-2") == [
        ("update_job_progress", 0) if kind == "fail_job" else (kind, value)
        for kind, value in recorded_story(name, "monitor", "fail-job-2")
    ]
    copies = [m for m in heard if m.get("job_id") == "fail-job-2"]
    assert {m["client_id"] for m in copies} == {"client-1"}
    statuses = [(m["worker_id"], m["status"]) for m in heard if m["type"] == "worker_status"]
    assert (failing_id, "busy") in statuses and (healthy_id, "busy") in statuses
    assert statuses[-1] == (healthy_id, "idle")
    for peer in (failing, healthy, client, monitor):
        await peer.close()


async def test_cancel_running(hub_url: str) -> None:
    """Cancel while the job runs: the original let it finish as "completed" and never told
    the worker; ours tells it at once, and its later reports are refused."""
    name = "cancel_running"
    ids: dict[str, str] = {}
    worker, monitor, client = await opening(hub_url, name, ids=ids)
    await worker.play(until="job_assigned")
    # Its status and first three progress reports, then the client cancels.
    await worker.send_next(4)
    await play_n(client, "update_job_progress", 3)
    await client.play(until="response_job_status")  # the cancel, answered once
    await worker.expect("cancel_job", job_id="cancel-run-1", reason="cancel while running")
    # The original worker goes on (it ignores cancel_job); its reports now get errors.
    while worker.pos < len(worker.frames):
        frame = worker.frames[worker.pos]
        if frame["dir"] == "from_hub":
            worker.skip(why="the job is cancelled: no ack for its completion")
            continue
        kind = frame["msg"]["type"]
        await worker.send_next()
        if kind in {"update_job_progress", "complete_job"}:
            error = await worker.expect("error")
            assert "does not hold job cancel-run-1" in error["error"]
    client.skip(why="a cancelled job's later reports go nowhere", count=len(client.frames))
    async with httpx.AsyncClient(base_url=hub_url, headers=AUTH) as http:
        job = (await http.get("/api/jobs/cancel-run-1")).json()
    assert (job["status"], job["client_id"]) == ("cancelled", "client-1")
    await drain(client)
    assert [m["type"] for m in client.got[-1:]] == ["response_job_status"]  # nothing after
    await drain(monitor)
    assert job_story(monitor.got, "cancel-run-1")[-1] == ("response_job_status", "cancelled")
    for peer in (worker, client, monitor):
        await peer.close()


async def test_worker_kill(hub_url: str) -> None:
    """The worker running a job is killed (its socket drops): the original took ~60 s to
    run the job elsewhere; ours requeues it when the lease runs out (2 s here)."""
    name = "worker_kill"
    ids: dict[str, str] = {}
    a_id, b_id = conn_ids(name, "worker")
    doomed, monitor, client = await opening(hub_url, name, a_id, ids)
    await doomed.play()  # offer, claim, two progress steps; then the recording ends
    # The second worker connects now, not before the submit as recorded: with two idle
    # workers ours offers the job to either (taking turns), the original to the first.
    other = await Peer(name, "worker", b_id, ids).connect(hub_url, TOKEN)
    await other.play(until="worker_heartbeat_ack")
    await play_n(client, "update_job_progress", 4)
    assert doomed.socket is not None
    doomed.socket.transport.abort()  # like kill -9: no close frame
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    # The other worker's heartbeats and, once the lease is gone, the job.
    other.skip(why="its heartbeats at 20 s and 40 s", until="worker_heartbeat_ack")
    other.skip(why="its heartbeats at 20 s and 40 s", until="worker_heartbeat_ack")
    other.skip(why="heartbeat at 60 s: ours offers the job without waiting for one", count=1)
    await other.play(until="job_available")
    rerun_after = loop.time() - killed_at
    other.skip(why="the heartbeat's ack (that heartbeat was not sent)", count=1)
    await other.play()  # claim, run, complete
    await client.play()
    async with httpx.AsyncClient(base_url=hub_url, headers=AUTH) as http:
        job = (await http.get("/api/jobs/kill-job-1")).json()
    assert (job["status"], job["worker_id"], job["orphans"]) == ("completed", b_id, 1)
    assert rerun_after < 10, rerun_after  # the original: 59.7 s
    await drain(monitor)
    assert job_story(monitor.got, "kill-job-1") == recorded_story(name, "monitor", "kill-job-1")
    for peer in (other, client, monitor):
        await peer.close()


async def test_client_extras(hub_url: str) -> None:
    """The client's and monitor's other messages around three jobs run by an original
    worker: status requests, subscriptions, errors, an id reused, a job submitted over
    REST and followed over the socket."""
    name = "client_extras"
    ids: dict[str, str] = {}
    # The client's opening: stay_alive, subscribe_stats, request_stats, bad status
    # requests, an unknown type, a frame that is not JSON, then extra-job-1.
    worker, monitor, client = await opening(hub_url, name, ids=ids)
    await worker.play(until="job_completed_ack")
    await client.play(until="complete_job")
    status = await client.play(until="response_job_status")  # request_job_status
    assert status is not None and status["result"]["status"] == "success"
    await client.play(until="subscription_confirmed")  # subscribe_job
    await client.play(until="response_job_status")  # force_retry_job: nothing to clear
    # The id reused: the original stored the job under a new id and said nothing.
    await client.send_next()
    error = await client.expect("error")
    assert "extra-job-1 already exists" in error["error"]
    worker.skip(why="the reused id's job does not exist here", until="job_completed_ack")

    # The monitor's own requests.
    monitor.skip_to("get_system_status", why="its job copies are checked at the end")
    await drain(monitor)
    await monitor.play(until="subscription_confirmed")  # stay_alive ... subscribe

    await client.play(until="job_accepted")  # extra-job-2 ...
    await worker.play(until="job_completed_ack")  # ... run by the worker
    await client.play(until="complete_job")
    async with httpx.AsyncClient(base_url=hub_url, headers=AUTH) as http:
        [rest] = [r["msg"] for r in recorded(name, "rest") if r["dir"] == "to_hub"]
        r = await http.post(rest["path"], json=rest["body"])
        assert r.json()["job_id"] == "extra-rest-1"
    await worker.play(until="job_available")  # offered (so reserved, "processing") ...
    await client.play()  # ... when the client subscribes to it
    await worker.play()  # the worker runs it
    # Ours really subscribes (the original's subscribe_job never did).
    worker_id = conn_ids(name, "worker")[0]
    await client.expect("update_job_progress", job_id="extra-rest-1", worker_id=worker_id)
    await drain(client)
    assert job_story(client.got, "extra-rest-1")[-1] == ("complete_job", None)

    await drain(monitor)
    for job_id in ("extra-job-1", "extra-job-2", "extra-rest-1"):
        assert job_story(monitor.got, job_id) == recorded_story(name, "monitor", job_id)
    clients = {m["job_id"]: m["client_id"] for m in monitor.got if "client_id" in m}
    assert clients == {"extra-job-1": "client-1", "extra-job-2": "client-1", "extra-rest-1": None}
    statuses = [m["status"] for m in monitor.got if m["type"] == "worker_status"]
    # The worker's first heartbeat ("idle") may reach the monitor or come just before it.
    assert statuses in (["busy", "idle"] * 3, ["idle"] + ["busy", "idle"] * 3)
    for peer in (worker, client, monitor):
        await peer.close()


async def test_unsupported_cancel(hub_url: str) -> None:
    """A job no worker can run waits; it is cancelled; cancelling again, an unknown id
    and a missing id are errors."""
    name = "unsupported_cancel"
    worker = await Peer(name, "worker").connect(hub_url, TOKEN)
    await worker.play()
    monitor = await Peer(name, "monitor").connect(hub_url, TOKEN)
    await monitor.play()
    client = await Peer(name, "client").connect(hub_url, TOKEN)
    await client.play(until="job_accepted")
    async with httpx.AsyncClient(base_url=hub_url, headers=AUTH) as http:
        job = (await http.get("/api/jobs/nst-job-1")).json()
        assert (job["status"], job["position"], job["display_position"]) == ("pending", 0, 1)
        queues = (await http.get("/api/queues")).json()
        assert queues["unschedulable_jobs"] == 1, queues  # nobody can run it: the hub says so
        await client.play(until="response_job_status")  # cancelled, answered once
        # A second cancel of the cancelled job: the original said "cancelled" again.
        client.skip(why="cancelling a cancelled job is an error", until="response_job_status")
        await client.send({"type": "cancel_job", "job_id": "nst-job-1"})
        error = await client.expect("error")
        assert "terminal state" in error["error"]
        await client.play()  # unknown id, missing id: the recorded errors
        job = (await http.get("/api/jobs/nst-job-1")).json()
        assert (job["status"], job["position"]) == ("cancelled", None)
    assert worker.got[-1]["type"] == "worker_heartbeat_ack"  # offered nothing
    for peer in (worker, client, monitor):
        await peer.close()


async def test_invalid_token(hub_url: str) -> None:
    """A bad or missing token on each route: the same `error`, then the socket closes (the
    original closed with 1000; ours with 1008, policy violation). REST wants the token too
    (the original had no authentication there)."""
    name = "invalid_token"
    opens = [r for r in scenario(name) if r["msg"].get("_event") == "open"]
    assert len(opens) == 5
    for row in opens:
        url = hub_url.replace("http", "ws", 1) + row["msg"]["path"]
        async with websockets.connect(url) as conn:
            first = json.loads(await asyncio.wait_for(conn.recv(), 5))
            assert first["type"] == "error"
            assert first["error"].startswith("Authentication failed"), first
            # The original worker still sent its registration (the recording's frames);
            # they land on a closed socket, as they did there.
            with contextlib.suppress(websockets.ConnectionClosed):
                for frame in recorded(name, row["conn"], row["conn_id"]):
                    if frame["dir"] == "to_hub":
                        await conn.send(json.dumps(frame["msg"]))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(conn.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    rest = [r for r in recorded(name, "rest") if r["dir"] == "to_hub"]
    async with httpx.AsyncClient(base_url=hub_url) as http:
        for row in rest:
            r = await http.request(
                row["msg"]["method"], row["msg"]["path"], json=row["msg"]["body"]
            )
            assert r.status_code == 401, r.text
        r = await http.post("/api/jobs", json=rest[0]["msg"]["body"], headers=AUTH)
        assert r.json()["job_id"] == "rest-noauth-1"
