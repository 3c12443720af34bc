"""Wire messages between worker and hub (JSON text frames `{"type": ..., ...}`).

The original emp-redis types and fields are kept; the pull model adds `request_job`,
`release_job`, lease tokens in `job_assigned`, `cancel_job` to the worker, and `lost` jobs
in the heartbeat acknowledgement. docs/protocol.md lists every message with an example.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    field_validator,
    model_serializer,
)
from pydantic_core import to_json

from emp_protocol.capabilities import Name, WorkerCapabilities

#: The version of this protocol. The hub says its own in `connection_established`
#: (`protocol_version`), the worker its own in `register_worker`, and the hub refuses a
#: worker of another version. Raised only for changes an older peer would misunderstand.
PROTOCOL_VERSION = 1


class Message(BaseModel):
    """Fields every message may carry. Unknown extra fields are tolerated (and ignored),
    as original workers send some (connector details, message ids).

    On the wire (`model_dump(mode="json")`) `type` comes first, and the fields named in
    `OMIT_NONE` are left out while they are None."""

    model_config = ConfigDict(extra="allow")
    OMIT_NONE: ClassVar[frozenset[str]] = frozenset()

    timestamp: float = Field(default_factory=time.time)

    @model_serializer(mode="wrap")
    def _wire(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        kind = {"type": data.pop("type")} if "type" in data else {}
        return kind | {k: v for k, v in data.items() if v is not None or k not in self.OMIT_NONE}


class HeldJob(BaseModel):
    """A job a reconnecting worker still runs, with the lease token it was given."""

    job_id: str
    lease_token: str


class RegisterWorker(Message):
    """First message of a worker: who it is and what it can do."""

    type: Literal["register_worker"] = "register_worker"
    worker_id: str | None = None
    instance: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="Names the worker process: the same process reconnecting takes over its "
        "old socket at once, another process with the same worker id is refused.",
    )
    protocol_version: int | None = Field(
        default=None,
        description="The worker's PROTOCOL_VERSION; another one is refused. Original "
        "workers send none and are accepted.",
    )
    capabilities: dict[str, Any] = Field(default_factory=dict)
    subscribe_to_jobs: bool = True
    status: str = "idle"
    jobs: list[HeldJob] = Field(default_factory=list, description="Jobs kept over a reconnect.")
    dry_run: bool = Field(
        default=False,
        description="Only check whether this worker id could register (emp-worker doctor): "
        "answered with worker_id_available or a worker_id_in_use error; nothing is recorded.",
    )
    batch: bool = Field(
        default=False,
        description="The worker reads `batch` messages (several messages in one frame); "
        "it sends them once worker_registered says the hub takes them.",
    )

    @field_validator("capabilities")
    @classmethod
    def _capabilities_hold(cls, capabilities: dict[str, Any]) -> dict[str, Any]:
        _worker_capabilities(capabilities)  # invalid ones make the message invalid
        return capabilities

    @property
    def original(self) -> bool:
        """An original emp-redis worker (it waits for job_available offers)."""
        return "supported_job_types" in self.capabilities and "services" not in self.capabilities

    def worker_capabilities(self) -> WorkerCapabilities:
        """Our capabilities, or the original shape ({"supported_job_types": [...]})."""
        return _worker_capabilities(self.capabilities)


def _worker_capabilities(capabilities: dict[str, Any]) -> WorkerCapabilities:
    if "services" in capabilities:
        return WorkerCapabilities.model_validate(capabilities)
    return WorkerCapabilities(services=capabilities.get("supported_job_types", []))


#: The models a worker has loaded now, per service: {service: [model]} (model-warm
#: affinity, docs/scheduling.md). None: not reported (unchanged since the last report).
LoadedModels = dict[Name, list[Name]] | None
LOADED_MODELS_DOC = (
    "The models the worker has loaded now, per service ({service: [model]}), as its "
    "connectors report them; left out: unchanged. The hub favours jobs preferring them "
    "when model-warm affinity is on."
)


class RequestJob(Message):
    """Pull model: the worker has `slots` free slots; the hub answers with job_assigned
    messages now or as soon as matching jobs arrive. `prefetch`: how many more jobs it
    would hold to start as slots free up; the hub claims those now, if jobs are waiting,
    but does not park them (a new job goes to a worker with a free slot)."""

    OMIT_NONE = frozenset({"loaded_models", "held"})

    type: Literal["request_job"] = "request_job"
    slots: int = Field(default=1, ge=0, le=1000)
    prefetch: int = Field(default=0, ge=0, le=1000)
    held: int | None = Field(
        default=None,
        ge=0,
        description="How many jobs the worker held as it asked (running and prefetched): "
        "the jobs the hub assigned since are on their way and count against this request, "
        "so asking again before they arrive does not claim twice.",
    )
    loaded_models: LoadedModels = Field(default=None, description=LOADED_MODELS_DOC)


class ClaimJob(Message):
    """The original worker takes the job it was offered (job_available)."""

    type: Literal["claim_job"] = "claim_job"
    job_id: str
    worker_id: str | None = None
    claim_timeout: float = 30


class WorkerHeartbeat(Message):
    """Liveness; renews the leases of the jobs this connection holds."""

    OMIT_NONE = frozenset({"loaded_models"})

    type: Literal["worker_heartbeat"] = "worker_heartbeat"
    worker_id: str | None = None
    status: str = "idle"
    load: float = 0
    loaded_models: LoadedModels = Field(default=None, description=LOADED_MODELS_DOC)


class WorkerStatus(Message):
    """The original worker's status report (idle/busy)."""

    type: Literal["worker_status"] = "worker_status"
    worker_id: str | None = None
    status: str = "idle"


