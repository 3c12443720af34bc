"""The broker's data: what a client submits, what a job record holds, and the errors."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal, cast

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from emp_protocol.capabilities import NAME_PATTERN, Isolation, JobRequirements, Name
from emp_protocol.jobs import JobStatus

#: Priorities run from PRIORITY_MIN to PRIORITY_MAX; higher runs first.
PRIORITY_MIN = -1000
PRIORITY_MAX = 1000
#: A job's queue score is (PRIORITY_MAX - priority) * PRIORITY_SCALE + seq: one integer,
#: exact in a double (< 2**53) while seq < 2**42. See docs/broker.md.
PRIORITY_SCALE = 2**42
#: How urgent a client says a job is; a priority policy may weigh it (docs/scheduling.md).
Urgency = Literal["low", "normal", "high", "critical"]
#: Job ids: what a URL path segment holds as is, so that every job can be reached at
#: /api/jobs/<id> (no '/', '?', '#', '%', and not '.' or '..'). The original system's ids
#: ("job-<uuid>", "job-rest-<uuid>", a client's message_id like "ack-1795926929") fit.
JOB_ID_PATTERN = r"^[A-Za-z0-9_:@+=-][A-Za-z0-9_.:@+=-]{0,199}$"
JOB_ID_RULE = "1 to 200 ASCII letters, digits and _ . : @ + = - (not starting with '.')"


def _check_job_id(value: str) -> str:
    if not re.fullmatch(JOB_ID_PATTERN, value):
        raise ValueError(f"a job id is {JOB_ID_RULE}")
    return value


JobId = Annotated[
    str,
    AfterValidator(_check_job_id),
    Field(description=f"A job id: {JOB_ID_RULE}.", json_schema_extra={"pattern": JOB_ID_PATTERN}),
]


#: The fields of a job record that may be large: a list reads them only when asked.
LARGE_FIELDS = ("payload", "result")


class RequirementsSpec(BaseModel):
    """The requirements a client may give beside service and customer."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    gpu_memory_gb: float = Field(default=0, ge=0)
    gpu_count: int = Field(default=0, ge=0, le=64)
    models: list[Name] = Field(default_factory=list)
    isolation: Isolation = Isolation.NONE
    region: Name | None = None
    tags: list[Name] = Field(default_factory=list)
    cpu_cores: int = Field(default=0, ge=0)
    ram_gb: float = Field(default=0, ge=0)
    prefer_model: Name | None = Field(
        default=None,
        description="A model the job prefers but does not require: any worker of the service "
        "may run it; with model-warm affinity on, one that has it loaded is favoured.",
    )


class JobSpec(BaseModel):
    """A job as submitted. Unknown fields, NaN and infinite numbers are an error."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    service: str = Field(pattern=NAME_PATTERN, description="The service (job_type) to run.")
    payload: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(default=0, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    id: JobId | None = Field(default=None, description="Client-given id; must be new.")
    customer: Name | None = None
    requirements: RequirementsSpec = Field(default_factory=RequirementsSpec)
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    timeout: float = Field(default=0, ge=0, description="Seconds per attempt; 0: no limit.")
    client_id: str | None = Field(
        default=None,
        max_length=200,
        description="The client connection that submitted it (original protocol).",
    )
    urgency: Urgency | None = Field(
        default=None, description="low, normal (the default), high or critical."
    )
    deadline: float | None = Field(
        default=None, gt=0, description="Epoch seconds by which it should have started."
    )
    deadline_in_s: float | None = Field(
        default=None, ge=0, description="The deadline as seconds from now (not with deadline)."
    )
    tier: Name | None = Field(
        default=None,
        description="The tier of the token that submitted it (the hub sets it, not the "
        "client); else the customer's tier counts (docs/scheduling.md).",
    )

    @model_validator(mode="after")
    def _requirements_hold_together(self) -> JobSpec:
        self.job_requirements()  # e.g. isolation needs a customer
        if self.deadline is not None and self.deadline_in_s is not None:
            raise ValueError("give deadline or deadline_in_s, not both")
        return self

    def deadline_at(self, now: float) -> float | None:
        """The deadline in epoch seconds, if it has one."""
        if self.deadline_in_s is not None:
            return now + self.deadline_in_s
        return self.deadline

    def job_requirements(self) -> JobRequirements:
        """The hard requirements in canonical form (service and customer included)."""
        return JobRequirements(
            service=self.service, customer=self.customer, **self.requirements.model_dump()
        )


class Job(BaseModel):
    """A job record as stored by the broker."""

    id: str
    service: str
    status: JobStatus
    priority: int = Field(description="The priority the client asked for.")
    effective_priority: int | None = Field(
        default=None,
        description="The priority it is queued at (the policy's, promotions included).",
    )
    urgency: Urgency | None = None
    deadline: float | None = Field(default=None, description="Epoch seconds, if it has one.")
    payload: dict[str, Any]
    requirements: JobRequirements
    requirement_class: str
    customer: str | None
    seq: int
    attempt: int = Field(description="How many times the job was claimed.")
    failures: int = Field(description="Failed attempts (timeouts included).")
    orphans: int = Field(description="Times its worker was lost (lease expired).")
    max_attempts: int
    timeout: float
    worker: str | None = None
    client_id: str | None = None
    created_at: float
    claimed_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    lease_expires: float | None = None
    retry_at: float | None = None
    progress: float = 0
    message: str | None = None
    result: Any = None
    error: str | None = None
    omitted: dict[str, int] = Field(
        default_factory=dict,
        description="Large fields (LARGE_FIELDS) left out of this record, not asked for or "
        "over a cap, with their size in bytes; a left-out payload reads {}, a result None.",
    )

    @classmethod
    def from_hash(cls, h: dict[str, str], omitted: dict[str, int] | None = None) -> Job:
        """Build a Job from the fields of its Redis hash."""

        def opt(name: str) -> str | None:
            value = h.get(name)
            return value if value else None

        def opt_float(name: str) -> float | None:
            value = opt(name)
            return float(value) if value is not None and float(value) > 0 else None

        return cls(
            id=h["id"],
            service=h["service"],
            status=JobStatus(h["status"]),
            priority=int(h["priority"]),
            effective_priority=int(h.get("effective_priority") or h["priority"]),
            urgency=cast(Urgency, h["urgency"]) if h.get("urgency") else None,
            deadline=opt_float("deadline_at"),
            payload=json.loads(h["payload"]) if "payload" in h else {},
            requirements=_requirements(h["requirements"]),
            requirement_class=h["class"],
            customer=opt("customer"),
            seq=int(h["seq"]),
            attempt=int(h.get("attempt", 0)),
            failures=int(h.get("failures", 0)),
            orphans=int(h.get("orphans", 0)),
            max_attempts=int(h["max_attempts"]),
            timeout=float(h.get("timeout", 0)),
            worker=opt("worker"),
            client_id=opt("client"),
            created_at=float(h["created_at"]),
            claimed_at=opt_float("claimed_at"),
            started_at=opt_float("started_at"),
            finished_at=opt_float("finished_at"),
            lease_expires=opt_float("lease_expires") if h.get("status") == "active" else None,
            retry_at=opt_float("retry_at") if h.get("status") == "delayed" else None,
            progress=float(h.get("progress") or 0),
            message=opt("message"),
            result=json.loads(h["result"]) if h.get("result") else None,
            error=opt("error"),
            omitted=omitted or {},
        )


@dataclass(frozen=True)
class FinishedJob:
    """A job that ended in another system, imported as history (see Broker.import_finished)."""

    spec: JobSpec
    status: JobStatus
    created_at: float
    finished_at: float
    result: Any = None
    error: str | None = None
    worker: str | None = None


@dataclass(frozen=True, slots=True)
class Submitted:
    """A job just accepted: its id and its place in line (seq orders submissions)."""

    id: str
    seq: int
    priority: int
    requirement_class: str
    created_at: float
    #: Pending jobs of its class ahead of it right after the submit (single submits only).
    position: int | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    """A worker's progress report on a held job (0-100), with an optional message, stage
    label (started, processing, ...) and connector details (JSON); it renews the lease."""

    job_id: str
    token: str
    progress: float
    message: str = ""
    stage: str = ""
    details: Any = None


@dataclass(frozen=True, slots=True)
class Completion:
    """A held job's result."""

    job_id: str
    token: str
    result: Any = None


