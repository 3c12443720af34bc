"""The hub's logs: in the format `EMP_LOG_FORMAT` names (text, or one JSON object a line:
emp_protocol/logs.py), uvicorn's own lines (its access log too) alike, and secrets never in
them: tokens in `?token=`, `Authorization` headers and passwords in URLs are replaced by
*** in what uvicorn (access log, WebSocket handshakes, ASGI traces, the websockets
library's header dumps) and the hub log."""

from __future__ import annotations

import logging
from typing import Any

from emp_protocol.logs import JsonFormatter, LogFormat, RedactSecrets, configure, redact

__all__ = [
    "LOGGERS",
    "HubJsonFormatter",
    "RedactSecrets",
    "configure_hub_logging",
    "redact",
    "redact_secrets_in_logs",
]

#: The loggers the hub's records go through (a filter on a logger sees only the records
#: logged on it by name, so each is named).
LOGGERS = ("uvicorn.access", "uvicorn.error", "uvicorn.asgi", "emp_hub")
#: The hub's text lines (uvicorn's keep their own format).
TEXT_FORMAT = "%(levelname)-9s %(name)s: %(message)s"


def redact_secrets_in_logs() -> None:
    """Install the filter on the hub's loggers (once; repeated calls change nothing)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


class HubJsonFormatter(JsonFormatter):
    """JSON lines; uvicorn's access lines also have their parts as fields: client,
    method, path (redacted), http_version, status."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            record.__dict__.update(zip(ACCESS_FIELDS, args, strict=True))
        return super().format(record)


#: The arguments of uvicorn's access line, in order.
ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


def level_number(name: str) -> int:
    """A level's number from its name (uvicorn's `trace` included; unknown: DEBUG)."""
    level = logging.getLevelName(name.upper())
    return level if isinstance(level, int) else logging.DEBUG


def configure_hub_logging(log_level: str, log_format: LogFormat) -> dict[str, Any] | None:
    """Set up this process's logs; returns uvicorn's `log_config` (None: uvicorn's own)."""
    level = level_number(log_level)
    configure(level, log_format, TEXT_FORMAT)
    if log_format == "text":
        return None
    # uvicorn applies this in every process it runs (--workers too): its loggers, the
    # access log included, write JSON to stderr; everything else reaches the root's.
    json_handler = {
        "class": "logging.StreamHandler",
        "formatter": "json",
        "stream": "ext://sys.stderr",
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "emp_hub.logs.HubJsonFormatter"}},
        "handlers": {"default": json_handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.access": {"handlers": ["default"], "level": level, "propagate": False},
        },
        "root": {"handlers": ["default"], "level": level},
    }
