"""The event bus of one hub replica: its one Redis pub/sub connection.

Every replica hears the hub-wide channels (work announced, cancels, messages for monitors,
changes of the live workers; see broker/keys.py) and hands each message to the handler
registered for it (`on`). Job events fan out to the sockets following them: a replica
subscribes to a job's channel only while one of its sockets follows the job (`watch`),
and to every job's channel only while a monitor is connected (`add_monitor`), so a replica
nobody watches through decodes no job events at all.

The listener never waits on a watcher: `forward` only queues the event in the watcher's
`Outbox` (bounded; the oldest are dropped when a peer falls far behind), whose own task
sends them. So a monitor that reads slowly, or not at all, delays nothing else this
replica hears (work announcements, cancels, other sockets' events).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import redis.asyncio
import redis.exceptions

from emp_hub.broker.connection import REDIS_DOWN
from emp_hub.broker.keys import KeyName, Keys

log = logging.getLogger("emp_hub")

#: A handler of one hub-wide channel: gets the message's data (a string).
Handler = Callable[[str], Awaitable[None]]

#: The most events a watcher's outbox holds; past that, the oldest are dropped.
OUTBOX_LIMIT = 10_000
#: The most events an outbox's sender takes at once.
OUTBOX_BATCH = 500
#: Seconds between two warnings that one watcher's events were dropped.
DROP_WARNING_S = 10.0
#: Seconds a closing outbox's sender gets to finish the batch in hand.
OUTBOX_CLOSE_S = 5.0


class Watcher(Protocol):
    """A connection that follows jobs (a client or a monitor socket)."""

    def forward(self, event: dict[str, Any]) -> None:
        """Take an event for the peer; never waits (the listener calls it)."""


class Outbox:
    """A watcher's events waiting to be sent, and the task that sends them, in order and
    in batches (`send` gets a list). `put` never waits: past `limit` events the oldest
    are dropped, and a warning (at most one per DROP_WARNING_S) names the watcher and
    how many."""

    def __init__(
        self,
        name: str,
        send: Callable[[list[dict[str, Any]]], Awaitable[None]],
        limit: int | None = None,
    ) -> None:
        self.name = name
        self.limit = limit or OUTBOX_LIMIT
        self.dropped = 0
        self._send = send
        self._events: deque[dict[str, Any]] = deque()
        self._ready = asyncio.Event()
        self._closing = False
        self._unreported = 0
        self._warned_at = float("-inf")
        self._task = asyncio.create_task(self._run(), name=f"outbox of {name}")

    def __len__(self) -> int:
        return len(self._events)

    def put(self, event: dict[str, Any]) -> None:
        """Queue an event (O(1))."""
        if len(self._events) >= self.limit:
            self._events.popleft()
            self.dropped += 1
            self._unreported += 1
            self._report()
        self._events.append(event)
        self._ready.set()

    def _report(self, *, final: bool = False) -> None:
        """Warn of the events dropped since the last warning, at most once per interval."""
        now = time.monotonic()
        if self._unreported and (final or now - self._warned_at >= DROP_WARNING_S):
            log.warning(
                "%s is too far behind: dropped its %d oldest events (%d queued, limit %d)",
                self.name,
                self._unreported,
                len(self._events),
                self.limit,
            )
            self._warned_at = now
            self._unreported = 0

    async def _run(self) -> None:
        while not self._closing:
            await self._ready.wait()
            self._ready.clear()
            while self._events and not self._closing:
                size = min(len(self._events), OUTBOX_BATCH)
                batch = [self._events.popleft() for _ in range(size)]
                try:
                    await self._send(batch)
                except Exception:  # the peer went away: its socket's handler closes us
                    log.debug("could not send %s its events", self.name, exc_info=True)
            self._report()

    async def close(self) -> None:
        """Stop sending (the peer is gone): the batch in hand is finished, the rest dropped."""
        self._closing = True
        self._ready.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), OUTBOX_CLOSE_S)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._report(final=True)


class EventBus:
    """One replica's pub/sub connection: hub-wide channels to their handlers, job events
    to the sockets that follow them."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._pubsub = client.pubsub()
        self._handlers: dict[str, Handler] = {}
        self._on_reconnect: list[Callable[[], None]] = []
        #: Sockets following a job, by job id; monitors follow all.
        self.watchers: dict[str, set[Watcher]] = {}
        self.monitors: set[Watcher] = set()
        # Set once listen() holds the pub/sub connection: before that, a subscription from
        # another task would open a second connection (redis-py keeps only one of them).
        self._listening = asyncio.Event()
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self.on("monitor_channel", self._for_monitors)

    def on(self, channel: KeyName, handler: Handler) -> None:
        """Call `handler` with each message of a hub-wide channel (before `listen`)."""
        self._handlers[self.keys(channel)] = handler

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call `callback` after the connection was lost and is back (messages published
        meanwhile are lost)."""
        self._on_reconnect.append(callback)

    async def watch(self, job_id: str, watcher: Watcher) -> None:
        """Send this job's events to `watcher` from now on."""
        watchers = self.watchers.setdefault(job_id, set())
        watchers.add(watcher)
        if len(watchers) == 1:
            await self._subscribe(self.keys("job_channel", job_id))

    async def unwatch(self, job_id: str, watcher: Watcher) -> None:
        """Stop sending this job's events to `watcher`."""
        watchers = self.watchers.get(job_id)
        if watchers is None:
            return
        watchers.discard(watcher)
        if not watchers:
            del self.watchers[job_id]
            await self._unsubscribe(self.keys("job_channel", job_id))

    async def add_monitor(self, monitor: Watcher) -> None:
        """A monitor: every job's events, and the messages for monitors."""
        self.monitors.add(monitor)
        if len(self.monitors) == 1:
            await self._subscribe(self.keys("job_channel", "*"), pattern=True)

    async def remove_monitor(self, monitor: Watcher) -> None:
        """The monitor went away."""
        self.monitors.discard(monitor)
        if not self.monitors:
            await self._unsubscribe(self.keys("job_channel", "*"), pattern=True)

    async def tell_monitors(self, message: dict[str, Any]) -> None:
        """Send a message to the monitors of every replica (through the monitor channel)."""
        event = {"type": "monitor", "message": message}
        await self.redis.publish(self.keys("monitor_channel"), json.dumps(event))

    async def _for_monitors(self, data: str) -> None:
        forward(json.loads(data), self.monitors)

    async def _subscribe(self, channel: str, *, pattern: bool = False) -> None:
        """Subscribe, and return once Redis confirmed it (events published after this
        returns reach this replica)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), 5)
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations[channel] = confirmed
        if pattern:
            await self._pubsub.psubscribe(channel)
        else:
            await self._pubsub.subscribe(channel)
        try:
            await asyncio.wait_for(confirmed, 5)
        except TimeoutError:
            log.warning("Redis did not confirm the subscription to %s in 5 s", channel)
        finally:
            self._confirmations.pop(channel, None)

    async def _unsubscribe(self, channel: str, *, pattern: bool = False) -> None:
        """Unsubscribe; a connection already closed (the hub stopping) has nothing to undo."""
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            if pattern:
                await self._pubsub.punsubscribe(channel)
            else:
                await self._pubsub.unsubscribe(channel)

    async def listen(self, stop: asyncio.Event) -> None:
        """Read the channels and hand each message on, until `stop`."""
        await self._pubsub.subscribe(*self._handlers)
        self._listening.set()
        lost = False
        try:
            while not stop.is_set():
                try:
                    message = await self._pubsub.get_message(timeout=0.5)
                except REDIS_DOWN:
                    # Redis went away: redis-py resubscribes when it is back.
                    log.warning("lost the announcement channels; reconnecting")
                    await asyncio.sleep(0.5)
                    lost = True
                    continue
                if lost:
                    lost = False
                    for callback in self._on_reconnect:
                        callback()
                if message is not None:
                    await self._dispatch(message)
        finally:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _dispatch(self, message: dict[str, Any]) -> None:
        kind, channel = message["type"], message["channel"]
        if kind in {"subscribe", "psubscribe"}:
            confirmed = self._confirmations.get(channel)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
        elif kind == "pmessage":  # every job's events: for the monitors
            forward(json.loads(message["data"]), self.monitors)
        elif kind == "message":
            handler = self._handlers.get(channel)
            if handler is not None:
                await handler(message["data"])
            else:  # a watched job's events
                event = json.loads(message["data"])
                forward(event, self.watchers.get(event["job"], ()))


def forward(event: dict[str, Any], watchers: Iterable[Watcher]) -> None:
    """Pass an event to the connections that follow it (each queues it: no waiting)."""
    for watcher in list(watchers):
        try:
            watcher.forward(event)
        except Exception:  # one watcher's bug must not stop the others
            log.exception("could not forward an event")
