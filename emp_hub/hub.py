"""The hub's state: what one replica's routes share (`Hub`), and `open_hub`, which
connects it to Redis (or starts the embedded Valkey) and runs the replica's background
work: the event bus, the maintenance pass and the token re-checks. Stateless across
replicas: every replica on one Redis is alike."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio

from emp_hub.alerts import AlertEngine
from emp_hub.auth import TokenStore
from emp_hub.broker import (
    REDIS_DOWN,
    Allowance,
    Broker,
    CancelResult,
    ClaimFor,
    Job,
    JobSpec,
    Submitted,
    connect,
)
from emp_hub.dispatch import Dispatcher
from emp_hub.embedded import EmbeddedValkey
from emp_hub.events import EventBus
from emp_hub.logs import redact
from emp_hub.metrics import Metrics
from emp_hub.scheduling import Scheduler
from emp_hub.series import flush_until
from emp_hub.settings import HubSettings
from emp_hub.sockets import OpenSockets
from emp_hub.storage import remove_expired

log = logging.getLogger("emp_hub")


@dataclass
class Hub:
    """What the routes of one hub process share."""

    settings: HubSettings
    redis: redis.asyncio.Redis
    broker: Broker
    tokens: TokenStore
    metrics: Metrics
    bus: EventBus
    dispatcher: Dispatcher
    alerts: AlertEngine
    sockets: OpenSockets = field(default_factory=OpenSockets)  # this replica's WebSockets
    #: Set when the process was told to stop (SIGTERM, SIGINT): event streams end at once
    #: instead of holding the server's graceful shutdown (see stop_streams_on_signals).
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def submit(
        self, specs: Sequence[JobSpec], token_id: str | None = None
    ) -> list[Submitted]:
        """Store jobs (atomically: all or none), spending a job each of the token's allowance
        (EMP_SUBMIT_RATE, EMP_SUBMIT_BURST; RateLimited when over it), and hand them to this
        replica's parked workers at once: for one of them the submit's own script claims (one
        Valkey call in all), the others are woken to claim; the other replicas hear the
        broker's announcement."""
        allowance = None
        if token_id is not None:
            allowance = Allowance(token_id, self.settings.submit_rate, self.settings.submit_burst)
        classes = {self.broker.requirements(spec).requirement_class for spec in specs}
        session = await self.dispatcher.reserve(classes)
        claims = None
        if session is None:
            submitted, _ = await self.broker.submit_and_claim(specs, allowance=allowance)
        else:
            assert session.caps is not None  # reserve() takes registered workers only
            want = ClaimFor(session.worker_id, session.caps, session.wanted, session.loaded)
            try:
                started = time.perf_counter()
                submitted, claims = await self.broker.submit_and_claim(specs, want, allowance)
                if claims is not None:
                    took = time.perf_counter() - started
                    await self.dispatcher.claimed(session, claims)  # the worker told first
                    self.metrics.claim_seconds.observe(took)
            finally:
                session.claim_lock.release()
        taken = {claim.job.id for claim in claims or ()}
        left = Counter(s.requirement_class for s in submitted if s.id not in taken)
        try:
            if left:
                await self.dispatcher.submitted(left)
        except Exception:  # waking local workers is a shortcut; the jobs are stored
            log.exception("could not wake local workers after a submit")
        return submitted

    async def until_stopping(self, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """The items of an endless stream (server-sent events) until the process is told to
        stop: then it ends, and the server's graceful shutdown need not wait for it."""
        stopped = asyncio.ensure_future(self.stopping.wait())
        try:
            while True:
                item = asyncio.ensure_future(anext(stream))
                await asyncio.wait({item, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not item.done():
                    # A read it waits on (XREAD BLOCK) may take a while to give up: it ends
                    # in the background, the stream ends now.
                    item.cancel()
                    item.add_done_callback(_retrieve)
                    await asyncio.wait({item}, timeout=0.5)
                    return
                try:
                    yield item.result()
                except GeneratorExit:
                    raise
        except StopAsyncIteration:
            return
        finally:
            stopped.cancel()
            await aclose(stream)

    async def cancel(self, job: Job, reason: str) -> CancelResult:
        """Cancel a job and, when it was running, tell its worker on whichever replica
        holds its connection (the cancel channel)."""
        result = await self.broker.cancel(job.id, reason)
        if result.worker is not None:
            self.metrics.finished.labels(job.service, "cancelled").inc()
            notice = {"job_id": job.id, "worker": result.worker, "reason": reason}
            await self.redis.publish(self.broker.key("cancel_channel"), json.dumps(notice))
        return result


async def maintain_until(
    stop: asyncio.Event, broker: Broker, interval: float, outputs: Path | None = None
) -> None:
    """Run the broker's idempotent maintenance pass every `interval` seconds until `stop`,
    and remove the `outputs` of expired jobs.
    (Stopped by an event, not by cancelling: a Redis command is never cut in half.)"""
    while not stop.is_set():
        try:
            # This replica is alive (its workers' ids are held by live connections) for
            # three passes more: a replica killed outright frees its workers' ids then.
            await broker.replica_alive(3 * interval + 1)
            await broker.maintain()
            if outputs is not None:
                await remove_expired(broker, outputs)
        except REDIS_DOWN as exc:
            log.warning("maintenance pass skipped: %s", exc)
        except Exception:  # nothing must end the loop
            log.exception("maintenance pass failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


def _retrieve(task: asyncio.Future[str]) -> None:
    """Take a finished task's outcome, so that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


async def aclose(stream: AsyncIterator[str]) -> None:
    """Close an async generator (its `finally` runs); other iterators have nothing to close."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


@asynccontextmanager
async def open_hub(settings: HubSettings) -> AsyncIterator[Hub]:
    """Connect to Redis (or start the embedded Valkey), and run maintenance meanwhile."""
    with contextlib.ExitStack() as stack:
        url = settings.redis_url
        if not url:
            # Starting the embedded server blocks for a moment, once, at start-up. This
            # process owns it (DataDirLocked if another does) and restarts it if it dies.
            server = EmbeddedValkey(settings.data_dir / "valkey", supervise=True)
            url = stack.enter_context(server).url
            log.info(
                "no EMP_REDIS_URL: an embedded Valkey at %s keeps the data in %s",
                redact(url),
                server.data_dir,
            )
        async with _hub(settings, url) as hub:
            yield hub


@asynccontextmanager
async def _hub(settings: HubSettings, url: str) -> AsyncIterator[Hub]:
    client = connect(url)
    namespace = settings.broker.namespace
    shared = settings.auth_token.get_secret_value() if settings.auth_token else None
    scheduler = Scheduler.from_settings(settings.scheduling)  # an unknown policy: error
    broker = Broker(
        client,
        settings.broker,
        scheduler=scheduler,
        affinity=settings.scheduling.affinity,
        fair_share=settings.scheduling.fair_share,
    )
    metrics = Metrics(settings.metrics_max_queue_series, settings.metrics_max_services)
    bus = EventBus(client, broker.keys)
    alerts = AlertEngine(broker, bus, settings.alerts)
    hub = Hub(
        settings=settings,
        redis=client,
        broker=broker,
        tokens=TokenStore(client, namespace, shared, settings.token_refresh_s),
        metrics=metrics,
        bus=bus,
        dispatcher=Dispatcher(broker, bus, metrics, alerts.worker_lost),
        alerts=alerts,
    )
    if await hub.tokens.is_open():
        log.warning("no auth token configured and none created: the hub is open to anyone")
    await hub.broker.replica_alive(3 * settings.maintenance_interval_s + 1)  # before sockets
    stop = asyncio.Event()
    maintenance = asyncio.create_task(
        maintain_until(stop, hub.broker, settings.maintenance_interval_s, settings.outputs)
    )
    token_checks = asyncio.create_task(hub.sockets.check_tokens_until(stop, hub.tokens))
    listener = asyncio.create_task(bus.listen(stop))
    alerting = asyncio.create_task(alerts.run_until(stop))
    series = asyncio.create_task(flush_until(stop, metrics.series, client, broker.keys))
    try:
        yield hub
    finally:
        stop.set()
        await listener
        await alerting
        await hub.dispatcher.close()
        await maintenance
        await token_checks
        await series
        with contextlib.suppress(*REDIS_DOWN):  # its workers reconnect to another replica
            await hub.broker.replica_gone()
        await client.aclose()
