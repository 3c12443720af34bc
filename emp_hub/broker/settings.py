"""The broker's knobs. Every one is documented in docs/broker.md."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class BrokerSettings(BaseModel):
    """Settings of one broker deployment (shared by every hub replica on one Redis)."""

    model_config = ConfigDict(extra="forbid")

    namespace: str = Field(
        default="emp",
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="Key namespace: every key is '{namespace}:...'; one hash tag, one slot.",
    )
    lease_s: float = Field(default=30, gt=0, description="Lease length; heartbeats renew it.")
    timeout_grace_s: float = Field(
        default=30, ge=0, description="How long after a job's timeout the lease still holds."
    )
    max_attempts: int = Field(default=3, ge=1, description="Default attempts per job.")
    max_orphans: int = Field(
        default=3, ge=0, description="Lost workers a job survives before it is dead-lettered."
    )
    retry_base_s: float = Field(default=2, ge=0, description="First retry delay.")
    retry_cap_s: float = Field(default=300, ge=0, description="Largest retry delay.")
    retention_s: int = Field(
        default=86_400, ge=1, description="How long completed and cancelled jobs are kept."
    )
    dead_retention_s: int = Field(
        default=7 * 86_400, ge=1, description="How long failed (dead-lettered) jobs are kept."
    )
    event_cap: int = Field(default=500, ge=10, description="Events kept per job (approx.).")
    max_payload_bytes: int = Field(default=8 * 2**20, ge=1, description="Payload size cap.")
    max_result_bytes: int = Field(default=2**20, ge=1, description="Result size cap.")
    worker_ttl_s: float = Field(
        default=60, gt=0, description="A worker not heard from for this long is not live."
    )
    reconnect_grace_s: float = Field(
        default=5,
        gt=0,
        description="A worker whose connection ended counts as live this long, waiting for it "
        "to reconnect; then it is gone and the jobs it held go back to pending.",
    )
    worker_state_ttl_s: float = Field(
        default=86_400,
        gt=0,
        description="A drained or stopping worker's state is forgotten this long after the "
        "worker was last heard from.",
    )
    live_cache_s: float = Field(
        default=1.0, ge=0, description="How long the list of live workers is cached."
    )
    max_skip: int = Field(
        default=64, ge=1, description="Jobs a claim may pass over that avoid the worker."
    )
    class_idle_s: float = Field(
        default=600,
        ge=0,
        description="A requirement class without pending jobs for this long leaves the class "
        "list (its next job lists it again).",
    )


class AffinitySettings(BaseModel):
    """Model-warm affinity (docs/scheduling.md): EMP_SCHEDULING__AFFINITY__*."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=False,
        description="Among pending jobs of the same priority, a worker claims one that "
        "prefers a model it has loaded before one that would make it switch models.",
    )
    max_wait_s: float = Field(
        default=60,
        ge=0,
        description="A job that would make the worker switch models is passed over only "
        "while it has waited less than this (since it was submitted): nothing starves.",
    )
