"""Tokens and roles.

A token has a role: admin, client, worker or monitor. A client token may be scoped to a
customer: it then submits only as that customer and sees only that customer's jobs.
Tokens are created with `emp-hub token create`, stored in Redis as their SHA-256 (never the
token itself), listed and revoked by id. The original single WEBSOCKET_AUTH_TOKEN (here
EMP_AUTH_TOKEN) still works and acts as an admin token.

With no shared token configured and no token created, the hub is open (every caller is an
admin), as the original was with an empty token; the hub logs a warning at start.

HTTP calls look their token up every time. What a running hub remembers is re-checked every
`refresh_s` (EMP_TOKEN_REFRESH_S): whether it is still open, and the tokens of its open
WebSockets (see ws_common.OpenSockets).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import cast

import redis.asyncio
from pydantic import BaseModel

from emp_hub.broker.connection import on_lane
from emp_hub.broker.keys import Keys
from emp_protocol.capabilities import Name


class Role(StrEnum):
    """What a token may do."""

    ADMIN = "admin"  # everything
    CLIENT = "client"  # submit, read, cancel and retry jobs (its customer's only, if scoped)
    WORKER = "worker"  # connect as a worker, upload the outputs of jobs it holds
    MONITOR = "monitor"  # read everything, change nothing


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    name: str
    role: Role
    customer: str | None = None
    #: The tier its token carries (the priority policy weighs it; docs/scheduling.md).
    tier: str | None = None
    token_id: str = "anonymous"
    digest: str = ""  # SHA-256 of its stored token; "" for the shared token and anonymous

    def may_see(self, customer: str | None) -> bool:
        """Whether this caller may see a job of `customer`."""
        if self.role in (Role.ADMIN, Role.MONITOR):
            return True
        if self.role is Role.CLIENT:
            return self.customer is None or self.customer == customer
        return False


ANONYMOUS = Principal(name="anonymous", role=Role.ADMIN)


class TokenRecord(BaseModel):
    """A stored token (its hash is the key; the token itself is never stored)."""

    id: str
    name: str
    role: Role
    customer: Name | None = None
    tier: Name | None = None
    created_at: float


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Tokens in Redis: `{namespace}:tokens`, a hash of SHA-256(token) -> record (JSON)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        namespace: str,
        shared_token: str | None = None,
        refresh_s: float = 2.0,
    ) -> None:
        self.redis = client
        self.key = Keys(namespace)("tokens")
        self._shared = shared_token
        self.refresh_s = refresh_s
        self._open_checked_at = float("-inf")
        self._open = False

    async def create(
        self, role: Role, *, name: str = "", customer: str | None = None, tier: str | None = None
    ) -> str:
        """Create a token and return it: it is shown once and cannot be recovered. A `tier`
        counts for the jobs it submits, before the customer's (EMP_SCHEDULING__TIERS)."""
        if customer is not None and role is not Role.CLIENT:
            raise ValueError("only client tokens can be scoped to a customer")
        if tier is not None and role not in (Role.CLIENT, Role.ADMIN):
            raise ValueError("only client and admin tokens submit jobs: a tier needs one")
        token = "emp_" + secrets.token_urlsafe(32)
        digest = _digest(token)
        record = TokenRecord(
            id=digest[:12],
            name=name or f"{role.value}-{digest[:6]}",
            role=role,
            customer=customer,
            tier=tier,
            created_at=time.time(),
        )
        await self.redis.hset(self.key, digest, record.model_dump_json())
        return token

    async def list(self) -> list[TokenRecord]:
        """Every stored token's record (not the tokens), oldest first."""
        raw = cast(dict[str, str], await self.redis.hgetall(self.key))
        records = [TokenRecord.model_validate_json(v) for v in raw.values()]
        return sorted(records, key=lambda r: r.created_at)

    async def revoke(self, token_id: str) -> bool:
        """Revoke the token whose id (the first 12 hex digits of its hash) is given."""
        raw = cast(dict[str, str], await self.redis.hgetall(self.key))
        for digest, value in raw.items():
            if json.loads(value)["id"] == token_id:
                return bool(await self.redis.hdel(self.key, digest))
        return False

    async def authenticate(self, token: str | None) -> Principal | None:
        """The caller a token stands for, or None when it is missing or unknown."""
        if await self.is_open():
            return ANONYMOUS
        if not token:
            return None
        if self._shared is not None and hmac.compare_digest(token.encode(), self._shared.encode()):
            return Principal(name="shared-token", role=Role.ADMIN, token_id="shared")
        # The lookup is by hash: timing reveals nothing about the stored tokens.
        value = cast(str | None, await on_lane(self.redis, "HGET", self.key, _digest(token)))
        if value is None:
            return None
        record = TokenRecord.model_validate_json(value)
        return Principal(
            name=record.name,
            role=record.role,
            customer=record.customer,
            tier=record.tier,
            token_id=record.id,
            digest=_digest(token),
        )

    async def refused(self, principals: Collection[Principal]) -> set[Principal]:
        """Those of `principals` whose token would be refused now: a stored token since
        revoked, or no token on a hub no longer open (one round trip to Redis)."""
        digests = sorted({p.digest for p in principals if p.digest})
        values: list[str | None] = []
        if digests:
            values = cast(list[str | None], await self.redis.hmget(self.key, digests))
        gone = {d for d, v in zip(digests, values, strict=True) if v is None}
        closed = ANONYMOUS in principals and not await self.is_open()
        return {p for p in principals if p.digest in gone or (closed and p == ANONYMOUS)}

    async def is_open(self) -> bool:
        """True when no shared token is configured and no token exists (checked every
        `refresh_s`)."""
        if self._shared is not None:
            return False
        now = time.monotonic()
        if now - self._open_checked_at > self.refresh_s:
            self._open = await self.redis.hlen(self.key) == 0
            self._open_checked_at = now
        return self._open
