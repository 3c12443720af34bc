"""Alerts (emp_hub/alerts.py) against the real hub under uvicorn, with a webhook receiver
of the test's own on a free port: each rule fires once and clears once, the webhook is
signed, retried while the receiver is down and delivered in order, and N replicas send
one webhook per event."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio
import websockets

from emp_hub.alerts import AlertSettings
from emp_hub.broker import Broker, BrokerSettings, JobSpec
from emp_hub.embedded import free_port
from emp_hub.settings import HubSettings
from emp_worker.testing import eventually
from tests.hub_server import running_hub
from tests.test_hub_ws import submit, worker

pytestmark = pytest.mark.hub

SECRET = "s3cret"

#: Every rule off, fast passes and retries; a test turns on the rules it is about.
QUIET = {
    "interval_s": 0.1,
    "unschedulable_s": 0,
    "oldest_pending_s": 0,
    "no_worker_s": 0,
    "dead_letter_count": 0,
    "worker_lost_s": 0,
    "webhook_backoff_s": 0.05,
    "webhook_max_backoff_s": 0.2,
    "webhook_timeout_s": 2,
}


@dataclass
class Attempt:
    """One POST the receiver got, and what it answered."""

    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Receiver:
    """A webhook receiver: records every POST; answers `status` (switch it to 503 to play
    a receiver that is down)."""

    url: str = ""
    status: int = 200
    delay_s: float = 0.0  # before answering: a slow receiver
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def delivered(self) -> list[dict[str, Any]]:
        """The bodies it took (answered 2xx), in order."""
        return [a.json for a in self.attempts if a.status < 300]

    def events(self) -> list[tuple[str, str, str]]:
        """(event, rule, alert id) of each delivery taken."""
        return [(d["event"], d["alert"]["rule"], d["alert"]["id"]) for d in self.delivered]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            lines = head.split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name:
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            status = self.status
            self.attempts.append(Attempt(headers, body, status))
            await asyncio.sleep(self.delay_s)
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    port = free_port()
    rec = Receiver(url=f"http://127.0.0.1:{port}/hook")
    server = await asyncio.start_server(rec.handle, "127.0.0.1", port)
    async with server:
        yield rec


def hub_settings(redis_url: str, namespace: str, **alerts: Any) -> HubSettings:
    return HubSettings(
        redis_url=redis_url,
        broker=BrokerSettings(namespace=namespace, live_cache_s=0, reconnect_grace_s=0.3),
        maintenance_interval_s=0.2,
        alerts=AlertSettings(**{**QUIET, **alerts}),
    )


def webhook(receiver: Receiver) -> dict[str, Any]:
    return {"webhook_url": receiver.url, "webhook_secret": SECRET}


async def get_alerts(base_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url) as http:
        r = await http.get("/api/alerts")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


async def cancel(base_url: str, job_id: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as http:
        r = await http.post(f"/api/jobs/{job_id}/cancel", json={"reason": "test"})
        assert r.status_code == 200, r.text


async def delivered(receiver: Receiver, n: int) -> list[tuple[str, str, str]]:
    """Wait until the receiver took `n` deliveries; return them."""
    await eventually(lambda: len(receiver.delivered) >= n, what=f"{n} deliveries")
    return receiver.events()


@asynccontextmanager
async def monitor(base_url: str) -> AsyncIterator[websockets.ClientConnection]:
    async with websockets.connect(base_url.replace("http", "ws") + "/ws/monitor/m1") as conn:
        assert json.loads(await conn.recv())["type"] == "connection_established"
        yield conn


async def next_alert(conn: websockets.ClientConnection) -> dict[str, Any]:
    """The next `alert` message a monitor gets (other messages are skipped)."""
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(conn.recv(), 10))
        if message["type"] == "alert":
            return message


def documented_verify() -> Callable[[str, bytes, str], bool]:
    """The receiver's check of docs/alerts.md, as written there."""
    text = (Path(__file__).parents[1] / "docs" / "alerts.md").read_text()
    match = re.search(r"### Verifying the signature.*?```python\n(.*?)```", text, re.S)
    assert match is not None
    scope: dict[str, Any] = {}
    exec(match.group(1), scope)
    check: Callable[[str, bytes, str], bool] = scope["verify"]
    return check


