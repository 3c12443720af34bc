"""Model-warm affinity (docs/scheduling.md): a worker claims an equal-priority job that
prefers a model it has loaded before one that would make it switch, never a lower-priority
one, and never passes over a job that has waited max_wait_s; off, the order is today's."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emp_hub.broker import Broker, BrokerSettings, JobSpec, RequirementsSpec
from emp_hub.broker.connection import connect
from emp_hub.broker.settings import AffinitySettings
from emp_protocol.capabilities import JobRequirements, WorkerCapabilities
from tests.conftest import Clock, drop_namespace

pytestmark = pytest.mark.broker

SD = WorkerCapabilities(services={"sd"})
ON = AffinitySettings(enabled=True, max_wait_s=60)


def job(prefer: str | None = None, priority: int = 0, **req: object) -> JobSpec:
    """A job of service sd preferring `prefer`."""
    return JobSpec(
        service="sd",
        priority=priority,
        requirements=RequirementsSpec.model_validate({"prefer_model": prefer, **req}),
    )


def on(broker: Broker, affinity: AffinitySettings = ON) -> Broker:
    """The same broker's connection and namespace, with affinity set."""
    return Broker(broker.redis, broker.settings, clock=broker.clock, affinity=affinity)


async def claimed(broker: Broker, loaded: dict[str, set[str]] | None) -> str | None:
    claim = await broker.claim("w1", SD, loaded=loaded)
    return claim.job.id if claim else None


def test_prefer_model_is_soft_and_keeps_other_classes() -> None:
    plain = JobRequirements(service="sd")
    preferring = JobRequirements(service="sd", prefer_model="m")
    assert "prefer_model" not in plain.canonical_json  # existing classes keep their hash
    assert preferring.requirement_class != plain.requirement_class
    assert JobRequirements(service="sd", prefer_model="n").requirement_class not in {
        plain.requirement_class,
        preferring.requirement_class,
    }


async def test_warm_job_beats_an_older_equal_priority_cold_one(broker: Broker) -> None:
    affine = on(broker)
    old_n = (await affine.submit(job("n"))).id
    new_m = (await affine.submit(job("m"))).id
    assert await claimed(affine, {"sd": {"m"}}) == new_m
    assert await claimed(affine, {"sd": {"m"}}) == old_n


async def test_a_worker_of_the_service_runs_a_job_preferring_a_model_it_lacks(
    broker: Broker,
) -> None:
    affine = on(broker)
    only = (await affine.submit(job("n"))).id
    assert await claimed(affine, {"sd": {"m"}}) == only  # soft: not a matching constraint


async def test_higher_priority_cold_job_still_wins(broker: Broker) -> None:
    affine = on(broker)
    warm = (await affine.submit(job("m"))).id
    urgent = (await affine.submit(job("n", priority=5))).id
    assert await claimed(affine, {"sd": {"m"}}) == urgent
    assert await claimed(affine, {"sd": {"m"}}) == warm


async def test_cold_job_older_than_the_bound_wins(broker: Broker, clock: Clock) -> None:
    affine = on(broker)
    old_n = (await affine.submit(job("n"))).id
    clock.advance(59)
    new_m = (await affine.submit(job("m"))).id
    second_m = (await affine.submit(job("m"))).id
    assert await claimed(affine, {"sd": {"m"}}) == new_m  # n has waited 59 s < 60
    clock.advance(1)
    assert await claimed(affine, {"sd": {"m"}}) == old_n  # 60 s: plain order again
    assert await claimed(affine, {"sd": {"m"}}) == second_m


async def test_any_overdue_cold_head_ahead_of_the_warm_one_restores_plain_order(
    broker: Broker, clock: Clock
) -> None:
    """A policy may tag jobs out of submission order (fair share): then a cold head other
    than the plain best may be the overdue one; the warm job still does not pass it."""
    affine = on(broker)
    fresh = (await affine.submit(job("n"))).id  # the plain best, waited 0 s
    clock.advance(-100)  # the next one is tagged later but waited longer
    overdue = (await affine.submit(job("o"))).id
    clock.advance(100)
    await affine.submit(job("m"))
    assert await claimed(affine, {"sd": {"m"}}) == fresh
    assert await claimed(affine, {"sd": {"m"}}) == overdue


