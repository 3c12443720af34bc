"""Submission rate limits per token, shared by every hub replica (GCRA in one Lua script)."""

from __future__ import annotations

import math
import time
from typing import cast

import redis.asyncio

from emp_hub.broker.keys import Keys

# Generic cell rate algorithm: one key per token holds the "theoretical arrival time".
# ARGV: now, seconds per job (1/rate), burst (jobs), cost (jobs in this request).
# Returns {allowed (1/0), seconds to wait before retrying (string)}.
_GCRA = """
local now, interval = tonumber(ARGV[1]), tonumber(ARGV[2])
local burst, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
if tat < now then tat = now end
local new_tat = tat + cost * interval
local allow_at = new_tat - burst * interval
if allow_at > now then
  return {0, tostring(allow_at - now)}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
return {1, '0'}
"""


class RateLimited(Exception):
    """A submission over the token's allowance; `retry_after`: whole seconds to wait."""

    def __init__(self, wait: float) -> None:
        self.retry_after = 3600 if math.isinf(wait) else max(1, math.ceil(wait))
        super().__init__(f"too many submissions for this token; retry in {self.retry_after} s")


class RateLimiter:
    """Allows `rate` jobs a second per token, with bursts of up to `burst` jobs."""

    def __init__(
        self, client: redis.asyncio.Redis, namespace: str, rate: float, burst: int
    ) -> None:
        self.keys = Keys(namespace)
        self.rate = rate
        self.burst = burst
        self._script = client.register_script(_GCRA)

    async def take(self, token_id: str, cost: int = 1) -> float:
        """Spend `cost` jobs of the token's allowance. Returns 0 when allowed, else the
        seconds to wait before the request would be allowed. A cost over the burst could
        never be allowed: ValueError (callers check `burst` first)."""
        if cost > self.burst:
            raise ValueError(f"a cost of {cost} is over the burst of {self.burst}")
        allowed, wait = cast(
            list[int | str],
            await self._script(
                keys=[self.keys("rate", token_id)],
                args=[repr(time.time()), repr(1 / self.rate), self.burst, cost],
            ),
        )
        return 0.0 if allowed == 1 else float(wait)

    async def spend(self, token_id: str, cost: int = 1) -> None:
        """Spend `cost` jobs of the token's allowance, or raise RateLimited. Every submit
        path (HTTP, batches, the client WebSocket) calls this."""
        wait = await self.take(token_id, cost)
        if wait:
            raise RateLimited(wait)
