"""Alerts: rules evaluated every `interval_s` over what the broker knows, each alert fired
once when its condition starts and cleared once when it ends; shown by `GET /api/alerts`,
sent to every replica's monitors and, when a URL is set, POSTed to a webhook.

One replica at a time evaluates and sends (it holds `alerts:lock`, renewed every pass);
the others only answer `GET /api/alerts`. The state lives in Redis (`alerts:firing`,
`alerts:recent`), so any replica answers and a restart does not fire again what fired.
Webhook deliveries wait in `alerts:outbox` (a list, in order) until the receiver takes
them: retried with capped exponential backoff, delivered at least once. See docs/alerts.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from asyncio import FIRST_COMPLETED
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar, cast

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

import emp_hub
from emp_hub.broker import REDIS_DOWN, Broker, QueueStats
from emp_hub.events import EventBus

log = logging.getLogger("emp_hub.alerts")

T = TypeVar("T")

Rule = Literal[
    "unschedulable", "dead_letter_growth", "no_worker_for_service", "oldest_pending", "worker_lost"
]

#: Cleared alerts kept for `GET /api/alerts` (the newest).
RECENT_MAX = 100
#: Webhook deliveries kept while the receiver is down; past it the oldest is dropped.
OUTBOX_MAX = 10_000
#: Workers lost mid-job remembered at once; past it a loss is logged, not recorded.
LOST_MAX = 1_000
#: Jobs named in a worker_lost alert (the count is always there).
LOST_JOBS_SHOWN = 20


class AlertSettings(BaseModel):
    """The alert rules and the webhook (EMP_ALERTS__...). A threshold of 0 turns its rule
    off."""

    model_config = ConfigDict(extra="forbid")

    interval_s: float = Field(default=10, gt=0, description="How often the rules are evaluated.")
    unschedulable_s: float = Field(
        default=300,
        ge=0,
        description="Fire when jobs no live worker can run have waited this long (per class).",
    )
    oldest_pending_s: float = Field(
        default=3600, ge=0, description="Fire when the oldest pending job has waited this long."
    )
    no_worker_s: float = Field(
        default=300,
        ge=0,
        description="Fire when a service's pending jobs have waited this long and no live "
        "worker offers the service.",
    )
    dead_letter_count: int = Field(
        default=10,
        ge=0,
        description="Fire when this many jobs were dead-lettered within dead_letter_window_s.",
    )
    dead_letter_window_s: float = Field(
        default=3600, gt=0, description="The window of dead_letter_count."
    )
    worker_lost_s: float = Field(
        default=600,
        ge=0,
        description="A worker lost mid-job (gone past the reconnect grace while holding jobs) "
        "fires; the alert clears when it is back, or after this long.",
    )
    webhook_url: str | None = Field(default=None, description="Where alerts are POSTed.")
    webhook_secret: SecretStr | None = Field(
        default=None, description="Signs each POST (X-Emp-Signature: HMAC-SHA256 of the body)."
    )
    webhook_timeout_s: float = Field(default=10, gt=0, description="Timeout of one POST.")
    webhook_backoff_s: float = Field(
        default=1, gt=0, description="The first retry delay after a failed POST (doubles)."
    )
    webhook_max_backoff_s: float = Field(
        default=300, gt=0, description="The largest retry delay of a failed POST."
    )


class Alert(BaseModel):
    """One alert: firing (cleared_at null) or cleared."""

    id: str
    rule: Rule
    subject: str = Field(description="What it is about: a class, a service, a worker; '' global.")
    message: str = Field(description="One human sentence.")
    started_at: float
    cleared_at: float | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class AlertList(BaseModel):
    """The answer of GET /api/alerts."""

    firing: list[Alert]
    recent: list[Alert] = Field(description="Cleared alerts, newest first (the last 100).")


class Condition(BaseModel):
    """A rule's condition that holds now (it fires unless it already does)."""

    rule: Rule
    subject: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)

    @property
    def field(self) -> str:
        """Its field in alerts:firing."""
        return f"{self.rule}\t{self.subject}"


