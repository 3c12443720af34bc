"""Secrets never reach the hub's logs: tokens in `?token=`, `Authorization` headers and
passwords in URLs are replaced by *** in what uvicorn (access log, WebSocket handshakes,
ASGI traces, the websockets library's header dumps) and the hub log."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

#: The loggers the hub's records go through (a filter on a logger sees only the records
#: logged on it by name, so each is named).
LOGGERS = ("uvicorn.access", "uvicorn.error", "uvicorn.asgi", "emp_hub")

_SECRETS = [
    re.compile(r"(?i)(\btoken=)[^&\s'\"]+"),  # ?token=... in a path or a query string
    re.compile(r"(?i)(\bbearer\s+)[^\s'\",]+"),  # Authorization: Bearer ...
    re.compile(r"(\b(?i:authorization)['\"]?\s*[:,]\s*(?:b?['\"])?)[^'\"\n]+"),  # any scheme
    re.compile(r"(://[^:/@\s]*:)[^@/\s]+(?=@)"),  # redis://user:password@host
]


def redact(text: str) -> str:
    """The text with every secret it holds replaced by ***."""
    for pattern in _SECRETS:
        text = pattern.sub(r"\1***", text)
    return text


def _redact_arg(arg: Any, after: Any = None) -> Any:
    if isinstance(after, str) and after.lower() == "authorization":
        return "***"  # a header dump: ("< %s: %s", "authorization", value)
    if isinstance(arg, int | float) or arg is None:
        return arg
    text = str(arg)
    cleaned = redact(text)
    return arg if cleaned == text else cleaned


class RedactSecrets(logging.Filter):
    """Rewrites a record's message and arguments without their secrets (the arguments
    keep their places: uvicorn's access formatter reads them one by one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the record; always keep it."""
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            args = record.args
            record.args = tuple(
                _redact_arg(arg, args[i - 1] if i else None) for i, arg in enumerate(args)
            )
        elif isinstance(record.args, Mapping):
            record.args = {key: _redact_arg(value) for key, value in record.args.items()}
        return True


def redact_secrets_in_logs() -> None:
    """Install the filter on the hub's loggers (once; repeated calls change nothing)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
