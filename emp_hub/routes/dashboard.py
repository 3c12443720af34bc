"""The operations dashboard: its page and assets (`/dashboard/`, plain ES modules shipped in
emp_hub/dashboard/, nothing from the internet) and the endpoints only it needs: who the
caller is, an overview of the deployment, and the retry of a selection of jobs.
docs/dashboard.md describes the pages; docs/api.md the endpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, cast

from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from emp_hub.auth import Principal
from emp_hub.broker import BrokerError, JobStatus
from emp_hub.hub import Hub
from emp_hub.routes.api import (
    ERROR_STATUS,
    HubDep,
    Operator,
    StrictJSONRoute,
    Submitter,
    authenticated,
)
from emp_hub.routes.api import retry_job as retry_one
from emp_hub.series import SeriesView

#: The dashboard's files (package data).
ASSET_DIR = Path(__file__).parent.parent / "dashboard"
#: The most jobs one retry of a selection takes.
MAX_RETRY_IDS = 500
#: Active jobs looked at to count the busy workers (their distinct workers).
BUSY_SCAN = 10_000

router = APIRouter(route_class=StrictJSONRoute)


class Me(BaseModel):
    """The calling token: the dashboard shows actions by role."""

    name: str
    role: str
    customer: str | None


class Unschedulable(BaseModel):
    """Pending jobs of a class that no live worker can run."""

    requirement_class: str
    service: str
    pending: int
    reason: str | None = Field(description="The requirement no live worker satisfies.")


class WorkerCounts(BaseModel):
    """Live workers, and those running a job."""

    live: int
    busy: int


class Overview(BaseModel):
    """The deployment at a glance."""

    jobs: dict[str, int] = Field(description="Jobs per status (the by-status indexes).")
    workers: WorkerCounts
    unschedulable: list[Unschedulable]
    series: SeriesView


class RetryRequest(BaseModel):
    """The jobs to retry."""

    model_config = ConfigDict(extra="forbid")

    job_ids: list[str] = Field(min_length=1, max_length=MAX_RETRY_IDS)


class RetryOutcome(BaseModel):
    """What became of one job of the selection."""

    job_id: str
    ok: bool
    status_code: int = Field(description="What POST /api/jobs/{id}/retry would answer.")
    detail: str | None = None
    status: str | None = Field(default=None, description="The job's status after.")


class RetryResults(BaseModel):
    """One outcome per job, in the order given."""

    results: list[RetryOutcome]


@router.get("/api/me", response_model=Me, tags=["operations"])
async def me(principal: Annotated[Principal, Depends(authenticated)]) -> Me:
    """The calling token's name, role and customer."""
    return Me(name=principal.name, role=principal.role.value, customer=principal.customer)


@router.get("/api/overview", response_model=Overview, tags=["operations"])
async def overview(hub: HubDep, principal: Operator) -> Overview:
    """Jobs by status, live and busy workers, the unschedulable classes and why, and the
    last hour's throughput and submit-to-start latency per minute."""
    broker = hub.broker
    statuses = list(JobStatus)
    async with hub.redis.pipeline(transaction=False) as pipe:
        for status in statuses:
            pipe.zcard(broker.key("by_status", status.value))
        pipe.zrange(broker.key("leases"), 0, BUSY_SCAN - 1)
        *counts, active = await pipe.execute()
    stats = await broker.stats()
    unschedulable = [
        Unschedulable(
            requirement_class=c.requirement_class,
            service=c.requirements.service,
            pending=c.pending,
            reason=await broker.why_unschedulable(c.requirements),
        )
        for c in stats.classes
        if c.unschedulable
    ]
    return Overview(
        jobs={s.value: int(n) for s, n in zip(statuses, counts, strict=True)},
        workers=WorkerCounts(live=stats.live_workers, busy=await _busy(hub, active)),
        unschedulable=unschedulable,
        series=await hub.metrics.series.read(hub.redis, broker.keys),
    )


async def _busy(hub: Hub, active: list[str]) -> int:
    """The distinct workers of these active jobs."""
    if not active:
        return 0
    async with hub.redis.pipeline(transaction=False) as pipe:
        for job_id in active:
            pipe.hget(hub.broker.key("job", job_id), "worker")
        workers = cast(list[str | None], await pipe.execute())
    return len({w for w in workers if w})


@router.post("/api/jobs/retry", response_model=RetryResults, tags=["jobs"])
async def retry_jobs(body: RetryRequest, hub: HubDep, principal: Submitter) -> RetryResults:
    """Retry each job of a selection (as POST /api/jobs/{id}/retry does, each checked
    alone): one outcome per job, in the order given."""
    results = []
    for job_id in body.job_ids:
        try:
            view = await retry_one(job_id, hub, principal)
        except HTTPException as exc:
            results.append(
                RetryOutcome(
                    job_id=job_id, ok=False, status_code=exc.status_code, detail=exc.detail
                )
            )
        except BrokerError as exc:
            code = next((c for t, c in ERROR_STATUS.items() if isinstance(exc, t)), 422)
            results.append(RetryOutcome(job_id=job_id, ok=False, status_code=code, detail=str(exc)))
        else:
            results.append(
                RetryOutcome(job_id=job_id, ok=True, status_code=200, status=view.status)
            )
    return RetryResults(results=results)


def add_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at /dashboard/ (and / leads there), and its endpoints."""
    app.include_router(router)
    app.mount("/dashboard/", StaticFiles(directory=ASSET_DIR, html=True), name="dashboard")

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> RedirectResponse:
        return RedirectResponse("dashboard/")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("dashboard/")