# Take or renew the lock: KEYS[1] the lock, ARGV[1] this replica, ARGV[2] its TTL (ms).
_LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] or not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# Let go of the lock, if this replica holds it.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Fire, if this replica holds the lock and the alert does not fire yet. KEYS: lock, firing,
# outbox; ARGV: replica, field, alert (JSON), webhook body ('' for none), outbox cap.
_FIRE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 0 then return 0 end
if ARGV[4] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[4])
  if redis.call('LLEN', KEYS[3]) > tonumber(ARGV[5]) then redis.call('LPOP', KEYS[3]) end
end
return 1
"""

# Clear, if this replica holds the lock and that alert (by id) still fires. KEYS: lock,
# firing, recent, outbox; ARGV: replica, field, alert id, cleared alert (JSON), webhook body
# ('' for none), outbox cap, recent cap.
_CLEAR = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local current = redis.call('HGET', KEYS[2], ARGV[2])
if not current or cjson.decode(current).id ~= ARGV[3] then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('LPUSH', KEYS[3], ARGV[4])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[7]) - 1)
if ARGV[5] ~= '' then
  redis.call('RPUSH', KEYS[4], ARGV[5])
  if redis.call('LLEN', KEYS[4]) > tonumber(ARGV[6]) then redis.call('LPOP', KEYS[4]) end
end
return 1
"""

# A delivery was taken: drop it from the head of the outbox (if it is still there).
_ACK = """
if redis.call('LINDEX', KEYS[1], 0) == ARGV[1] then redis.call('LPOP', KEYS[1]) return 1 end
return 0
"""


