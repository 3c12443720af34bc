"""Fair share between customers (docs/scheduling.md), checked against a model on the real
broker: hypothesis generates submits, claims and cancels; every job's tag must be the one
start-time fair queuing gives, every claim the best job the worker matches, the order
within a customer FIFO, the shares of backlogged customers within a fixed bound of their
weights, and the state must shrink back to one clock per band and service."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import cast

import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emp_hub.broker import Broker, BrokerSettings, JobSpec, RequirementsSpec
from emp_hub.broker.connection import connect
from emp_hub.broker.models import PRIORITY_MAX, PRIORITY_SCALE
from emp_hub.broker.settings import FAIR_UNIT, FairShareSettings
from emp_hub.settings import HubSettings
from emp_protocol.capabilities import JobRequirements, WorkerCapabilities, matches
from tests.conftest import drop_namespace
from tests.strategies import CUSTOMERS, MODELS, SERVICES, capabilities
from tests.test_broker_order import UNIVERSAL

pytestmark = [pytest.mark.broker]

WEIGHTS = [0.5, 1, 2, 3, 4]


def spec(req: JobRequirements, priority: int = 0) -> JobSpec:
    extra = req.model_dump(exclude={"service", "customer"})
    return JobSpec(
        service=req.service,
        customer=req.customer,
        priority=priority,
        requirements=RequirementsSpec.model_validate(extra),
    )


@dataclass
class FairModel:
    """Start-time fair queuing as docs/scheduling.md describes it, in Python."""

    fair: FairShareSettings
    clock: dict[tuple[int, str], int] = field(default_factory=dict)  # (band, service) -> V
    finish: dict[tuple[int, str, str], int] = field(default_factory=dict)

    def submit(self, band: int, service: str, customer: str, seq: int) -> tuple[int, int]:
        """The job's tag S and finish tag F."""
        v = self.clock.setdefault((band, service), seq)
        s = max(v, self.finish.get((band, service, customer), 0))
        f = s + self.fair.cost(customer)
        self.finish[(band, service, customer)] = f
        return s, f

    def claimed(self, band: int, service: str, customer: str, s: int, f: int) -> None:
        self.clock[(band, service)] = max(self.clock[(band, service)], s)
        if self.finish.get((band, service, customer)) == f:
            del self.finish[(band, service, customer)]

    def cancelled(self, band: int, service: str, customer: str, s: int, f: int) -> None:
        key = (band, service, customer)
        if self.finish.get(key) != f:
            return
        if s <= self.clock[(band, service)]:
            del self.finish[key]
        else:
            self.finish[key] = s


@dataclass
class Pending:
    band: int
    tag: int
    finish: int
    seq: int
    req: JobRequirements

    @property
    def customer(self) -> str:
        return self.req.customer or ""


@dataclass
class Submit:
    jobs: list[tuple[int, int]]  # (index into the pool of requirements, priority)


@dataclass
class ClaimBy:
    worker: int


@dataclass
class Cancel:
    index: int


ops = st.lists(
    st.one_of(
        st.builds(
            Submit,
            st.lists(
                st.tuples(st.integers(0, 7), st.sampled_from([0, 0, 0, 5])),
                min_size=1,
                max_size=8,
            ),
        ),
        st.builds(ClaimBy, st.sampled_from([0, 0, 0, 1, 2])),
        st.builds(Cancel, st.integers(0, 50)),
    ),
    min_size=1,
    max_size=50,
)

#: Plain requirements of one of the customers (or none): the universal worker runs them all.
plain = st.builds(
    JobRequirements,
    service=st.sampled_from(SERVICES[:2]),
    models=st.lists(st.sampled_from(MODELS), max_size=1),
    customer=st.sampled_from([None, *CUSTOMERS]),
)


async def stored(client: redis.asyncio.Redis, broker: Broker, job_id: str) -> tuple[int, int]:
    """A job's band and tag as the broker stored them (its score)."""
    score = int(await client.hget(broker.key("job", job_id), "score") or -1)
    return divmod(score, PRIORITY_SCALE)


def check_claim(pending: dict[str, Pending], caps: WorkerCapabilities, got: str | None) -> None:
    """The claim took the best job the worker matches, and the oldest of its customer's."""
    candidates = {jid: p for jid, p in pending.items() if matches(p.req, caps)}
    if not candidates:
        assert got is None
        return
    assert got is not None
    best = min((p.band, p.tag) for p in candidates.values())
    job = candidates[got]
    assert (job.band, job.tag) == best
    same = [
        p.seq
        for p in candidates.values()
        if (p.band, p.req.service, p.customer) == (job.band, job.req.service, job.customer)
    ]
    assert job.seq == min(same), "FIFO within a customer"


