"""Replay recorded emp-redis traffic (tests/fixtures/emp-redis/*.jsonl, copied from the
reference recordings) against our hub, one recorded connection at a time.

A `Peer` sends its connection's recorded frames in order and checks every reply against
the recorded one: same type, every recorded field present, same values where they do not
vary by nature (timestamps, ids we generate). Frames the original sent that ours does not,
because they were bugs or noise the reference lists, are left out by `ours_too`; where a
scenario goes another way on purpose, the test says so with `skip(why=...)`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

FIXTURES = Path(__file__).parent / "fixtures" / "emp-redis"
#: Fields whose values differ by nature between runs.
VARYING = {
    "timestamp",
    "started_at",
    "completed_at",
    "message",
    "worker_id",
    "message_id",
    "notified_workers",
    "client_id",
}
#: Seconds to wait for one reply.
REPLY_S = 10.0


def scenario(name: str) -> list[dict[str, Any]]:
    """Every line of a recorded scenario, in order."""
    lines = (FIXTURES / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def recorded(name: str, conn: str, conn_id: str | None = None) -> list[dict[str, Any]]:
    """The frames of one connection of a recorded scenario, in order (no open/close)."""
    return [
        r
        for r in scenario(name)
        if r["conn"] == conn
        and (conn_id is None or r["conn_id"] == conn_id)
        and "_event" not in r["msg"]
    ]


def conn_ids(name: str, conn: str) -> list[str]:
    """The ids of a scenario's connections of one kind, in the order they opened."""
    ids: list[str] = []
    for r in scenario(name):
        if r["conn"] == conn and r["conn_id"] not in ids:
            ids.append(r["conn_id"])
    return ids


def ours_too(conn: str, msg: dict[str, Any], previous: dict[str, Any] | None) -> bool:
    """Whether our hub sends this recorded frame too (the reference's list of the
    original's bugs and noise, which we do not copy)."""
    kind = msg.get("type")
    if kind in {"stats_broadcast", "ack"}:
        return False  # periodic; their content is checked in test_original_monitor
    if conn == "monitor" and kind == "worker_status":
        return False  # ours on changes, the original's at every heartbeat: checked apart
    if kind == "subscription_confirmed" and msg.get("job_id") == "monitor-subscription":
        return False  # the original confirmed a monitor's subscription twice
    if conn in {"client", "monitor"} and kind == "update_job_progress" and msg["progress"] == -1:
        return False  # keep-alives renew the lease; they are not news for a client
    if previous is not None and kind == "response_job_status":
        same = {k: v for k, v in msg.items() if k != "timestamp"}
        if same == {k: v for k, v in previous.items() if k != "timestamp"}:
            return False  # the original answered cancel and force_retry twice
    return True


def check_reply(got: dict[str, Any], want: dict[str, Any], ids: dict[str, str]) -> None:
    """Our reply has the recorded type, every recorded field, and the same values where
    they do not vary by nature."""
    assert got["type"] == want["type"], (got, want)
    missing = set(want) - set(got)
    assert not missing, f"{want['type']} lacks {missing}"
    for key, value in want.items():
        if key == "job_id":
            assert got[key] == ids.get(value, value), (got, want)
        elif key not in VARYING:
            assert got[key] == value, (key, got, want)


class Peer:
    """One recorded connection, played against our hub."""

    def __init__(
        self, name: str, conn: str, conn_id: str | None = None, ids: dict[str, str] | None = None
    ) -> None:
        self.conn = conn
        self.frames: list[dict[str, Any]] = []
        previous = None
        for frame in recorded(name, conn, conn_id):
            if frame["dir"] == "from_hub":
                if ours_too(conn, frame["msg"], previous):
                    self.frames.append(frame)
                previous = frame["msg"]
            else:
                self.frames.append(frame)
        self.conn_id = conn_id or self.frames[0]["conn_id"]
        self.ids = {} if ids is None else ids  # recorded job id -> ours
        self.pos = 0
        self.socket: ClientConnection | None = None
        self.got: list[dict[str, Any]] = []  # every message received, in order

    async def connect(self, base_url: str, token: str | None = None) -> Peer:
        """Open the connection the recording opened."""
        query = f"?token={token}" if token else ""
        url = base_url.replace("http", "ws", 1) + f"/ws/{self.conn}/{self.conn_id}{query}"
        self.socket = await websockets.connect(url)
        return self

    async def close(self) -> None:
        """Close the connection."""
        if self.socket is not None:
            await self.socket.close()

    @property
    def next_frame(self) -> dict[str, Any]:
        """The next recorded frame (to send or to expect)."""
        return self.frames[self.pos]["msg"]  # type: ignore[no-any-return]

    async def receive(self) -> dict[str, Any]:
        """Our hub's next message, minus those not checked in order (stats broadcasts, and
        a monitor's worker_status copies); all are kept in `got`."""
        assert self.socket is not None
        while True:
            got: dict[str, Any] = json.loads(await asyncio.wait_for(self.socket.recv(), REPLY_S))
            self.got.append(got)
            if got["type"] == "stats_broadcast":
                continue
            if self.conn == "monitor" and got["type"] == "worker_status":
                continue
            return got

    async def play(self, until: str | None = None) -> dict[str, Any] | None:
        """Send and check recorded frames in order; stop after the first reply of type
        `until` (and return it), or at the end of the recording."""
        assert self.socket is not None
        while self.pos < len(self.frames):
            frame = self.frames[self.pos]
            self.pos += 1
            msg = frame["msg"]
            if frame["dir"] == "to_hub":
                self.pos -= 1
                await self.send_next()
                continue
            got = await self.receive()
            if msg["type"] in {"job_available", "job_accepted"} and "job_id" in msg:
                self.ids.setdefault(msg["job_id"], got.get("job_id", ""))
            check_reply(got, msg, self.ids)
            if msg["type"] == until:
                return got
        assert until is None, f"the recording has no further {until}"
        return None

    def skip(self, *, why: str, until: str | None = None, count: int = 1) -> None:
        """Pass over recorded frames where our hub deliberately goes another way: `count`
        frames, or up to and including the next of type `until`."""
        assert why
        if until is None:
            self.pos += count
            return
        while self.frames[self.pos]["msg"].get("type") != until:
            self.pos += 1
        self.pos += 1

    def skip_to(self, kind: str, *, why: str) -> None:
        """Pass over recorded frames up to (not including) the next of this type."""
        assert why
        while self.frames[self.pos]["msg"].get("type") != kind:
            self.pos += 1

    async def send(self, message: dict[str, Any]) -> None:
        """Send a frame the recording does not have (where we differ on purpose)."""
        assert self.socket is not None
        await self.socket.send(json.dumps(message))

    async def send_next(self, count: int = 1) -> None:
        """Send the next `count` recorded frames, which must be ones this peer sends."""
        for _ in range(count):
            frame = self.frames[self.pos]
            assert frame["dir"] == "to_hub", frame
            self.pos += 1
            out = dict(frame["msg"])
            if "_raw" in out:  # a frame that was not JSON
                assert self.socket is not None
                await self.socket.send(out["_raw"])
                continue
            if "job_id" in out:
                out["job_id"] = self.ids.get(out["job_id"], out["job_id"])
            await self.send(out)

    async def expect(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Our hub's next message (a reply the recording does not have)."""
        got = await self.receive()
        assert got["type"] == kind, got
        for key, value in fields.items():
            assert got[key] == value, (key, got)
        return got
