"""The match predicate and the requirement class (docs/matching.md)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from emp_protocol.capabilities import (
    GPU,
    CustomerAccess,
    Isolation,
    JobRequirements,
    WorkerCapabilities,
    matches,
    why_unmatched,
)
from tests.strategies import capabilities, requirements


@given(requirements(), st.randoms())
def test_class_ignores_order(req: JobRequirements, rnd: random.Random) -> None:
    data = req.model_dump(mode="json")
    rnd.shuffle(data["models"])
    rnd.shuffle(data["tags"])
    data["models"] = data["models"] + data["models"][:1]  # duplicates do not count either
    reordered = dict(reversed(list(data.items())))
    same = JobRequirements.model_validate(reordered)
    assert same.requirement_class == req.requirement_class
    assert same.canonical_json == req.canonical_json


@given(requirements(), requirements())
def test_class_distinguishes_requirements(a: JobRequirements, b: JobRequirements) -> None:
    assert (a.requirement_class == b.requirement_class) == (a == b)


@pytest.mark.slow
@given(requirements(), capabilities())
def test_denied_customer_never_runs(req: JobRequirements, caps: WorkerCapabilities) -> None:
    if req.customer in caps.customer_access.denied:
        assert not matches(req, caps)


@pytest.mark.slow
@given(requirements(), capabilities())
def test_strict_job_runs_only_on_a_dedicated_worker(
    req: JobRequirements, caps: WorkerCapabilities
) -> None:
    if req.isolation is Isolation.STRICT and matches(req, caps):
        access = caps.customer_access
        assert access.isolation is Isolation.STRICT
        assert access.allowed == {req.customer}


@pytest.mark.slow
@given(requirements(), capabilities())
def test_strict_worker_runs_only_allowed_customers(
    req: JobRequirements, caps: WorkerCapabilities
) -> None:
    if caps.customer_access.isolation is Isolation.STRICT and matches(req, caps):
        assert req.customer in caps.customer_access.allowed


@pytest.mark.slow
@given(requirements(), capabilities())
def test_loose_rules(req: JobRequirements, caps: WorkerCapabilities) -> None:
    access = caps.customer_access
    if not matches(req, caps):
        return
    if access.isolation is Isolation.LOOSE:
        assert req.customer is None or req.customer in access.allowed
    if req.isolation is Isolation.LOOSE:
        assert access.isolation is not Isolation.NONE
        assert req.customer in access.allowed


@pytest.mark.slow
@given(requirements(), capabilities())
def test_match_implies_every_hard_requirement(
    req: JobRequirements, caps: WorkerCapabilities
) -> None:
    if not matches(req, caps):
        return
    assert req.service in caps.services
    assert set(req.models) <= caps.models.get(req.service, frozenset())
    assert sum(g.memory_gb >= req.gpu_memory_gb for g in caps.gpus) >= req.gpus_needed
    assert req.region in (None, caps.region)
    assert set(req.tags) <= caps.tags
    assert req.cpu_cores <= caps.cpu_cores
    assert req.ram_gb <= caps.ram_gb


@pytest.mark.slow
@given(requirements(), capabilities())
def test_more_capable_worker_still_matches(req: JobRequirements, caps: WorkerCapabilities) -> None:
    """Adding hardware, models or tags never loses a match (isolation aside)."""
    if not matches(req, caps):
        return
    bigger = caps.model_copy(
        update={
            "gpus": (*caps.gpus, GPU(memory_gb=80), GPU(memory_gb=80)),
            "models": {s: m | {"extra"} for s, m in caps.models.items()},
            "tags": caps.tags | {"extra"},
            "cpu_cores": caps.cpu_cores + 8,
            "ram_gb": caps.ram_gb + 8,
        }
    )
    assert matches(req, bigger)


def test_plain_job_runs_on_shared_worker() -> None:
    caps = WorkerCapabilities(services={"sim"})
    assert matches(JobRequirements(service="sim"), caps)
    assert matches(JobRequirements(service="sim", customer="acme"), caps)
    assert not matches(JobRequirements(service="other"), caps)


def test_gpu_memory_counts_per_gpu() -> None:
    caps = WorkerCapabilities(services={"sim"}, gpus=(GPU(memory_gb=24), GPU(memory_gb=12)))
    assert matches(JobRequirements(service="sim", gpu_memory_gb=24), caps)
    assert not matches(JobRequirements(service="sim", gpu_memory_gb=24, gpu_count=2), caps)
    assert matches(JobRequirements(service="sim", gpu_memory_gb=12, gpu_count=2), caps)
    assert not matches(JobRequirements(service="sim", gpu_count=3), caps)


def test_isolation_needs_customer() -> None:
    with pytest.raises(ValidationError, match="needs a customer"):
        JobRequirements(service="sim", isolation=Isolation.STRICT)


def test_strict_pairs() -> None:
    dedicated = WorkerCapabilities(
        services={"sim"},
        customer_access=CustomerAccess(isolation=Isolation.STRICT, allowed={"acme"}),
    )
    shared = WorkerCapabilities(services={"sim"})
    strict_job = JobRequirements(service="sim", customer="acme", isolation=Isolation.STRICT)
    assert matches(strict_job, dedicated)
    assert not matches(strict_job, shared)
    assert not matches(JobRequirements(service="sim"), dedicated)
    assert not matches(JobRequirements(service="sim", customer="globex"), dedicated)


def test_unknown_requirement_is_rejected() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        JobRequirements.model_validate({"service": "sim", "vram": 12})


def test_why_unmatched_names_the_requirement_no_worker_meets() -> None:
    flux = JobRequirements(service="comfyui", models=("flux",), gpu_memory_gb=24)
    sdxl_box = WorkerCapabilities(services={"comfyui"}, models={"comfyui": {"sdxl"}})
    a1111_box = WorkerCapabilities(services={"a1111"})
    assert why_unmatched(flux, []) == "no worker is connected"
    assert why_unmatched(JobRequirements(service="sim"), [sdxl_box, a1111_box]) == (
        "no live worker offers service 'sim' (the 2 live worker(s) offer: a1111, comfyui)"
    )
    assert why_unmatched(flux, [sdxl_box, a1111_box]) == (
        "no live worker can run it: the 1 of 2 live worker(s) that offer service 'comfyui' "
        "do not have model(s) flux for 'comfyui'"
    )
    small_gpu = WorkerCapabilities(
        services={"comfyui"}, models={"comfyui": {"flux"}}, gpus=(GPU(memory_gb=12),)
    )
    assert why_unmatched(flux, [small_gpu]) == (
        "no live worker can run it: the 1 of 1 live worker(s) that offer service 'comfyui' "
        "and have model(s) flux for 'comfyui' do not have 1 GPU(s) with at least 24 GB each"
    )
    strict = JobRequirements(service="comfyui", customer="acme", isolation=Isolation.STRICT)
    assert "do not accept customer 'acme' (job isolation strict)" in str(
        why_unmatched(strict, [sdxl_box])
    )
    assert why_unmatched(flux, [small_gpu, small_gpu.model_copy(update={"gpus": ()})]) is not None
    big = small_gpu.model_copy(update={"gpus": (GPU(memory_gb=24),)})
    assert why_unmatched(flux, [sdxl_box, big]) is None


@pytest.mark.slow
@given(requirements(), st.lists(capabilities(), max_size=4))
def test_why_unmatched_agrees_with_matches(
    req: JobRequirements, workers: list[WorkerCapabilities]
) -> None:
    assert (why_unmatched(req, workers) is None) == any(matches(req, w) for w in workers)
