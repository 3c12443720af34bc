"""Hypothesis strategies for requirements and capabilities, over small name pools so that
matches and mismatches both happen often."""

from __future__ import annotations

from hypothesis import strategies as st

from emp_protocol.capabilities import (
    GPU,
    CustomerAccess,
    Isolation,
    JobRequirements,
    WorkerCapabilities,
)

SERVICES = ["comfyui", "a1111", "sim"]
MODELS = ["sdxl", "flux", "sd15"]
REGIONS = ["eu", "us"]
TAGS = ["fast", "nvme", "h100"]
CUSTOMERS = ["acme", "globex", "initech"]
MEMORY = [0, 8, 16, 24, 80]


@st.composite
def requirements(draw: st.DrawFn) -> JobRequirements:
    """Random job requirements (always valid)."""
    customer = draw(st.none() | st.sampled_from(CUSTOMERS))
    isolation = Isolation.NONE if customer is None else draw(st.sampled_from(list(Isolation)))
    return JobRequirements(
        service=draw(st.sampled_from(SERVICES)),
        gpu_memory_gb=draw(st.sampled_from(MEMORY)),
        gpu_count=draw(st.integers(0, 2)),
        models=draw(st.lists(st.sampled_from(MODELS), max_size=2)),
        customer=customer,
        isolation=isolation,
        region=draw(st.none() | st.sampled_from(REGIONS)),
        tags=draw(st.lists(st.sampled_from(TAGS), max_size=2)),
        cpu_cores=draw(st.sampled_from([0, 0, 4, 16])),
        ram_gb=draw(st.sampled_from([0, 0, 16, 64])),
    )


@st.composite
def capabilities(draw: st.DrawFn) -> WorkerCapabilities:
    """Random worker capabilities."""
    services = draw(st.sets(st.sampled_from(SERVICES), min_size=1))
    isolation = draw(st.sampled_from(list(Isolation)))
    allowed = draw(st.sets(st.sampled_from(CUSTOMERS), max_size=2))
    denied = draw(st.sets(st.sampled_from(CUSTOMERS), max_size=1)) - allowed
    return WorkerCapabilities(
        services=services,
        models={s: draw(st.sets(st.sampled_from(MODELS))) for s in services},
        gpus=[GPU(memory_gb=m) for m in draw(st.lists(st.sampled_from(MEMORY), max_size=3))],
        cpu_cores=draw(st.sampled_from([2, 8, 32])),
        ram_gb=draw(st.sampled_from([8, 32, 128])),
        region=draw(st.none() | st.sampled_from(REGIONS)),
        tags=draw(st.sets(st.sampled_from(TAGS))),
        customer_access=CustomerAccess(isolation=isolation, allowed=allowed, denied=denied),
    )
