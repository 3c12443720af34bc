"""The broker's knobs. Every one is documented in docs/broker.md."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


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


#: A job's virtual cost at weight 1 (fair share): FAIR_UNIT / weight, rounded, at least 1.
FAIR_UNIT = 100


class FairShareSettings(BaseModel):
    """Fair share between customers within one priority (docs/scheduling.md)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=False,
        description="Within one priority and service, customers share the workers by weight "
        "(start-time fair queuing); off: one FIFO order.",
    )
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Customer -> weight (0.01 to 100); others, and jobs without a "
        'customer (the customer ""), weigh default_weight.',
    )
    default_weight: float = Field(
        default=1, ge=0.01, le=100, description="The weight of customers not in weights."
    )

    @field_validator("weights")
    @classmethod
    def _weights_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for customer, weight in value.items():
            if not 0.01 <= weight <= 100:
                raise ValueError(f"weight of {customer!r} must be 0.01 to 100, not {weight}")
        return value

    def cost(self, customer: str | None) -> int:
        """A job's virtual cost for `customer`: FAIR_UNIT / weight, rounded, at least 1;
        0 when fair share is off (the job's tag is then its seq)."""
        if not self.enabled:
            return 0
        weight = self.weights.get(customer or "", self.default_weight)
        return max(1, round(FAIR_UNIT / weight))
