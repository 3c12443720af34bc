"""Prometheus metrics of one hub replica (`GET /metrics`).

Counters and histograms count what this replica did (Prometheus sums the replicas); the
queue gauges are read from Redis at each scrape, so every replica reports the same.
Series are bounded whatever clients submit: per-service counters name the first
`max_services` services a replica sees, and `emp_queue_depth` has at most
`max_queue_series` series; the rest are counted under the label value OTHER.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from emp_hub.broker import QueueStats
from emp_hub.series import Series

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)

#: The label value of whatever is beyond the caps (service and class names never start
#: with "_").
OTHER = "_other"


class ServiceCounter:
    """A counter whose first label is the service, naming at most `cap` services: the
    first ones this replica counts; later ones are counted as OTHER."""

    def __init__(self, counter: Counter, named: set[str], cap: int) -> None:
        self.counter = counter
        self.named = named  # shared by the per-service counters, so they name the same
        self.cap = cap

    def labels(self, service: str, *rest: str) -> Counter:
        """The child of the counter for this service (or OTHER) and the other labels."""
        if service not in self.named:
            if len(self.named) >= self.cap:
                return self.counter.labels(OTHER, *rest)
            self.named.add(service)
        return self.counter.labels(service, *rest)


class Metrics:
    """The hub's metrics, in a registry of their own."""

    def __init__(self, max_queue_series: int = 100, max_services: int = 100) -> None:
        self.registry = r = CollectorRegistry()
        self.max_queue_series = max_queue_series
        named: set[str] = set()
        self.submitted = ServiceCounter(
            Counter("emp_jobs_submitted", "Jobs submitted", ["service"], registry=r),
            named,
            max_services,
        )
        self.finished = ServiceCounter(
            Counter(
                "emp_job_attempts_finished",
                "Attempts that ended, by outcome (completed, failed, retrying, released, "
                "cancelled)",
                ["service", "outcome"],
                registry=r,
            ),
            named,
            max_services,
        )
        self.claim_seconds = Histogram(
            "emp_claim_seconds", "Time one claim took", buckets=LATENCY_BUCKETS, registry=r
        )
        self.submit_to_start = Histogram(
            "emp_submit_to_start_seconds",
            "From submission to assignment to a worker",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.connected_workers = Gauge(
            "emp_connected_workers", "Workers connected to this replica", registry=r
        )
        self.live_workers = Gauge(
            "emp_live_workers", "Workers heard from recently (all replicas)", registry=r
        )
        self.queue_depth = Gauge(
            "emp_queue_depth",
            "Pending jobs",
            ["requirement_class", "service", "priority"],
            registry=r,
        )
        self.unschedulable = Gauge(
            "emp_unschedulable_jobs", "Pending jobs no live worker can run", registry=r
        )
        self.jobs = Gauge("emp_jobs", "Jobs in a set", ["state"], registry=r)
        #: The dashboard's per-minute counts (emp_hub/series.py), flushed to Redis.
        self.series = Series()

    def render(self, stats: QueueStats, connected: int) -> bytes:
        """The text exposition, with the gauges set from `stats`."""
        self.queue_depth.clear()
        rows = sorted(
            (-count, c.requirement_class, priority, c.requirements.service)
            for c in stats.classes
            for priority, count in c.by_priority.items()
        )
        if len(rows) > self.max_queue_series:  # the deepest, and the rest summed in one
            rest = rows[self.max_queue_series - 1 :]
            rows = rows[: self.max_queue_series - 1]
            self.queue_depth.labels(OTHER, OTHER, OTHER).set(-sum(r[0] for r in rest))
        for count, requirement_class, priority, service in rows:
            self.queue_depth.labels(requirement_class, service, str(priority)).set(-count)
        self.unschedulable.set(stats.unschedulable_jobs)
        self.live_workers.set(stats.live_workers)
        self.connected_workers.set(connected)
        for state, value in (
            ("pending", stats.pending),
            ("active", stats.active),
            ("delayed", stats.delayed),
            ("dead", stats.dead),
        ):
            self.jobs.labels(state).set(value)
        return generate_latest(self.registry)
