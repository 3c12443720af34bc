"""What a job needs, what a worker offers, and the one predicate that matches them.

A job's hard requirements are put in canonical form; the hash of that form is the job's
*requirement class*. Jobs of one class wait in one queue, so the broker can find the best job
for a worker by looking only at the heads of the queues whose class the worker satisfies.
The matching rules are written down in docs/matching.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Names of services, models, tags and regions: printable, no whitespace.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$"
#: Customer ids follow the same rule.
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class Isolation(StrEnum):
    """How strictly work of one customer is kept apart from other customers' work."""

    NONE = "none"
    LOOSE = "loose"
    STRICT = "strict"


def _sorted_unique(value: Any) -> Any:
    """Turn any iterable of names into a sorted tuple without duplicates."""
    if isinstance(value, str):
        raise ValueError("expected a list of names, not a string")
    if isinstance(value, list | tuple | set | frozenset):
        return tuple(sorted(set(value)))
    return value


def _sort_sets(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sort_sets(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_sort_sets(v) for v in value]
        if all(isinstance(v, str) for v in items):
            return sorted(items)
        return items
    return value


def _canonical_json(data: Any) -> str:
    """JSON with sorted keys and sorted lists of names: equal content, equal text."""
    return json.dumps(_sort_sets(data), sort_keys=True, separators=(",", ":"))


class JobRequirements(BaseModel):
    """The hard requirements of a job: a worker runs it only if it satisfies all of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service: Name
    gpu_memory_gb: float = Field(default=0, ge=0, description="Minimum memory of each GPU.")
    gpu_count: int = Field(default=0, ge=0, le=64, description="GPUs needed (0: any).")
    models: tuple[Name, ...] = Field(default=(), description="Models the service must have.")
    customer: Name | None = None
    isolation: Isolation = Isolation.NONE
    region: Name | None = None
    tags: tuple[Name, ...] = ()
    cpu_cores: int = Field(default=0, ge=0)
    ram_gb: float = Field(default=0, ge=0)
    prefer_model: Name | None = Field(
        default=None,
        description="A model the job prefers (soft): not matched, but part of the class, so "
        "that model-warm affinity (docs/scheduling.md) can favour workers that have it loaded.",
    )

    _norm = field_validator("models", "tags", mode="before")(_sorted_unique)

    @field_validator("isolation")
    @classmethod
    def _isolation_needs_customer(cls, value: Isolation, info: Any) -> Isolation:
        if value is not Isolation.NONE and info.data.get("customer") is None:
            raise ValueError(f"isolation {value.value!r} needs a customer")
        return value

    @property
    def gpus_needed(self) -> int:
        """How many GPUs the job needs: gpu_count, or one if only GPU memory is given."""
        return max(self.gpu_count, 1 if self.gpu_memory_gb > 0 else 0)

    @cached_property
    def canonical_json(self) -> str:
        """The canonical JSON form: the same requirements always give the same text.
        `prefer_model` appears only when set, so the classes of other jobs keep their hash."""
        return _canonical_json(
            self.model_dump(
                mode="json", exclude={"prefer_model"} if self.prefer_model is None else None
            )
        )

    @cached_property
    def requirement_class(self) -> str:
        """The stable hash of the canonical form, naming the job's queue."""
        return hashlib.sha256(self.canonical_json.encode()).hexdigest()[:20]


class GPU(BaseModel):
    """One GPU of a worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "gpu"
    memory_gb: float = Field(default=0, ge=0)
    driver: str | None = None


class CustomerAccess(BaseModel):
    """Which customers' jobs a worker may run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    isolation: Isolation = Isolation.NONE
    allowed: frozenset[Name] = frozenset()
    denied: frozenset[Name] = frozenset()


class WorkerCapabilities(BaseModel):
    """What a worker offers: services, models per service, hardware, place and access."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    services: frozenset[Name]
    models: dict[Name, frozenset[Name]] = Field(default_factory=dict)
    gpus: tuple[GPU, ...] = ()
    cpu_cores: int = Field(default=0, ge=0)
    ram_gb: float = Field(default=0, ge=0)
    disk_gb: float = Field(default=0, ge=0)
    region: Name | None = None
    tags: frozenset[Name] = frozenset()
    customer_access: CustomerAccess = CustomerAccess()

    @cached_property
    def canonical_json(self) -> str:
        """Canonical JSON of the capabilities (sets sorted), usable as a cache key."""
        return _canonical_json(self.model_dump(mode="json"))


def customer_allows(req: JobRequirements, access: CustomerAccess) -> bool:
    """The customer-isolation half of matching (see docs/matching.md)."""
    customer = req.customer
    if customer is not None and customer in access.denied:
        return False
    # What the worker demands.
    if access.isolation is Isolation.STRICT and customer not in access.allowed:
        return False
    if (
        access.isolation is Isolation.LOOSE
        and customer is not None
        and (customer not in access.allowed)
    ):
        return False
    # What the job demands.
    if req.isolation is Isolation.STRICT:
        return access.isolation is Isolation.STRICT and access.allowed == {customer}
    if req.isolation is Isolation.LOOSE:
        return access.isolation is not Isolation.NONE and customer in access.allowed
    return True


def first_unmet(req: JobRequirements, caps: WorkerCapabilities) -> int | None:
    """The number of the first rule (docs/matching.md) that `caps` fails for `req`, in
    the order service, models, GPUs, region, tags, CPU and RAM, customer; None: it matches."""
    if req.service not in caps.services:
        return 0
    if req.models and not set(req.models) <= caps.models.get(req.service, frozenset()):
        return 1
    needed = req.gpus_needed
    if needed and sum(1 for g in caps.gpus if g.memory_gb >= req.gpu_memory_gb) < needed:
        return 2
    if req.region is not None and req.region != caps.region:
        return 3
    if not set(req.tags) <= caps.tags:
        return 4
    if req.cpu_cores > caps.cpu_cores or req.ram_gb > caps.ram_gb:
        return 5
    if not customer_allows(req, caps.customer_access):
        return 6
    return None


def matches(req: JobRequirements, caps: WorkerCapabilities) -> bool:
    """True when a worker with `caps` may run a job with requirements `req`."""
    return first_unmet(req, caps) is None


def _rule(req: JobRequirements, number: int) -> tuple[str, str] | None:
    """Rule `number` of first_unmet() as (what the workers that pass it do, what those
    that fail it do not); None when the rule asks nothing of this job."""
    if number == 0:
        return f"offer service {req.service!r}", f"offer service {req.service!r}"
    if number == 1 and req.models:
        models = f"model(s) {', '.join(req.models)} for {req.service!r}"
        return f"have {models}", f"have {models}"
    if number == 2 and req.gpus_needed:
        memory = f" with at least {req.gpu_memory_gb:g} GB each" if req.gpu_memory_gb else ""
        gpus = f"{req.gpus_needed} GPU(s){memory}"
        return f"have {gpus}", f"have {gpus}"
    if number == 3 and req.region is not None:
        return f"are in region {req.region!r}", f"run in region {req.region!r}"
    if number == 4 and req.tags:
        return f"carry tag(s) {', '.join(req.tags)}", f"carry tag(s) {', '.join(req.tags)}"
    if number == 5 and (req.cpu_cores or req.ram_gb):
        size = f"at least {req.cpu_cores} CPU cores and {req.ram_gb:g} GB of RAM"
        return f"have {size}", f"have {size}"
    if number == 6:
        if req.customer is None:
            return "accept jobs of no customer", "accept jobs of no customer"
        whose = f"customer {req.customer!r} (job isolation {req.isolation.value})"
        return f"accept {whose}", f"accept {whose}"
    return None


def why_unmatched(req: JobRequirements, workers: Iterable[WorkerCapabilities]) -> str | None:
    """Why none of `workers` may run a job with `req`, naming the requirement that the
    workers that got furthest fail; None when one of them may run it."""
    workers = list(workers)
    failed = [first_unmet(req, caps) for caps in workers]
    if not failed:
        return "no worker is connected"
    if None in failed:
        return None
    furthest = max(n for n in failed if n is not None)
    if furthest == 0:
        offered = sorted({s for caps in workers for s in caps.services})
        return (
            f"no live worker offers service {req.service!r} "
            f"(the {len(failed)} live worker(s) offer: {', '.join(offered) or 'nothing'})"
        )
    passed = " and ".join(rule[0] for n in range(furthest) if (rule := _rule(req, n)))
    failing = _rule(req, furthest)
    assert failing is not None  # a rule that asks nothing fails no worker
    return (
        f"no live worker can run it: the {failed.count(furthest)} of {len(failed)} live "
        f"worker(s) that {passed} do not {failing[1]}"
    )
