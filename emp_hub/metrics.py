"""Prometheus metrics of one hub replica (`GET /metrics`).

Counters and histograms count what this replica did (Prometheus sums the replicas); the
queue gauges are read from Redis at each scrape, so every replica reports the same.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from emp_hub.broker import QueueStats

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


class Metrics:
    """The hub's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.submitted = Counter("emp_jobs_submitted", "Jobs submitted", ["service"], registry=r)
        self.finished = Counter(
            "emp_job_attempts_finished",
            "Attempts that ended, by outcome (completed, failed, retrying, released, cancelled)",
            ["service", "outcome"],
            registry=r,
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

    def render(self, stats: QueueStats, connected: int) -> bytes:
        """The text exposition, with the gauges set from `stats`."""
        self.queue_depth.clear()
        for c in stats.classes:
            for priority, count in c.by_priority.items():
                self.queue_depth.labels(
                    c.requirement_class, c.requirements.service, str(priority)
                ).set(count)
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
