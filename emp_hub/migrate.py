"""Import the jobs of an emp-redis deployment (`emp-hub migrate-emp-redis`).

The original keeps each job in a `job:<id>` hash (docs: reference of the emp-redis data).
Its queue ZSET is not trusted (nothing was ever removed from it): the hash's status is the
truth. Pending jobs, and those the old hub had handed to a worker (their workers belong to
the old hub; they run again here), are submitted to our queues in their original order,
priority first, then age, keeping their ids. Finished jobs (completed, failed, cancelled)
become history. The old keys are only read (SCAN in batches), never changed. Jobs whose id
already exists here are skipped, so the import can run again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio
from pydantic import ValidationError

from emp_hub.broker import Broker, JobSpec, JobStatus
from emp_hub.broker.models import FinishedJob

FINISHED = {
    "completed": JobStatus.COMPLETED,
    "failed": JobStatus.FAILED,
    "cancelled": JobStatus.CANCELLED,
}
#: Old statuses of jobs that had not ended: they are queued again here.
UNFINISHED = {"pending", "queued", "active", "claimed", "processing", "assigned", "started"}


@dataclass
class MigrationReport:
    """What the migration found and did."""

    scanned: int = 0
    pending: int = 0
    requeued_running: int = 0
    finished: int = 0
    imported: int = 0
    skipped_existing: int = 0
    unreadable: list[str] = field(default_factory=list)


def _json(value: str | None) -> Any:
    if not value:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def _float(value: str | None, default: float) -> float:
    try:
        return float(value) if value else default
    except ValueError:
        return default


def to_spec(h: dict[str, str]) -> JobSpec:
    """Our JobSpec for an old job hash (old records may use `type` and `params`)."""
    payload = _json(h.get("job_request_payload") or h.get("params")) or {}
    if not isinstance(payload, dict):
        payload = {"value": payload}
    priority = int(float(h.get("priority") or 0))
    return JobSpec(
        id=h["id"],
        service=h.get("job_type") or h.get("type") or "",
        payload=payload,
        priority=max(-1000, min(1000, priority)),
        client_id=h.get("client_id") or None,
    )


async def read_old_jobs(old: redis.asyncio.Redis, batch: int = 500) -> list[dict[str, str]]:
    """Every `job:*` hash of the old deployment, read with SCAN and pipelined HGETALLs."""
    out: list[dict[str, str]] = []
    keys: list[str] = []

    async def flush() -> None:
        async with old.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            hashes = await pipe.execute()
        for key, h in zip(keys, hashes, strict=True):
            if h:
                h.setdefault("id", key.removeprefix("job:"))
                out.append(cast(dict[str, str], h))
        keys.clear()

    async for key in old.scan_iter(match="job:*", count=batch, _type="HASH"):
        keys.append(key)
        if len(keys) >= batch:
            await flush()
    if keys:
        await flush()
    return out


async def migrate(
    old: redis.asyncio.Redis, broker: Broker, *, dry_run: bool = False
) -> MigrationReport:
    """Import the old deployment's jobs into `broker` (nothing is written when dry_run)."""
    report = MigrationReport()
    queue: list[tuple[int, float, JobSpec]] = []
    history: list[FinishedJob] = []
    for h in await read_old_jobs(old):
        report.scanned += 1
        status = (h.get("status") or "pending").lower()
        try:
            spec = to_spec(h)
        except (ValidationError, ValueError) as exc:
            report.unreadable.append(f"{h.get('id')}: {exc}".splitlines()[0])
            continue
        created = _float(h.get("created_at"), 0.0)
        if status in FINISHED:
            report.finished += 1
            history.append(
                FinishedJob(
                    spec=spec,
                    status=FINISHED[status],
                    created_at=created,
                    finished_at=_float(
                        h.get("completed_at") or h.get("cancelled_at") or h.get("last_updated_at"),
                        created,
                    ),
                    result=_json(h.get("result")),
                    error=h.get("error") or h.get("cancellation_reason") or None,
                    worker=h.get("worker_id") or h.get("worker") or None,
                )
            )
        elif status in UNFINISHED:
            report.pending += status == "pending"
            report.requeued_running += status != "pending"
            queue.append((-spec.priority, created, spec))
        else:
            report.unreadable.append(f"{h.get('id')}: unknown status {status!r}")
    queue.sort(key=lambda item: (item[0], item[1]))
    if dry_run:
        return report
    existing = await _existing(broker, [s.id or "" for _, _, s in queue])
    fresh = [spec for _, _, spec in queue if spec.id not in existing]
    report.skipped_existing += len(queue) - len(fresh)
    for i in range(0, len(fresh), 500):
        await broker.submit_many(fresh[i : i + 500])
    report.imported += len(fresh)
    for i in range(0, len(history), 500):
        chunk = history[i : i + 500]
        stored = await broker.import_finished(chunk)
        report.imported += stored
        report.skipped_existing += len(chunk) - stored
    return report


async def _existing(broker: Broker, ids: list[str]) -> set[str]:
    async with broker.redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.exists(broker.key("job", job_id))
        found = await pipe.execute()
    return {job_id for job_id, hit in zip(ids, found, strict=True) if hit}