async def fair_state(client: redis.asyncio.Redis, broker: Broker) -> dict[str, dict[str, str]]:
    """Every fair-share hash of the broker's namespace (tests only: it uses SCAN)."""
    keys = [k async for k in client.scan_iter(match=broker.key("fair", "*", "*"))]
    return {k: cast(dict[str, str], await client.hgetall(k)) for k in keys}


async def run_model(
    url: str,
    pool: list[JobRequirements],
    workers: list[WorkerCapabilities],
    weights: dict[str, float],
    steps: list[object],
) -> None:
    client = connect(url)
    namespace = f"fair-{uuid.uuid4().hex[:10]}"
    fair = FairShareSettings(enabled=True, weights=weights)
    broker = Broker(client, BrokerSettings(namespace=namespace), fair_share=fair)
    model = FairModel(fair)
    pending: dict[str, Pending] = {}
    try:
        for step in steps:
            if isinstance(step, Submit):
                reqs = [(pool[i % len(pool)], prio) for i, prio in step.jobs]
                jobs = await broker.submit_many([spec(r, prio) for r, prio in reqs])
                for job, (req, prio) in zip(jobs, reqs, strict=True):
                    band = PRIORITY_MAX - prio
                    s, f = model.submit(band, req.service, req.customer or "", job.seq)
                    assert await stored(client, broker, job.id) == (band, s)
                    pending[job.id] = Pending(band, s, f, job.seq, req)
            elif isinstance(step, ClaimBy):
                caps = workers[step.worker]
                claim = await broker.claim(f"w{step.worker}", caps)
                got = claim.job.id if claim else None
                check_claim(pending, caps, got)
                if claim is not None:
                    p = pending.pop(claim.job.id)
                    model.claimed(p.band, p.req.service, p.customer, p.tag, p.finish)
                    await broker.complete(claim.job.id, claim.token, None)
            elif isinstance(step, Cancel) and pending:
                job_id = sorted(pending)[step.index % len(pending)]
                await broker.cancel(job_id)
                p = pending.pop(job_id)
                model.cancelled(p.band, p.req.service, p.customer, p.tag, p.finish)
        stats = await broker.stats()
        assert stats.pending == len(pending)  # nothing lost
        # The broker's state is the model's: a clock per band and service, and an entry per
        # customer whose last job submitted is still pending.
        state = await fair_state(client, broker)
        want: dict[str, dict[str, str]] = {}
        for (band, service), v in model.clock.items():
            want.setdefault(broker.key("fair", str(band), service), {})[".v"] = str(v)
        for (band, service, customer), f in model.finish.items():
            want[broker.key("fair", str(band), service)][customer] = str(f)
        assert state == want
    finally:
        await drop_namespace(client, namespace)
        await client.aclose()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pool=st.lists(plain, min_size=2, max_size=8),
    workers=st.lists(capabilities(), min_size=2, max_size=2),
    weights=st.dictionaries(st.sampled_from(["", *CUSTOMERS]), st.sampled_from(WEIGHTS)),
    steps=ops,
)
@pytest.mark.slow
def test_fair_claims_follow_the_tags_and_fifo_within_a_customer(
    redis_url: str,
    pool: list[JobRequirements],
    workers: list[WorkerCapabilities],
    weights: dict[str, float],
    steps: list[object],
) -> None:
    asyncio.run(run_model(redis_url, pool, [UNIVERSAL, *workers], weights, steps))


async def shares(url: str, weights: dict[str, float], order: list[str]) -> None:
    client = connect(url)
    namespace = f"fair-{uuid.uuid4().hex[:10]}"
    fair = FairShareSettings(enabled=True, weights=weights)
    broker = Broker(client, BrokerSettings(namespace=namespace), fair_share=fair)
    try:
        backlog = {c: order.count(c) for c in weights}
        await broker.submit_many([JobSpec(service="sim", customer=c) for c in order])
        cost = {c: fair.cost(c) for c in weights}
        done = dict.fromkeys(weights, 0)
        a, b = weights
        while all(done[c] < backlog[c] for c in weights):  # both backlogged
            claim = await broker.claim("w", UNIVERSAL)
            assert claim is not None and claim.job.customer is not None
            done[claim.job.customer] += 1
            # Service per weight: the two customers' claimed costs differ by at most one
            # job of each (start-time fair queuing's bound, exact in integer costs).
            assert abs(done[a] * cost[a] - done[b] * cost[b]) <= cost[a] + cost[b], done
    finally:
        await drop_namespace(client, namespace)
        await client.aclose()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    wa=st.sampled_from(WEIGHTS),
    wb=st.sampled_from(WEIGHTS),
    order=st.permutations(["acme"] * 60 + ["globex"] * 60),
)
@pytest.mark.slow
def test_backlogged_customers_share_by_weight(
    redis_url: str, wa: float, wb: float, order: list[str]
) -> None:
    asyncio.run(shares(redis_url, {"acme": wa, "globex": wb}, order))


