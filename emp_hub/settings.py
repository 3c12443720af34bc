"""The hub's settings: EMP_* environment variables, plus the original emp-redis names.

Every setting is listed in docs/configuration.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from emp_hub.alerts import AlertSettings
from emp_hub.broker import BrokerSettings
from emp_hub.broker.settings import FairShareSettings
from emp_protocol.logs import LogFormat

#: The most jobs one batch may hold (POST /api/jobs/batch); the default burst lets it pass.
MAX_BATCH_JOBS = 10_000


def default_data_dir() -> Path:
    """$XDG_DATA_HOME/emp (~/.local/share/emp)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "emp"


def _env(name: str, *legacy: str) -> AliasChoices:
    """Environment names of a setting: EMP_<NAME> first, then the original ones."""
    return AliasChoices(f"EMP_{name.upper()}", *legacy)


class SchedulingSettings(BaseModel):
    """Scheduling policy (docs/scheduling.md): each part off by default, and with all off
    the order is priority, then FIFO."""

    model_config = ConfigDict(extra="forbid")

    fair_share: FairShareSettings = Field(default_factory=FairShareSettings)


class HubSettings(BaseSettings):
    """Settings of one hub replica. Replicas sharing a Redis share the broker settings."""

    model_config = SettingsConfigDict(
        env_prefix="EMP_",
        env_nested_delimiter="__",
        extra="ignore",
        populate_by_name=True,
    )

    redis_url: str | None = Field(
        default=None,
        validation_alias=_env("redis_url", "REDIS_URL"),
        description="Redis or Valkey URL; unset: start an embedded Valkey in data_dir.",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        validation_alias=_env("data_dir"),
        description="Where the embedded Valkey keeps its data.",
    )
    output_dir: Path | None = Field(
        default=None,
        validation_alias=_env("output_dir"),
        description="Where uploaded job outputs are kept (default: data_dir/outputs); "
        "replicas must share it.",
    )
    max_output_bytes: int = Field(
        default=512 * 2**20,
        gt=0,
        validation_alias=_env("max_output_bytes"),
        description="Largest output file a worker may upload (413 above it).",
    )
    output_quota_bytes: int = Field(
        default=2**30,
        gt=0,
        validation_alias=_env("output_quota_bytes"),
        description="Most bytes of output files one job may keep (413 above it).",
    )
    host: str = Field(default="127.0.0.1", validation_alias=_env("host"))
    port: int = Field(default=8001, ge=0, le=65535, validation_alias=_env("port"))
    auth_token: SecretStr | None = Field(
        default=None,
        validation_alias=_env("auth_token", "WEBSOCKET_AUTH_TOKEN"),
        description="One shared admin token (the original WEBSOCKET_AUTH_TOKEN).",
    )
    max_ws_message_size_mb: float = Field(
        default=16,
        gt=0,
        validation_alias=_env("max_ws_message_size_mb", "MAX_WS_MESSAGE_SIZE_MB"),
        description="Largest WebSocket message accepted, in MiB (a larger one closes the "
        "socket with 1009).",
    )
    max_body_bytes: int = Field(
        default=16 * 2**20,
        gt=0,
        validation_alias=_env("max_body_bytes"),
        description="Largest HTTP request body accepted (413 above it).",
    )
    list_field_max_bytes: int = Field(
        default=16 * 2**10,
        ge=0,
        validation_alias=_env("list_field_max_bytes"),
        description="In a list of jobs asked to include payloads or results, the largest "
        "shown; a larger one is a marker (GET the job for it).",
    )
    submit_rate: float = Field(
        default=100,
        gt=0,
        validation_alias=_env("submit_rate"),
        description="Jobs per second one token may submit, sustained.",
    )
    submit_burst: int = Field(
        default=MAX_BATCH_JOBS,
        ge=1,
        validation_alias=_env("submit_burst"),
        description="Jobs one token may submit at once above the sustained rate; also the "
        "largest batch that can pass.",
    )
    events_keepalive_s: float = Field(
        default=15.0,
        gt=0,
        le=15,
        validation_alias=_env("events_keepalive_s"),
        description="A job's event stream (GET /api/jobs/{id}/events) sends a keep-alive "
        "comment after this many quiet seconds (at most 15), so proxies with short idle "
        "timeouts keep it open.",
    )
    token_refresh_s: float = Field(
        default=2.0,
        gt=0,
        validation_alias=_env("token_refresh_s"),
        description="How often a replica re-checks what it remembers of tokens: the open "
        "WebSockets of a revoked token close within this, and the first token created "
        "closes an open hub within this.",
    )
    maintenance_interval_s: float = Field(
        default=1.0,
        gt=0,
        validation_alias=_env("maintenance_interval_s"),
        description="How often the hub requeues expired leases and promotes due retries.",
    )
    shutdown_timeout_s: float = Field(
        default=10,
        gt=0,
        validation_alias=_env("shutdown_timeout_s"),
        description="On stop, how long open requests (waits, event streams) may finish.",
    )
    metrics_max_queue_series: int = Field(
        default=100,
        ge=2,
        validation_alias=_env("metrics_max_queue_series"),
        description="Most emp_queue_depth series: the deepest get their own, the rest one.",
    )
    metrics_max_services: int = Field(
        default=100,
        ge=1,
        validation_alias=_env("metrics_max_services"),
        description="Most services named in the per-service counters; later ones: _other.",
    )
    log_level: str = Field(default="info", validation_alias=_env("log_level", "LOG_LEVEL"))
    log_format: LogFormat = Field(
        default="text",
        validation_alias=_env("log_format"),
        description="text, or json: one JSON object a line (uvicorn's lines too).",
    )
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    scheduling: SchedulingSettings = Field(default_factory=SchedulingSettings)

    @property
    def ws_max_bytes(self) -> int:
        """max_ws_message_size_mb in bytes (uvicorn's ws_max_size)."""
        return int(self.max_ws_message_size_mb * 2**20)

    @property
    def outputs(self) -> Path:
        """The directory of uploaded outputs."""
        return self.output_dir or self.data_dir / "outputs"
