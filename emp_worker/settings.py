"""The worker's settings: EMP_* environment variables, the original emp-redis WORKER_*
names, and an optional TOML file (`--config`, or `EMP_CONFIG`). Environment beats file.

Every setting is listed in docs/configuration.md.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from emp_protocol.capabilities import Isolation, Name


def env_names(name: str, *older: str, prefix: str = "EMP_") -> AliasChoices:
    """The names a setting is read under: `<prefix><NAME>` first, then the older ones (the
    original emp-redis names; a name before a rename, such as EMP_DRAIN_TIMEOUT for
    EMP_DRAIN_TIMEOUT_S), then the plain field name (for a TOML file, and for settings
    given by name in code). Connectors use it with their prefix (`EMP_COMFYUI_`)."""
    return AliasChoices(f"{prefix}{name.upper()}", *older, name)


_env = env_names


CommaList = Annotated[list[str], NoDecode]
#: Names the hub takes as names (customers, tags, the region): checked here, so a bad one
#: names its variable at start.
NameList = Annotated[list[Name], NoDecode]


class WorkerSettings(BaseSettings):
    """Settings of one worker process."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)
    #: The TOML file to read, if any (set by `emp-worker run --config`).
    config_file: ClassVar[Path | None] = None

    hub_url: str = Field(
        default="ws://127.0.0.1:8001",
        validation_alias=_env("hub_url", "WORKER_REDIS_WS_URL"),
        description="The hub's WebSocket base URL (ws:// or wss://).",
    )
    token: SecretStr | None = Field(
        default=None,
        validation_alias=_env("token", "WORKER_WEBSOCKET_AUTH_TOKEN"),
        description="A worker token (or the hub's shared token).",
    )
    worker_id: str | None = Field(
        default=None,
        validation_alias=_env("worker_id", "WORKER_ID"),
        pattern=r"^[A-Za-z0-9_.:@+=-]{1,200}$",
        description="Stable id; default: <host>-gpu<EMP_GPU_INDEX> (or <host>-cpu).",
    )
    connectors: CommaList = Field(
        default_factory=list,
        validation_alias=_env("connectors", "WORKER_CONNECTORS"),
        description="Connectors to enable (comma list); empty: every installed one.",
    )
    gpu_index: int = Field(default=0, ge=0, validation_alias=_env("gpu_index"))
    worker_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto",
        validation_alias=_env("worker_loop"),
        description="The event loop: uvloop when installed (auto), or asyncio's own.",
    )
    heartbeat_s: float = Field(
        default=20,
        gt=0,
        validation_alias=_env(
            "heartbeat_s",
            "EMP_HEARTBEAT_INTERVAL",
            "WORKER_HEARTBEAT_INTERVAL",
            "heartbeat_interval",
        ),
    )
    drain_timeout_s: float = Field(
        default=60,
        ge=0,
        validation_alias=_env("drain_timeout_s", "EMP_DRAIN_TIMEOUT", "drain_timeout"),
        description="On SIGTERM, how long running jobs may take before they are handed back.",
    )
    progress_interval_s: float = Field(
        default=0.5,
        ge=0,
        validation_alias=_env("progress_interval_s", "EMP_PROGRESS_INTERVAL", "progress_interval"),
        description="At most one progress report per job this often (the latest one is "
        "sent when the interval is up).",
    )
    prefetch: int = Field(
        default=64,
        ge=0,
        le=1000,
        validation_alias=_env("prefetch"),
        description="Jobs held beyond the free slots, started as slots free up (0: none); "
        "see prefetch_wait_s.",
    )
    prefetch_wait_s: float = Field(
        default=0.2,
        ge=0,
        validation_alias=_env("prefetch_wait_s"),
        description="Prefetch only as many jobs as the worker would start within this "
        "many seconds at the pace of its recent jobs: none while jobs are long.",
    )
    capabilities_refresh_s: float = Field(
        default=60,
        gt=0,
        validation_alias=_env(
            "capabilities_refresh_s", "EMP_CAPABILITIES_REFRESH", "capabilities_refresh"
        ),
    )
    health_interval_s: float = Field(
        default=10,
        gt=0,
        validation_alias=_env("health_interval_s", "EMP_HEALTH_INTERVAL", "health_interval"),
        description="Seconds between checks of each connector's health; a connector that "
        "is down has its services withdrawn until it is back.",
    )
    reconnect_min_s: float = Field(
        default=0.5,
        gt=0,
        validation_alias=_env("reconnect_min_s", "EMP_RECONNECT_MIN", "reconnect_min"),
    )
    reconnect_max_s: float = Field(
        default=30,
        gt=0,
        validation_alias=_env("reconnect_max_s", "EMP_RECONNECT_MAX", "reconnect_max"),
    )
    auth_retry_s: float = Field(
        default=60,
        gt=0,
        validation_alias=_env("auth_retry_s", "EMP_AUTH_RETRY", "auth_retry"),
        description="After the hub refused the token, how long to wait before trying again.",
    )
    region: Name | None = Field(default=None, validation_alias=_env("region"))
    tags: NameList = Field(default_factory=list, validation_alias=_env("tags"))
    customer_isolation: Isolation = Field(
        default=Isolation.NONE, validation_alias=_env("customer_isolation")
    )
    customers_allowed: NameList = Field(
        default_factory=list, validation_alias=_env("customers_allowed")
    )
    customers_denied: NameList = Field(
        default_factory=list, validation_alias=_env("customers_denied")
    )

    @field_validator("connectors", "tags", "customers_allowed", "customers_denied", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @model_validator(mode="before")
    @classmethod
    def _original_hub_address(cls, data: Any) -> Any:
        """WORKER_REDIS_API_HOST/_PORT/WORKER_USE_SSL, the original's other way to say
        where the hub is."""
        host = os.environ.get("WORKER_REDIS_API_HOST")
        if (
            isinstance(data, dict)
            and host
            and not any(k in data for k in ("hub_url", "EMP_HUB_URL", "WORKER_REDIS_WS_URL"))
        ):
            port = os.environ.get("WORKER_REDIS_API_PORT", "8001")
            ssl = os.environ.get("WORKER_USE_SSL", "").lower() in {"1", "true", "yes"}
            data = {**data, "hub_url": f"{'wss' if ssl else 'ws'}://{host}:{port}"}
        return data

    @field_validator("hub_url")
    @classmethod
    def _ws_url(cls, value: str) -> str:
        value = value.rstrip("/")
        if value.startswith("http"):
            value = "ws" + value[4:]
        if not value.startswith(("ws://", "wss://")):
            raise ValueError("hub_url must start with ws://, wss://, http:// or https://")
        return value.removesuffix("/ws")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then environment, then the TOML file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = cls.config_file or (
            Path(os.environ["EMP_CONFIG"]) if "EMP_CONFIG" in os.environ else None
        )
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @property
    def http_url(self) -> str:
        """The hub's HTTP base URL (for output uploads)."""
        return "http" + self.hub_url[2:]

    def effective_worker_id(self, has_gpu: bool) -> str:
        """The configured id, or one derived from the host and the GPU index."""
        if self.worker_id:
            return self.worker_id
        host = socket.gethostname().split(".")[0] or "worker"
        return f"{host}-gpu{self.gpu_index}" if has_gpu else f"{host}-cpu"
