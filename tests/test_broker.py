"""The broker's operations against a real Redis-protocol server."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio
from pydantic import ValidationError

from emp_hub.broker import (
    Allowance,
    Broker,
    BrokerSettings,
    ClaimFor,
    Completion,
    DuplicateJob,
    Failure,
    InvalidJob,
    InvalidState,
    JobNotFound,
    JobSpec,
    JobStatus,
    Progress,
    RateLimited,
    RequirementsSpec,
    StaleLease,
)
from emp_protocol.capabilities import GPU, CustomerAccess, Isolation, WorkerCapabilities
from tests.conftest import Clock

pytestmark = pytest.mark.broker

SIM = WorkerCapabilities(services={"sim"})


async def test_submit_and_get(broker: Broker) -> None:
    job = await broker.submit(
        JobSpec(
            service="sim",
            payload={"prompt": "a cat", "n": [1, 2.5]},
            priority=7,
            customer="acme",
            timeout=60,
        )
    )
    got = await broker.get(job.id)
    assert got.status is JobStatus.PENDING
    assert got.payload == {"prompt": "a cat", "n": [1, 2.5]}
    assert (got.priority, got.customer, got.timeout) == (7, "acme", 60)
    assert got.requirement_class == job.requirement_class
    assert got.max_attempts == 3
    assert got.attempt == 0


async def test_client_id_must_be_new(broker: Broker) -> None:
    await broker.submit(JobSpec(service="sim", id="job-1", payload={"v": 1}))
    with pytest.raises(DuplicateJob, match="job-1"):
        await broker.submit(JobSpec(service="sim", id="job-1", payload={"v": 2}))
    assert (await broker.get("job-1")).payload == {"v": 1}


async def test_batch_is_all_or_nothing(broker: Broker) -> None:
    await broker.submit(JobSpec(service="sim", id="taken"))
    batch = [JobSpec(service="sim", id=f"b{i}") for i in range(5)] + [
        JobSpec(service="sim", id="taken")
    ]
    with pytest.raises(DuplicateJob, match="taken"):
        await broker.submit_many(batch)
    with pytest.raises(JobNotFound):
        await broker.get("b0")
    with pytest.raises(DuplicateJob, match="twice"):
        await broker.submit_many([JobSpec(service="sim", id="x"), JobSpec(service="sim", id="x")])
    assert (await broker.stats()).pending == 1


async def test_a_submit_spends_its_tokens_allowance_in_its_script(broker: Broker) -> None:
    """The submit script spends a job each of the token's allowance: over it, RateLimited
    and nothing stored; a refused submit (over the allowance, a duplicate) spends nothing."""
    allowance = Allowance("t1", rate=0.001, burst=2)
    await broker.submit_and_claim(
        [JobSpec(service="sim", id=f"a{i}") for i in range(2)], None, allowance
    )
    with pytest.raises(RateLimited) as refused:
        await broker.submit_and_claim([JobSpec(service="sim", id="a2")], None, allowance)
    assert 900 <= refused.value.retry_after <= 1000  # one job's worth at 0.001 jobs/s
    with pytest.raises(JobNotFound):
        await broker.get("a2")
    other = Allowance("t2", rate=0.001, burst=1)
    with pytest.raises(DuplicateJob):
        await broker.submit_and_claim([JobSpec(service="sim", id="a0")], None, other)
    await broker.submit_and_claim([JobSpec(service="sim", id="b0")], None, other)  # still 1
    await broker.submit_many([JobSpec(service="sim", id="b1")])  # no token: no limit
    assert (await broker.stats()).pending == 4


async def test_a_submit_claims_for_a_waiting_worker_in_its_script(broker: Broker) -> None:
    """submit_and_claim with a worker's free slots: the best jobs it can run are claimed in
    the same script, older ones first; a new class (the worker's candidates predate it)
    leaves the claim to claim_many."""
    await broker.submit(JobSpec(service="sim", id="old"))
    await broker.refresh_classes()
    slots = ClaimFor("w1", SIM, 2)
    submitted, claims = await broker.submit_and_claim([JobSpec(service="sim", id="new")], slots)
    assert [c.job.id for c in claims or []] == ["old", "new"] and submitted[0].position is None
    assert (await broker.get("new")).status is JobStatus.ACTIVE
    _, claims = await broker.submit_and_claim(
        [JobSpec(service="sim", id="gpu", requirements=RequirementsSpec(gpu_memory_gb=8))], slots
    )
    assert claims is None and (await broker.get("gpu")).status is JobStatus.PENDING


async def test_a_submit_announces_only_the_jobs_its_claim_left_pending(
    broker: Broker, redis_client: redis.asyncio.Redis
) -> None:
    """The work channel tells the replicas of jobs that became pending: a job the submit's
    own claim took is not announced (a worker woken for it would claim nothing)."""
    await broker.submit(JobSpec(service="sim", id="first"))  # the class is known now
    await broker.refresh_classes()
    await broker.claim_many("w0", SIM, 1)  # "first": the queue is empty again
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(broker.key("work_channel"))
    await pubsub.get_message(timeout=1)  # the subscription's confirmation
    _, claims = await broker.submit_and_claim(
        [JobSpec(service="sim", id="a")], ClaimFor("w1", SIM, 1)
    )
    assert [c.job.id for c in claims or []] == ["a"]
    _, claims = await broker.submit_and_claim(
        [JobSpec(service="sim", id="b"), JobSpec(service="sim", id="c")], ClaimFor("w2", SIM, 1)
    )
    assert [c.job.id for c in claims or []] == ["b"]
    await broker.submit(JobSpec(service="sim", id="d"))
    heard = []
    while message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5):
        heard.append(message["data"].split()[1:])
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    [job_class] = {(await broker.get(i)).requirement_class for i in "abcd"}
    assert heard == [[f"{job_class}:1"], [f"{job_class}:1"]]  # c, then d


def test_bad_specs_are_rejected() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        JobSpec.model_validate({"service": "sim", "colour": "red"})
    with pytest.raises(ValidationError, match="less than or equal to 1000"):
        JobSpec(service="sim", priority=1001)
    with pytest.raises(ValidationError, match="greater than or equal to -1000"):
        JobSpec(service="sim", priority=-1001)
    with pytest.raises(ValidationError, match="service"):
        JobSpec.model_validate({"payload": {}})
    with pytest.raises(ValidationError, match="id"):
        JobSpec(service="sim", id="has space")
    with pytest.raises(ValidationError, match="needs a customer"):
        JobSpec(service="sim", requirements=RequirementsSpec(isolation=Isolation.STRICT))


@pytest.fixture
def settings(namespace: str) -> BrokerSettings:
    return BrokerSettings(
        namespace=namespace,
        live_cache_s=0,
        max_payload_bytes=1000,
        max_result_bytes=1000,
        retry_base_s=10,
        retry_cap_s=100,
        timeout_grace_s=0,
    )


async def test_oversize_payload_and_result(broker: Broker) -> None:
    with pytest.raises(InvalidJob, match="exceeds the cap of 1000 bytes"):
        await broker.submit(JobSpec(service="sim", payload={"x": "y" * 2000}))
    assert (await broker.stats()).pending == 0
    await broker.submit(JobSpec(service="sim"))
    claim = await broker.claim("w", SIM)
    assert claim is not None
    with pytest.raises(InvalidJob, match="upload large outputs"):
        await broker.complete(claim.job.id, claim.token, {"image": "z" * 2000})
    assert (await broker.get(claim.job.id)).status is JobStatus.ACTIVE


async def test_priority_then_fifo(broker: Broker) -> None:
    prios = [0, 5, -3, 5, 0, 1000, -1000, 5]
    jobs = await broker.submit_many([JobSpec(service="sim", priority=p) for p in prios])
    expected = [j.id for j in sorted(jobs, key=lambda j: (-j.priority, j.seq))]
    got = []
    while (claim := await broker.claim("w", SIM)) is not None:
        got.append(claim.job.id)
    assert got == expected


async def test_only_matching_workers_get_jobs(broker: Broker) -> None:
    big = await broker.submit(
        JobSpec(service="comfyui", requirements=RequirementsSpec(gpu_memory_gb=24, models=["flux"]))
    )
    small_gpu = WorkerCapabilities(
        services={"comfyui"}, models={"comfyui": {"flux"}}, gpus=(GPU(memory_gb=12),)
    )
    no_model = WorkerCapabilities(services={"comfyui"}, gpus=(GPU(memory_gb=80),))
    right = WorkerCapabilities(
        services={"comfyui"}, models={"comfyui": {"flux", "sdxl"}}, gpus=(GPU(memory_gb=80),)
    )
    assert await broker.claim("small", small_gpu) is None
    assert await broker.claim("nomodel", no_model) is None
    assert await broker.claim("sim", SIM) is None
    claim = await broker.claim("right", right)
    assert claim is not None
    assert claim.job.id == big.id


async def test_strict_customer_isolation(broker: Broker) -> None:
    strict = await broker.submit(
        JobSpec(
            service="sim",
            customer="acme",
            requirements=RequirementsSpec(isolation=Isolation.STRICT),
        )
    )
    other = await broker.submit(JobSpec(service="sim", customer="globex"))
    dedicated = WorkerCapabilities(
        services={"sim"},
        customer_access=CustomerAccess(isolation=Isolation.STRICT, allowed={"acme"}),
    )
    assert await broker.claim("shared", SIM) is not None  # takes globex's job, not acme's
    assert (await broker.get(other.id)).status is JobStatus.ACTIVE
    assert await broker.claim("shared", SIM) is None
    claim = await broker.claim("dedicated", dedicated)
    assert claim is not None
    assert claim.job.id == strict.id


async def test_lease_expiry_requeues_in_place(broker: Broker, clock: Clock) -> None:
    first, _second = await broker.submit_many([JobSpec(service="sim"), JobSpec(service="sim")])
    claim = await broker.claim("w1", SIM, lease_s=5)
    assert claim is not None
    assert claim.job.id == first.id
    clock.advance(4)
    assert (await broker.maintain()).requeued == []
    clock.advance(2)
    report = await broker.maintain()
    assert report.requeued == [first.id]
    job = await broker.get(first.id)
    assert (job.status, job.orphans, job.failures, job.worker) == (JobStatus.PENDING, 1, 0, None)
    again = await broker.claim("w2", SIM)
    assert again is not None
    assert again.job.id == first.id
    assert again.job.attempt == 2
    # The lost worker comes back: its token no longer holds the job.
    with pytest.raises(StaleLease):
        await broker.complete(first.id, claim.token, {"by": "w1"})
    with pytest.raises(StaleLease):
        await broker.progress(first.id, claim.token, 50)
    assert await broker.extend([(first.id, claim.token), (first.id, again.token)]) == [
        False,
        True,
    ]
    await broker.complete(first.id, again.token, {"by": "w2"})
    with pytest.raises(StaleLease):
        await broker.complete(first.id, again.token, {"by": "w2 again"})
    job = await broker.get(first.id)
    assert (job.status, job.result, job.worker) == (JobStatus.COMPLETED, {"by": "w2"}, "w2")
    completions = [e for e in await broker.events(first.id) if e.data.get("status") == "completed"]
    assert len(completions) == 1


async def test_heartbeat_keeps_the_lease(broker: Broker, clock: Clock) -> None:
    await broker.submit(JobSpec(service="sim"))
    claim = await broker.claim("w", SIM, lease_s=5)
    assert claim is not None
    for _ in range(5):
        clock.advance(4)
        assert await broker.extend([(claim.job.id, claim.token)], lease_s=5) == [True]
        assert (await broker.maintain()).requeued == []
    clock.advance(3)
    await broker.progress(claim.job.id, claim.token, 40, "denoising")  # progress renews too
    clock.advance(3)
    assert (await broker.maintain()).requeued == []
    assert (await broker.get(claim.job.id)).status is JobStatus.ACTIVE


@pytest.mark.parametrize("max_orphans", [0, 2])
async def test_orphan_limit(
    redis_client: redis.asyncio.Redis, namespace: str, clock: Clock, max_orphans: int
) -> None:
    broker = Broker(
        redis_client, BrokerSettings(namespace=namespace, max_orphans=max_orphans), clock=clock
    )
    job = await broker.submit(JobSpec(service="sim", max_attempts=1))
    for n in range(max_orphans + 1):
        assert await broker.claim(f"w{n}", SIM, lease_s=1) is not None
        clock.advance(2)
        report = await broker.maintain()
        if n < max_orphans:
            assert report.requeued == [job.id]
    assert report.dead_lettered == [job.id]
    got = await broker.get(job.id)
    assert got.status is JobStatus.FAILED
    assert got.failures == 0
    assert got.orphans == max_orphans + 1
    assert got.error is not None
    assert "lost" in got.error
    assert (await broker.stats()).dead == 1


async def test_retry_backoff_and_dead_letter(broker: Broker, clock: Clock) -> None:
    job = await broker.submit(JobSpec(service="sim", max_attempts=2))
    claim = await broker.claim("w", SIM)
    assert claim is not None
    assert await broker.fail(job.id, claim.token, "CUDA out of memory") is JobStatus.DELAYED
    delayed = await broker.get(job.id)
    assert delayed.status is JobStatus.DELAYED
    assert delayed.retry_at is not None
    # retry_base_s=10 with equal jitter: due between 5 and 10 s after the failure.
    assert clock.now + 5 <= delayed.retry_at <= clock.now + 10
    assert await broker.claim("w", SIM) is None
    clock.advance(4.9)
    assert (await broker.maintain()).promoted_classes == []
    clock.advance(5.2)
    assert (await broker.maintain()).promoted_classes == [job.requirement_class]
    claim = await broker.claim("w", SIM)  # the only live worker: it may take the job again
    assert claim is not None
    assert claim.job.attempt == 2
    with pytest.raises(StaleLease):
        await broker.fail(job.id, "not-the-token", "x")
    assert await broker.fail(job.id, claim.token, "CUDA out of memory") is JobStatus.FAILED
    dead = await broker.get(job.id)
    assert (dead.status, dead.failures, dead.error) == (JobStatus.FAILED, 2, "CUDA out of memory")
    assert (await broker.stats()).dead == 1


async def test_second_failure_waits_longer(broker: Broker, clock: Clock) -> None:
    job = await broker.submit(JobSpec(service="sim", max_attempts=5))
    delays = []
    for _ in range(3):
        claim = await broker.claim("w", SIM)
        assert claim is not None
        await broker.fail(job.id, claim.token, "boom")
        retry_at = (await broker.get(job.id)).retry_at
        assert retry_at is not None
        delays.append(retry_at - clock.now)
        clock.advance(200)
        await broker.maintain()
    assert 5 <= delays[0] <= 10
    assert 10 <= delays[1] <= 20
    assert 20 <= delays[2] <= 40


async def test_non_retryable_failure_is_dead_at_once(broker: Broker) -> None:
    job = await broker.submit(JobSpec(service="sim"))
    claim = await broker.claim("w", SIM)
    assert claim is not None
    assert await broker.fail(job.id, claim.token, "bad prompt", retryable=False) is (
        JobStatus.FAILED
    )


async def test_failed_worker_is_passed_over(broker: Broker, clock: Clock) -> None:
    await broker.register_worker("w1", SIM)
    await broker.register_worker("w2", SIM)
    job = await broker.submit(JobSpec(service="sim"))
    claim = await broker.claim("w1", SIM)
    assert claim is not None
    await broker.fail(job.id, claim.token, "w1 has a broken GPU")
    clock.advance(20)
    await broker.maintain()
    later = await broker.submit(JobSpec(service="sim"))
    mine = await broker.claim("w1", SIM)
    assert mine is not None
    assert mine.job.id == later.id
    theirs = await broker.claim("w2", SIM)
    assert theirs is not None
    assert theirs.job.id == job.id
    # Once w2 is gone, w1 is the only one left and gets the job again.
    await broker.fail(job.id, theirs.token, "w2 too")
    await broker.unregister_worker("w2")
    clock.advance(60)
    await broker.maintain()
    again = await broker.claim("w1", SIM)
    assert again is not None
    assert again.job.id == job.id


async def test_retry_a_waiting_job_now_for_any_worker(broker: Broker) -> None:
    """force_retry_job: a job waiting for its next attempt is queued at once, and the
    worker that failed it may take it even while another worker could."""
    await broker.register_worker("w1", SIM)
    await broker.register_worker("w2", SIM)
    job = await broker.submit(JobSpec(service="sim"))
    claim = await broker.claim("w1", SIM)
    assert claim is not None
    await broker.fail(job.id, claim.token, "flaky")
    assert (await broker.get(job.id)).status is JobStatus.DELAYED
    await broker.retry(job.id)
    waiting = await broker.get(job.id)
    assert (waiting.status, waiting.failures) == (JobStatus.PENDING, 1)
    again = await broker.claim("w1", SIM)
    assert again is not None
    assert again.job.id == job.id
    await broker.fail(job.id, again.token, "flaky again")
    await broker.maintain()  # not due yet: stays delayed
    assert (await broker.stats()).delayed == 1


async def test_release_keeps_place_and_attempts(broker: Broker) -> None:
    first, _second = await broker.submit_many([JobSpec(service="sim"), JobSpec(service="sim")])
    claim = await broker.claim("w", SIM)
    assert claim is not None
    await broker.release(first.id, claim.token)
    job = await broker.get(first.id)
    assert (job.status, job.failures, job.orphans) == (JobStatus.PENDING, 0, 0)
    again = await broker.claim("w", SIM)
    assert again is not None
    assert again.job.id == first.id


async def test_cancel_pending(broker: Broker) -> None:
    job = await broker.submit(JobSpec(service="sim"))
    result = await broker.cancel(job.id, "user changed their mind")
    assert result.previous_status is JobStatus.PENDING
    assert result.worker is None
    assert await broker.claim("w", SIM) is None
    got = await broker.get(job.id)
    assert got.status is JobStatus.CANCELLED
    assert got.message == "user changed their mind"
    with pytest.raises(InvalidState, match="already cancelled"):
        await broker.cancel(job.id)
    with pytest.raises(JobNotFound):
        await broker.cancel("no-such-job")
    assert (await broker.stats()).classes == []


async def test_cancel_active_tells_whom_and_fences(broker: Broker) -> None:
    job = await broker.submit(JobSpec(service="sim"))
    claim = await broker.claim("gpu-7", SIM)
    assert claim is not None
    result = await broker.cancel(job.id)
    assert result.previous_status is JobStatus.ACTIVE
    assert result.worker == "gpu-7"
    with pytest.raises(StaleLease, match="cancelled"):
        await broker.complete(job.id, claim.token, {})
    with pytest.raises(StaleLease):
        await broker.progress(job.id, claim.token, 10)
    assert await broker.extend([(job.id, claim.token)]) == [False]
    assert (await broker.stats()).active == 0


async def test_cancel_delayed(broker: Broker) -> None:
    job = await broker.submit(JobSpec(service="sim"))
    claim = await broker.claim("w", SIM)
    assert claim is not None
    await broker.fail(job.id, claim.token, "x")
    assert (await broker.cancel(job.id)).previous_status is JobStatus.DELAYED
    assert (await broker.stats()).delayed == 0


async def test_retry_from_dead_letter(broker: Broker) -> None:
    job = await broker.submit(JobSpec(service="sim", priority=3))
    later = await broker.submit(JobSpec(service="sim", priority=3))
    claim = await broker.claim("w", SIM)
    assert claim is not None
    await broker.fail(job.id, claim.token, "fatal", retryable=False)
    with pytest.raises(InvalidState, match="only failed"):
        await broker.retry(later.id)
    await broker.retry(job.id)
    revived = await broker.get(job.id)
    assert (revived.status, revived.failures, revived.error) == (JobStatus.PENDING, 0, None)
    assert (await broker.stats()).dead == 0
    assert await broker.redis.ttl(broker.key("job", job.id)) == -1  # retention lifted
    again = await broker.claim("w", SIM)
    assert again is not None
    assert again.job.id == job.id


async def test_job_timeout_is_backed_by_the_lease(broker: Broker, clock: Clock) -> None:
    job = await broker.submit(JobSpec(service="sim", timeout=3))
    claim = await broker.claim("w", SIM, lease_s=30)
    assert claim is not None
    assert claim.lease_expires == pytest.approx(clock.now + 3)
    clock.advance(2)
    assert await broker.extend([(job.id, claim.token)]) == [True]  # heartbeats cannot pass it
    clock.advance(1.5)
    report = await broker.maintain()
    assert report.timed_out == [job.id]
    got = await broker.get(job.id)
    assert got.status is JobStatus.DELAYED
    assert got.failures == 1
    assert got.error == "timed out after 3.0 s"


@pytest.mark.slow
async def test_retention(broker: Broker, clock: Clock, namespace: str) -> None:
    broker.settings.retention_s = 1
    broker = Broker(broker.redis, broker.settings, clock=clock)
    job = await broker.submit(JobSpec(service="sim", customer="acme"))
    claim = await broker.claim("w", SIM)
    assert claim is not None
    await broker.complete(job.id, claim.token, {"ok": True})
    assert 0 < await broker.redis.ttl(broker.key("job", job.id)) <= 1
    assert 0 < await broker.redis.ttl(broker.key("events", job.id)) <= 1
    assert [j.id for j in (await broker.list_jobs(customer="acme")).jobs] == [job.id]
    await asyncio.sleep(1.2)
    clock.advance(1.2)
    assert (await broker.maintain()).purged == 1
    with pytest.raises(JobNotFound):
        await broker.get(job.id)
    left = {k async for k in broker.redis.scan_iter(match="{" + namespace + "}:*")}
    assert all(":idx:" not in k for k in left), left
    assert broker.key("expiring") not in left


async def test_events_resume(broker: Broker) -> None:
    job = await broker.submit(JobSpec(service="sim"))
    claim = await broker.claim("w", SIM)
    assert claim is not None
    for p in (10, 50, 90):
        await broker.progress(job.id, claim.token, p, f"step {p}")
    await broker.complete(job.id, claim.token, {"ok": 1})
    events = await broker.events(job.id)
    summary = [(e.type, e.data.get("status") or e.data["progress"]) for e in events]
    assert summary == [
        ("status", "pending"),
        ("status", "active"),
        ("progress", 10),  # a number, as in the job's record
        ("progress", 50),
        ("progress", 90),
        ("status", "completed"),
    ]
    rest = await broker.events(job.id, after=events[2].id)
    assert [e.id for e in rest] == [e.id for e in events[3:]]
    assert await broker.events(job.id, after=events[-1].id) == []
    with pytest.raises(InvalidJob, match=r"0\.\.100"):
        await broker.progress(job.id, claim.token, 101)


async def test_event_stream_is_capped(broker: Broker) -> None:
    broker = Broker(broker.redis, broker.settings.model_copy(update={"event_cap": 10}))
    job = await broker.submit(JobSpec(service="sim"))
    claim = await broker.claim("w", SIM)
    assert claim is not None
    for i in range(500):
        await broker.progress(job.id, claim.token, i / 5)
    assert await broker.redis.xlen(broker.key("events", job.id)) < 200


async def test_batch_submit_and_listing(broker: Broker) -> None:
    specs = [
        JobSpec(service=("a1111" if i % 3 else "comfyui"), customer=("acme" if i % 2 else None))
        for i in range(500)
    ]
    jobs = await broker.submit_many(specs)
    assert [j.seq for j in jobs] == list(range(jobs[0].seq, jobs[0].seq + 500))
    assert (await broker.stats()).pending == 500
    seen: list[str] = []
    cursor = None
    while True:
        page = await broker.list_jobs(limit=64, cursor=cursor)
        seen += [j.id for j in page.jobs]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [j.id for j in reversed(jobs)]
    acme = await broker.list_jobs(customer="acme", service="comfyui", limit=1000)
    assert {j.id for j in acme.jobs} == {
        j.id
        for j, s in zip(jobs, specs, strict=True)
        if s.customer == "acme" and s.service == "comfyui"
    }
    claim = await broker.claim("w", WorkerCapabilities(services={"comfyui"}))
    assert claim is not None
    active = await broker.list_jobs(status=JobStatus.ACTIVE)
    assert [j.id for j in active.jobs] == [claim.job.id]
    pending = await broker.list_jobs(status=JobStatus.PENDING, service="comfyui", limit=1000)
    assert len(pending.jobs) == sum(s.service == "comfyui" for s in specs) - 1


async def test_listing_reads_large_fields_only_when_asked(broker: Broker) -> None:
    small = await broker.submit(JobSpec(service="sim", payload={"n": 1}))
    big = await broker.submit(JobSpec(service="sim", payload={"x": "y" * 500}))
    claim = await broker.claim("w", WorkerCapabilities(services={"sim"}))
    assert claim is not None and claim.job.id == small.id
    await broker.complete(small.id, claim.token, {"ok": True})
    whole = {j.id: j for j in (await broker.list_jobs()).jobs}
    assert whole[big.id].payload == {"x": "y" * 500} and whole[big.id].omitted == {}
    assert whole[small.id].result == {"ok": True}
    bare = {j.id: j for j in (await broker.list_jobs(include=())).jobs}
    assert bare[big.id].payload == {} and bare[big.id].omitted == {"payload": 508}
    assert bare[small.id].result is None
    assert bare[small.id].omitted == {"payload": 7, "result": 11}
    capped = {j.id: j for j in (await broker.list_jobs(include=["payload"], cap=100)).jobs}
    assert capped[small.id].payload == {"n": 1} and capped[small.id].omitted == {"result": 11}
    assert capped[big.id].omitted == {"payload": 508} and capped[big.id].status.value == "pending"
    assert (await broker.get(big.id)).payload == {"x": "y" * 500}


async def test_stats_depth_and_unschedulable(broker: Broker) -> None:
    await broker.submit_many(
        [JobSpec(service="sim", priority=p) for p in (0, 0, 5, -2)]
        + [JobSpec(service="nobody-runs-this", priority=1)]
    )
    stats = await broker.stats()
    assert stats.pending == 5
    assert stats.unschedulable_jobs == 5
    assert stats.live_workers == 0
    await broker.register_worker("w", SIM)
    stats = await broker.stats()
    by_service = {c.requirements.service: c for c in stats.classes}
    assert by_service["sim"].by_priority == {5: 1, 0: 2, -2: 1}
    assert by_service["sim"].matching_workers == 1
    assert not by_service["sim"].unschedulable
    assert by_service["nobody-runs-this"].unschedulable
    assert stats.unschedulable_jobs == 1
    assert stats.live_workers == 1


async def test_dead_workers_drop_out(broker: Broker, clock: Clock) -> None:
    await broker.register_worker("w", SIM)
    clock.advance(30)
    await broker.touch_worker("w")
    clock.advance(45)
    assert list(await broker.live_workers()) == ["w"]
    clock.advance(20)
    assert await broker.live_workers() == {}
    assert (await broker.maintain()).workers_pruned == 1


async def test_concurrent_claimers_each_job_once(broker: Broker) -> None:
    jobs = await broker.submit_many([JobSpec(service="sim") for _ in range(300)])
    taken: list[str] = []

    async def worker(name: str) -> None:
        while (claim := await broker.claim(name, SIM)) is not None:
            taken.append(claim.job.id)
            await broker.complete(claim.job.id, claim.token, None)

    await asyncio.gather(*(worker(f"w{i}") for i in range(25)))
    assert sorted(taken) == sorted(j.id for j in jobs)
    assert (await broker.stats()).active == 0


async def test_claim_many_fills_free_slots_in_order(broker: Broker) -> None:
    jobs = await broker.submit_many([JobSpec(service="sim", priority=p) for p in (1, 3, 2, 3)])
    claims = await broker.claim_many("w", SIM, 3)
    best = sorted(jobs, key=lambda j: (-j.priority, j.seq))
    assert [c.job.id for c in claims] == [j.id for j in best[:3]]
    assert len({c.token for c in claims}) == 3
    assert [c.job.id for c in await broker.claim_many("w", SIM, 5)] == [best[3].id]
    assert await broker.claim_many("w", SIM, 5) == []
    for c in claims:
        await broker.complete(c.job.id, c.token, None)


def tagged(tag: str, **fields: object) -> JobSpec:
    """A sim job whose requirement class is its own (a tag no other job has)."""
    return JobSpec.model_validate({"service": "sim", "requirements": {"tags": [tag]}, **fields})


async def test_empty_classes_are_collected(broker: Broker, clock: Clock) -> None:
    """200 one-off classes, drained: after class_idle_s without a pending job they leave
    the class list (its version moves, so every replica re-reads it). A class with a
    pending job stays; a class from before collection existed is found too."""
    tags = [f"once-{i}" for i in range(200)]
    await broker.submit_many([tagged(t) for t in tags])
    kept = await broker.submit(tagged("kept"))
    drainer = WorkerCapabilities(services={"sim"}, tags=set(tags))
    while claims := await broker.claim_many("w", drainer, 50):
        for c in claims:
            await broker.complete(c.job.id, c.token, None)
    old = JobSpec(service="old").job_requirements()  # listed by an earlier version
    await broker.redis.hset(broker.key("classes"), old.requirement_class, old.canonical_json)
    classes = broker.key("classes")
    assert await broker.redis.hlen(classes) == 202
    version = int(await broker.redis.get(broker.key("classes_ver")) or 0)
    await broker.maintain()
    await broker.maintain()
    clock.advance(broker.settings.class_idle_s - 1)
    await broker.maintain()
    assert await broker.redis.hlen(classes) == 202  # not idle for long enough yet
    clock.advance(2)
    await broker.maintain()
    assert await broker.redis.hkeys(classes) == [kept.requirement_class]
    assert int(await broker.redis.get(broker.key("classes_ver")) or 0) > version
    stats = await broker.stats()
    assert [c.requirement_class for c in stats.classes] == [kept.requirement_class]
    assert list(broker.known_classes) == [kept.requirement_class]


async def test_a_claim_that_empties_a_queue_marks_its_class_idle(
    broker: Broker, clock: Clock
) -> None:
    """The class of a queue a claim empties leaves `nonempty` for `idle` (collected later);
    a queue that still holds a job the claiming worker skipped (it failed that job, and
    another live worker can run it) stays in `nonempty`, until that worker takes it."""
    await broker.register_worker("w1", SIM)
    await broker.register_worker("w2", SIM)
    first, second = await broker.submit_many([JobSpec(service="sim"), JobSpec(service="sim")])
    claim = await broker.claim("w1", SIM)
    assert claim is not None and claim.job.id == first.id
    await broker.fail(first.id, claim.token, "flaky")
    clock.advance(broker.settings.retry_base_s + 1)
    await broker.maintain()  # the retry is due: pending again, ahead of `second`
    assert (await broker.get(first.id)).status is JobStatus.PENDING
    nonempty, idle = broker.key("nonempty"), broker.key("idle")
    cls = first.requirement_class
    got = await broker.claim_many("w1", SIM, 5)
    assert [c.job.id for c in got] == [second.id]  # `first` skipped: w2 can run it
    assert await broker.redis.sismember(nonempty, cls)
    assert await broker.redis.zscore(idle, cls) is None
    got = await broker.claim_many("w2", SIM, 5)
    assert [c.job.id for c in got] == [first.id]
    assert not await broker.redis.sismember(nonempty, cls)
    assert await broker.redis.zscore(idle, cls) == clock()


async def test_jobs_find_their_class_after_it_was_collected(broker: Broker, clock: Clock) -> None:
    """A class is collected while its jobs are active, delayed or dead; each way back to
    pending (retry, release, lease expiry, retry due) lists it again, as does a new job of a
    collected class, and another replica that read the list without them claims them."""
    settings = broker.settings.model_copy(
        update={"class_idle_s": 5, "lease_s": 100, "retry_base_s": 50, "retry_cap_s": 50}
    )
    broker = Broker(broker.redis, settings, clock=clock)
    replica = Broker(broker.redis, settings, clock=clock)
    ways = ["retried", "dead", "released", "reaped", "promoted", "done"]
    await broker.submit_many([tagged(w, id=f"job-{w}") for w in ways])
    worker = WorkerCapabilities(services={"sim"}, tags=set(ways))
    held = {c.job.id: c.token for c in await broker.claim_many("w", worker, 6)}
    assert len(held) == 6
    await broker.fail("job-retried", held["job-retried"], "flaky")
    await broker.fail("job-promoted", held["job-promoted"], "flaky")
    await broker.fail("job-dead", held["job-dead"], "fatal", retryable=False)
    await broker.complete("job-done", held["job-done"], None)
    clock.advance(6)
    assert (await broker.maintain()).classes_collected == 6
    assert await broker.redis.hlen(broker.key("classes")) == 0
    await replica.refresh_classes()
    assert replica.known_classes == {}

    await broker.retry("job-retried")
    await broker.retry("job-dead")
    await broker.release("job-released", held["job-released"])
    clock.advance(100)  # the lease of job-reaped ran out; job-promoted's retry is due
    report = await broker.maintain()
    assert report.requeued == ["job-reaped"] and report.promoted_classes
    again = await broker.submit(tagged("done"))
    got = await replica.claim_many("w2", worker, 10)
    expected = [f"job-{w}" for w in ways if w != "done"] + [again.id]
    assert sorted(c.job.id for c in got) == sorted(expected)


async def test_reports_of_a_batch_are_applied_in_order_in_one_call(
    broker: Broker, redis_client: redis.asyncio.Redis
) -> None:
    """Broker.report: one script call for a batch; each report's outcome in order; a
    refused one (bad input, a stale token, a job already ended) changes nothing."""
    jobs = [await broker.submit(JobSpec(service="sim")) for _ in range(4)]
    claims = await broker.claim_many("w", SIM, 4)
    a, b, c, d = ((cl.job.id, cl.token) for cl in claims)
    await broker.progress(*d, 5)  # the script is loaded now
    await redis_client.config_resetstat()
    results = await broker.report(
        [
            Progress(*a, 40, "warming up", "processing", {"step": 2}),
            Completion(*a, {"n": 1}),
            Progress(*b, 120),  # out of range: refused before the script
            Failure(*b, "OOM", retryable=True),
            Failure(*c, "bad prompt", retryable=False),
            Completion(d[0], "not-the-token", 1),
            Completion(*a, {"n": 2}),  # ended already
            Completion(*d, "x" * 2000),  # over the result cap
        ]
    )
    stats = await redis_client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1
    kinds = [r if isinstance(r, JobStatus) else type(r).__name__ for r in results]
    assert kinds == [
        JobStatus.ACTIVE,
        JobStatus.COMPLETED,
        "InvalidJob",
        JobStatus.DELAYED,
        JobStatus.FAILED,
        "StaleLease",
        "StaleLease",
        "TooLarge",
    ]
    first = await broker.get(a[0])
    assert (first.result, first.progress) == ({"n": 1}, 100)
    assert [e.data.get("progress") for e in await broker.events(a[0])].count(40.0) == 1
    assert (await broker.get(d[0])).status is JobStatus.ACTIVE
    assert {j.id for j in jobs} == {a[0], b[0], c[0], d[0]}