class UpdateJobProgress(Message):
    """Progress of a held job: 0-100 (-1: keep-alive only)."""

    type: Literal["update_job_progress"] = "update_job_progress"
    job_id: str
    progress: float = Field(ge=-1, le=100)
    status: str = "processing"
    message: str | None = None


class CompleteJob(Message):
    """The result of a held job."""

    type: Literal["complete_job"] = "complete_job"
    job_id: str
    result: Any = None


class FailJob(Message):
    """A held job's attempt failed."""

    type: Literal["fail_job"] = "fail_job"
    job_id: str
    error: str = "failed"
    retryable: bool = True


class ReleaseJob(Message):
    """Hand a held job back without penalty (e.g. on shutdown)."""

    type: Literal["release_job"] = "release_job"
    job_id: str


class ConnectorWsStatus(Message):
    """The state of a connector's link to its service; relayed to monitors."""

    type: Literal["connector_ws_status"] = "connector_ws_status"
    worker_id: str | None = None
    connector_type: str
    connected: bool
    service_name: str | None = None
    details: Any = None
    last_ping: float | None = None


class ServiceRequest(Message):
    """A request a connector made to its service for a job; relayed to monitors."""

    type: Literal["service_request"] = "service_request"
    job_id: str
    worker_id: str | None = None
    service: str | None = None
    request_type: str | None = None
    content: Any = None


#: The most messages one `batch` may carry.
MAX_BATCH = 1000


class Batch(Message):
    """Several messages in one frame, to be handled in order (both directions; only
    between peers that said they take them: `batch` in register_worker and
    worker_registered). The hub sends no acknowledgement for the complete_job, fail_job
    and release_job messages of a batch; refusals still come as `error` messages."""

    type: Literal["batch"] = "batch"
    messages: list[dict[str, Any]] = Field(max_length=MAX_BATCH)


def frame(messages: Sequence[Message]) -> str:
    """The text of one WebSocket frame: the message alone, or a `batch` of them (each
    dumped once, the frame serialised once)."""
    if len(messages) == 1:
        return to_json(messages[0].model_dump(mode="json")).decode()
    wire = [m.model_dump(mode="json") for m in messages]
    return to_json({"type": "batch", "timestamp": time.time(), "messages": wire}).decode()


WorkerMessage = Annotated[
    RegisterWorker
    | RequestJob
    | ClaimJob
    | WorkerHeartbeat
    | WorkerStatus
    | UpdateJobProgress
    | CompleteJob
    | FailJob
    | ReleaseJob
    | ConnectorWsStatus
    | ServiceRequest
    | Batch,
    Field(discriminator="type"),
]
worker_message = TypeAdapter(WorkerMessage)