async def test_loaded_models_count_for_their_own_service(broker: Broker) -> None:
    affine = on(broker)
    old_n = (await affine.submit(job("n"))).id
    await affine.submit(job("m"))
    assert await claimed(affine, {"other": {"m"}}) == old_n


async def test_off_or_nothing_loaded_keeps_todays_order(broker: Broker) -> None:
    old_n = (await broker.submit(job("n"))).id
    await broker.submit(job("m"))
    assert await claimed(broker, {"sd": {"m"}}) == old_n  # off (the default)
    again = (await broker.submit(job("n"))).id
    assert await claimed(on(broker), None) != again  # on, but the worker reports nothing


async def test_claim_many_fills_slots_warm_first(broker: Broker) -> None:
    affine = on(broker)
    a = (await affine.submit(job("n"))).id
    b = (await affine.submit(job("m"))).id
    c = (await affine.submit(job("m"))).id
    claims = await affine.claim_many("w1", SD, 3, loaded={"sd": {"m"}})
    assert [x.job.id for x in claims] == [b, c, a]


# -- the model check ---------------------------------------------------------------------

MAX_WAIT = 10.0
PREFER = [None, "m", "n", "o"]


@dataclass
class Submit:
    jobs: list[tuple[int, int]]  # (index into PREFER, priority)


@dataclass
class Wait:
    seconds: float


@dataclass
class ClaimBy:
    loaded: frozenset[str]


ops = st.lists(
    st.one_of(
        st.builds(
            Submit,
            st.lists(
                st.tuples(st.integers(0, len(PREFER) - 1), st.sampled_from([0, 0, 5])),
                min_size=1,
                max_size=4,
            ),
        ),
        st.builds(Wait, st.sampled_from([1.0, 4.0, 9.0, 10.0, 15.0])),
        st.builds(ClaimBy, st.frozensets(st.sampled_from(["m", "n", "o", "x"]), max_size=2)),
    ),
    min_size=1,
    max_size=40,
)


@dataclass
class Pending:
    priority: int
    seq: int
    prefer: str | None
    created: float


def expected(pending: dict[str, Pending], loaded: frozenset[str], now: float) -> str | None:
    """The model: the plain best (priority, then seq), unless it is cold and has waited
    less than MAX_WAIT and a warm job of the same priority waits: then the oldest such."""
    if not pending:
        return None
    order = sorted(pending, key=lambda j: (-pending[j].priority, pending[j].seq))
    best = pending[order[0]]
    if best.prefer in loaded or now - best.created >= MAX_WAIT:
        return order[0]
    warm = [
        j for j in order if pending[j].priority == best.priority and pending[j].prefer in loaded
    ]
    return warm[0] if warm else order[0]


async def run_model(url: str, steps: list[object], enabled: bool) -> None:
    client = connect(url)
    namespace = f"affinity-{uuid.uuid4().hex[:10]}"
    clock = Clock()
    broker = Broker(
        client,
        BrokerSettings(namespace=namespace, live_cache_s=0),
        clock=clock,
        affinity=AffinitySettings(enabled=enabled, max_wait_s=MAX_WAIT),
    )
    pending: dict[str, Pending] = {}
    try:
        for step in steps:
            if isinstance(step, Submit):
                specs = [job(PREFER[i], p) for i, p in step.jobs]
                for s, sub in zip(specs, await broker.submit_many(specs), strict=True):
                    prefer = s.requirements.prefer_model
                    pending[sub.id] = Pending(s.priority, sub.seq, prefer, clock.now)
            elif isinstance(step, Wait):
                clock.advance(step.seconds)
            elif isinstance(step, ClaimBy):
                loaded = step.loaded if enabled else frozenset()
                want = expected(pending, loaded, clock.now)
                claim = await broker.claim("w", SD, loaded={"sd": step.loaded})
                assert (claim.job.id if claim else None) == want
                if claim is not None:
                    del pending[claim.job.id]
                    await broker.complete(claim.job.id, claim.token, None)
        assert (await broker.stats()).pending == len(pending)
    finally:
        await drop_namespace(client, namespace)
        await client.aclose()


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=ops, enabled=st.booleans())
def test_claims_follow_the_affinity_model(
    redis_url: str, steps: list[object], enabled: bool
) -> None:
    """With affinity on, a job is passed over for a warm one only while it has waited less
    than max_wait_s (nothing starves); off, the order is exactly priority then FIFO."""
    asyncio.run(run_model(redis_url, steps, enabled))
