"""Priority policy, deadlines and aging: a job's effective priority and its promotion steps.

At submit the hub's `Scheduler` asks its `PriorityPolicy` for the job's effective priority
(from the client's priority, the customer's tier, the urgency and the deadline) and for the
steps at which the job gains priority later (its deadline nearing). It adds the aging step
(`max_wait_s` after submit: the top priority) and the deadline itself. The broker stores
the steps with the job and schedules the first in a zset (`promote:at`); each maintenance
pass applies at most `promote_limit` due steps (lua/schedule.lua), so the work per pass is
bounded whatever the backlog. docs/scheduling.md describes the policies and the weights.

Policies: ``fifo`` (the client's number, unchanged: the default), ``weighted`` (tier,
urgency and deadline weights from the settings), or the name of an entry point in the group
``emp_hub.priority_policies``: a callable taking the `SchedulingSettings` and returning a
`PriorityPolicy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Literal, Protocol

from pydantic import BaseModel, Field, field_validator

from emp_hub.broker.models import PRIORITY_MAX, PRIORITY_MIN, Urgency
from emp_hub.broker.settings import AffinitySettings, FairShareSettings

#: The entry point group of priority policy plugins.
POLICY_GROUP = "emp_hub.priority_policies"
#: The policies emp_hub ships.
BUILTIN_POLICIES = ("fifo", "weighted")


@dataclass(frozen=True)
class PriorityRequest:
    """What a policy knows of a job at submit."""

    priority: int  # as the client asked
    customer: str | None
    tier: str | None  # the customer's tier (settings), None when it has none
    urgency: Urgency
    deadline: float | None  # epoch seconds
    now: float  # when it is submitted


class PriorityPolicy(Protocol):
    """Computes a job's effective priority at submit, and when it rises later."""

    def priority(self, request: PriorityRequest) -> int:
        """The effective priority at submit (clamped to PRIORITY_MIN..PRIORITY_MAX)."""
        ...

    def steps(self, request: PriorityRequest) -> list[tuple[float, int]]:
        """Later promotions: (when, effective priority from then on), in any order."""
        ...


class PolicyWeights(BaseModel):
    """The weights of the `weighted` policy (EMP_SCHEDULING__WEIGHTS__...)."""

    tiers: dict[str, int] = Field(
        default_factory=lambda: {"free": -100, "standard": 0, "premium": 100, "enterprise": 200},
        description="Priority added per customer tier; a customer without a tier adds 0.",
    )
    urgency: dict[str, int] = Field(
        default_factory=lambda: {"low": -50, "normal": 0, "high": 50, "critical": 150},
        description="Priority added per urgency.",
    )
    deadline: dict[float, int] = Field(
        default_factory=lambda: {3600.0: 100, 600.0: 250, 60.0: 500},
        description="Priority added once the deadline is this many seconds away or less "
        "(the largest boost reached counts, not their sum).",
    )


class SchedulingSettings(BaseModel):
    """EMP_SCHEDULING__...: how the hub orders pending jobs (docs/scheduling.md)."""

    policy: str = Field(
        default="fifo",
        description="fifo (the client's priority), weighted, or an entry point name in the "
        f"group {POLICY_GROUP}.",
    )
    tiers: dict[str, str] = Field(
        default_factory=dict, description="Customer -> tier (a JSON object), for the policy."
    )
    weights: PolicyWeights = Field(default_factory=PolicyWeights)
    affinity: AffinitySettings = Field(default_factory=AffinitySettings)
    fair_share: FairShareSettings = Field(default_factory=FairShareSettings)
    max_wait_s: float = Field(
        default=0,
        ge=0,
        description="Aging: a job pending this long moves to the top priority "
        f"({PRIORITY_MAX}), first come first served among such jobs; 0: off.",
    )
    deadline_action: Literal["expire", "keep"] = Field(
        default="expire",
        description="A job still waiting at its deadline: expire (failed, error `deadline`) "
        "or keep (it stays pending).",
    )
    promote_limit: int = Field(
        default=1000, ge=1, description="Most promotion steps one maintenance pass applies."
    )

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        if name in BUILTIN_POLICIES:
            return name
        installed = sorted(ep.name for ep in entry_points(group=POLICY_GROUP))
        if name not in installed:
            raise ValueError(
                f"unknown priority policy {name!r} (EMP_SCHEDULING__POLICY): not one of "
                f"{', '.join(BUILTIN_POLICIES)}, nor an entry point of the group "
                f"{POLICY_GROUP} (installed: {', '.join(installed) or 'none'})"
            )
        return name