@dataclass(frozen=True, slots=True)
class Failure:
    """A held job's attempt failed; `retryable`: another attempt may follow."""

    job_id: str
    token: str
    error: str
    retryable: bool = True


#: What a worker reports on a job it holds (Broker.report).
JobReport = Progress | Completion | Failure


@lru_cache(maxsize=4096)
def _requirements(canonical_json: str) -> JobRequirements:
    """Parse stored requirements; there are few distinct ones, so parse each once."""
    return JobRequirements.model_validate_json(canonical_json)


class Claim(BaseModel):
    """A job handed to a worker, with the lease token that proves it holds it."""

    job: Job
    token: str
    lease_expires: float


class CancelResult(BaseModel):
    """What a cancel did: the status the job had, and the worker to tell if it was active."""

    previous_status: JobStatus
    worker: str | None


class ClassStats(BaseModel):
    """Pending jobs of one requirement class."""

    requirement_class: str
    requirements: JobRequirements
    pending: int
    by_priority: dict[int, int]
    matching_workers: int
    unschedulable: bool = Field(description="Pending jobs and no live worker can run them.")
    oldest_age_s: float | None = Field(
        default=None, description="Seconds the oldest pending job has waited (GET /api/queues)."
    )
    oldest_age_s_by_priority: dict[int, float] | None = Field(
        default=None, description="The same per priority (GET /api/queues)."
    )


class QueueStats(BaseModel):
    """Queue depths per class and priority, and the counts of the other sets."""

    classes: list[ClassStats]
    pending: int
    active: int
    delayed: int
    dead: int
    unschedulable_jobs: int
    live_workers: int


class Event(BaseModel):
    """One entry of a job's event stream (status changes and progress)."""

    id: str = Field(description="Stream id; pass it back as `after` to resume.")
    type: str
    ts: float
    data: dict[str, str | float] = Field(description="The event's fields; `progress` is a number.")


class Page(BaseModel):
    """A page of jobs, newest first; pass `next_cursor` back for the next page."""

    jobs: list[Job]
    next_cursor: int | None


class BrokerError(Exception):
    """Base of the broker's errors."""


class JobNotFound(BrokerError):
    """No job with that id (or it expired)."""


class DuplicateJob(BrokerError):
    """A job with that id already exists."""


class StaleLease(BrokerError):
    """The lease token does not hold the job (it expired, was cancelled or reassigned)."""


class InvalidState(BrokerError):
    """The job is not in a state that allows the operation."""


class InvalidJob(BrokerError):
    """The submitted job or report is not acceptable (bad values)."""


class TooLarge(InvalidJob):
    """A payload or result is over its size cap."""


class RateLimited(BrokerError):
    """A submission over its token's allowance; `retry_after`: whole seconds to wait."""

    def __init__(self, wait: float) -> None:
        self.retry_after = 3600 if math.isinf(wait) else max(1, math.ceil(wait))
        super().__init__(f"too many submissions for this token; retry in {self.retry_after} s")
