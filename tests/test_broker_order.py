"""Exact claim order, checked against a model: hypothesis generates submits and claims by
workers with random capabilities; every claim must return the highest-priority, oldest job
among those the worker matches, and no job may be lost or handed out twice."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emp_hub.broker import Broker, BrokerSettings, JobSpec, RequirementsSpec
from emp_hub.broker.connection import connect
from emp_protocol.capabilities import GPU, JobRequirements, WorkerCapabilities, matches
from tests.conftest import drop_namespace
from tests.strategies import MODELS, SERVICES, TAGS, capabilities, requirements

pytestmark = [pytest.mark.slow, pytest.mark.broker]


@dataclass
class Submit:
    jobs: list[tuple[int, int]]  # (index into the pool of requirements, priority)


@dataclass
class ClaimBy:
    worker: int
    complete: bool


def spec(req: JobRequirements, priority: int) -> JobSpec:
    extra = req.model_dump(exclude={"service", "customer"})
    return JobSpec(
        service=req.service,
        customer=req.customer,
        priority=priority,
        requirements=RequirementsSpec.model_validate(extra),
    )


ops = st.lists(
    st.one_of(
        st.builds(
            Submit,
            st.lists(
                st.tuples(st.integers(0, 5), st.sampled_from([-5, 0, 0, 3, 10])),
                min_size=1,
                max_size=6,
            ),
        ),
        st.builds(ClaimBy, st.sampled_from([0, 0, 0, 1, 2, 3, 4]), st.booleans()),
    ),
    min_size=1,
    max_size=40,
)


#: A worker that runs every job but the customer-isolated ones.
UNIVERSAL = WorkerCapabilities(
    services=set(SERVICES),
    models={s: set(MODELS) for s in SERVICES},
    gpus=[GPU(memory_gb=80)] * 2,
    cpu_cores=64,
    ram_gb=512,
    region="eu",
    tags=set(TAGS),
)


async def run_scenario(
    url: str, pool: list[JobRequirements], workers: list[WorkerCapabilities], steps: list[object]
) -> None:
    client = connect(url)
    namespace = f"order-{uuid.uuid4().hex[:10]}"
    broker = Broker(client, BrokerSettings(namespace=namespace))
    pending: dict[str, tuple[int, int, JobRequirements]] = {}  # id -> (-priority, seq, req)
    handed: set[str] = set()
    try:
        for step in steps:
            if isinstance(step, Submit):
                reqs = [(pool[i % len(pool)], p) for i, p in step.jobs]
                jobs = await broker.submit_many([spec(r, p) for r, p in reqs])
                for job, (req, p) in zip(jobs, reqs, strict=True):
                    pending[job.id] = (-p, job.seq, req)
            elif isinstance(step, ClaimBy):
                caps = workers[step.worker]
                candidates = [(k, jid) for jid, (*k, req) in pending.items() if matches(req, caps)]
                expected = min(candidates)[1] if candidates else None
                claim = await broker.claim(f"w{step.worker}", caps)
                assert (claim.job.id if claim else None) == expected
                if claim is not None:
                    assert claim.job.id not in handed
                    handed.add(claim.job.id)
                    del pending[claim.job.id]
                    if step.complete:
                        await broker.complete(claim.job.id, claim.token, None)
        # Nothing lost: every job not handed out is still pending in the broker.
        stats = await broker.stats()
        assert stats.pending == len(pending)
    finally:
        await drop_namespace(client, namespace)
        await client.aclose()


#: Plain requirements (service and models): the universal worker matches them all, so
#: claims often choose among several non-empty classes.
plain = st.builds(
    JobRequirements,
    service=st.sampled_from(SERVICES),
    models=st.lists(st.sampled_from(MODELS), max_size=2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pool=st.lists(plain | requirements(), min_size=2, max_size=6),
    workers=st.lists(capabilities(), min_size=4, max_size=4),
    steps=ops,
)
def test_claims_follow_priority_fifo_and_matching(
    redis_url: str,
    pool: list[JobRequirements],
    workers: list[WorkerCapabilities],
    steps: list[object],
) -> None:
    asyncio.run(run_scenario(redis_url, pool, [UNIVERSAL, *workers], steps))
