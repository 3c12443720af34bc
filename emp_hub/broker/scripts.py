"""The broker's Lua scripts: loaded once, run with EVALSHA, reloaded after NOSCRIPT.

Each script is the settings' names, the key prefix `P` and the key layout `K` (keys.py),
the shared prelude (lua/common.lua), then its own body (lua/NAME.lua); of the layout and
the prelude, only what the body uses (`source`).
They run with EVALSHA and, when the server answers NOSCRIPT (a restarted Redis, a SCRIPT
FLUSH, a failover), with EVAL, which loads the source again: on the client's lane
(lane.py) when it has one, else through redis-py (`connection.on_lane`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from functools import cache
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from emp_hub.broker.connection import on_lane
from emp_hub.broker.keys import lua_layout
from emp_hub.broker.models import (
    BrokerError,
    DuplicateJob,
    InvalidState,
    JobNotFound,
    RateLimited,
    StaleLease,
)

NAMES = (
    "submit",
    "claim",
    "extend",
    "report",
    "release",
    "cancel",
    "retry",
    "reap",
    "promote",
    "schedule",
    "janitor",
    "collect",
    "depth",
    "oldest",
    "import",
    "register",
    "disconnect",
    "read_jobs",
    "output",
)

#: The settings every script receives in ARGV[3], in this order (see lua/common.lua).
CONFIG_FIELDS = (
    "pmax",
    "pscale",
    "event_cap",
    "retention",
    "dead_retention",
    "retry_base",
    "retry_cap",
    "max_orphans",
    "timeout_grace",
    "max_skip",
    "affinity_wait",
)

#: A script's refusal ("CODE message") as the exception it raises, made from the message.
_ERRORS: dict[str, Callable[[str], BrokerError]] = {
    "NOJOB": JobNotFound,
    "DUPLICATE": DuplicateJob,
    "STALE": StaleLease,
    "STATE": InvalidState,
    "RATE": lambda wait: RateLimited(float(wait)),  # the seconds to wait
}


#: A top-level definition of lua/common.lua (`local NAME` or `local function NAME` at the
#: start of a line), with the comment lines just above it.
_DEFINITION = re.compile(r"^(?:--.*\n)*local (?:function )?(\w+)", re.MULTILINE)
#: A line that is only a comment (a comment after code stays: it can only add names).
_COMMENT_LINE = re.compile(r"^\s*--.*$", re.MULTILINE)


def _names(code: str) -> set[str]:
    """Every word in `code` outside its comment lines: the names it may use."""
    return set(re.findall(r"\w+", _COMMENT_LINE.sub("", code)))


@cache
def _definitions() -> dict[str, str]:
    """lua/common.lua as its top-level definitions, by name, in the file's order."""
    common = (files("emp_hub.broker") / "lua" / "common.lua").read_text()
    found = list(_DEFINITION.finditer(common))
    ends = [m.start() for m in found[1:]] + [len(common)]
    return {m.group(1): common[m.start() : end] for m, end in zip(found, ends, strict=True)}


@cache
def source(name: str) -> str:
    """The full source of one script: the settings' names, the key layout, the prelude,
    the body. Of the key layout and the prelude (lua/common.lua), only what the body uses,
    directly or through another helper: a script runs its whole prelude at every call,
    and all of it cost about 10 us a call, a quarter of a plain submit's time in Valkey
    (docs/benchmarks.md)."""
    body = (files("emp_hub.broker") / "lua" / f"{name}.lua").read_text()
    definitions = _definitions()
    used, kept = _names(body), set()
    while grown := {d for d in definitions if d in used and d not in kept}:
        kept |= grown
        for definition in grown:
            used |= _names(definitions[definition])
    prelude = "".join(code for d, code in definitions.items() if d in kept)  # in file order
    keys = set(re.findall(r"\bK\.(\w+)", prelude + body))
    fields = ", ".join(f"'{f}'" for f in CONFIG_FIELDS)
    return "\n".join(
        [
            f"local CONFIG_FIELDS = {{{fields}}}",
            "local P = ARGV[1]",
            lua_layout(keys),
            prelude,
            body,
        ]
    )


def refusal(reply: str) -> BrokerError:
    """The error a script's refusal names ("STALE the lease token ..."), as an exception."""
    code, _, message = reply.partition(" ")
    return _ERRORS.get(code, BrokerError)(message or reply)


class Scripts:
    """The broker's scripts on one Redis client: run on its lane when it has one (emp's
    own client, connection.py), else through redis-py."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._shas = {name: hashlib.sha1(source(name).encode()).hexdigest() for name in NAMES}

    async def run(self, name: str, key: str, args: list[Any]) -> Any:
        """Run script `name`; `key` names the slot (all keys share one hash tag)."""
        try:
            try:
                return await on_lane(self._redis, "EVALSHA", self._shas[name], 1, key, *args)
            except NoScriptError:  # a restarted server, a SCRIPT FLUSH: EVAL loads it again
                return await on_lane(self._redis, "EVAL", source(name), 1, key, *args)
        except ResponseError as exc:
            code, _, message = str(exc).partition(" ")
            error = _ERRORS.get(code)
            if error is None:
                raise
            raise error(message) from None
