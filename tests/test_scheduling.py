"""Priority policy, deadlines and aging (emp_hub/scheduling.py, lua/schedule.lua): the claim
order is checked against a model (hypothesis, like test_broker_order.py) on the real broker
with a clock the test moves; expiry, keep mode, bounded work per pass, promotions that
survive a retry, and the policy plugin point."""

from __future__ import annotations

import asyncio
import json
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis.asyncio
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import emp_client
from emp_client import cli as emp_cli
from emp_hub import cli
from emp_hub.auth import Role, TokenStore
from emp_hub.broker import PRIORITY_MAX, Broker, BrokerSettings, JobSpec
from emp_hub.broker.connection import connect
from emp_hub.broker.models import Urgency
from emp_hub.scheduling import (
    POLICY_GROUP,
    PolicyWeights,
    PriorityRequest,
    Scheduler,
    SchedulingSettings,
    WeightedPolicy,
    clamp,
)
from emp_hub.settings import HubSettings
from emp_protocol.capabilities import WorkerCapabilities
from emp_protocol.jobs import JobStatus
from tests.conftest import Clock, drop_namespace
from tests.hub_server import running_hub

pytestmark = [pytest.mark.broker]

SERVICES = ["comfyui", "a1111"]
#: Runs every job of SERVICES (no requirements beyond the service).
UNIVERSAL = WorkerCapabilities(services=set(SERVICES))


@dataclass
class Submit:
    jobs: list[tuple[int, int, Urgency | None, float | None]]  # service, priority, urgency, in_s


@dataclass
class Advance:
    seconds: float  # then one maintenance pass


@dataclass
class ClaimOne:
    """Claim one job and complete it (a held job's lease would run out as time passes)."""


@dataclass
class Pending:
    seq: int
    effective: int
    deadline: float | None
    base: int  # client priority + urgency weight (the weighted policy)
    cls: str = ""  # its requirement class

    def key(self) -> tuple[int, int]:
        return (-self.effective, self.seq)


def submits(deadlines: list[float | None]) -> st.SearchStrategy[Submit]:
    return st.builds(
        Submit,
        st.lists(
            st.tuples(
                st.integers(0, 1),
                st.sampled_from([-5, 0, 0, 3, 10, PRIORITY_MAX]),
                st.sampled_from([None, "low", "normal", "high", "critical"]),
                st.sampled_from(deadlines),
            ),
            min_size=1,
            max_size=5,
        ),
    )


def scenario(deadlines: list[float | None]) -> st.SearchStrategy[list[object]]:
    return st.lists(
        st.one_of(
            submits(deadlines),
            st.builds(Advance, st.sampled_from([0.5, 3.0, 7.0, 40.0, 400.0, 3000.0])),
            st.builds(ClaimOne),
            st.builds(ClaimOne),
        ),
        min_size=1,
        max_size=40,
    )


class Model:
    """What the broker should do: the weighted (or fifo) policy's arithmetic, aging and
    expiry applied at each maintenance pass."""

    def __init__(self, s: SchedulingSettings) -> None:
        self.s = s
        self.pending: dict[str, Pending] = {}
        self.created: dict[str, float] = {}

    def boost(self, deadline: float | None, now: float) -> int:
        if deadline is None or self.s.policy == "fifo":
            return 0
        reached = [b for h, b in self.s.weights.deadline.items() if deadline - h <= now]
        return max(reached, default=0)

    def submit(self, job_id: str, seq: int, priority: int, urgency: Urgency | None,
               deadline: float | None, now: float) -> None:  # fmt: skip
        base = priority
        if self.s.policy == "weighted":
            base += self.s.weights.urgency[urgency or "normal"]
        effective = clamp(base + self.boost(deadline, now))
        self.pending[job_id] = Pending(seq, effective, deadline, base)
        self.created[job_id] = now

    def maintain(self, now: float) -> set[str]:
        """Apply every due step; returns the jobs expired."""
        expired = set()
        for job_id, p in list(self.pending.items()):
            if p.deadline is not None and p.deadline <= now and self.s.deadline_action == "expire":
                expired.add(job_id)
                del self.pending[job_id]
                continue
            if self.s.max_wait_s and self.created[job_id] + self.s.max_wait_s <= now:
                p.effective = PRIORITY_MAX
            p.effective = max(p.effective, clamp(p.base + self.boost(p.deadline, now)))
        return expired

    def next(self) -> str | None:
        if not self.pending:
            return None
        return min(self.pending, key=lambda i: self.pending[i].key())

    def position(self, job_id: str) -> int:
        """Pending jobs of its class ahead of it."""
        p = self.pending[job_id]
        return sum(1 for q in self.pending.values() if q.cls == p.cls and q.key() < p.key())