def verify(attempt: Attempt) -> bool:
    """The signature verifies as docs/alerts.md says, and not for another body."""
    check = documented_verify()
    header = attempt.headers["x-emp-signature"]
    assert not check(SECRET, attempt.body + b" ", header)
    assert not check("another secret", attempt.body, header)
    return check(SECRET, attempt.body, header)


@pytest.mark.slow
async def test_unschedulable_fires_once_and_clears_once(
    redis_url: str, namespace: str, redis_client: redis.asyncio.Redis, receiver: Receiver
) -> None:
    settings = hub_settings(redis_url, namespace, unschedulable_s=0.2, **webhook(receiver))
    async with running_hub(settings) as base_url, monitor(base_url) as mon:
        job_id = await submit(base_url, job_type=None, service="comfyui")
        [(event, rule, alert_id)] = await delivered(receiver, 1)
        assert (event, rule) == ("firing", "unschedulable")
        alert = receiver.delivered[0]["alert"]
        assert alert["message"].startswith("1 job of service 'comfyui' has waited ")
        assert "no live worker can run them: no worker is connected" in alert["message"]
        assert alert["details"]["service"] == "comfyui"
        assert alert["details"]["oldest_job"] == job_id
        assert alert["subject"] == alert["details"]["requirement_class"]
        assert alert["cleared_at"] is None
        assert all(verify(a) for a in receiver.attempts)
        assert receiver.attempts[0].headers["x-emp-event"] == "firing"
        assert receiver.delivered[0]["hub"]["namespace"] == namespace

        shown = await get_alerts(base_url)
        assert [a["id"] for a in shown["firing"]] == [alert_id] and shown["recent"] == []
        told = await next_alert(mon)
        assert (told["id"], told["rule"], told["cleared_at"]) == (alert_id, rule, None)

        await cancel(base_url, job_id)
        assert await delivered(receiver, 2) == [
            ("firing", "unschedulable", alert_id),
            ("cleared", "unschedulable", alert_id),
        ]
        cleared = await next_alert(mon)
        assert cleared["id"] == alert_id and cleared["cleared_at"] >= alert["started_at"]
        shown = await get_alerts(base_url)
        assert shown["firing"] == []
        assert [(a["id"], a["cleared_at"]) for a in shown["recent"]] == [
            (alert_id, cleared["cleared_at"])
        ]
        assert all(verify(a) for a in receiver.attempts)


@pytest.mark.slow
async def test_no_worker_for_service_clears_when_a_worker_offers_it(
    redis_url: str, namespace: str, redis_client: redis.asyncio.Redis, receiver: Receiver
) -> None:
    settings = hub_settings(redis_url, namespace, no_worker_s=0.2, **webhook(receiver))
    async with running_hub(settings) as base_url:
        for _ in range(2):
            await submit(base_url, job_type=None, service="flux")
        [(event, rule, alert_id)] = await delivered(receiver, 1)
        alert = receiver.delivered[0]["alert"]
        assert (event, rule, alert["subject"]) == ("firing", "no_worker_for_service", "flux")
        assert alert["message"].startswith("2 jobs of service 'flux' are pending, the oldest")
        assert alert["message"].endswith("and no live worker offers service 'flux'")
        async with worker(base_url, "w1", {"services": ["flux"]}):
            assert await delivered(receiver, 2) == [
                ("firing", rule, alert_id),
                ("cleared", rule, alert_id),
            ]


@pytest.mark.slow
async def test_oldest_pending_fires_and_clears(
    redis_url: str, namespace: str, redis_client: redis.asyncio.Redis, receiver: Receiver
) -> None:
    settings = hub_settings(redis_url, namespace, oldest_pending_s=0.3, **webhook(receiver))
    async with running_hub(settings) as base_url:
        first = await submit(base_url)
        await submit(base_url, priority=9)  # newer, ahead in line: not the oldest
        [(event, rule, alert_id)] = await delivered(receiver, 1)
        alert = receiver.delivered[0]["alert"]
        assert (event, rule, alert["subject"]) == ("firing", "oldest_pending", "")
        assert alert["details"]["job_id"] == first
        assert alert["message"].startswith(f"the oldest pending job, {first} of service ")
        for job in (await get_alerts(base_url))["firing"]:
            assert job["id"] == alert_id
        async with httpx.AsyncClient(base_url=base_url) as http:
            pending = (await http.get("/api/jobs", params={"status": "pending"})).json()
        for job in pending["jobs"]:
            await cancel(base_url, job["job_id"])
        assert [e for e, _, _ in await delivered(receiver, 2)] == ["firing", "cleared"]