def sign(secret: str, body: bytes) -> str:
    """The X-Emp-Signature header of a body: "sha256=" and the hex HMAC-SHA256."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _jobs(n: int) -> str:
    return "1 job of service" if n == 1 else f"{n} jobs of service"


class AlertEngine:
    """One replica's part in alerting: evaluate and send while it holds the lock; answer
    what fires from Redis whenever asked."""

    def __init__(
        self,
        broker: Broker,
        bus: EventBus,
        settings: AlertSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.broker = broker
        self.bus = bus
        self.settings = settings
        self.clock = clock
        self.redis = broker.redis
        keys = broker.keys
        self._lock_key = keys("alerts_lock")
        self._firing_key = keys("alerts_firing")
        self._recent_key = keys("alerts_recent")
        self._outbox_key = keys("alerts_outbox")
        self._lost_key = keys("alerts_lost")
        self._lock_script = self.redis.register_script(_LOCK)
        self._fire_script = self.redis.register_script(_FIRE)
        self._clear_script = self.redis.register_script(_CLEAR)
        self._ack_script = self.redis.register_script(_ACK)
        self._unlock_script = self.redis.register_script(_UNLOCK)
        #: Whether this replica held the lock at its last pass.
        self.holder = False
        self._outbox_ready = asyncio.Event()
        self.hub_info = {
            "namespace": broker.settings.namespace,
            "replica": broker.origin,
            "version": emp_hub.__version__,
        }

    # -- reading ---------------------------------------------------------------------------

    async def firing(self) -> list[Alert]:
        """The alerts firing now, oldest first."""
        raw = cast(dict[str, str], await self.redis.hgetall(self._firing_key))
        alerts = [Alert.model_validate_json(v) for v in raw.values()]
        return sorted(alerts, key=lambda a: a.started_at)

    async def snapshot(self) -> AlertList:
        """What GET /api/alerts answers: the firing alerts and the recently cleared ones."""
        recent = cast(list[str], await self.redis.lrange(self._recent_key, 0, RECENT_MAX - 1))
        return AlertList(
            firing=await self.firing(), recent=[Alert.model_validate_json(r) for r in recent]
        )

    # -- what the hub tells it -------------------------------------------------------------

    async def worker_lost(self, worker_id: str, connection: str, jobs: list[str]) -> None:
        """A worker's connection ended without a goodbye while it held `jobs`: the
        worker_lost rule fires for it unless it is back within the reconnect grace."""
        if not self.settings.worker_lost_s or not jobs:
            return
        if await self.redis.hlen(self._lost_key) >= LOST_MAX:
            log.warning("worker %s lost mid-job; too many lost workers to alert on", worker_id)
            return
        record = {
            "at": self.clock(),
            "connection": connection,
            "jobs": jobs[:LOST_JOBS_SHOWN],
            "held": len(jobs),
        }
        await self.redis.hset(self._lost_key, worker_id, json.dumps(record))

    # -- the loops -------------------------------------------------------------------------

    async def run_until(self, stop: asyncio.Event) -> None:
        """Evaluate (while this replica holds the lock) and deliver, until `stop`."""
        async with httpx.AsyncClient(timeout=self.settings.webhook_timeout_s) as http:
            await asyncio.gather(self._evaluate_until(stop), self._deliver_until(stop, http))

    async def _evaluate_until(self, stop: asyncio.Event) -> None:
        interval = self.settings.interval_s
        while not stop.is_set():
            try:
                self.holder = await self._take_lock()
                if self.holder:
                    await self.evaluate()
            except REDIS_DOWN as exc:
                self.holder = False
                log.warning("alert pass skipped: %s", exc)
            except Exception:  # nothing must end the loop
                log.exception("alert pass failed")
            await _wait(stop, interval)
        if self.holder:  # stopping: another replica takes over at once
            with contextlib.suppress(*REDIS_DOWN):
                await self._unlock_script(keys=[self._lock_key], args=[self.broker.origin])

    async def _take_lock(self) -> bool:
        ttl_ms = int((3 * self.settings.interval_s + 1) * 1000)
        return bool(
            await self._lock_script(keys=[self._lock_key], args=[self.broker.origin, ttl_ms])
        )

    async def evaluate(self) -> None:
        """One pass: fire the conditions that hold and do not fire yet, clear the alerts
        whose condition ended."""
        now = self.clock()
        conditions = {c.field: c for c in await self.conditions(now)}
        firing = cast(dict[str, str], await self.redis.hgetall(self._firing_key))
        for field, condition in conditions.items():
            if field not in firing:
                await self._fire(condition, now)
        for field, stored in firing.items():
            if field not in conditions:
                await self._clear(field, Alert.model_validate_json(stored), now)

    async def _fire(self, condition: Condition, now: float) -> None:
        alert = Alert(
            id=secrets.token_hex(8),
            rule=condition.rule,
            subject=condition.subject,
            message=condition.message,
            started_at=now,
            details=condition.details,
        )
        body = self._body("firing", alert)
        fired = await self._fire_script(
            keys=[self._lock_key, self._firing_key, self._outbox_key],
            args=[self.broker.origin, condition.field, alert.model_dump_json(), body, OUTBOX_MAX],
        )
        if fired:
            log.warning("alert firing: %s", alert.message)
            await self._announce(alert)

    async def _clear(self, field: str, alert: Alert, now: float) -> None:
        cleared = alert.model_copy(update={"cleared_at": now})
        body = self._body("cleared", cleared)
        done = await self._clear_script(
            keys=[self._lock_key, self._firing_key, self._recent_key, self._outbox_key],
            args=[
                self.broker.origin,
                field,
                alert.id,
                cleared.model_dump_json(),
                body,
                OUTBOX_MAX,
                RECENT_MAX,
            ],
        )
        if done:
            log.info("alert cleared: %s", alert.message)
            await self._announce(cleared)

    def _body(self, event: str, alert: Alert) -> str:
        """The webhook body of an event ('' without a webhook)."""
        if not self.settings.webhook_url:
            return ""
        return json.dumps(
            {
                "event": event,
                "alert": alert.model_dump(mode="json"),
                "hub": self.hub_info,
                "delivery": uuid.uuid4().hex,
            },
            separators=(",", ":"),
        )

    async def _announce(self, alert: Alert) -> None:
        self._outbox_ready.set()
        try:
            await self.bus.tell_monitors({"type": "alert", **alert.model_dump(mode="json")})
        except REDIS_DOWN:
            log.warning("could not tell the monitors of alert %s", alert.id)

    # -- the rules -------------------------------------------------------------------------

    async def conditions(self, now: float) -> list[Condition]:
        """Every rule's conditions that hold now."""
        s = self.settings
        stats = await self.broker.stats()
        wanted = s.unschedulable_s or s.oldest_pending_s or s.no_worker_s
        classes = [c.requirement_class for c in stats.classes]
        heads = await self.broker.oldest_pending(classes) if wanted and classes else {}
        oldest = {
            c: min(by_priority.values(), key=lambda h: h[1]) for c, by_priority in heads.items()
        }
        found: list[Condition] = []
        found += await self._unschedulable(stats, oldest, now)
        found += await self._no_worker(stats, oldest, now)
        found += self._oldest_pending(stats, oldest, now)
        found += await self._dead_letters(now)
        found += await self._lost_workers(now)
        return found

    async def _unschedulable(
        self, stats: QueueStats, oldest: dict[str, tuple[str, float]], now: float
    ) -> list[Condition]:
        limit = self.settings.unschedulable_s
        found: list[Condition] = []
        for c in stats.classes:
            head = oldest.get(c.requirement_class)
            if not limit or not c.unschedulable or head is None or now - head[1] < limit:
                continue
            waited = now - head[1]
            why = await self.broker.why_unschedulable(c.requirements) or "none matches"
            service = c.requirements.service
            verb = "has" if c.pending == 1 else "have"
            found.append(
                Condition(
                    rule="unschedulable",
                    subject=c.requirement_class,
                    message=f"{_jobs(c.pending)} '{service}' {verb} waited {waited:.0f} s and "
                    f"no live worker can run them: {why}",
                    details={
                        "requirement_class": c.requirement_class,
                        "service": service,
                        "pending": c.pending,
                        "oldest_job": head[0],
                        "waited_s": round(waited, 1),
                        "reason": why,
                        "requirements": c.requirements.model_dump(mode="json"),
                    },
                )
            )
        return found

    async def _no_worker(
        self, stats: QueueStats, oldest: dict[str, tuple[str, float]], now: float
    ) -> list[Condition]:
        limit = self.settings.no_worker_s
        if not limit or not stats.classes:
            return []
        live = await self.broker.live_workers()
        offered = {s for caps in live.values() for s in caps.services}
        pending: dict[str, int] = {}
        since: dict[str, float] = {}
        for c in stats.classes:
            service, head = c.requirements.service, oldest.get(c.requirement_class)
            pending[service] = pending.get(service, 0) + c.pending
            if head is not None:
                since[service] = min(since.get(service, now), head[1])
        found: list[Condition] = []
        for service, n in sorted(pending.items()):
            waited = now - since.get(service, now)
            if service in offered or waited < limit:
                continue
            verb = "is" if n == 1 else "are"
            found.append(
                Condition(
                    rule="no_worker_for_service",
                    subject=service,
                    message=f"{_jobs(n)} '{service}' {verb} pending, the oldest for "
                    f"{waited:.0f} s, and no live worker offers service '{service}'",
                    details={"service": service, "pending": n, "waited_s": round(waited, 1)},
                )
            )
        return found

    def _oldest_pending(
        self, stats: QueueStats, oldest: dict[str, tuple[str, float]], now: float
    ) -> list[Condition]:
        limit = self.settings.oldest_pending_s
        if not limit or not oldest:
            return []
        cls, (job_id, created) = min(oldest.items(), key=lambda kv: kv[1][1])
        waited = now - created
        if waited < limit:
            return []
        service = next(c.requirements.service for c in stats.classes if c.requirement_class == cls)
        return [
            Condition(
                rule="oldest_pending",
                subject="",
                message=f"the oldest pending job, {job_id} of service '{service}', has waited "
                f"{waited:.0f} s (the limit is {limit:.0f} s)",
                details={
                    "job_id": job_id,
                    "service": service,
                    "requirement_class": cls,
                    "waited_s": round(waited, 1),
                    "pending": stats.pending,
                },
            )
        ]

    async def _dead_letters(self, now: float) -> list[Condition]:
        s = self.settings
        if not s.dead_letter_count:
            return []
        window = s.dead_letter_window_s
        n = int(await self.redis.zcount(self.broker.key("dead"), now - window, "+inf"))
        if n < s.dead_letter_count:
            return []
        return [
            Condition(
                rule="dead_letter_growth",
                subject="",
                message=f"{'1 job was' if n == 1 else f'{n} jobs were'} dead-lettered in "
                f"the last {window:.0f} s (the limit is {s.dead_letter_count})",
                details={"count": n, "window_s": window, "limit": s.dead_letter_count},
            )
        ]

    async def _lost_workers(self, now: float) -> list[Condition]:
        """Workers lost mid-job and not back: one condition each, from the reconnect grace
        on, until the worker is back or worker_lost_s passed (then the record goes)."""
        limit = self.settings.worker_lost_s
        if not limit:
            await self.redis.delete(self._lost_key)
            return []
        lost = cast(dict[str, str], await self.redis.hgetall(self._lost_key))
        if not lost:
            return []
        workers = sorted(lost)
        owners = cast(
            list[str | None],
            await self.redis.mget([self.broker.key("owner", w) for w in workers]),
        )
        grace = self.broker.settings.reconnect_grace_s
        found: list[Condition] = []
        done: list[str] = []
        for worker, owner in zip(workers, owners, strict=True):
            record = json.loads(lost[worker])
            state = (owner or "").split(" ")
            back = state[0] == "up" and state[2:3] != [record["connection"]]
            since = now - record["at"]
            if back or since >= limit:
                done.append(worker)
            elif since >= grace:
                found.append(_lost(worker, record, since))
        if done:
            await self.redis.hdel(self._lost_key, *done)
        return found

    # -- the webhook -----------------------------------------------------------------------

    async def _deliver_until(self, stop: asyncio.Event, http: httpx.AsyncClient) -> None:
        """Send the outbox's head until it is taken, in order, with capped backoff."""
        s = self.settings
        failures = 0
        while not stop.is_set():
            try:
                body = await self._next_delivery()
                if body is None:
                    await self._outbox_waits(stop)
                    continue
                done = await _unless_stopped(stop, self._post(http, s.webhook_url or "", body))
                if done is None:
                    return  # stopping mid-POST: it stays first in the outbox
                if done:
                    failures = 0
                    await self._ack_script(keys=[self._outbox_key], args=[body])
                    continue
            except REDIS_DOWN as exc:
                log.warning("alert outbox unreachable: %s", exc)
            except Exception:  # nothing must end the loop
                log.exception("alert delivery failed")
            failures += 1
            await _wait(
                stop, min(s.webhook_max_backoff_s, s.webhook_backoff_s * 2 ** (failures - 1))
            )

    async def _next_delivery(self) -> str | None:
        """The outbox's head, when this replica sends."""
        if not (self.holder and self.settings.webhook_url):
            return None
        return cast(str | None, await self.redis.lindex(self._outbox_key, 0))

    async def _outbox_waits(self, stop: asyncio.Event) -> None:
        """Until this replica fires or clears something, or the next pass (or `stop`)."""
        self._outbox_ready.clear()
        await _unless_stopped(stop, self._outbox_ready.wait(), self.settings.interval_s)

    async def _post(self, http: httpx.AsyncClient, url: str, body: str) -> bool:
        """POST one delivery; True when it is done with (taken, or refused for good)."""
        data = body.encode()
        event = json.loads(body)
        headers = {
            "Content-Type": "application/json",
            "X-Emp-Event": event["event"],
            "X-Emp-Delivery": event["delivery"],
        }
        secret = self.settings.webhook_secret
        if secret is not None:
            headers["X-Emp-Signature"] = sign(secret.get_secret_value(), data)
        try:
            response = await http.post(url, content=data, headers=headers)
        except httpx.HTTPError as exc:
            log.warning("alert webhook unreachable (%s); retrying", exc)
            return False
        code = response.status_code
        if code < 300:
            return True
        if code >= 500 or code in (408, 429):
            log.warning("alert webhook answered %d; retrying", code)
            return False
        log.error("alert webhook refused a delivery with %d; dropped: %s", code, body[:200])
        return True


def _lost(worker: str, record: dict[str, Any], since: float) -> Condition:
    n = int(record["held"])
    jobs = "1 job" if n == 1 else f"{n} jobs"
    return Condition(
        rule="worker_lost",
        subject=worker,
        message=f"worker '{worker}' was lost {since:.0f} s ago while running {jobs} and has "
        "not come back",
        details={
            "worker_id": worker,
            "lost_at": record["at"],
            "jobs": record["jobs"],
            "held": n,
        },
    )


async def _unless_stopped(
    stop: asyncio.Event, work: Coroutine[Any, Any, T], within_s: float | None = None
) -> T | None:
    """Run `work` until it ends (its result), `stop` is set or `within_s` passes (None:
    it is cancelled)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, timeout=within_s, return_when=FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return task.result() if not task.cancelled() else None


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