async def check_places(broker: Broker, model: Model) -> None:
    """Every pending job has the model's effective priority and place in its queue."""
    for job_id, p in model.pending.items():
        assert (await broker.get(job_id)).effective_priority == p.effective
        assert await broker.position(job_id, p.cls) == model.position(job_id)


async def run_scenario(url: str, s: SchedulingSettings, steps: list[object]) -> None:
    client = connect(url)
    namespace = f"sched-{uuid.uuid4().hex[:10]}"
    clock = Clock()
    broker = Broker(
        client,
        BrokerSettings(namespace=namespace, live_cache_s=0, retry_base_s=1),
        clock=clock,
        scheduler=Scheduler.from_settings(s),
    )
    model = Model(s)
    try:
        for step in steps:
            if isinstance(step, Submit):
                specs = [
                    JobSpec(service=SERVICES[svc], priority=p, urgency=u, deadline_in_s=in_s)
                    for svc, p, u, in_s in step.jobs
                ]
                done = await broker.submit_many(specs)
                for job, spec in zip(done, specs, strict=True):
                    model.submit(
                        job.id, job.seq, spec.priority, spec.urgency,
                        spec.deadline_at(clock.now), clock.now,
                    )  # fmt: skip
                    model.pending[job.id].cls = job.requirement_class
            elif isinstance(step, Advance):
                clock.advance(step.seconds)
                report = await broker.maintain()
                assert set(report.deadline_expired) == model.maintain(clock.now)
                for job_id in report.deadline_expired:
                    gone = await broker.get(job_id)
                    assert (gone.status, gone.error) == (JobStatus.FAILED, "deadline")
                await check_places(broker, model)
            elif isinstance(step, ClaimOne):
                expected = model.next()
                claim = await broker.claim("w", UNIVERSAL)
                assert (claim.job.id if claim else None) == expected
                if claim is not None:
                    assert claim.job.effective_priority == model.pending[claim.job.id].effective
                    del model.pending[claim.job.id]
                    await broker.complete(claim.job.id, claim.token, None)
        assert (await broker.stats()).pending == len(model.pending)
    finally:
        await drop_namespace(client, namespace)
        await client.aclose()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=scenario([None]))
def test_aging_no_younger_job_passes_a_job_that_waited_max_wait(
    redis_url: str, steps: list[object]
) -> None:
    """fifo + aging: a job pending max_wait_s moves above every client priority, first
    come first served among such jobs; the others keep today's order."""
    asyncio.run(run_scenario(redis_url, SchedulingSettings(max_wait_s=10), steps))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=scenario([None, None, 30.0, 300.0, 1200.0, 4000.0]),
    max_wait_s=st.sampled_from([0, 50]),
    action=st.sampled_from(["expire", "keep"]),
)
def test_weighted_policy_deadline_boosts_expiry_and_aging_follow_the_model(
    redis_url: str, steps: list[object], max_wait_s: float, action: str
) -> None:
    """weighted: urgency and deadline weights, boosts as the deadline nears, expiry (or
    keep) at the deadline, aging: the claim order is the model's."""
    s = SchedulingSettings.model_validate(
        {"policy": "weighted", "max_wait_s": max_wait_s, "deadline_action": action}
    )
    asyncio.run(run_scenario(redis_url, s, steps))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=scenario([None]))
def test_fifo_without_deadlines_is_todays_order(redis_url: str, steps: list[object]) -> None:
    """The default: the client's priority, then submission order; maintenance changes
    nothing."""
    asyncio.run(run_scenario(redis_url, SchedulingSettings(), steps))


def weighted(clock: Clock, broker: Broker, **fields: object) -> Broker:
    s = SchedulingSettings.model_validate({"policy": "weighted", **fields})
    return Broker(broker.redis, broker.settings, clock=clock, scheduler=Scheduler.from_settings(s))