def fair_broker(redis_client: redis.asyncio.Redis, namespace: str, **weights: float) -> Broker:
    fair = FairShareSettings(enabled=True, weights=weights)
    return Broker(redis_client, BrokerSettings(namespace=namespace), fair_share=fair)


async def test_a_single_job_is_not_held_up_by_a_big_batch(
    redis_client: redis.asyncio.Redis, namespace: str
) -> None:
    broker = fair_broker(redis_client, namespace)
    for _ in range(10):
        await broker.submit_many([JobSpec(service="sim", customer="a")] * 1000)
    for _ in range(3):
        claim = await broker.claim("w", UNIVERSAL)
        assert claim is not None and claim.job.customer == "a"
    single = await broker.submit(JobSpec(service="sim", customer="b"))
    claimed = []
    for _ in range(2):
        claim = await broker.claim("w", UNIVERSAL)
        assert claim is not None
        claimed.append(claim.job.id)
    assert single.id in claimed


async def test_state_drains_to_one_clock_per_band_and_service(
    redis_client: redis.asyncio.Redis, namespace: str
) -> None:
    broker = fair_broker(redis_client, namespace, a=2)
    specs = [
        JobSpec(service=service, customer=customer, priority=priority)
        for service in ("sim", "comfyui")
        for customer in ("a", "b", None)
        for priority in (0, 3)
    ]
    jobs = await broker.submit_many(specs * 5)
    await broker.cancel(jobs[-1].id)  # the last job of one customer, cancelled pending
    while (claim := await broker.claim("w", UNIVERSAL)) is not None:
        await broker.complete(claim.job.id, claim.token, None)
    state = await fair_state(redis_client, broker)
    assert len(state) == 4  # 2 services x 2 priorities
    assert all(set(h) == {".v"} for h in state.values()), state


async def test_switching_on_keeps_the_jobs_pending_in_order(
    redis_client: redis.asyncio.Redis, namespace: str
) -> None:
    fifo = Broker(redis_client, BrokerSettings(namespace=namespace))
    before = await fifo.submit_many([JobSpec(service="sim", customer="a")] * 3)
    after = await fair_broker(redis_client, namespace).submit(JobSpec(service="sim"))
    order = []
    while (claim := await fifo.claim("w", UNIVERSAL)) is not None:
        order.append(claim.job.id)
    assert order == [j.id for j in before] + [after.id]


async def test_off_the_tag_is_the_seq(redis_client: redis.asyncio.Redis, namespace: str) -> None:
    fair = FairShareSettings(enabled=False, weights={"a": 4})
    broker = Broker(redis_client, BrokerSettings(namespace=namespace), fair_share=fair)
    jobs = await broker.submit_many([JobSpec(service="sim", customer="a", priority=2)] * 3)
    for job in jobs:
        band, tag = await stored(redis_client, broker, job.id)
        assert (band, tag) == (PRIORITY_MAX - 2, job.seq)
    assert await fair_state(redis_client, broker) == {}


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMP_SCHEDULING__FAIR_SHARE__ENABLED", "true")
    monkeypatch.setenv("EMP_SCHEDULING__FAIR_SHARE__WEIGHTS", '{"acme": 3, "globex": 0.5}')
    fair = HubSettings().scheduling.fair_share
    assert fair.enabled and fair.weights == {"acme": 3, "globex": 0.5}
    assert [fair.cost(c) for c in ("acme", "globex", None)] == [33, 200, FAIR_UNIT]
    assert FairShareSettings().cost("acme") == 0  # off by default
    with pytest.raises(ValueError, match=r"0\.01 to 100"):
        FairShareSettings(weights={"acme": 0})


async def test_the_worked_example_of_the_docs(
    redis_client: redis.asyncio.Redis, namespace: str
) -> None:
    """docs/scheduling.md, "Worked example": the tags and the order, as computed by hand."""
    broker = fair_broker(redis_client, namespace, acme=3)
    acme = await broker.submit_many([JobSpec(service="sim", customer="acme")] * 6)
    first = await broker.claim("w", UNIVERSAL)
    assert first is not None and first.job.id == acme[0].id
    globex = await broker.submit_many([JobSpec(service="sim", customer="globex")] * 2)
    tags = [(await stored(redis_client, broker, j.id))[1] for j in acme + globex]
    assert tags == [1, 34, 67, 100, 133, 166, 1, 101]
    assert await redis_client.hget(broker.key("job", globex[0].id), "score") == str(
        4398046511104001
    )
    order = []
    while (claim := await broker.claim("w", UNIVERSAL)) is not None:
        order.append(claim.job.id)
    a, g = [j.id for j in acme], [j.id for j in globex]
    assert order == [g[0], a[1], a[2], a[3], g[1], a[4], a[5]]
    assert await fair_state(redis_client, broker) == {
        broker.key("fair", "1000", "sim"): {".v": "166"}
    }
