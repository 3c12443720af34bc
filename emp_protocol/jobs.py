"""What hub and worker both say about a job: its status, and where its outputs went."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel


class JobStatus(StrEnum):
    """Where a job is in its life. Terminal: completed, failed, cancelled."""

    PENDING = "pending"
    ACTIVE = "active"
    DELAYED = "delayed"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True for completed, failed and cancelled."""
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


#: The terminal statuses' names, as events and the API carry them.
TERMINAL = frozenset(s.value for s in JobStatus if s.terminal)


class OutputRef(BaseModel):
    """Where an output file went: the hub's answer to an upload, and what a job's result
    lists under `outputs` (never the bytes)."""

    name: str
    size: int
    content_type: str
    url: str
