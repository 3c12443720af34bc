"""The broker: every job operation, each one Lua script over the Redis data model.

The data model: the keys are defined in keys.py, described in docs/broker.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from redis.asyncio import Redis

from emp_hub.broker.keys import KeyName, Keys
from emp_hub.broker.models import (
    LARGE_FIELDS,
    PRIORITY_MAX,
    PRIORITY_SCALE,
    BrokerError,
    CancelResult,
    Claim,
    ClassStats,
    Completion,
    DuplicateJob,
    Event,
    Failure,
    FinishedJob,
    InvalidJob,
    Job,
    JobNotFound,
    JobReport,
    JobSpec,
    Page,
    Progress,
    QueueStats,
    Submitted,
    TooLarge,
)
from emp_hub.broker.scripts import CONFIG_FIELDS, Scripts, refusal
from emp_hub.broker.settings import AffinitySettings, BrokerSettings, FairShareSettings
from emp_hub.scheduling import EXPIRE, Scheduler
from emp_protocol.capabilities import JobRequirements, WorkerCapabilities, matches, why_unmatched
from emp_protocol.jobs import JobStatus

log = logging.getLogger("emp_hub.broker")
#: One INFO line per job state change (job_id, worker_id where one is involved, state and
#: old_state); EMP_LOG_LEVEL=warning leaves them out.
jobs_log = logging.getLogger("emp_hub.jobs")
#: The models a worker has loaded now, per service (what its connectors report).
ModelsByService = Mapping[str, Collection[str]]


@dataclass(frozen=True)
class Allowance:
    """A token's submit allowance: `rate` jobs a second sustained, bursts of `burst` jobs
    (a batch spends one per job; one over the burst can never pass)."""

    token_id: str
    rate: float
    burst: int


@dataclass(frozen=True)
class ClaimFor:
    """A claim for a worker: up to `count` jobs it can run (Broker.claim_many, or with a
    submit: Broker.submit_and_claim)."""

    worker_id: str
    caps: WorkerCapabilities
    count: int
    loaded: ModelsByService | None = None
    lease_s: float | None = None


def _changed(job_id: str, event: str, state: str, old: str | None, **fields: Any) -> None:
    """Log one job state change (callers check jobs_log.isEnabledFor(INFO) first)."""
    jobs_log.info(
        "job %s %s",
        job_id,
        event,
        extra={"job_id": job_id, "event": event, "state": state, "old_state": old, **fields},
    )


#: report.lua's replies that are not refusals: the job's status after the report.
REPORTED = {
    "progress": JobStatus.ACTIVE,
    "completed": JobStatus.COMPLETED,
    "delayed": JobStatus.DELAYED,
    "failed": JobStatus.FAILED,
}
#: The job log's event for a report that ended an attempt.
FINISH_EVENTS = {
    JobStatus.COMPLETED: "completed",
    JobStatus.DELAYED: "failed: retry scheduled",
    JobStatus.FAILED: "failed: dead-lettered",
}

#: What the reaper did to a job whose lease ran out (its worker was lost, or it timed out):
#: the line's event and the job's new state.
REAPED = {
    "requeued": ("requeued: its worker was lost", "pending"),
    "delayed": ("failed: timed out, retry scheduled", "delayed"),
    "failed": ("failed: dead-lettered (timed out, or its worker lost too often)", "failed"),
}


@dataclass(frozen=True)
class Registration:
    """The answer to register_worker."""

    ok: bool
    #: The connection of the same process that this registration took over, if any.
    replaced: str | None = None
    #: Refused: whether the process holding the id is connected (else it is within its
    #: reconnect grace), and the seconds until its claim lapses unless it comes back.
    holder_connected: bool = False
    retry_after: float = 0.0
    #: A holder connected through another hub replica: seconds until that replica, if it
    #: was killed, no longer counts and the id is free (0: nothing to wait for).
    recheck_after: float = 0.0


#: What an admin asked of a worker (stored in its `worker_state` key); none: active.
WorkerAction = Literal["drain", "shutdown"]


@dataclass(frozen=True)
class WorkerDetails:
    """What the hub knows of one worker beyond its capabilities."""

    #: drain or shutdown, as an admin asked; None: active.
    action: WorkerAction | None
    #: The jobs it holds now (active, leased to it).
    jobs: list[str]
    #: When it was last heard from (epoch seconds); None once it left the live set.
    last_heard: float | None


@dataclass
class MaintenanceReport:
    """What one maintenance pass did."""

    requeued: list[str]
    timed_out: list[str]
    dead_lettered: list[str]
    promoted_classes: list[str]
    purged: int
    workers_pruned: int
    classes_collected: int
    #: Promotion steps applied (priority policy, deadlines, aging), and the jobs expired
    #: at their deadline.
    promotion_steps: int = 0
    deadline_expired: list[str] = field(default_factory=list)


class Broker:
    """Jobs on Redis: submit, claim, lease, progress, complete, fail, retry, cancel.

    One Broker per hub process; any number of them may share one Redis. `redis` must be
    created with ``decode_responses=True``.
    """

    def __init__(
        self,
        redis: Redis,
        settings: BrokerSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        scheduler: Scheduler | None = None,
        affinity: AffinitySettings | None = None,
        fair_share: FairShareSettings | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings or BrokerSettings()
        #: Model-warm affinity (docs/scheduling.md); off by default.
        self.affinity = affinity or AffinitySettings()
        #: Fair share between customers (the hub's scheduling.fair_share); off by default.
        self.fair_share = fair_share or FairShareSettings()
        self.clock = clock
        #: The priority policy, deadlines and aging (emp_hub/scheduling.py); default: FIFO.
        self.scheduler = scheduler or Scheduler()
        #: Names this broker in its announcements of submitted jobs: a hub wakes its own
        #: parked workers for what it submits at once (Hub.submit), and skips the
        #: announcement that comes back with its origin.
        self.origin = uuid.uuid4().hex[:12]
        self.keys = Keys(self.settings.namespace)
        self._scripts = Scripts(redis)
        s = self.settings
        config = {
            "pmax": PRIORITY_MAX,
            "pscale": PRIORITY_SCALE,
            "event_cap": s.event_cap,
            "retention": s.retention_s,
            "dead_retention": s.dead_retention_s,
            "retry_base": s.retry_base_s,
            "retry_cap": s.retry_cap_s,
            "max_orphans": s.max_orphans,
            "timeout_grace": s.timeout_grace_s,
            "max_skip": s.max_skip,
            "affinity_wait": self.affinity.max_wait_s,
        }
        self._config = " ".join(repr(config[name]) for name in CONFIG_FIELDS)
        # Requirement classes known to this process, refreshed when the server's version
        # counter moves; and per distinct capabilities, the classes they satisfy.
        self._req_cache: dict[tuple[str, str | None, str], JobRequirements] = {}
        self._classes: dict[str, JobRequirements] = {}
        self._classes_ver = "-1"
        self._matching: dict[str, tuple[str, list[str]]] = {}
        self._live: dict[str, WorkerCapabilities] = {}
        self._live_at = float("-inf")
        self._live_gen = 0  # bumped at every change of _live
        self._resting: frozenset[str] = frozenset()  # live workers drained or stopping
        self._live_refresh: asyncio.Future[dict[str, WorkerCapabilities]] | None = None
        self._parsed_caps: dict[str, WorkerCapabilities] = {}  # stored JSON -> parsed
        self._counts: tuple[tuple[int, str], dict[str, int]] = ((-1, ""), {})

    # -- helpers -----------------------------------------------------------------------

    def key(self, name: KeyName, *args: str) -> str:
        """A key in this broker's namespace, e.g. key("job", id) (the layout: keys.py)."""
        return self.keys(name, *args)

    async def _run(self, name: str, *args: Any) -> Any:
        return await self._scripts.run(
            name, self.key("seq"), [self.keys.prefix, repr(self.clock()), self._config, *args]
        )

    # -- submit ------------------------------------------------------------------------

    async def submit(self, spec: JobSpec) -> Submitted:
        """Submit one job. Raises DuplicateJob if its id exists, InvalidJob if too large."""
        return (await self.submit_many([spec]))[0]

    async def submit_many(self, specs: Sequence[JobSpec]) -> list[Submitted]:
        """Submit a batch atomically: every job is stored, or (on any error) none."""
        submitted, _ = await self.submit_and_claim(specs)
        return submitted

    async def submit_and_claim(
        self,
        specs: Sequence[JobSpec],
        claim: ClaimFor | None = None,
        allowance: Allowance | None = None,
    ) -> tuple[list[Submitted], list[Claim] | None]:
        """Submit a batch atomically, as submit_many, spending a job each of the token's
        `allowance` (RateLimited when over it: nothing stored, nothing spent); and in the
        same script claim for a worker waiting for work: up to `claim.count` of the best
        jobs it can run, these or older ones (one call instead of two). The claims are None
        when none was asked or the claim could not run (no class it can run is known yet,
        or a new one appeared since: claim_many as usual)."""
        if not specs:
            return [], None
        now = self.clock()
        rows: list[list[str]] = []
        accepted: list[tuple[str, JobSpec, JobRequirements, int]] = []
        seen: set[str] = set()
        for spec in specs:
            job_id = spec.id or f"job-{uuid.uuid4()}"
            if job_id in seen:
                raise DuplicateJob(f"the batch holds job id {job_id} twice")
            seen.add(job_id)
            payload = json.dumps(spec.payload, separators=(",", ":"))
            if len(payload) > self.settings.max_payload_bytes:
                raise TooLarge(
                    f"job {job_id}: payload of {len(payload)} bytes exceeds the cap of "
                    f"{self.settings.max_payload_bytes} bytes"
                )
            req = self.requirements(spec)
            max_attempts = spec.max_attempts or self.settings.max_attempts
            deadline = spec.deadline_at(now)
            plan = self.scheduler.plan(
                priority=spec.priority,
                customer=spec.customer,
                urgency=spec.urgency,
                deadline=deadline,
                now=now,
                tier=spec.tier,
            )
            rows.append(
                [
                    job_id,
                    spec.service,
                    req.requirement_class,
                    req.canonical_json,
                    str(spec.priority),
                    spec.customer or "",
                    str(max_attempts),
                    repr(spec.timeout),
                    payload,
                    spec.client_id or "",
                    str(plan.effective_priority),
                    spec.urgency or "",
                    "" if deadline is None else repr(deadline),
                    plan.encoded(),
                    repr(plan.next_at or 0),
                    str(self.fair_share.cost(spec.customer)),
                ]
            )
            accepted.append((job_id, spec, req, max_attempts))
        prefix: str = ""
        claim_args: list[Any] = []
        if claim is not None:
            prefix, claim_args = await self._claim_args(claim)
        spend = ["", "", ""]
        if allowance is not None:
            spend = [allowance.token_id, repr(1 / allowance.rate), str(allowance.burst)]
        first_seq, _new_classes, rank, claimed = await self._run(
            "submit", json.dumps(rows, separators=(",", ":")), self.origin, *spend, *claim_args
        )
        if jobs_log.isEnabledFor(logging.INFO):
            for job_id, spec, _, _ in accepted:
                _changed(job_id, "submitted", "pending", None, service=spec.service)
        submitted = [
            Submitted(
                id=job_id,
                seq=int(first_seq) + i,
                priority=spec.priority,
                requirement_class=req.requirement_class,
                created_at=now,
                position=int(rank) if rank >= 0 else None,
            )
            for i, (job_id, spec, req, _) in enumerate(accepted)
        ]
        claims = None if claim is None else self._claims(claimed, prefix, claim.worker_id)
        return submitted, claims

    def requirements(self, spec: JobSpec) -> JobRequirements:
        """The spec's requirements, parsed and hashed once per distinct set (few exist)."""
        key = (spec.service, spec.customer, spec.requirements.model_dump_json())
        req = self._req_cache.get(key)
        if req is None:
            if len(self._req_cache) > 4096:
                self._req_cache.clear()
            req = self._req_cache[key] = spec.job_requirements()
        return req

    async def import_finished(self, jobs: Sequence[FinishedJob]) -> int:
        """Store finished jobs of another system as history (with the usual retention);
        ids that exist are skipped. Returns how many were stored."""
        rows = []
        for job in jobs:
            req = self.requirements(job.spec)
            rows.append(
                [
                    job.spec.id or "",
                    job.spec.service,
                    req.requirement_class,
                    req.canonical_json,
                    str(job.spec.priority),
                    job.spec.customer or "",
                    job.status.value,
                    json.dumps(job.spec.payload),
                    json.dumps(job.result),
                    job.error or "",
                    repr(job.created_at),
                    repr(job.finished_at),
                    job.worker or "",
                    job.spec.client_id or "",
                ]
            )
        if not rows:
            return 0
        return int(await self._run("import", json.dumps(rows, separators=(",", ":"))))

    # -- workers and matching ----------------------------------------------------------

    async def register_worker(
        self,
        worker_id: str,
        caps: WorkerCapabilities,
        *,
        instance: str | None = None,
        connection: str = "-",
        dry_run: bool = False,
    ) -> Registration:
        """Record a live worker and its capabilities (call again to refresh them).

        A worker id belongs to one process (`instance`) at a time: another process is
        refused while the holder is connected or within its reconnect grace, and the same
        process coming back on a new `connection` takes over at once (the answer names the
        connection it replaced). Original workers send no instance; the newest wins.
        A `dry_run` answers the same and records nothing.
        """
        ok, *rest = await self._run(
            "register",
            worker_id,
            instance or "-",
            connection,
            caps.model_dump_json(),
            self.settings.worker_ttl_s,
            "1" if dry_run else "0",
            self.origin,
        )
        if not ok:
            state, left, replica_left = rest
            return Registration(
                ok=False,
                holder_connected=state == "up",
                retry_after=float(left),
                recheck_after=max(0.0, float(replica_left)),
            )
        if dry_run:
            return Registration(ok=True, replaced=rest[0] or None)
        self._set_live({**self._live, worker_id: caps})  # the others come at the next refresh
        return Registration(ok=True, replaced=rest[0] or None)

    async def replica_alive(self, ttl_s: float) -> None:
        """Say this hub replica (`origin`) is alive for `ttl_s` more seconds. The worker
        ids its connections hold are free once it is not (killed, or stopped)."""
        await self.redis.set(self.key("replica", self.origin), "1", px=int(ttl_s * 1000))

    async def replica_gone(self) -> None:
        """This replica stops: the worker ids its connections held are free at once."""
        await self.redis.delete(self.key("replica", self.origin))

    async def touch_worker(self, worker_id: str) -> None:
        """Mark a registered worker as still alive (its heartbeat)."""
        ttl = int(self.settings.worker_ttl_s) + 1
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(self.key("workers"), {worker_id: self.clock()}, xx=True)
            pipe.expire(self.key("worker", worker_id), ttl)
            pipe.expire(self.key("owner", worker_id), ttl)
            pipe.expire(self.key("worker_state", worker_id), self._state_ttl())
            await pipe.execute()

    def _state_ttl(self) -> int:
        return max(1, int(self.settings.worker_state_ttl_s))

    async def set_worker_state(self, worker_id: str, action: WorkerAction | None) -> None:
        """Keep what an admin asked of a worker: `drain` or `shutdown` (claims then give it
        nothing, see claim.lua), or None (resume: active again). The state outlives the
        worker's connection and the hub; it expires worker_state_ttl_s after the worker
        was last heard from, and a clean goodbye ends a shutdown (disconnect.lua)."""
        key = self.key("worker_state", worker_id)
        if action is None:
            await self.redis.delete(key)
        else:
            await self.redis.set(key, action, ex=self._state_ttl())

    async def worker_state(self, worker_id: str) -> WorkerAction | None:
        """What an admin asked of the worker (drain, shutdown), or None: active."""
        stored = await self.redis.get(self.key("worker_state", worker_id))
        return _action(cast(str | None, stored))

    async def worker_details(self, worker_ids: Sequence[str]) -> dict[str, WorkerDetails]:
        """Each worker's state, held jobs and last heartbeat (for /api/workers). Reads
        every active job's worker: O(active jobs)."""
        if not worker_ids:
            return {}
        leased = cast(list[str], await self.redis.zrange(self.key("leases"), 0, -1))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.mget([self.key("worker_state", w) for w in worker_ids])
            pipe.zmscore(self.key("workers"), list(worker_ids))
            for job_id in leased:
                pipe.hget(self.key("job", job_id), "worker")
            states, heard, *holders = await pipe.execute()
        jobs: dict[str, list[str]] = {w: [] for w in worker_ids}
        for job_id, holder in zip(leased, holders, strict=True):
            if holder in jobs:
                jobs[holder].append(job_id)
        return {
            w: WorkerDetails(
                action=_action(state),
                jobs=sorted(jobs[w]),
                last_heard=float(score) if score is not None else None,
            )
            for w, state, score in zip(worker_ids, states, heard, strict=True)
        }

    async def unregister_worker(self, worker_id: str, connection: str = "-") -> bool:
        """Forget a worker that stopped cleanly on `connection`, holding nothing. False when
        that connection no longer owns the id (a newer one took over): nothing changes."""
        gone = await self._run(
            "disconnect", worker_id, connection, "bye", 0, self.settings.worker_ttl_s
        )
        if gone:
            self._set_live({w: c for w, c in self._live.items() if w != worker_id})
        return bool(gone)

    async def worker_lost(
        self, worker_id: str, connection: str, held: Iterable[tuple[str, str]]
    ) -> bool:
        """The worker's `connection` ended without a goodbye (killed, crashed, cut off).
        It stays live for reconnect_grace_s; then it no longer counts, and the leases of
        the (job id, token) pairs it held run out, so the reaper requeues those jobs unless
        it comes back first. False when that connection no longer owned the id."""
        pairs = [x for pair in held for x in pair]
        s = self.settings
        lost = await self._run(
            "disconnect", worker_id, connection, "lost", s.reconnect_grace_s, s.worker_ttl_s, *pairs
        )
        return bool(lost)

    def _set_live(self, live: dict[str, WorkerCapabilities]) -> None:
        self._live = live
        self._live_gen += 1

    @property
    def resting(self) -> frozenset[str]:
        """The live workers that take no job (drained or stopping), as of the last read
        of the live workers (`live_workers`)."""
        return self._resting

    async def live_workers(self, *, fresh: bool = False) -> dict[str, WorkerCapabilities]:
        """Workers heard from within worker_ttl_s, with their capabilities (cached for
        live_cache_s; callers that find it stale at once share one read)."""
        if not fresh and self.clock() - self._live_at < self.settings.live_cache_s:
            return self._live
        if self._live_refresh is None:
            self._live_refresh = asyncio.ensure_future(self._read_live_workers())
        refresh = self._live_refresh
        try:
            return await asyncio.shield(refresh)
        finally:
            if refresh.done() and self._live_refresh is refresh:
                self._live_refresh = None

    async def _read_live_workers(self) -> dict[str, WorkerCapabilities]:
        now = self.clock()
        ids = cast(
            list[str],
            await self.redis.zrangebyscore(
                self.key("workers"), now - self.settings.worker_ttl_s, "+inf"
            ),
        )
        keys = [self.key("worker", i) for i in ids] + [self.key("worker_state", i) for i in ids]
        stored_all = cast(list[str | None], await self.redis.mget(keys) if ids else [])
        raw, states = stored_all[: len(ids)], stored_all[len(ids) :]
        self._resting = frozenset(i for i, state in zip(ids, states, strict=True) if state)
        if len(self._parsed_caps) > 4 * len(ids) + 1000:
            self._parsed_caps.clear()
        live = {}
        for worker_id, stored in zip(ids, raw, strict=True):
            if stored:  # most workers share a few distinct capability sets: parse each once
                caps = self._parsed_caps.get(stored)
                if caps is None:
                    caps = self._parsed_caps[stored] = WorkerCapabilities.model_validate_json(
                        stored
                    )
                live[worker_id] = caps
        self._set_live(live)
        self._live_at = now
        return live

    async def why_unschedulable(self, req: JobRequirements) -> str | None:
        """Why no live worker may run a job with `req` (the requirement none satisfies);
        None when one may."""
        live = await self.live_workers()
        known = req.requirement_class in self._classes  # then counted once per snapshot
        if known and self._live_counts(live).get(req.requirement_class, 0):
            return None
        active = [caps for w, caps in live.items() if w not in self._resting]
        why = why_unmatched(req, active)
        resting = sorted(w for w in self._resting if w in live and matches(req, live[w]))
        if why is None or not resting:
            return why
        shown = ", ".join(resting[:5]) + (
            f" and {len(resting) - 5} more" if len(resting) > 5 else ""
        )
        return (
            f"the only live worker(s) that can run it are drained or stopping: {shown} "
            "(`emp workers resume ID` takes one back)"
        )

    async def refresh_classes(self) -> None:
        """Re-read the requirement classes (a new one appeared)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(self.key("classes_ver"))
            pipe.hgetall(self.key("classes"))
            ver, classes = await pipe.execute()
        self._classes = {c: JobRequirements.model_validate_json(r) for c, r in classes.items()}
        self._classes_ver = ver or "0"

    @property
    def known_classes(self) -> dict[str, JobRequirements]:
        """The requirement classes this process knows of (see refresh_classes)."""
        return self._classes

    def matching_classes(self, caps: WorkerCapabilities) -> list[str]:
        """The known requirement classes that `caps` satisfies (cached per capabilities)."""
        cache_key = caps.canonical_json
        hit = self._matching.get(cache_key)
        if hit is not None and hit[0] == self._classes_ver:
            return hit[1]
        found = sorted(c for c, req in self._classes.items() if matches(req, caps))
        self._matching[cache_key] = (self._classes_ver, found)
        return found

    async def _claim_plan(
        self, worker_id: str, caps: WorkerCapabilities, loaded: ModelsByService | None = None
    ) -> list[str]:
        """Claim-script arguments: each candidate class and whether avoided jobs may go;
        then, with affinity on and a class warm, which classes prefer a loaded model."""
        classes = self.matching_classes(caps)
        if not classes:
            return []
        counts = self._live_counts(await self.live_workers())
        plan: list[str] = []
        for c in classes:
            counted = worker_id in self._live and worker_id not in self._resting
            others = counts.get(c, 0) - (1 if counted else 0)
            plan += [c, "1" if others <= 0 else "0"]
        warm = self._warm_mask(classes, loaded)
        return [*plan, warm] if warm else plan

    def _warm_mask(self, classes: list[str], loaded: ModelsByService | None) -> str:
        """'1' per class whose preferred model the worker has loaded for its service, '0'
        for the others; '' when affinity is off or no class is warm (plain order)."""
        if not self.affinity.enabled or not loaded:
            return ""
        mask = "".join(
            "1"
            if (req := self._classes[c]).prefer_model is not None
            and req.prefer_model in loaded.get(req.service, ())
            else "0"
            for c in classes
        )
        return mask if "1" in mask else ""

    def _live_counts(self, live: dict[str, WorkerCapabilities]) -> dict[str, int]:
        """How many live workers that take jobs (not drained or stopping) satisfy each class
        (computed once per live snapshot)."""
        snapshot = (self._live_gen, self._classes_ver)
        if self._counts[0] == snapshot and live is self._live:
            return self._counts[1]
        counts: dict[str, int] = {}
        for worker_id, caps in live.items():
            if worker_id in self._resting:  # drained or stopping: takes no job
                continue
            for c in self.matching_classes(caps):
                counts[c] = counts.get(c, 0) + 1
        self._counts = (snapshot, counts)
        return counts

    # -- claim and the life of a claimed job ---------------------------------------------

    async def claim(
        self,
        worker_id: str,
        caps: WorkerCapabilities,
        *,
        lease_s: float | None = None,
        loaded: ModelsByService | None = None,
    ) -> Claim | None:
        """Take the best job `caps` can run (highest priority, then oldest) and lease it.

        Returns None when no matching job is pending. A job that `worker_id` failed before
        is passed over while another live worker could run it. `loaded`: the models the
        worker has loaded now per service (used by model-warm affinity, when it is on).
        """
        claims = await self.claim_many(worker_id, caps, 1, lease_s=lease_s, loaded=loaded)
        return claims[0] if claims else None

    async def claim_many(
        self,
        worker_id: str,
        caps: WorkerCapabilities,
        count: int,
        *,
        lease_s: float | None = None,
        loaded: ModelsByService | None = None,
    ) -> list[Claim]:
        """Claim up to `count` jobs at once, best first (a worker filling its free slots)."""
        for _ in range(3):
            prefix, args = await self._claim_args(ClaimFor(worker_id, caps, count, loaded, lease_s))
            claims = self._claims(await self._run("claim", *args), prefix, worker_id)
            if claims is not None:
                return claims
            await self.refresh_classes()  # a new class appeared: recompute the candidates
        return []

    async def _claim_args(self, claim: ClaimFor) -> tuple[str, list[Any]]:
        """A fresh token prefix, and the arguments of claim_jobs (lua/common.lua)."""
        plan = await self._claim_plan(claim.worker_id, claim.caps, claim.loaded)
        prefix = secrets.token_hex(12)
        lease = claim.lease_s or self.settings.lease_s
        ver = self._classes_ver
        return prefix, [claim.worker_id, prefix, lease, claim.count, ver, len(plan) // 2, *plan]

    def _claims(self, reply: list[Any], prefix: str, worker_id: str) -> list[Claim] | None:
        """The jobs claim_jobs leased (their tokens from `prefix`), or None when its
        candidates were out of date."""
        if reply[0] != 1:
            return None
        claims = []
        for i, fields in enumerate(cast(list[list[str]], reply[2:]), start=1):
            job = Job.from_hash(dict(zip(fields[::2], fields[1::2], strict=True)))
            claims.append(
                Claim(job=job, token=f"{prefix}:{i}", lease_expires=job.lease_expires or 0)
            )
        if jobs_log.isEnabledFor(logging.INFO):
            for claim in claims:
                _changed(
                    claim.job.id,
                    "assigned",
                    "active",
                    "pending",
                    worker_id=worker_id,
                    attempt=claim.job.attempt,
                )
        return claims

    async def extend(
        self, leases: Iterable[tuple[str, str]], *, lease_s: float | None = None
    ) -> list[bool]:
        """Renew the leases of (job id, token) pairs. False: that job is no longer held."""
        pairs = [x for pair in leases for x in pair]
        if not pairs:
            return []
        reply = await self._run("extend", lease_s or self.settings.lease_s, *pairs)
        return [bool(x) for x in reply]

    async def report(self, reports: Sequence[JobReport]) -> list[JobStatus | BrokerError]:
        """Apply a worker's reports on held jobs in order, in one call (a batch): per
        report the job's status after it (ACTIVE after progress; COMPLETED; DELAYED when a
        retry follows a failure, FAILED when dead-lettered), or the error that refused it
        (StaleLease when the token no longer holds the job, InvalidJob for bad input);
        a refused report changes nothing."""
        out: list[JobStatus | BrokerError | None] = []
        args: list[Any] = []
        for r in reports:
            try:
                args += self._report_args(r)
                out.append(None)
            except BrokerError as exc:
                out.append(exc)
        replies = iter(await self._run("report", self.settings.lease_s, *args) if args else [])
        results: list[JobStatus | BrokerError] = []
        for r, refused in zip(reports, out, strict=True):
            if refused is not None:
                results.append(refused)
                continue
            reply = next(replies)
            if reply not in REPORTED:
                results.append(refusal(reply))
                continue
            status = REPORTED[reply]
            results.append(status)
            if status is not JobStatus.ACTIVE and jobs_log.isEnabledFor(logging.INFO):
                _changed(r.job_id, FINISH_EVENTS[status], status.value, "active")
        return results

    def _report_args(self, r: JobReport) -> list[Any]:
        """A report's seven values for report.lua; raises InvalidJob for bad input."""
        if isinstance(r, Progress):
            if not 0 <= r.progress <= 100:
                raise InvalidJob(f"progress must be within 0..100, not {r.progress}")
            extra = "" if r.details is None else json.dumps(r.details, separators=(",", ":"))
            return ["p", r.job_id, r.token, repr(r.progress), r.message, r.stage, extra]
        if isinstance(r, Completion):
            data = json.dumps(r.result, separators=(",", ":"))
            if len(data) > self.settings.max_result_bytes:
                raise TooLarge(
                    f"job {r.job_id}: result of {len(data)} bytes exceeds the cap of "
                    f"{self.settings.max_result_bytes} bytes; upload large outputs instead"
                )
            return ["c", r.job_id, r.token, data, "", "", ""]
        retryable = "1" if r.retryable else "0"
        return ["f", r.job_id, r.token, r.error, retryable, random.random(), ""]

    async def _report_one(self, report: JobReport) -> JobStatus:
        [result] = await self.report([report])
        if isinstance(result, BrokerError):
            raise result
        return result

    async def progress(
        self,
        job_id: str,
        token: str,
        progress: float,
        message: str = "",
        stage: str = "",
        details: Any = None,
    ) -> None:
        """Record progress (0-100) of a held job, with an optional message, stage label
        (started, processing, ...) and connector details (JSON); also renews its lease."""
        await self._report_one(Progress(job_id, token, progress, message, stage, details))

    async def complete(self, job_id: str, token: str, result: Any = None) -> None:
        """Record the result of a held job. Raises StaleLease if the token no longer holds it."""
        await self._report_one(Completion(job_id, token, result))

    async def fail(
        self, job_id: str, token: str, error: str, *, retryable: bool = True
    ) -> JobStatus:
        """Fail the current attempt: DELAYED (a retry follows) or FAILED (dead-lettered)."""
        return await self._report_one(Failure(job_id, token, error, retryable))

    async def holds(self, job_id: str, token: str) -> bool:
        """Whether `token` holds the active job `job_id` (e.g. to accept its outputs)."""
        status, current = await self.redis.hmget(self.key("job", job_id), ["status", "token"])
        return status == "active" and current == token and bool(token)

    async def release(self, job_id: str, token: str) -> None:
        """Hand a held job back without penalty; it keeps its place in line."""
        await self._run("release", job_id, token)
        if jobs_log.isEnabledFor(logging.INFO):
            _changed(job_id, "released", "pending", "active")

    async def cancel(self, job_id: str, reason: str = "cancelled") -> CancelResult:
        """Cancel a job. A pending job is removed; for an active one, tell `worker`."""
        status, worker = await self._run("cancel", job_id, reason)
        result = CancelResult(previous_status=JobStatus(status), worker=worker or None)
        if jobs_log.isEnabledFor(logging.INFO):
            _changed(job_id, "cancelled", "cancelled", status, worker_id=result.worker)
        return result

    async def retry(self, job_id: str) -> None:
        """Re-queue a dead-lettered job with fresh attempts, at its original place; a job
        waiting for its next attempt is queued now, and the workers that failed it may take
        it again."""
        await self._run("retry", job_id)
        if jobs_log.isEnabledFor(logging.INFO):
            _changed(job_id, "retried by hand", "pending", None)

    # -- maintenance -------------------------------------------------------------------

    async def maintain(self, *, limit: int = 1000) -> MaintenanceReport:
        """One idempotent pass: requeue expired leases, promote due retries, purge expired
        jobs from the indexes, drop dead workers and requirement classes idle for
        class_idle_s. Every hub replica runs it periodically."""
        reaped = await self._run("reap", limit, random.random())
        outcomes = dict(zip(reaped[::2], reaped[1::2], strict=True))
        if outcomes and jobs_log.isEnabledFor(logging.INFO):
            for job_id, outcome in outcomes.items():
                if outcome in REAPED:
                    event, state = REAPED[outcome]
                    _changed(job_id, event, state, "active", worker_id=None)
        promoted = await self._run("promote", limit)
        steps, expired = await self.apply_promotions()
        purged = await self._run("janitor", limit)
        collected = await self._run("collect", limit, self.settings.class_idle_s)
        pruned = await self.redis.zremrangebyscore(
            self.key("workers"), "-inf", self.clock() - self.settings.worker_ttl_s
        )
        return MaintenanceReport(
            requeued=[i for i, o in outcomes.items() if o == "requeued"],
            timed_out=[i for i, o in outcomes.items() if o == "delayed"],
            dead_lettered=[i for i, o in outcomes.items() if o == "failed"],
            promoted_classes=list(promoted),
            purged=int(purged),
            workers_pruned=int(pruned),
            classes_collected=int(collected),
            promotion_steps=steps,
            deadline_expired=expired,
        )

    async def apply_promotions(self) -> tuple[int, list[str]]:
        """Apply due promotion steps (deadline boosts, aging, deadlines), at most
        scheduling.promote_limit of them (see docs/scheduling.md); returns how many were
        applied and the jobs expired at their deadline. maintain() calls it."""
        steps, *expired = await self._run(
            "schedule",
            self.scheduler.settings.promote_limit,
            EXPIRE,
            1 if self.scheduler.settings.deadline_action == "expire" else 0,
        )
        if expired and jobs_log.isEnabledFor(logging.INFO):
            for job_id in expired:
                _changed(job_id, "failed: its deadline passed", "failed", None)
        return int(steps), list(expired)

    async def accept_output(self, job_id: str, token: str) -> bool:
        """Whether `token` holds the active job `job_id` (to accept an output of it); if
        so, note in the same round trip that the job has files stored (before a byte of the
        output lands): when its retention runs out, maintain() lists it in
        expired_outputs()."""
        return bool(await self._run("output", job_id, token))

    async def expired_outputs(self, limit: int = 1000) -> list[str]:
        """Jobs with stored files whose retention ran out, oldest first; whoever removes
        their files calls forget_outputs() after (until then every replica may see them)."""
        return cast(list[str], await self.redis.zrange(self.key("outputs_expired"), 0, limit - 1))

    async def forget_outputs(self, job_ids: Sequence[str]) -> None:
        """The files of these expired jobs are gone."""
        if job_ids:
            await self.redis.zrem(self.key("outputs_expired"), *job_ids)

    # -- reading -----------------------------------------------------------------------

    async def get(self, job_id: str) -> Job:
        """The job record. Raises JobNotFound."""
        h = cast(dict[str, str], await self.redis.hgetall(self.key("job", job_id)))
        if not h:
            raise JobNotFound(f"no such job: {job_id}")
        return Job.from_hash(h)

    async def job_fields(
        self, job_ids: Collection[str], names: Sequence[str]
    ) -> dict[str, dict[str, str | None] | None]:
        """Some fields of many jobs in one round trip (their hashes' names, e.g. "client",
        "worker", "result"): job id -> {name: value or None}, or None for a job that does not
        exist."""
        if not job_ids:
            return {}
        fields = ["id", *names]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self.key("job", job_id), fields)
            rows = cast(list[list[str | None]], await pipe.execute())
        return {
            job_id: dict(zip(names, values, strict=True)) if exists is not None else None
            for job_id, (exists, *values) in zip(job_ids, rows, strict=True)
        }

    async def list_jobs(
        self,
        *,
        status: JobStatus | None = None,
        service: str | None = None,
        customer: str | None = None,
        limit: int = 50,
        cursor: int | None = None,
        include: Collection[str] = LARGE_FIELDS,
        cap: int | None = None,
    ) -> Page:
        """Jobs newest first, filtered; walks the most selective index, never all keys.
        Of the LARGE_FIELDS, only those in `include` are read, and only when at most `cap`
        bytes; the others are left out (`Job.omitted` says which, and their sizes)."""
        if customer is not None:
            index = self.key("by_customer", customer)
        elif service is not None:
            index = self.key("by_service", service)
        elif status is not None:
            index = self.key("by_status", status.value)
        else:
            index = self.key("all_jobs")
        jobs: list[Job] = []
        top = f"({cursor}" if cursor is not None else "+inf"
        batch = max(limit, 50)
        budget = 20 * batch
        while len(jobs) < limit and budget > 0:
            rows = cast(
                list[tuple[str, float]],
                await self.redis.zrevrangebyscore(index, top, "-inf", 0, batch, withscores=True),
            )
            if not rows:
                return Page(jobs=jobs, next_cursor=None)
            budget -= len(rows)
            records = await self._run(
                "read_jobs",
                -1 if cap is None else cap,
                " ".join(f for f in LARGE_FIELDS if f in include),
                " ".join(f for f in LARGE_FIELDS if f not in include),
                *(job_id for job_id, _ in rows),
            )
            for (_job_id, seq), (flat, cut) in zip(rows, records, strict=True):
                top = f"({int(seq)}"
                if not flat:
                    continue  # expired; the janitor removes the entry
                job = Job.from_hash(_pairs(flat), {f: int(n) for f, n in _pairs(cut).items()})
                if (
                    (status is None or job.status is status)
                    and (service is None or job.service == service)
                    and (customer is None or job.customer == customer)
                ):
                    jobs.append(job)
                    if len(jobs) == limit:
                        return Page(jobs=jobs, next_cursor=int(seq))
            if len(rows) < batch:
                return Page(jobs=jobs, next_cursor=None)
        return Page(jobs=jobs, next_cursor=int(top[1:]) if top != "+inf" else None)

    async def events(
        self, job_id: str, *, after: str | None = None, count: int = 100
    ) -> list[Event]:
        """The job's events after stream id `after` (all when None), oldest first."""
        start = f"({after}" if after else "-"
        rows = cast(
            list[tuple[str, dict[str, str]]],
            await self.redis.xrange(self.key("events", job_id), start, "+", count=count),
        )
        return [_event(event_id, fields) for event_id, fields in rows]

    async def wait_events(
        self, job_id: str, *, after: str | None = None, block_s: float = 15.0
    ) -> list[Event]:
        """Like events(), but when nothing came after `after` yet, wait up to `block_s`
        (at most 15) for something to come (XREAD BLOCK; it holds one connection while it
        waits)."""
        block_s = min(block_s, 15.0)
        ready = await self.events(job_id, after=after)
        if ready:
            return ready
        reply = cast(
            list[tuple[str, list[tuple[str, dict[str, str]]]]],
            await self.redis.xread(
                {self.key("events", job_id): after or "0-0"}, count=100, block=int(block_s * 1000)
            ),
        )
        return [_event(i, f) for _, rows in reply for i, f in rows]

    async def position(self, job_id: str, requirement_class: str) -> int | None:
        """How many pending jobs of its class are ahead of the job (0: next), or None when
        it is not pending."""
        rank = await self.redis.zrank(self.key("queue", requirement_class), job_id)
        return cast(int | None, rank)

    async def positions(self, jobs: Sequence[Job]) -> list[int | None]:
        """Each job's `position`: those of the pending ones in one round trip, None for
        the others."""
        pending = [job for job in jobs if job.status is JobStatus.PENDING]
        ranks: dict[str, int | None] = {}
        if pending:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job in pending:
                    pipe.zrank(self.key("queue", job.requirement_class), job.id)
                found = await pipe.execute()
            ranks = dict(zip((job.id for job in pending), found, strict=True))
        return [ranks.get(job.id) for job in jobs]

    async def oldest_pending(
        self, classes: Sequence[str]
    ) -> dict[str, dict[int, tuple[str, float]]]:
        """The oldest pending job of each priority of each class: its id and when it was
        submitted (the head of each priority's band of the class's queue). A class without
        pending jobs is left out. A few reads per class and priority, whatever the backlog."""
        rows: list[list[Any]] = []
        for i in range(0, len(classes), 500):
            rows += await self._run("oldest", *classes[i : i + 500])
        found: dict[str, dict[int, tuple[str, float]]] = {}
        for c, row in zip(classes, rows, strict=True):
            for j in range(0, len(row), 3):
                found.setdefault(c, {})[int(row[j])] = (row[j + 1], float(row[j + 2] or 0))
        return found

    async def stats(self) -> QueueStats:
        """Depth per class and priority, set sizes, and unschedulable classes."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.key("classes_ver"))
            pipe.smembers(self.key("nonempty"))
            version, members = await pipe.execute()
        if (version or "0") != self._classes_ver:  # classes came or were collected
            await self.refresh_classes()
        nonempty = sorted(cast(set[str], members))
        live = await self.live_workers(fresh=True)
        counts = self._live_counts(live)
        classes: list[ClassStats] = []
        depths: list[list[int]] = []
        for i in range(0, len(nonempty), 500):  # a few classes a script: short, few trips
            depths += await self._run("depth", *nonempty[i : i + 500])
        for c, flat in zip(nonempty, depths, strict=True):
            by_priority = {int(p): int(n) for p, n in zip(flat[::2], flat[1::2], strict=True)}
            pending = sum(by_priority.values())
            if not pending:
                continue
            classes.append(
                ClassStats(
                    requirement_class=c,
                    requirements=self._classes[c],
                    pending=pending,
                    by_priority=by_priority,
                    matching_workers=counts.get(c, 0),
                    unschedulable=counts.get(c, 0) == 0,
                )
            )
        async with self.redis.pipeline(transaction=False) as pipe:
            names: tuple[KeyName, ...] = ("leases", "delayed", "dead")
            for name in names:
                pipe.zcard(self.key(name))
            active, delayed, dead = await pipe.execute()
        return QueueStats(
            classes=classes,
            pending=sum(c.pending for c in classes),
            active=active,
            delayed=delayed,
            dead=dead,
            unschedulable_jobs=sum(c.pending for c in classes if c.unschedulable),
            live_workers=len(live),
        )


def _action(stored: str | None) -> WorkerAction | None:
    """A stored worker state as an action (anything else reads as active)."""
    if stored == "drain":
        return "drain"
    if stored == "shutdown":
        return "shutdown"
    return None


def _pairs(flat: list[Any]) -> dict[str, Any]:
    """A flat field, value, field, value... list (a Lua reply) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


#: Event fields that are numbers (a stream keeps every value as a string).
NUMERIC_EVENT_FIELDS = frozenset({"progress"})


def _event(event_id: str, fields: dict[str, str]) -> Event:
    data: dict[str, str | float] = {
        k: float(v) if k in NUMERIC_EVENT_FIELDS else v for k, v in fields.items()
    }
    kind, ts = str(data.pop("type")), float(data.pop("ts"))
    return Event(id=event_id, type=kind, ts=ts, data=data)