@pytest.mark.slow
async def test_dead_letter_growth_without_a_webhook(
    redis_url: str, namespace: str, redis_client: redis.asyncio.Redis
) -> None:
    """No webhook: the alert still shows in GET /api/alerts."""
    settings = hub_settings(redis_url, namespace, dead_letter_count=1, dead_letter_window_s=60)
    async with running_hub(settings) as base_url:
        job_id = await submit(base_url, max_attempts=1)
        async with worker(base_url, "w1") as w:
            await w.send("request_job", slots=1)
            await w.expect("job_assigned")
            await w.send("fail_job", job_id=job_id, error="CUDA out of memory", retryable=False)
            await w.expect("job_failed_ack")

        async def firing() -> list[dict[str, Any]]:
            return list((await get_alerts(base_url))["firing"])

        [alert] = await eventually(firing, what="the dead-letter alert")
        assert (alert["rule"], alert["subject"]) == ("dead_letter_growth", "")
        assert alert["message"].startswith("1 job was dead-lettered in the last 60 s")
        async with httpx.AsyncClient(base_url=base_url) as http:
            assert (await http.post(f"/api/jobs/{job_id}/retry")).status_code == 200

        async def recent() -> list[dict[str, Any]]:
            return list((await get_alerts(base_url))["recent"])

        [cleared] = await eventually(recent, what="the alert cleared")
        assert cleared["id"] == alert["id"] and cleared["cleared_at"] is not None
        assert (await get_alerts(base_url))["firing"] == []


@pytest.mark.slow
async def test_a_worker_lost_mid_job_fires_until_it_comes_back(
    redis_url: str, namespace: str, redis_client: redis.asyncio.Redis, receiver: Receiver
) -> None:
    settings = hub_settings(redis_url, namespace, worker_lost_s=60, **webhook(receiver))
    async with running_hub(settings) as base_url:
        job_id = await submit(base_url)
        async with worker(base_url, "w1") as w:
            await w.send("request_job", slots=1)
            await w.expect("job_assigned")
        # The connection ended without a goodbye, holding the job.
        [(event, rule, alert_id)] = await delivered(receiver, 1)
        alert = receiver.delivered[0]["alert"]
        assert (event, rule, alert["subject"]) == ("firing", "worker_lost", "w1")
        assert alert["details"]["jobs"] == [job_id]
        assert alert["message"].startswith("worker 'w1' was lost ")
        assert alert["message"].endswith("while running 1 job and has not come back")
        async with worker(base_url, "w1"):
            assert await delivered(receiver, 2) == [
                ("firing", rule, alert_id),
                ("cleared", rule, alert_id),
            ]
        assert await redis_client.hlen(f"{{{namespace}}}:alerts:lost") == 0


@pytest.mark.slow
async def test_the_webhook_is_retried_while_down_and_delivered_in_order(
    redis_url: str, namespace: str, redis_client: redis.asyncio.Redis, receiver: Receiver
) -> None:
    receiver.status = 503
    settings = hub_settings(redis_url, namespace, oldest_pending_s=0.2, **webhook(receiver))
    async with running_hub(settings) as base_url:
        job_id = await submit(base_url)
        await eventually(lambda: len(receiver.attempts) >= 3, what="retries")
        await cancel(base_url, job_id)
        await eventually(
            lambda: get_recent(base_url), what="the alert cleared while the receiver is down"
        )
        assert receiver.delivered == []
        # The clear waits behind the firing: every attempt so far was the same delivery.
        assert len({a.body for a in receiver.attempts}) == 1
        assert receiver.attempts[0].json["event"] == "firing"
        receiver.status = 200
        [(e1, _, id1), (e2, _, id2)] = await delivered(receiver, 2)
        assert (e1, e2) == ("firing", "cleared") and id1 == id2
        assert receiver.delivered[0] == receiver.attempts[0].json  # the same body, resent
        assert all(verify(a) for a in receiver.attempts)
        assert await redis_client.llen(f"{{{namespace}}}:alerts:outbox") == 0


