"""The log line format both sides write, and the secrets no line may hold (standard library
only). `EMP_LOG_FORMAT=json`: one JSON object a line, with `ts`, `level`, `logger`,
`message`, the ids of the job, worker and request the line was logged for (`JOB_ID`,
`WORKER_ID`, `REQUEST_ID`: context variables, set where a job, a worker connection or a
request is handled), `exc` with the traceback, and any `extra=` fields. `text` (the
default): the line as before, its secrets redacted too."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Literal

#: `EMP_LOG_FORMAT`'s values.
LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

#: The job, worker and HTTP request the code running now works for (None: none).
JOB_ID: ContextVar[str | None] = ContextVar("emp_job_id", default=None)
WORKER_ID: ContextVar[str | None] = ContextVar("emp_worker_id", default=None)
REQUEST_ID: ContextVar[str | None] = ContextVar("emp_request_id", default=None)
_CONTEXT = (("job_id", JOB_ID), ("worker_id", WORKER_ID), ("request_id", REQUEST_ID))

_SECRETS = [
    re.compile(r"(?i)(\btoken=)[^&\s'\"]+"),  # ?token=... in a path or a query string
    re.compile(r"(?i)(\bbearer\s+)[^\s'\",]+"),  # Authorization: Bearer ...
    re.compile(r"(\b(?i:authorization)['\"]?\s*[:,]\s*(?:b?['\"])?)[^'\"\n]+"),  # any scheme
    re.compile(r"(://[^:/@\s]*:)[^@/\s]+(?=@)"),  # redis://user:password@host
]


def redact(text: str) -> str:
    """The text with every secret it holds replaced by ***."""
    # Each pattern's match holds one of these; most text holds none and is passed over
    # (the patterns cost ten times more).
    lower = text.lower()
    if not ("token=" in lower or "bearer" in lower or "authorization" in lower or "://" in lower):
        return text
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


#: A LogRecord's own attributes: the others are a call site's `extra=` fields.
_RECORD_FIELDS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName", "color_message"}  # color_message: uvicorn's copy
)


def _clean(value: Any) -> Any:
    """An extra field's value, JSON-ready and redacted."""
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (ISO 8601 UTC, milliseconds), level, logger, message,
    job_id, worker_id and request_id when known (a record's own fields first, then the
    context), exc (the traceback), and the record's extra fields; secrets redacted."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {
            "ts": f"{seconds}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        fields = record.__dict__
        for name, var in _CONTEXT:
            value = fields[name] if name in fields else var.get()
            if value is not None:
                line[name] = _clean(value)
        for name, value in fields.items():
            if name not in _RECORD_FIELDS and name not in line and value is not None:
                line[name] = _clean(value)
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = redact(record.exc_text)
        if record.stack_info:
            line["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(line, ensure_ascii=False, default=str)


class RedactingFormatter(logging.Formatter):
    """The text format: the usual line (traceback included) with its secrets redacted."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as text, redacted."""
        return redact(super().format(record))


def formatter(log_format: LogFormat, text_format: str) -> logging.Formatter:
    """The formatter of `log_format` (`text_format` is the text line's pattern)."""
    return JsonFormatter() if log_format == "json" else RedactingFormatter(text_format)


def configure(level: int | str, log_format: LogFormat, text_format: str) -> None:
    """Send every log line (the root logger's) to stderr in `log_format`, at `level`;
    handlers set before are replaced."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, text_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
