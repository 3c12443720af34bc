"""The hub's HTTP API. The original emp-redis routes keep their bodies and fields."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterable, Iterator
from typing import Annotated, Any, Literal, Self, cast

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import emp_hub
from emp_hub.alerts import AlertList
from emp_hub.auth import Principal, Role
from emp_hub.broker import (
    PRIORITY_MAX,
    PRIORITY_MIN,
    TERMINAL,
    BrokerError,
    CancelResult,
    DuplicateJob,
    InvalidState,
    Job,
    JobNotFound,
    JobSpec,
    JobStatus,
    QueueStats,
    RateLimited,
    RequirementsSpec,
    StaleLease,
    TooLarge,
)
from emp_hub.broker.models import LARGE_FIELDS, Event, JobId, Urgency
from emp_hub.dispatch import ControlAction, WorkerState, state_name, worker_state_message
from emp_hub.hub import Hub
from emp_hub.settings import MAX_BATCH_JOBS
from emp_protocol.capabilities import NAME_PATTERN, JobRequirements, WorkerCapabilities

# -- strict JSON bodies ------------------------------------------------------------------


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: too large for a double
        raise _NonFinite(text)
    return value


def _non_finite(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The places of the non-finite numbers in a parsed JSON value."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_finite(item, (*path, index))


def parse_json_body(body: bytes) -> Any:
    """A request body's JSON. NaN, Infinity and numbers beyond a double (1e400), which
    Python's json accepts but JSON has not, are refused with a 422 naming their place."""
    try:
        return json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
    except _NonFinite:
        value = json.loads(body)  # again, leniently, to find where they are
        msg = "Input should be a finite number (NaN and Infinity are not JSON)"
        detail = [
            {"type": "finite_number", "loc": ["body", *place], "msg": msg}
            for place in _non_finite(value)
        ]
        raise HTTPException(422, detail) from None


class StrictJSONRequest(Request):
    """A request whose JSON body is parsed by `parse_json_body`."""

    async def json(self) -> Any:
        """The body's JSON (422 on NaN or Infinity)."""
        return parse_json_body(await self.body())


#: A shortcut for an endpoint's common case (see `fast_path`): the answer, or None to
#: leave the request to FastAPI.
FastPath = Callable[[Request], Coroutine[Any, Any, Response | None]]


def fast_path(shortcut: FastPath) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give an endpoint a shortcut that answers its common case without FastAPI's
    per-request work (routing, dependency solving, body validation through its fields):
    it returns None, before doing anything, for every request it does not take (a body
    that does not validate, a caller refused), and the route's full handler answers that
    one as declared, errors included. The endpoint keeps its signature, so its OpenAPI
    description is the same. `FastPaths` tries the shortcuts."""

    def mark(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        endpoint.fast_path = shortcut  # type: ignore[attr-defined]
        return endpoint

    return mark


class FastPaths:
    """The routers' shortcuts (`fast_path`), tried before routing: a request for one, by
    its exact method and path, goes to it first; one it leaves goes on to the router with
    its body as sent. Placed inside the app's exception handlers (app.py), so an error in a
    shortcut is answered as the route's would be. The router and the route's request
    machinery took 43 us of a submit in a run with timestamps (docs/benchmarks.md)."""

    def __init__(self, app: ASGIApp, routers: Iterable[APIRouter]) -> None:
        self.app = app
        self.shortcuts: dict[tuple[str, str], FastPath] = {
            (method, route.path): shortcut
            for router in routers
            for route in router.routes
            if isinstance(route, APIRoute)
            and (shortcut := getattr(route.endpoint, "fast_path", None)) is not None
            for method in route.methods or ()
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        shortcut = None
        if scope["type"] == "http":
            shortcut = self.shortcuts.get((scope["method"], scope["path"]))
        if shortcut is None:
            await self.app(scope, receive, send)
            return
        request = StrictJSONRequest(scope, receive)
        response = await shortcut(request)
        if response is not None:
            await response(scope, receive, send)
            return
        sent = False

        async def again() -> Message:  # the body the shortcut read (or reads now), then on
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": await request.body(), "more_body": False}

        await self.app(scope, again, send)


class StrictJSONRoute(APIRoute):
    """A route that reads its JSON body with `parse_json_body`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The route's handler, given a StrictJSONRequest."""
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


