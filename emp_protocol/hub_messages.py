"""Wire messages from the hub to a worker (`/ws/worker/{worker_id}`).

The hub builds every message it sends a worker from these models, and `emp-worker` reads
them with `hub_message` (a discriminated union on `type`). The original emp-redis types
and fields are kept (`job_available` is for original workers, which claim what they are
offered); the pull model adds `job_assigned` with its lease token, `cancel_job`, the
`lost` jobs of `worker_heartbeat_ack` and `worker_control` (drain, resume, shutdown).
The messages a worker sends are in `emp_protocol.messages`; docs/protocol.md lists both
directions with examples.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from emp_protocol.jobs import JobStatus
from emp_protocol.messages import Batch, Message


class ConnectionEstablished(Message):
    """The hub's greeting, before anything else."""

    type: Literal["connection_established"] = "connection_established"
    message: str
    protocol_version: int | None = Field(
        default=None, description="The hub's PROTOCOL_VERSION; None: not an emp hub."
    )
    hub_version: str | None = None


class WorkerRegistered(Message):
    """register_worker was accepted; `jobs` are the held jobs the worker keeps (the
    others it listed are no longer its own: it stops them)."""

    type: Literal["worker_registered"] = "worker_registered"
    worker_id: str
    status: str = "active"
    jobs: list[str]
    batch: bool = Field(
        default=False, description="The hub takes `batch` messages from this worker."
    )


class JobNotificationsSubscribed(Message):
    """Sent after worker_registered when the worker asked for job notifications."""

    type: Literal["job_notifications_subscribed"] = "job_notifications_subscribed"
    worker_id: str


class WorkerIdAvailable(Message):
    """The answer to a dry-run register_worker: this worker id could register."""

    type: Literal["worker_id_available"] = "worker_id_available"
    worker_id: str


class JobAvailable(Message):
    """An offer to an original worker, reserved for it for a few seconds: claim_job takes
    it, silence hands it back."""

    type: Literal["job_available"] = "job_available"
    job_id: str
    job_type: str
    priority: int
    job_request_payload: dict[str, Any]


class JobAssigned(Message):
    """A job the worker holds now, with the lease token that proves it."""

    type: Literal["job_assigned"] = "job_assigned"
    job_id: str
    worker_id: str
    job_type: str
    priority: int
    params: dict[str, Any] = Field(description="The job's payload.")
    lease_token: str
    attempt: int
    timeout: float = Field(description="Seconds this attempt may take; 0: no limit.")
    lease_expires: float | None
    created_at: float = Field(description="When the job was submitted (epoch seconds).")


class WorkerHeartbeatAck(Message):
    """The answer to worker_heartbeat; `lost`: held jobs whose lease is gone (drop them)."""

    type: Literal["worker_heartbeat_ack"] = "worker_heartbeat_ack"
    worker_id: str
    lost: list[str]


class JobCompletedAck(Message):
    """complete_job was recorded."""

    type: Literal["job_completed_ack"] = "job_completed_ack"
    job_id: str
    worker_id: str


class JobFailedAck(Message):
    """fail_job was recorded; `status`: delayed (a retry follows) or failed."""

    type: Literal["job_failed_ack"] = "job_failed_ack"
    job_id: str
    worker_id: str
    error: str
    status: JobStatus


class JobReleased(Message):
    """release_job was recorded: the job is pending again."""

    type: Literal["job_released"] = "job_released"
    job_id: str
    worker_id: str


class CancelJob(Message):
    """Stop this job now: it is already cancelled."""

    type: Literal["cancel_job"] = "cancel_job"
    job_id: str
    reason: str


class WorkerControl(Message):
    """An admin's order to the worker (`emp workers drain|resume|shutdown`): `drain`: ask
    for no more jobs, let the running ones finish; `resume`: ask for jobs again;
    `shutdown`: drain, then exit 0. Also sent right after worker_registered when the worker
    is drained or stopping already (the state is kept by the hub)."""

    type: Literal["worker_control"] = "worker_control"
    worker_id: str
    action: Literal["drain", "resume", "shutdown"]


class Error(Message):
    """Something the worker sent was refused, or its token was. `code` says which refusal
    it is: `auth_failed` (then `cause` and `needs`, and the socket closes with 1008) or
    `worker_id_in_use` (then `worker_id`, and `retry_after` or `recheck_after` when trying
    again later may succeed). Fields that do not apply are left out."""

    OMIT_NONE = frozenset(
        {"details", "code", "cause", "needs", "worker_id", "retry_after", "recheck_after"}
    )

    type: Literal["error"] = "error"
    error: str
    details: Any = None
    code: str | None = None
    cause: str | None = None
    needs: str | None = None
    worker_id: str | None = None
    retry_after: float | None = None
    recheck_after: float | None = None


HubMessage = Annotated[
    ConnectionEstablished
    | WorkerRegistered
    | JobNotificationsSubscribed
    | WorkerIdAvailable
    | JobAvailable
    | JobAssigned
    | WorkerHeartbeatAck
    | JobCompletedAck
    | JobFailedAck
    | JobReleased
    | CancelJob
    | WorkerControl
    | Error
    | Batch,
    Field(discriminator="type"),
]
hub_message: TypeAdapter[HubMessage] = TypeAdapter(HubMessage)
