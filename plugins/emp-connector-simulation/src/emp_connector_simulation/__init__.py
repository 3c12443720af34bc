"""A simulated service: takes time, reports progress, fails on demand, writes a PNG."""

from __future__ import annotations

import asyncio
import functools
import random
import struct
import time
import zlib
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from emp_worker import hookimpl
from emp_worker.connector import (
    Connector,
    ConnectorCapabilities,
    ConnectorSettings,
    Health,
    Job,
    JobContext,
    JobFailed,
    env_names,
)

__version__ = "0.1.0"


_env = functools.partial(env_names, prefix="EMP_SIMULATION_")


class SimulationSettings(ConnectorSettings):
    """How the simulated service behaves (EMP_SIMULATION_*, or the original names)."""

    duration: float = Field(
        default=10, ge=0, validation_alias=_env("duration", "SIMULATION_PROCESSING_TIME")
    )
    duration_max: float | None = Field(default=None, ge=0, validation_alias=_env("duration_max"))
    seed: int | None = Field(default=None, validation_alias=_env("seed"))
    steps: int = Field(default=5, ge=1, le=1000, validation_alias=_env("steps", "SIMULATION_STEPS"))
    failure_rate: float = Field(default=0, ge=0, le=1, validation_alias=_env("failure_rate"))
    failure_kind: Literal["retryable", "fatal"] = Field(
        default="retryable", validation_alias=_env("failure_kind")
    )
    output_image: bool = Field(default=False, validation_alias=_env("output_image"))
    services: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["simulation"], validation_alias=_env("services")
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("models")
    )
    concurrency: int = Field(default=1, ge=1, le=256, validation_alias=_env("concurrency"))
    loaded: Annotated[list[str], NoDecode] | None = Field(
        default=None,
        validation_alias=_env("loaded"),
        description="Models it reports loaded at start (model-warm affinity); then the "
        "payload's `model` of the last job it ran. Unset: it reports none.",
    )

    @field_validator("services", "models", "loaded", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value


class SimulationConnector(Connector):
    """Runs no real service: sleeps in steps, reporting progress."""

    name = "simulation"
    Settings = SimulationSettings
    settings: SimulationSettings

    def __init__(self, settings: SimulationSettings | None = None) -> None:
        super().__init__(settings)
        self.random = random.Random(self.settings.seed)
        self.loaded = self.settings.loaded

    def loaded_models(self) -> list[str] | None:
        """The `loaded` setting, then the `model` of the last job it ran (a payload field)."""
        return self.loaded

    def capabilities(self) -> ConnectorCapabilities:
        """The configured services, each with the configured models."""
        services = frozenset(self.settings.services)
        models = frozenset(self.settings.models)
        return ConnectorCapabilities(
            services=services, models={s: models for s in services} if models else {}
        )

    async def health(self) -> Health:
        return Health(ok=True, detail=f"simulated, {self.settings.duration:g} s per job")

    def _duration(self, job: Job) -> float:
        if "duration" in job.payload:
            return max(0.0, float(job.payload["duration"]))
        low, high = self.settings.duration, self.settings.duration_max
        return self.random.uniform(low, high) if high is not None and high > low else low

    def _failure(self, job: Job) -> str | None:
        forced = job.payload.get("fail")
        if forced in {"retryable", "fatal"}:
            return str(forced)
        if job.attempt <= int(job.payload.get("fail_attempts", 0)):
            return "retryable"
        if self.settings.failure_rate and self.random.random() < self.settings.failure_rate:
            return self.settings.failure_kind
        return None

    async def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        """Take the job's time in steps; fail if asked to; maybe write a PNG."""
        began = time.perf_counter()
        duration = self._duration(job)
        steps = int(job.payload.get("steps", self.settings.steps))
        failure = self._failure(job)
        if isinstance(job.payload.get("model"), str):
            self.loaded = [job.payload["model"]]  # as a real service would switch to it
        await ctx.progress(0, "started", "started")
        for step in range(1, steps + 1):
            await asyncio.sleep(duration / steps)
            if failure is not None and step > steps // 2:
                raise JobFailed(
                    f"simulated {failure} failure at step {step}/{steps}",
                    retryable=failure == "retryable",
                )
            await ctx.progress(100 * step / steps, f"step {step}/{steps}")
        if failure is not None:  # a job of one step fails at its end
            raise JobFailed(f"simulated {failure} failure", retryable=failure == "retryable")
        if self.settings.output_image:
            await ctx.output("image.png", png(64, 64, seed=hash(job.id) & 0xFF), "image/png")
        return {
            "status": "success",
            "output": {
                "job_id": job.id,
                "job_type": job.service,
                "processing_time": round(duration, 3),
                "steps": steps,
                "attempt": job.attempt,
                "elapsed_s": round(time.perf_counter() - began, 6),
                "result": "Simulated job completed successfully",
            },
        }


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A small RGB gradient PNG (no imaging library needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(
        b"\x00"
        + bytes(
            v
            for x in range(width)
            for v in (x * 255 // width, y * 255 // height, (seed * 37 + x + y) & 0xFF)
        )
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@hookimpl
def register_connectors(register: Any) -> None:
    """The simulation connector."""
    register(SimulationConnector)