router = APIRouter(route_class=StrictJSONRoute)


# -- dependencies ------------------------------------------------------------------------


async def get_hub(request: Request) -> Hub:
    """The hub state of this process."""
    hub: Hub = request.app.state.hub
    return hub


HubDep = Annotated[Hub, Depends(get_hub)]


async def authenticated(
    hub: HubDep,
    authorization: Annotated[str | None, Header()] = None,
    token: Annotated[str | None, Query(description="Token, when no header can be set.")] = None,
) -> Principal:
    """The caller, from `Authorization: Bearer <token>` or `?token=`; 401 otherwise."""
    given = token
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise HTTPException(401, "use 'Authorization: Bearer <token>'")
        given = value.strip()
    principal = await hub.tokens.authenticate(given)
    if principal is None:
        raise HTTPException(
            401,
            "missing token" if not given else "invalid token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


#: The roles that may submit jobs.
SUBMITTERS = (Role.ADMIN, Role.CLIENT)


def role(*allowed: Role) -> Any:
    """A dependency that lets only callers with one of these roles through (403)."""

    async def check(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if principal.role not in allowed:
            names = ", ".join(r.value for r in allowed)
            raise HTTPException(403, f"this needs a token with role {names}")
        return principal

    return Depends(check)


Submitter = Annotated[Principal, role(*SUBMITTERS)]
Reader = Annotated[Principal, role(Role.ADMIN, Role.CLIENT, Role.MONITOR)]
Operator = Annotated[Principal, role(Role.ADMIN, Role.MONITOR)]
Admin = Annotated[Principal, role(Role.ADMIN)]


async def visible_job(hub: Hub, principal: Principal, job_id: str) -> Job:
    """The job, if this caller may see it; 404 for missing and hidden jobs alike."""
    try:
        job = await hub.broker.get(job_id)
    except JobNotFound:
        job = None
    if job is None or not principal.may_see(job.customer):
        raise HTTPException(404, f"Job with ID {job_id} not found")
    return job


# -- models ------------------------------------------------------------------------------


class SubmitRequest(BaseModel):
    """A job to submit. The original body (job_type, payload, priority, job_id, wait,
    timeout) works unchanged; the other fields are new."""

    model_config = ConfigDict(extra="forbid")

    job_type: str | None = Field(default=None, pattern=NAME_PATTERN, description="The service.")
    service: str | None = Field(default=None, pattern=NAME_PATTERN, description="= job_type.")
    payload: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(default=0, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    job_id: JobId | None = None
    wait: bool = Field(default=False, description="Answer only when the job has ended.")
    timeout: float = Field(default=300, gt=0, le=3600, description="How long `wait` waits.")
    requirements: RequirementsSpec = Field(default_factory=RequirementsSpec)
    customer: str | None = Field(default=None, pattern=NAME_PATTERN)
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    job_timeout: float = Field(default=0, ge=0, description="Seconds per attempt; 0: none.")
    urgency: Urgency | None = Field(default=None, description="low, normal, high, critical.")
    deadline: float | None = Field(default=None, gt=0, description="Epoch seconds.")
    deadline_in_s: float | None = Field(default=None, ge=0, description="Deadline from now.")
    idempotency_key: str | None = Field(
        default=None,
        max_length=200,
        description="A retried submit with the same key (and token) returns the first job.",
    )

    @model_validator(mode="after")
    def _one_service(self) -> SubmitRequest:
        if (self.job_type is None) == (self.service is None):
            raise ValueError("give the service as job_type (or service), exactly once")
        return self

    def spec(self, principal: Principal, job_id: str | None = None) -> JobSpec:
        """The broker's JobSpec, with the customer a scoped token imposes."""
        customer = self.customer
        if principal.customer is not None:
            if customer not in (None, principal.customer):
                raise HTTPException(403, f"this token submits only as {principal.customer}")
            customer = principal.customer
        try:
            return JobSpec(
                service=self.job_type or self.service or "",
                payload=self.payload,
                priority=self.priority,
                id=job_id or self.job_id or None,
                customer=customer,
                requirements=self.requirements,
                max_attempts=self.max_attempts,
                timeout=self.job_timeout,
                urgency=self.urgency,
                deadline=self.deadline,
                deadline_in_s=self.deadline_in_s,
                tier=principal.tier,
            )
        except ValidationError as exc:
            detail = [{"loc": ["body", *e["loc"]], "msg": e["msg"]} for e in exc.errors()]
            raise HTTPException(422, detail) from None


class SubmitResponse(BaseModel):
    """The answer to a submit (without `wait`)."""

    success: bool = True
    job_id: str
    message: str
    status: str = "pending"
    position: int | None = None
    duplicate: bool = Field(default=False, description="An earlier submit had this key.")
    unschedulable: str | None = Field(
        default=None, description="Why no live worker can run the job now (it waits for one)."
    )


class Cut(BaseModel):
    """In a list, stands for a payload or result over the cap (EMP_LIST_FIELD_MAX_BYTES)."""

    truncated: Literal[True]
    bytes: int = Field(description="The field's size, as JSON, in bytes.")
    cap: int = Field(description="The largest field a list shows, in bytes.")
    get: str = Field(description="GET this for the whole job.")


class JobSummary(BaseModel):
    """A job in a list: what `JobView` shows, with `payload` and `result` only when asked
    (`include`), each a `Cut` when over the cap."""

    job_id: str
    status: str
    job_type: str
    client_id: str | None = Field(description="The original client connection that submitted it.")
    worker_id: str | None
    created_at: float
    claimed_at: float | None
    completed_at: float | None
    position: int | None = Field(description="Pending jobs of its class ahead of it (0-based).")
    display_position: int | None = Field(description="position + 1")
    progress: float
    result: Any = Field(default=None, description="Only with include=result.")
    error: str | None
    payload: dict[str, Any] | Cut | None = Field(
        default=None, description="Only with include=payload."
    )
    failures: int
    priority: int = Field(description="The priority the client asked for.")
    effective_priority: int | None = Field(
        default=None, description="The priority it is queued at (docs/scheduling.md)."
    )
    urgency: str | None = None
    deadline: float | None = Field(default=None, description="Epoch seconds, if it has one.")
    customer: str | None
    requirements: dict[str, Any]
    attempt: int
    orphans: int
    max_attempts: int
    message: str | None
    started_at: float | None
    finished_at: float | None
    unschedulable: str | None = Field(
        default=None,
        description="A job waiting for a worker: why no live worker can run it now, naming "
        "the requirement none satisfies.",
    )

    @classmethod
    def of(
        cls,
        job: Job,
        position: int | None,
        include: Collection[str] = LARGE_FIELDS,
        cap: int = 0,
        unschedulable: str | None = None,
    ) -> Self:
        """The view of a broker Job, with the large fields in `include` (a Cut for those
        the broker left out: over `cap`), and why no live worker can run it, if so."""
        large = {
            name: Cut(truncated=True, bytes=job.omitted[name], cap=cap, get=f"/api/jobs/{job.id}")
            if name in job.omitted
            else getattr(job, name)
            for name in include
        }
        if unschedulable is not None:
            large["unschedulable"] = unschedulable
        return cls(
            job_id=job.id,
            status=job.status.value,
            job_type=job.service,
            client_id=job.client_id,
            worker_id=job.worker,
            created_at=job.created_at,
            claimed_at=job.claimed_at,
            completed_at=job.finished_at if job.status is JobStatus.COMPLETED else None,
            position=position,
            display_position=None if position is None else position + 1,
            progress=job.progress,
            error=job.error,
            failures=job.failures,
            priority=job.priority,
            effective_priority=job.effective_priority,
            urgency=job.urgency,
            deadline=job.deadline,
            customer=job.customer,
            requirements=job.requirements.model_dump(mode="json"),
            attempt=job.attempt,
            orphans=job.orphans,
            max_attempts=job.max_attempts,
            message=job.message,
            started_at=job.started_at,
            finished_at=job.finished_at,
            **large,
        )


class JobView(JobSummary):
    """A job as the API shows it, whole: the original fields first, then ours."""

    result: Any
    payload: dict[str, Any]


class BatchRequest(BaseModel):
    """Several jobs, submitted atomically: all are accepted or none is."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[SubmitRequest] = Field(min_length=1, max_length=MAX_BATCH_JOBS)


class BatchResponse(BaseModel):
    """The ids of a batch's jobs, in the order given."""

    success: bool = True
    job_ids: list[str]


class JobList(BaseModel):
    """A page of jobs, newest first."""

    jobs: list[JobSummary]
    next_cursor: int | None = Field(description="Pass as `cursor` for the next page.")


class CancelRequest(BaseModel):
    """Why the job is cancelled."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="Manually cancelled", max_length=1000)


class WorkerView(BaseModel):
    """A live worker."""

    worker_id: str
    capabilities: WorkerCapabilities
    state: WorkerState = Field(
        default="active",
        description="active; draining (drain asked, jobs still running); drained (drain "
        "asked, no job running); stopping (shutdown asked: finishing its jobs, then exits).",
    )
    jobs: list[str] = Field(default_factory=list, description="Ids of the jobs it holds now.")
    last_heartbeat: float | None = Field(
        default=None, description="When it was last heard from (epoch seconds)."
    )


# -- routes ------------------------------------------------------------------------------


async def _job_view(hub: Hub, job: Job) -> JobView:
    return JobView.of(
        job,
        await hub.broker.position(job.id, job.requirement_class),
        unschedulable=await _why_waiting(hub, job.requirements, job.status),
    )


async def _why_waiting(hub: Hub, req: JobRequirements, status: JobStatus) -> str | None:
    """For a job that waits for a worker, why no live worker can run it (else None)."""
    if status not in (JobStatus.PENDING, JobStatus.DELAYED):
        return None
    return await hub.broker.why_unschedulable(req)


def _within_burst(hub: Hub, cost: int) -> None:
    """A batch over the burst could never pass the rate limit (Hub.submit spends the
    allowance): say so at once, with 413."""
    burst = hub.settings.submit_burst
    if cost > burst:
        raise HTTPException(
            413,
            f"a batch of {cost} jobs exceeds the burst of {burst} jobs (EMP_SUBMIT_BURST), "
            f"so it can never pass the rate limit: split it into batches of at most {burst}",
        )


async def _wait_until_done(hub: Hub, job_id: str, seconds: float) -> None:
    """Return when the job has ended, or after `seconds`."""
    deadline = time.monotonic() + seconds
    after = None
    while (left := deadline - time.monotonic()) > 0:
        events = await hub.broker.wait_events(job_id, after=after, block_s=min(left, 10))
        for event in events:
            after = event.id
            if event.type == "status" and event.data.get("status") in TERMINAL:
                return
        if not events and (await hub.broker.get(job_id)).status.terminal:
            return  # its events were trimmed or expired


async def _duplicate(hub: Hub, principal: Principal, job_id: str) -> SubmitResponse:
    """The answer to a repeated submit (same idempotency key): the first one's job.
    Raises JobNotFound when that job does not exist."""
    job = await hub.broker.get(job_id)
    if not principal.may_see(job.customer):
        raise HTTPException(404, f"Job with ID {job_id} not found")
    return SubmitResponse(
        job_id=job.id,
        message=f"Job already submitted with ID: {job.id}",
        status=job.status.value,
        position=await hub.broker.position(job.id, job.requirement_class),
        duplicate=True,
    )


async def _submit_shortcut(request: Request) -> Response | None:
    """submit_job's common case: a JSON body that validates, from a caller who may submit
    (by header). FastAPI's dependency solving was about 0.3 ms of a submit's latency on a
    2-core VM (docs/benchmarks.md)."""
    if request.headers.get("content-type") != "application/json" or request.query_params:
        return None
    hub = await get_hub(request)
    await request.body()  # read as FastAPI does: an error here (413) is answered as there
    try:
        principal = await authenticated(hub, request.headers.get("authorization"))
        body = SubmitRequest.model_validate(await request.json())
    except (HTTPException, ValidationError, ValueError):  # ValueError: not JSON at all
        return None
    if principal.role not in SUBMITTERS:
        return None
    answer = await submit_job(body, hub, principal)
    return Response(answer.model_dump_json(), media_type="application/json")


@router.post(
    "/api/jobs",
    response_model=SubmitResponse | JobView,
    tags=["jobs"],
    responses={409: {"description": "A job with that id exists"}, 429: {}, 413: {}},
)
@fast_path(_submit_shortcut)
async def submit_job(
    body: SubmitRequest, hub: HubDep, principal: Submitter
) -> SubmitResponse | JobView:
    """Submit a job. With `wait`, answer with the job once it has ended (or `timeout`)."""
    job_id = body.job_id
    recovering = False  # the key's job was never stored: store it now
    if body.idempotency_key is not None:
        key = hub.broker.key("idempotency", principal.token_id, body.idempotency_key)
        candidate = job_id or f"job-rest-{uuid.uuid4()}"
        if not await hub.redis.set(key, candidate, nx=True, ex=86_400):
            # The key names the job of the first submit. If that job was never stored (its
            # hub died between the two writes), this submit stores it under that id.
            job_id = cast(str, await hub.redis.get(key))
            try:
                return await _duplicate(hub, principal, job_id)
            except JobNotFound:
                recovering = True
        else:
            job_id = candidate
    spec = body.spec(principal, job_id or f"job-rest-{uuid.uuid4()}")
    try:
        [submitted] = await hub.submit([spec], principal.token_id)
    except DuplicateJob:
        if not recovering:
            raise
        return await _duplicate(hub, principal, spec.id or "")  # a retry alongside won
    hub.metrics.submitted.labels(spec.service).inc()
    if body.wait:
        await _wait_until_done(hub, submitted.id, body.timeout)
        return await _job_view(hub, await hub.broker.get(submitted.id))
    position = submitted.position
    status = JobStatus.PENDING if position is not None else JobStatus.ACTIVE
    return SubmitResponse(
        job_id=submitted.id,
        message=f"Job submitted successfully with ID: {submitted.id}",
        status=status.value,
        position=position,
        unschedulable=await _why_waiting(hub, hub.broker.requirements(spec), status),
    )


@router.post("/api/jobs/batch", response_model=BatchResponse, tags=["jobs"])
async def submit_batch(body: BatchRequest, hub: HubDep, principal: Submitter) -> BatchResponse:
    """Submit several jobs at once: all are accepted, or (on any error) none."""
    for item in body.jobs:
        if item.wait or item.idempotency_key is not None:
            raise HTTPException(422, "wait and idempotency_key do not apply to batches")
    specs = [item.spec(principal, item.job_id or f"job-rest-{uuid.uuid4()}") for item in body.jobs]
    _within_burst(hub, len(specs))
    submitted = await hub.submit(specs, principal.token_id)
    for spec in specs:
        hub.metrics.submitted.labels(spec.service).inc()
    return BatchResponse(job_ids=[s.id for s in submitted])


@router.get("/api/jobs/{job_id}", response_model=JobView, tags=["jobs"])
async def get_job(job_id: str, hub: HubDep, principal: Reader) -> JobView:
    """A job's state (404 when unknown, or not visible to this token)."""
    return await _job_view(hub, await visible_job(hub, principal, job_id))


@router.get("/api/jobs", response_model=JobList, response_model_exclude_unset=True, tags=["jobs"])
async def list_jobs(
    hub: HubDep,
    principal: Reader,
    status: JobStatus | None = None,
    service: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    customer: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[int | None, Query(ge=0)] = None,
    include: Annotated[
        str | None,
        Query(
            pattern=r"^(payload|result)(,(payload|result))*$",
            description="payload, result or both (comma separated): shown in the list, each "
            "up to EMP_LIST_FIELD_MAX_BYTES (a larger one is a marker).",
        ),
    ] = None,
) -> JobList:
    """Jobs newest first, filtered by status, service and customer; paginated. Summaries:
    no payload or result unless `include` asks (GET the job for all of it)."""
    if principal.customer is not None:
        if customer not in (None, principal.customer):
            return JobList(jobs=[], next_cursor=None)
        customer = principal.customer
    wanted = [f for f in LARGE_FIELDS if f in (include or "").split(",")]
    cap = hub.settings.list_field_max_bytes
    page = await hub.broker.list_jobs(
        status=status,
        service=service,
        customer=customer,
        limit=limit,
        cursor=cursor,
        include=wanted,
        cap=cap,
    )
    positions = await hub.broker.positions(page.jobs)
    views = [
        JobSummary.of(job, position, wanted, cap)
        for job, position in zip(page.jobs, positions, strict=True)
    ]
    return JobList(jobs=views, next_cursor=page.next_cursor)


@router.post("/api/jobs/{job_id}/cancel", response_model=CancelResult, tags=["jobs"])
async def cancel_job(
    job_id: str, hub: HubDep, principal: Submitter, body: CancelRequest | None = None
) -> CancelResult:
    """Cancel a job: a pending one is removed; the worker running an active one is told."""
    job = await visible_job(hub, principal, job_id)
    return await hub.cancel(job, (body or CancelRequest()).reason)


@router.post("/api/jobs/{job_id}/retry", response_model=JobView, tags=["jobs"])
async def retry_job(job_id: str, hub: HubDep, principal: Submitter) -> JobView:
    """Re-queue a failed (dead-lettered) job with fresh attempts; a job waiting for a retry
    is queued now, for any worker."""
    await visible_job(hub, principal, job_id)
    await hub.broker.retry(job_id)
    return await _job_view(hub, await hub.broker.get(job_id))


#: An event's id (a Redis stream id), as `Last-Event-ID` and `after` give it back.
EVENT_ID_PATTERN = r"^\d{1,19}-\d{1,19}$"  # 19 digits: below 2**64


@router.get(
    "/api/jobs/{job_id}/events",
    tags=["jobs"],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str,
    hub: HubDep,
    principal: Reader,
    last_event_id: Annotated[str | None, Header(pattern=EVENT_ID_PATTERN)] = None,
    after: Annotated[str | None, Query(pattern=EVENT_ID_PATTERN)] = None,
    follow: Annotated[
        bool, Query(description="false: the events stored so far, then the stream ends.")
    ] = True,
) -> StreamingResponse:
    """The job's status and progress as server-sent events, until it ends (or, with
    `follow=false`, those stored so far). Resumes after the `Last-Event-ID` header (or
    `after`), so a reconnect misses nothing."""
    await visible_job(hub, principal, job_id)
    start = last_event_id or after

    async def stored() -> AsyncIterator[str]:
        cursor = start
        while events := await hub.broker.events(job_id, after=cursor):
            for event in events:
                cursor = event.id
                yield _sse(event)

    async def stream() -> AsyncIterator[str]:
        cursor = start
        while True:
            events = await hub.broker.wait_events(
                job_id, after=cursor, block_s=hub.settings.events_keepalive_s
            )
            if not events:
                try:
                    if (await hub.broker.get(job_id)).status.terminal:
                        return
                except JobNotFound:
                    return
                yield ": keep-alive\n\n"
                continue
            for event in events:
                cursor = event.id
                yield _sse(event)
                if event.type == "status" and event.data.get("status") in TERMINAL:
                    return

    return StreamingResponse(
        hub.until_stopping(stream()) if follow else stored(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


def _sse(event: Event) -> str:
    data = json.dumps({"type": event.type, "ts": event.ts, **event.data})
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n"


async def worker_views(hub: Hub, live: dict[str, WorkerCapabilities]) -> list[WorkerView]:
    """The views of these live workers: capabilities, state, jobs, last heartbeat."""
    details = await hub.broker.worker_details(sorted(live))
    return [
        WorkerView(
            worker_id=w,
            capabilities=live[w],
            state=state_name(d.action, bool(d.jobs)),
            jobs=d.jobs,
            last_heartbeat=d.last_heard,
        )
        for w, d in details.items()
    ]


@router.get("/api/workers", response_model=list[WorkerView], tags=["operations"])
async def list_workers(hub: HubDep, principal: Operator) -> list[WorkerView]:
    """Live workers: capabilities (GPUs, models), state, the jobs they hold, last heartbeat."""
    return await worker_views(hub, await hub.broker.live_workers(fresh=True))


async def control_worker(hub: Hub, worker_id: str, action: ControlAction) -> WorkerView:
    """Store an admin's action for a live worker, have its replica tell it, tell the
    monitors when its state changed; the worker's view after it."""
    live = await hub.broker.live_workers(fresh=True)
    if worker_id not in live:
        raise HTTPException(
            404, f"worker {worker_id} is not connected (GET /api/workers lists the live ones)"
        )
    [before] = await worker_views(hub, {worker_id: live[worker_id]})
    if before.state == "stopping" and action != "shutdown":
        raise HTTPException(
            409, f"worker {worker_id} is shutting down: it exits once its jobs are done"
        )
    stored = None if action == "resume" else action
    await hub.broker.set_worker_state(worker_id, stored)
    await hub.dispatcher.publish_control(worker_id, action)
    # Not read back: a worker told to shut down may be gone (its state with it) already.
    after = before.model_copy(update={"state": state_name(stored, bool(before.jobs))})
    if after.state != before.state:
        await hub.bus.tell_monitors(worker_state_message(worker_id, after.state))
    return after


WORKER_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "The worker is not connected."},
    409: {"description": "The worker is shutting down (drain and resume)."},
}


@router.post(
    "/api/workers/{worker_id}/drain",
    response_model=WorkerView,
    tags=["operations"],
    responses=WORKER_ERRORS,
)
async def drain_worker(worker_id: str, hub: HubDep, principal: Admin) -> WorkerView:
    """Give the worker no more jobs; its running jobs finish. It stays drained (across
    reconnects and hub restarts) until resumed."""
    return await control_worker(hub, worker_id, "drain")


@router.post(
    "/api/workers/{worker_id}/resume",
    response_model=WorkerView,
    tags=["operations"],
    responses=WORKER_ERRORS,
)
async def resume_worker(worker_id: str, hub: HubDep, principal: Admin) -> WorkerView:
    """A drained worker takes jobs again."""
    return await control_worker(hub, worker_id, "resume")


@router.post(
    "/api/workers/{worker_id}/shutdown",
    response_model=WorkerView,
    tags=["operations"],
    responses=WORKER_ERRORS,
)
async def shutdown_worker(worker_id: str, hub: HubDep, principal: Admin) -> WorkerView:
    """Drain the worker, then have it exit (status 0: a supervisor does not restart it)."""
    return await control_worker(hub, worker_id, "shutdown")


@router.get("/api/queues", response_model=QueueStats, tags=["operations"])
async def queues(hub: HubDep, principal: Operator) -> QueueStats:
    """Pending jobs per requirement class and priority, the age of the oldest of each,
    and the unschedulable ones."""
    stats = await hub.broker.stats()
    oldest = await hub.broker.oldest_pending([c.requirement_class for c in stats.classes])
    now = time.time()
    for c in stats.classes:
        heads = oldest.get(c.requirement_class, {})
        ages = {p: max(0.0, now - at) for p, (_, at) in heads.items()}
        c.oldest_age_s_by_priority = ages
        c.oldest_age_s = max(ages.values(), default=None)
    return stats


@router.get("/api/alerts", response_model=AlertList, tags=["operations"])
async def alerts(hub: HubDep, principal: Operator) -> AlertList:
    """The alerts firing now, and the recently cleared ones (newest first)."""
    return await hub.alerts.snapshot()


@router.get(
    "/metrics",
    tags=["operations"],
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(request: Request, hub: HubDep, principal: Operator) -> Response:
    """Prometheus metrics: jobs by service and outcome, queue depth, unschedulable jobs,
    workers, claim and submit-to-start latency."""
    connected = len(hub.dispatcher.sessions)
    body = hub.metrics.render(await hub.broker.stats(), connected)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)


@router.get("/health/live", tags=["operations"])
async def live() -> dict[str, str]:
    """The process answers; the hub's version."""
    return {"status": "ok", "version": emp_hub.__version__}


@router.get("/health/ready", tags=["operations"], responses={503: {}})
async def ready(hub: HubDep) -> Response:
    """The hub can reach Redis (503 otherwise)."""
    try:
        await asyncio.wait_for(hub.redis.ping(), timeout=2)
    except Exception as exc:
        return JSONResponse(
            {"status": "unavailable", "reason": str(exc), "version": emp_hub.__version__},
            status_code=503,
        )
    return JSONResponse({"status": "ok", "version": emp_hub.__version__})


# -- errors ------------------------------------------------------------------------------

ERROR_STATUS: dict[type[BrokerError], int] = {
    JobNotFound: 404,
    DuplicateJob: 409,
    StaleLease: 409,
    InvalidState: 409,
    TooLarge: 413,
}


async def broker_error(request: Request, exc: Exception) -> JSONResponse:
    """A broker error as an HTTP answer with its reason (429 with Retry-After when the
    token's submit allowance is spent)."""
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(exc.retry_after)}
        return JSONResponse({"detail": str(exc)}, status_code=429, headers=headers)
    status = next((s for t, s in ERROR_STATUS.items() if isinstance(exc, t)), 422)
    return JSONResponse({"detail": str(exc)}, status_code=status)