async def test_the_worked_example_of_the_docs(broker: Broker, clock: Clock) -> None:
    """docs/scheduling.md: premium tier +100, urgency high +50, deadline in 30 min: +100;
    at 10 min before the deadline +250, at 1 min +500 (clamped to PRIORITY_MAX)."""
    b = weighted(clock, broker, tiers={"acme": "premium"})
    job = await b.submit(
        JobSpec(service="a", customer="acme", priority=10, urgency="high", deadline_in_s=1800)
    )
    assert (await b.get(job.id)).effective_priority == 10 + 100 + 50 + 100
    clock.advance(1200)  # 10 minutes left
    await b.maintain()
    assert (await b.get(job.id)).effective_priority == 10 + 100 + 50 + 250
    clock.advance(540)  # 1 minute left
    await b.maintain()
    got = await b.get(job.id)
    assert (got.priority, got.effective_priority) == (10, 10 + 100 + 50 + 500)


def test_weights_clamp_and_tiers() -> None:
    policy = WeightedPolicy(PolicyWeights())
    req = PriorityRequest(
        priority=990, customer="x", tier="enterprise", urgency="critical", deadline=None, now=0
    )
    assert policy.priority(req) == PRIORITY_MAX
    low = PriorityRequest(
        priority=0, customer=None, tier="free", urgency="low", deadline=100, now=0
    )
    assert policy.priority(low) == -100 - 50 + 250  # 100 s left: within 3600 and 600
    assert policy.steps(low) == [(40, -100 - 50 + 500)]  # 60 s before the deadline


async def test_a_near_deadline_overtakes_the_backlog(broker: Broker, clock: Clock) -> None:
    b = weighted(clock, broker)
    backlog = [await b.submit(JobSpec(service="a", priority=50)) for _ in range(5)]
    urgent = await b.submit(JobSpec(service="a", deadline_in_s=900))  # +100: 100 > 50
    late = await b.submit(JobSpec(service="a", deadline_in_s=4000))  # 0 until 400 s pass
    clock.advance(401)
    await b.maintain()
    order = [(await b.claim("w", UNIVERSAL_A)) for _ in range(7)]
    ids = [c.job.id for c in order if c]
    assert ids == [urgent.id, late.id, *(j.id for j in backlog)]


UNIVERSAL_A = WorkerCapabilities(services={"a"})


async def test_expiry_fails_the_job_with_reason_deadline(broker: Broker, clock: Clock) -> None:
    b = weighted(clock, broker)
    job = await b.submit(JobSpec(service="a", deadline_in_s=30))
    clock.advance(29)
    assert (await b.maintain()).deadline_expired == []
    clock.advance(1)
    assert (await b.maintain()).deadline_expired == [job.id]
    got = await b.get(job.id)
    assert (got.status, got.error) == (JobStatus.FAILED, "deadline")
    assert [e.data.get("reason") for e in await b.events(job.id)][-1] == "deadline"
    assert await b.claim("w", UNIVERSAL_A) is None
    assert (await b.stats()).dead == 1
    await b.retry(job.id)  # dead-lettered: an operator may run it anyway
    assert (await b.get(job.id)).status is JobStatus.PENDING


async def test_keep_mode_keeps_a_job_past_its_deadline(broker: Broker, clock: Clock) -> None:
    b = weighted(clock, broker, deadline_action="keep")
    job = await b.submit(JobSpec(service="a", deadline_in_s=30))
    clock.advance(31)
    assert (await b.maintain()).deadline_expired == []
    claim = await b.claim("w", UNIVERSAL_A)
    assert claim is not None and claim.job.id == job.id
    assert claim.job.effective_priority == 500


async def test_a_delayed_job_expires_and_an_active_one_runs_on(
    broker: Broker, clock: Clock
) -> None:
    b = weighted(clock, broker)
    first = await b.submit(JobSpec(service="a", deadline_in_s=30))
    second = await b.submit(JobSpec(service="a", deadline_in_s=30))
    one = await b.claim("w", UNIVERSAL_A, lease_s=3600)
    two = await b.claim("w", UNIVERSAL_A, lease_s=3600)
    assert one and two and [one.job.id, two.job.id] == [first.id, second.id]
    await b.fail(first.id, one.token, "boom", retryable=True)  # delayed: retry later
    clock.advance(30)
    assert (await b.maintain()).deadline_expired == [first.id]
    assert (await b.get(second.id)).status is JobStatus.ACTIVE


