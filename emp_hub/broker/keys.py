"""The Redis key layout: every key and pub/sub channel of a deployment, defined once.

Every key starts with "{namespace}:" (the braces are a Redis Cluster hash tag: all keys of
one deployment live in one slot, so every script runs unchanged on a cluster; two
deployments share one Redis by using two namespaces). Python code builds keys with
`Keys`; the Lua scripts get the same layout as a table `K`, generated from `LAYOUT` by
`lua_layout()` and put before lua/common.lua (`K.leases`, `K.job(id)`), so a key's name
is spelled in this file only. docs/broker.md describes each key.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Literal, get_args

KeyName = Literal[
    "seq",
    "job",
    "events",
    "job_channel",
    "queue",
    "classes",
    "classes_ver",
    "classes_cursor",
    "classes_swept",
    "nonempty",
    "idle",
    "leases",
    "delayed",
    "dead",
    "promotions",
    "expiring",
    "all_jobs",
    "by_status",
    "by_service",
    "by_customer",
    "workers",
    "worker",
    "owner",
    "worker_state",
    "replica",
    "outputs",
    "outputs_expired",
    "idempotency",
    "tokens",
    "rate",
    "series",
    "work_channel",
    "cancel_channel",
    "monitor_channel",
    "workers_channel",
    "alerts_firing",
    "alerts_recent",
    "alerts_outbox",
    "alerts_lock",
    "alerts_lost",
    "control_channel",
    "fair",
]

#: Each key's pattern after the prefix; "{}" stands for one argument.
LAYOUT: dict[KeyName, str] = {
    "seq": "seq",  # counter: submission order
    "job": "job:{}",  # hash: a job's record
    "events": "ev:{}",  # stream: a job's status and progress events, capped
    "job_channel": "jev:{}",  # channel: a job's events as they happen
    "queue": "q:{}",  # zset: pending jobs of one requirement class, by score
    "classes": "classes",  # hash: requirement class -> canonical requirements
    "classes_ver": "classes:ver",  # counter: bumped when the class list changes
    "classes_cursor": "classes:cursor",  # string: the walk over old classes
    "classes_swept": "classes:swept",  # string: that walk is done
    "nonempty": "nonempty",  # set: classes with pending jobs
    "idle": "idle",  # zset: classes without pending jobs -> since when
    "leases": "leases",  # zset: active job -> lease expiry
    "delayed": "delayed",  # zset: job waiting for a retry -> when it is due
    "dead": "dead",  # zset: dead-lettered job -> when it failed
    "promotions": "promote:at",  # zset: job with promotion steps -> when the next is due
    "expiring": "expiring",  # zset: "id TAB service TAB customer TAB status" -> end
    "all_jobs": "idx:all",  # zset: job id -> seq
    "by_status": "idx:status:{}",  # zset: job id -> seq, one per status
    "by_service": "idx:svc:{}",  # zset: job id -> seq, one per service
    "by_customer": "idx:cust:{}",  # zset: job id -> seq, one per customer
    "workers": "workers",  # zset: worker id -> last heard from
    "worker": "worker:{}",  # string: a worker's capabilities (JSON), expires
    "owner": "owner:{}",  # string: which process and connection hold a worker id
    "worker_state": "wstate:{}",  # string: drain or shutdown, asked by an admin; expires
    "replica": "replica:{}",  # string: a live hub replica, expires unless renewed
    "outputs": "outputs",  # set: jobs with files stored by the hub
    "outputs_expired": "outputs:expired",  # zset: such jobs past retention -> when
    "idempotency": "idem:{}:{}",  # string: (token id, idempotency key) -> job id
    "tokens": "tokens",  # hash: SHA-256(token) -> token record
    "rate": "rate:{}",  # string: a token's submit allowance (GCRA)
    "series": "series:{}",  # hash: one minute's job counts (the dashboard), expires
    "work_channel": "work",  # channel: jobs became pending ("origin class:n ...")
    "cancel_channel": "cancel",  # channel: tell the worker's replica to cancel a job
    "monitor_channel": "monitor",  # channel: messages for every replica's monitors
    "workers_channel": "workers",  # channel: the live workers changed
    "alerts_firing": "alerts:firing",  # hash: "rule TAB subject" -> firing alert (JSON)
    "alerts_recent": "alerts:recent",  # list: cleared alerts (JSON), newest first, capped
    "alerts_outbox": "alerts:outbox",  # list: webhook deliveries (JSON bodies), in order
    "alerts_lock": "alerts:lock",  # string: the replica that evaluates alerts, expires
    "alerts_lost": "alerts:lost",  # hash: worker lost mid-job -> when, which jobs (JSON)
    "control_channel": "wctl",  # channel: drain/resume/shutdown for the worker's replica
    "fair": "fair:{}:{}",  # hash: fair share of (band, service): ".v" clock, customer -> F
}

assert set(LAYOUT) == set(get_args(KeyName)), "LAYOUT and KeyName must name the same keys"


def prefix(namespace: str) -> str:
    """The prefix of every key of a namespace: "{namespace}:"."""
    return "{" + namespace + "}:"


class Keys:
    """The keys of one namespace: `keys("job", job_id)`, `keys("leases")`."""

    def __init__(self, namespace: str) -> None:
        self.prefix = prefix(namespace)

    def __call__(self, name: KeyName, *args: str) -> str:
        pattern = LAYOUT[name]
        if pattern.count("{}") != len(args):
            raise TypeError(f"key {name!r} ({pattern}) takes {pattern.count('{}')} argument(s)")
        return self.prefix + pattern.format(*args)


def lua_layout(names: Collection[str] | None = None) -> str:
    """The layout as Lua: `local K = {...}`, a string per fixed key and a function per key
    that takes arguments, all built on `P` (the prefix, ARGV[1]); run after `P` is set.
    Only the keys in `names` when given (a script builds only the keys it uses)."""
    lines = ["local K = {}"]
    for name, pattern in LAYOUT.items():
        if names is not None and name not in names:
            continue
        if "{}" not in pattern:
            lines.append(f"K.{name} = P .. '{pattern}'")
            continue
        parts = pattern.split("{}")
        params = [f"a{i}" for i in range(len(parts) - 1)]
        pieces = ["P"]
        for i, literal in enumerate(parts):
            if literal:
                pieces.append(f"'{literal}'")
            if i < len(params):
                pieces.append(params[i])
        body = " .. ".join(pieces)
        lines.append(f"K.{name} = function({', '.join(params)}) return {body} end")
    return "\n".join(lines)
