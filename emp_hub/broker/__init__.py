"""The job broker on Redis: the data model, the Lua scripts, claim/lease/retry.

Start at `Broker` (broker.py); the data model is described there and in docs/broker.md.
"""

from emp_hub.broker.broker import (
    Broker,
    ClaimFor,
    MaintenanceReport,
    Registration,
    WorkerAction,
    WorkerDetails,
)
from emp_hub.broker.connection import REDIS_DOWN, connect
from emp_hub.broker.models import (
    PRIORITY_MAX,
    PRIORITY_MIN,
    BrokerError,
    CancelResult,
    Claim,
    ClassStats,
    Completion,
    DuplicateJob,
    Event,
    Failure,
    InvalidJob,
    InvalidState,
    Job,
    JobNotFound,
    JobReport,
    JobSpec,
    Page,
    Progress,
    QueueStats,
    RequirementsSpec,
    StaleLease,
    Submitted,
    TooLarge,
)
from emp_hub.broker.settings import BrokerSettings
from emp_protocol.jobs import TERMINAL, JobStatus

__all__ = [
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "REDIS_DOWN",
    "TERMINAL",
    "Broker",
    "BrokerError",
    "BrokerSettings",
    "CancelResult",
    "Claim",
    "ClaimFor",
    "ClassStats",
    "Completion",
    "DuplicateJob",
    "Event",
    "Failure",
    "InvalidJob",
    "InvalidState",
    "Job",
    "JobNotFound",
    "JobReport",
    "JobSpec",
    "JobStatus",
    "MaintenanceReport",
    "Page",
    "Progress",
    "QueueStats",
    "Registration",
    "RequirementsSpec",
    "StaleLease",
    "Submitted",
    "TooLarge",
    "WorkerAction",
    "WorkerDetails",
    "connect",
]