async def test_work_per_pass_is_bounded(broker: Broker, clock: Clock) -> None:
    b = weighted(clock, broker, promote_limit=7, max_wait_s=5)
    await b.submit_many([JobSpec(service="a", deadline_in_s=5) for _ in range(30)])
    clock.advance(5)
    counts = []
    for _ in range(5):
        report = await b.maintain()
        counts.append((report.promotion_steps, len(report.deadline_expired)))
    assert counts == [(7, 7), (7, 7), (7, 7), (7, 7), (2, 2)]
    assert await b.redis.zcard(b.key("promotions")) == 0


async def test_a_retry_keeps_the_promoted_place(broker: Broker, clock: Clock) -> None:
    b = weighted(clock, broker)
    x = await b.submit(JobSpec(service="a", deadline_in_s=700))  # +100 now, +250 at 100 s
    y = await b.submit(JobSpec(service="a", priority=200))
    clock.advance(100)
    await b.maintain()
    claim = await b.claim("w", UNIVERSAL_A)
    assert claim is not None and claim.job.id == x.id
    await b.fail(x.id, claim.token, "boom", retryable=True)
    clock.advance(b.settings.retry_cap_s)
    await b.maintain()
    again = await b.claim("w2", UNIVERSAL_A)
    assert again is not None and again.job.id == x.id  # still ahead of y
    assert (await b.get(y.id)).status is JobStatus.PENDING


async def test_a_promotion_of_an_active_job_is_kept_for_its_return(
    broker: Broker, clock: Clock
) -> None:
    b = weighted(clock, broker, max_wait_s=60)
    x = await b.submit(JobSpec(service="a"))
    claim = await b.claim("w", UNIVERSAL_A, lease_s=3600)
    assert claim is not None
    clock.advance(60)
    await b.maintain()
    await b.release(x.id, claim.token)
    await b.submit(JobSpec(service="a", priority=999))
    assert (await b.get(x.id)).effective_priority == PRIORITY_MAX
    again = await b.claim("w", UNIVERSAL_A)
    assert again is not None and again.job.id == x.id


# -- the plugin point ------------------------------------------------------------------


@pytest.fixture
def reverse_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A policy installed the way a package installs one: a module and a dist-info
    directory with an entry point in the group, on sys.path."""
    name = f"reverse_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            class Reverse:
                def __init__(self, settings):
                    self.settings = settings

                def priority(self, request):
                    return -request.priority

                def steps(self, request):
                    return []
            """
        )
    )
    info = tmp_path / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{POLICY_GROUP}]\n{name} = {name}:Reverse\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


async def test_a_policy_from_an_entry_point(
    reverse_policy: str, broker: Broker, clock: Clock
) -> None:
    s = SchedulingSettings(policy=reverse_policy)
    b = Broker(broker.redis, broker.settings, clock=clock, scheduler=Scheduler.from_settings(s))
    high = await b.submit(JobSpec(service="a", priority=5))
    low = await b.submit(JobSpec(service="a", priority=-5))
    got = [await b.claim("w", UNIVERSAL_A) for _ in range(2)]
    assert [c.job.id for c in got if c] == [low.id, high.id]