async def get_recent(base_url: str) -> list[dict[str, Any]]:
    return list((await get_alerts(base_url))["recent"])


@pytest.mark.slow
async def test_two_replicas_send_one_webhook_per_event(
    redis_url: str, namespace: str, redis_client: redis.asyncio.Redis, receiver: Receiver
) -> None:
    receiver.delay_s = 0.5  # a replica that sent on its own would send while one waits
    settings = hub_settings(redis_url, namespace, oldest_pending_s=0.2, **webhook(receiver))
    async with running_hub(settings) as hub_a, running_hub(settings) as hub_b:
        for n, base_url in ((2, hub_a), (4, hub_b)):
            job_id = await submit(base_url)
            await delivered(receiver, n - 1)
            await cancel(base_url, job_id)
            await delivered(receiver, n)
        events = receiver.events()
        assert len(receiver.attempts) == 4
        assert [e for e, _, _ in events] == ["firing", "cleared", "firing", "cleared"]
        assert events[0][2] == events[1][2] != events[2][2] == events[3][2]
        # Any replica answers, from Redis.
        assert await get_alerts(hub_a) == await get_alerts(hub_b)
        assert len((await get_alerts(hub_a))["recent"]) == 2


@pytest.mark.slow
async def test_a_restarted_hub_does_not_fire_again(
    redis_url: str, namespace: str, redis_client: redis.asyncio.Redis, receiver: Receiver
) -> None:
    settings = hub_settings(redis_url, namespace, oldest_pending_s=0.2, **webhook(receiver))
    async with running_hub(settings) as base_url:
        job_id = await submit(base_url)
        await delivered(receiver, 1)
    async with running_hub(settings) as base_url:
        await cancel(base_url, job_id)
        events = await delivered(receiver, 2)
        assert [e for e, _, _ in events] == ["firing", "cleared"]
        assert events[0][2] == events[1][2]


async def test_the_oldest_pending_job_is_found_across_priorities(broker: Broker) -> None:
    first = await broker.submit(JobSpec(service="sim", priority=0))
    fifth = await broker.submit(JobSpec(service="sim", priority=5))
    await broker.submit(JobSpec(service="sim", priority=0))
    other = await broker.submit(JobSpec(service="other"))
    oldest = await broker.oldest_pending(
        [first.requirement_class, other.requirement_class, "no-such-class"]
    )
    assert oldest == {
        first.requirement_class: {0: (first.id, first.created_at), 5: (fifth.id, fifth.created_at)},
        other.requirement_class: {0: (other.id, other.created_at)},
    }


@pytest.mark.slow
async def test_a_worker_back_within_the_grace_raises_nothing(
    redis_url: str, namespace: str, redis_client: redis.asyncio.Redis, receiver: Receiver
) -> None:
    settings = hub_settings(redis_url, namespace, worker_lost_s=60, **webhook(receiver))
    settings.broker.reconnect_grace_s = 2
    async with running_hub(settings) as base_url:
        for worker_id in ("blip", "gone"):
            await submit(base_url)
            async with worker(base_url, worker_id) as w:
                await w.send("request_job", slots=1)
                await w.expect("job_assigned")
        async with worker(base_url, "blip"):  # back within the grace
            [(event, rule, _)] = await delivered(receiver, 1)
            assert (event, rule) == ("firing", "worker_lost")
            assert receiver.delivered[0]["alert"]["subject"] == "gone"
            await eventually(
                lambda: redis_client.hkeys(f"{{{namespace}}}:alerts:lost"),
                what="the record of the lost worker",
            )
            assert await redis_client.hkeys(f"{{{namespace}}}:alerts:lost") == ["gone"]


def test_alert_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMP_ALERTS__WEBHOOK_URL", "http://127.0.0.1:9/hook")
    monkeypatch.setenv("EMP_ALERTS__WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("EMP_ALERTS__UNSCHEDULABLE_S", "0")
    alerts = HubSettings().alerts
    assert alerts.webhook_url == "http://127.0.0.1:9/hook" and alerts.unschedulable_s == 0
    assert alerts.webhook_secret is not None and alerts.webhook_secret.get_secret_value() == SECRET
    assert alerts.oldest_pending_s == 3600  # the others keep their defaults
    documented = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    for name in AlertSettings.model_fields:
        assert f"`EMP_ALERTS__{name.upper()}`" in documented, name