def clamp(priority: int) -> int:
    """A priority within PRIORITY_MIN..PRIORITY_MAX."""
    return max(PRIORITY_MIN, min(PRIORITY_MAX, priority))


class FifoPolicy:
    """Today's order: the client's priority, no promotions."""

    def priority(self, request: PriorityRequest) -> int:
        """The client's priority."""
        return request.priority

    def steps(self, request: PriorityRequest) -> list[tuple[float, int]]:
        """None."""
        return []


class WeightedPolicy:
    """client priority + tier weight + urgency weight + deadline boost, clamped."""

    def __init__(self, weights: PolicyWeights) -> None:
        self.weights = weights

    def _base(self, request: PriorityRequest) -> int:
        tier = self.weights.tiers.get(request.tier, 0) if request.tier else 0
        return request.priority + tier + self.weights.urgency.get(request.urgency, 0)

    def priority(self, request: PriorityRequest) -> int:
        """The base, plus the deadline boost already reached at submit."""
        boost = 0
        if request.deadline is not None:
            boost = max(
                (
                    b
                    for h, b in self.weights.deadline.items()
                    if request.deadline - h <= request.now
                ),
                default=0,
            )
        return clamp(self._base(request) + boost)

    def steps(self, request: PriorityRequest) -> list[tuple[float, int]]:
        """One step per deadline horizon still ahead: at deadline - horizon."""
        if request.deadline is None:
            return []
        base = self._base(request)
        return [
            (request.deadline - horizon, clamp(base + boost))
            for horizon, boost in self.weights.deadline.items()
            if request.deadline - horizon > request.now
        ]


@dataclass(frozen=True)
class Plan:
    """A job's scheduling at submit: what the broker stores."""

    effective_priority: int
    steps: list[tuple[float, int]]  # sorted by time, all in the future
    deadline: float | None

    @property
    def next_at(self) -> float | None:
        """When the first step is due (None: never)."""
        return self.steps[0][0] if self.steps else None

    def encoded(self) -> str:
        """The steps as the broker stores them: "when priority when priority ..."."""
        return " ".join(f"{at!r} {p}" for at, p in self.steps)


#: Marks the deadline step: expire the job if it still waits (deadline_action=expire).
EXPIRE = PRIORITY_MIN - 1


class Scheduler:
    """The policy and the deadline and aging settings, as the broker applies them."""

    def __init__(
        self, policy: PriorityPolicy | None = None, settings: SchedulingSettings | None = None
    ) -> None:
        self.policy: PriorityPolicy = policy or FifoPolicy()
        self.settings = settings or SchedulingSettings()

    @classmethod
    def from_settings(cls, settings: SchedulingSettings) -> Scheduler:
        """The scheduler the settings name (an unknown policy raises ValueError)."""
        return cls(load_policy(settings), settings)

    def plan(
        self,
        *,
        priority: int,
        customer: str | None,
        urgency: Urgency | None,
        deadline: float | None,
        now: float,
        tier: str | None = None,
    ) -> Plan:
        """The effective priority and the promotion steps of a job submitted now. `tier`:
        its token's; without one, the customer's from the settings."""
        if tier is None and customer:
            tier = self.settings.tiers.get(customer)
        request = PriorityRequest(
            priority=priority,
            customer=customer,
            tier=tier,
            urgency=urgency or "normal",
            deadline=deadline,
            now=now,
        )
        effective = clamp(self.policy.priority(request))
        steps = [(at, clamp(p)) for at, p in self.policy.steps(request) if at > now]
        if self.settings.max_wait_s > 0:
            steps.append((now + self.settings.max_wait_s, PRIORITY_MAX))
        if deadline is not None and self.settings.deadline_action == "expire":
            steps.append((max(deadline, now), EXPIRE))
        steps.sort()
        return Plan(effective_priority=effective, steps=steps, deadline=deadline)


def load_policy(settings: SchedulingSettings) -> PriorityPolicy:
    """The policy named by settings.policy: fifo, weighted, or an installed entry point
    (its object is called with the settings and returns the policy)."""
    if settings.policy == "fifo":
        return FifoPolicy()
    if settings.policy == "weighted":
        return WeightedPolicy(settings.weights)
    found = {ep.name: ep for ep in entry_points(group=POLICY_GROUP)}
    if settings.policy not in found:  # uninstalled since the settings were read
        SchedulingSettings(policy=settings.policy)  # raises, naming the installed ones
    factory = found[settings.policy].load()
    policy: PriorityPolicy = factory(settings)
    return policy