def test_an_unknown_policy_fails_at_start(
    reverse_policy: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMP_SCHEDULING__POLICY", "no-such-policy")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "unknown priority policy 'no-such-policy'" in err
    assert POLICY_GROUP in err and reverse_policy in err


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMP_SCHEDULING__POLICY", "weighted")
    monkeypatch.setenv("EMP_SCHEDULING__TIERS", '{"acme": "premium"}')
    monkeypatch.setenv("EMP_SCHEDULING__MAX_WAIT_S", "600")
    monkeypatch.setenv("EMP_SCHEDULING__WEIGHTS__URGENCY", '{"critical": 900}')
    s = HubSettings().scheduling
    assert (s.policy, s.tiers, s.max_wait_s) == ("weighted", {"acme": "premium"}, 600)
    assert s.weights.urgency == {"critical": 900}


async def test_no_scheduling_leaves_the_job_record_as_today(
    redis_client: redis.asyncio.Redis, broker: Broker
) -> None:
    job = await broker.submit(JobSpec(service="a", priority=3))
    stored = await redis_client.hgetall(broker.key("job", job.id))
    assert "steps" not in stored and await redis_client.zcard(broker.key("promotions")) == 0
    assert (await broker.get(job.id)).effective_priority == 3


# -- through the hub -------------------------------------------------------------------


@pytest.mark.hub
async def test_the_cli_and_the_http_api_carry_urgency_and_deadline(
    redis_url: str,
    namespace: str,
    redis_client: redis.asyncio.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hub = HubSettings(
        redis_url=redis_url,
        broker=BrokerSettings(namespace=namespace),
        scheduling=SchedulingSettings(policy="weighted", tiers={"acme": "premium"}),
    )
    async with running_hub(hub) as url:
        args = ["--hub", url, "submit", "sim", "--customer", "acme", "--priority", "10"]
        args += ["--urgency", "high", "--deadline-in", "1800"]
        assert await asyncio.to_thread(emp_cli.main, args) == 0
        job_id = capsys.readouterr().out.strip()
        async with httpx.AsyncClient(base_url=url) as http:
            job = (await http.get(f"/api/jobs/{job_id}")).json()
            listed = (await http.get("/api/jobs")).json()["jobs"][0]
            bad = await http.post(
                "/api/jobs", json={"job_type": "sim", "deadline": 1.0e9, "deadline_in_s": 5}
            )
        assert (job["priority"], job["effective_priority"], job["urgency"]) == (10, 260, "high")
        assert job["deadline"] > 0
        assert (listed["job_id"], listed["effective_priority"]) == (job_id, 260)
        assert bad.status_code == 422
        assert await asyncio.to_thread(emp_cli.main, ["--hub", url, "status", job_id]) == 0
        assert "priority=10 effective=260" in " ".join(capsys.readouterr().out.split())


@pytest.mark.hub
async def test_a_token_tier_wins_over_the_customer_tier(
    redis_url: str, namespace: str, redis_client: redis.asyncio.Redis
) -> None:
    store = TokenStore(redis_client, namespace)
    gold = await store.create(Role.CLIENT, customer="acme", tier="enterprise")
    plain = await store.create(Role.CLIENT, customer="acme")
    hub = HubSettings(
        redis_url=redis_url,
        broker=BrokerSettings(namespace=namespace),
        scheduling=SchedulingSettings(policy="weighted", tiers={"acme": "free"}),
    )
    assert {r.tier for r in await store.list()} == {"enterprise", None}
    async with running_hub(hub) as url:
        effective = []
        for token in (gold, plain):
            async with emp_client.Client(url, token) as emp:
                job_id = await emp.submit("sim", priority=10)
                effective.append((await emp.get(job_id))["effective_priority"])
    assert effective == [10 + 200, 10 - 100]  # the token's tier, else the customer's


@pytest.mark.hub
async def test_the_original_client_socket_carries_urgency_and_deadline(
    redis_url: str, namespace: str, redis_client: redis.asyncio.Redis
) -> None:
    hub = HubSettings(
        redis_url=redis_url,
        broker=BrokerSettings(namespace=namespace),
        scheduling=SchedulingSettings(policy="weighted"),
    )
    async with running_hub(hub) as url:
        async with websockets.connect(url.replace("http", "ws") + "/ws/client/c1") as conn:
            assert json.loads(await conn.recv())["type"] == "connection_established"
            submit = {"type": "submit_job", "message_id": "ws-1", "job_type": "sim"}
            await conn.send(json.dumps({**submit, "urgency": "critical", "deadline_in_s": 30}))
            assert json.loads(await conn.recv())["type"] == "job_accepted"
            await conn.send(json.dumps({**submit, "message_id": "ws-2", "urgency": "soon"}))
            error = json.loads(await conn.recv())
            assert error["type"] == "error" and "urgency" in error["error"], error
        async with httpx.AsyncClient(base_url=url) as http:
            job = (await http.get("/api/jobs/ws-1")).json()
    assert (job["priority"], job["effective_priority"]) == (0, 150 + 500)


async def test_a_finished_job_leaves_the_promotion_schedule(broker: Broker, clock: Clock) -> None:
    b = weighted(clock, broker, max_wait_s=86_400)
    done = await b.submit(JobSpec(service="a", deadline_in_s=7 * 86_400))
    cancelled = await b.submit(JobSpec(service="a"))
    claim = await b.claim("w", UNIVERSAL_A)
    assert claim is not None and claim.job.id == done.id
    await b.complete(done.id, claim.token, None)
    await b.cancel(cancelled.id)
    assert await b.redis.zcard(b.key("promotions")) == 0
