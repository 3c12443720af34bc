"""What the three WebSocket routes (worker, client, monitor) share: authenticating the
caller, reading a frame, describing an invalid message, and closing the sockets of revoked
tokens; and how the
client and monitor routes build their messages (the worker route's are the models of
emp_protocol).

Every frame is a JSON text frame. A binary frame or text that is not JSON is answered with
an `error` and the connection stays. A socket whose token is revoked (or, on a hub that was
open, once a token exists) is closed with 1008 "token revoked": each replica re-checks the
tokens of all its open sockets together every `token_refresh_s`. The socket's own task
closes it, at its next read, so nothing it was doing is cut in half.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.exceptions
from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from emp_hub.auth import Principal, Role, TokenStore
from emp_protocol.hub_messages import Error

log = logging.getLogger("emp_hub.ws")

#: The close code and reason of a socket whose token was revoked.
REVOKED = (1008, "token revoked")
#: The answer to a frame that is not JSON (the original hub's words).
NOT_JSON = "Invalid JSON format"
BINARY = "binary frames are not accepted: send JSON text frames"


def ws_message(type_: str, **fields: Any) -> dict[str, Any]:
    """A message of the client or monitor protocol, with its type and timestamp."""
    return {"type": type_, "timestamp": time.time(), **fields}


def error_details(
    exc: ValidationError, names: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """A validation error's problems as plain JSON: where (`loc`, its first field renamed
    by `names`), what (`msg`) and which rule (`type`). The input and the context are left
    out: they may not be JSON (inf, an exception) and may be large."""
    names = names or {}
    details = []
    for e in exc.errors(include_url=False):
        loc: list[str | int] = list(e["loc"])
        if loc and isinstance(loc[0], str):
            loc[0] = names.get(loc[0], loc[0])
        details.append({"loc": loc, "msg": e["msg"], "type": e["type"]})
    return details


def error_summary(details: list[dict[str, Any]]) -> str:
    """error_details in one line: `field.sub: what; ...`."""
    return "; ".join(
        f"{'.'.join(map(str, d['loc']))}: {d['msg']}" if d["loc"] else d["msg"] for d in details
    )


@dataclass(eq=False)
class _Open:
    """One open socket: who opened it, and whether its token was revoked since."""

    principal: Principal
    revoked: bool = False
    reading: asyncio.Timeout | None = None  # set while the socket waits for a frame


class OpenSockets:
    """This replica's open WebSockets and the callers that opened them."""

    def __init__(self) -> None:
        # Weak: a socket whose task ended without a disconnect message (an exception)
        # leaves no entry behind.
        self._open: weakref.WeakKeyDictionary[WebSocket, _Open] = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, websocket: WebSocket, principal: Principal) -> None:
        """A socket authenticated as `principal`: re-check its token from now on."""
        self._open[websocket] = _Open(principal)

    async def receive_json(
        self, websocket: WebSocket, error: Callable[[str], Awaitable[None]]
    ) -> Any:
        """The next frame's JSON value. Frames that are not JSON text are answered with
        `error(...)` and skipped. Raises WebSocketDisconnect when the peer closes, and
        after closing the socket (1008) when its token was revoked."""
        entry = self._open.get(websocket)
        while True:
            if entry is not None and entry.revoked:
                await self._close_revoked(websocket)
            try:
                async with asyncio.timeout(None) as reading:
                    if entry is not None:
                        entry.reading = reading
                    message = await websocket.receive()
            except TimeoutError:
                if entry is not None and entry.revoked:
                    continue  # woken by check_tokens: close at the top
                raise
            finally:
                if entry is not None:
                    entry.reading = None
            if message["type"] == "websocket.disconnect":
                self._open.pop(websocket, None)
                raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
            text = message.get("text")
            if text is None:
                await error(BINARY)
                continue
            try:
                return json.loads(text)
            except ValueError:
                await error(NOT_JSON)

    async def _close_revoked(self, websocket: WebSocket) -> None:
        self._open.pop(websocket, None)
        code, reason = REVOKED
        with contextlib.suppress(Exception):  # the peer may be gone already
            await websocket.close(code, reason)
        raise WebSocketDisconnect(code, reason)

    async def check_tokens(self, tokens: TokenStore) -> int:
        """Mark the sockets whose token is no longer accepted, and wake those waiting for
        a frame, so that they close. Returns how many were marked."""
        entries = [e for w, e in list(self._open.items()) if not e.revoked and not _ended(w)]
        if not entries:
            return 0
        refused = await tokens.refused({e.principal for e in entries})
        now = asyncio.get_running_loop().time()
        marked = 0
        for entry in entries:
            if entry.principal in refused:
                entry.revoked = True
                marked += 1
                if entry.reading is not None:
                    entry.reading.reschedule(now)
        return marked

    async def check_tokens_until(self, stop: asyncio.Event, tokens: TokenStore) -> None:
        """Re-check the open sockets' tokens every `tokens.refresh_s` until `stop`."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tokens.refresh_s)
            if stop.is_set():
                return
            try:
                if marked := await self.check_tokens(tokens):
                    log.info("closing %d socket(s) of revoked tokens", marked)
            except (redis.exceptions.RedisError, OSError) as exc:  # an outage: next time
                log.warning("could not re-check the tokens of open sockets: %s", exc)
            except Exception:  # nothing must end the loop
                log.exception("could not re-check the tokens of open sockets")


def _ended(websocket: WebSocket) -> bool:
    return WebSocketState.DISCONNECTED in (websocket.client_state, websocket.application_state)


async def authenticate_ws(
    websocket: WebSocket, tokens: TokenStore, sockets: OpenSockets, roles: set[Role]
) -> Principal | None:
    """The caller of a WebSocket (token in ?token= or Authorization: Bearer), whose token
    is re-checked while the socket is open (`sockets`). On failure, answer as the
    original hub did (an `error` message, with `code: auth_failed`, the `cause`: missing,
    invalid or role, and the roles it `needs`), then close (1008)."""
    token = websocket.query_params.get("token")
    header = websocket.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        token = header[7:].strip()
    principal = await tokens.authenticate(token)
    if principal is not None and principal.role in roles:
        sockets.add(websocket, principal)
        return principal
    needs = " or ".join(sorted(r.value for r in roles))
    if principal is None:  # the original hub's words, for missing and unknown tokens alike
        cause, text = ("missing" if not token else "invalid"), "Invalid token"
    else:
        cause = "role"
        text = f"this token has role {principal.role.value}; this route needs role {needs}"
    await websocket.accept()
    error = Error(
        error=f"Authentication failed: {text}", code="auth_failed", cause=cause, needs=needs
    )
    await websocket.send_text(json.dumps(error.model_dump(mode="json")))
    await websocket.close(code=1008)
    return None
