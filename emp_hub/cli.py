"""emp-hub: run the hub, and manage its tokens.

    emp-hub serve [--host H] [--port P] [--workers N]
    emp-hub token create --role client [--customer acme] [--tier premium] [--name NAME]
    emp-hub token list [--json]
    emp-hub token revoke ID
    emp-hub migrate-emp-redis --from REDIS_URL [--dry-run]

Settings come from EMP_* variables (docs/configuration.md); the command-line options
override them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import redis.exceptions

import emp_hub
from emp_hub.auth import Role, TokenStore
from emp_hub.broker import connect
from emp_hub.embedded import DataDirLocked, check_free, redis_url_or_embedded
from emp_hub.logs import configure_hub_logging
from emp_hub.settings import HubSettings


def serve(settings: HubSettings, workers: int) -> None:
    """Run the hub under uvicorn until interrupted."""
    import uvicorn

    # The hub's own lines (where its data lives, warnings) beside uvicorn's, at its level,
    # in its format (uvicorn's too).
    log_config = configure_hub_logging(settings.log_level, settings.log_format)
    logs: dict[str, Any] = {} if log_config is None else {"log_config": log_config}

    from emp_hub.app import create_app

    if not settings.redis_url:  # one hub per data directory: say so before uvicorn starts
        check_free(settings.data_dir / "valkey")
    common: dict[str, Any] = {
        "log_level": settings.log_level,
        "ws_max_size": settings.ws_max_bytes,
        # No permessage-deflate (uvicorn negotiates it by default): the frames are small
        # JSON, and compressing them cost CPU on both sides for nothing (docs/benchmarks.md).
        "ws_per_message_deflate": False,
        "timeout_graceful_shutdown": math.ceil(settings.shutdown_timeout_s),
        **logs,
    }
    if workers > 1:
        # Each worker process builds its own app from the same environment.
        os.environ["EMP_HOST"], os.environ["EMP_PORT"] = settings.host, str(settings.port)
        uvicorn.run(
            "emp_hub.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=workers,
            **common,
        )
        return
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        **common,
    )


async def with_tokens(settings: HubSettings, action: Callable[[TokenStore], Awaitable[int]]) -> int:
    """Run `action` on the token store of the configured (or embedded) Redis."""
    with redis_url_or_embedded(settings.redis_url, settings.data_dir / "valkey") as url:
        client = connect(url)
        try:
            return await action(TokenStore(client, settings.broker.namespace))
        finally:
            await client.aclose()


def token_command(settings: HubSettings, args: argparse.Namespace) -> int:
    """emp-hub token create|list|revoke."""

    async def create(store: TokenStore) -> int:
        token = await store.create(
            Role(args.role), name=args.name or "", customer=args.customer, tier=args.tier
        )
        print(token)
        print("(shown once: store it now; `emp-hub token list` shows its id)", file=sys.stderr)
        return 0

    async def list_tokens(store: TokenStore) -> int:
        records = await store.list()
        if args.json:
            print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
            return 0
        if not records:
            print("no tokens (the hub is open unless EMP_AUTH_TOKEN is set)")
        for r in records:
            scope = f" customer={r.customer}" if r.customer else ""
            scope += f" tier={r.tier}" if r.tier else ""
            print(f"{r.id}  {r.role.value:<8} {r.name}{scope}")
        return 0

    async def revoke(store: TokenStore) -> int:
        if await store.revoke(args.id):
            print(f"revoked {args.id}")
            return 0
        print(f"no token with id {args.id}", file=sys.stderr)
        return 1

    actions: dict[str, Callable[[TokenStore], Awaitable[int]]] = {
        "create": create,
        "list": list_tokens,
        "revoke": revoke,
    }
    return asyncio.run(with_tokens(settings, actions[args.token_command]))


def migrate_command(settings: HubSettings, args: argparse.Namespace) -> int:
    """emp-hub migrate-emp-redis --from URL [--dry-run]."""
    from emp_hub.broker import Broker
    from emp_hub.migrate import migrate

    async def run(url: str) -> int:
        old, new = connect(args.source), connect(url)
        try:
            report = await migrate(old, Broker(new, settings.broker), dry_run=args.dry_run)
        finally:
            await old.aclose()
            await new.aclose()
        verb = "would import" if args.dry_run else "imported"
        count = report.pending + report.requeued_running + report.finished
        print(
            f"scanned {report.scanned} old jobs: {report.pending} pending, "
            f"{report.requeued_running} running (queued again), {report.finished} finished"
        )
        print(
            f"{verb} {count if args.dry_run else report.imported}"
            + ("" if args.dry_run else f", skipped {report.skipped_existing} already here")
        )
        for problem in report.unreadable:
            print(f"not imported: {problem}", file=sys.stderr)
        return 0

    with redis_url_or_embedded(settings.redis_url, settings.data_dir / "valkey") as url:
        return asyncio.run(run(url))


def parser() -> argparse.ArgumentParser:
    """The emp-hub command line."""
    p = argparse.ArgumentParser(
        prog="emp-hub",
        description="The emp hub: HTTP and WebSocket API over the job broker.",
        epilog="Settings: EMP_* environment variables (see docs/configuration.md). "
        "Without EMP_REDIS_URL the hub starts an embedded Valkey in EMP_DATA_DIR.",
    )
    p.add_argument("--version", action="version", version=f"emp-hub {emp_hub.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the hub")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1, EMP_HOST)")
    s.add_argument("--port", type=int, help="port to listen on (default 8001, EMP_PORT)")
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        help="hub processes on this port (needs EMP_REDIS_URL: they share it)",
    )
    t = sub.add_parser("token", help="create, list and revoke tokens")
    tsub = t.add_subparsers(dest="token_command", required=True)
    c = tsub.add_parser("create", help="create a token and print it (once)")
    c.add_argument("--role", required=True, choices=[r.value for r in Role])
    c.add_argument("--customer", help="scope a client token to one customer")
    c.add_argument("--tier", help="the tier of the jobs it submits (the priority policy weighs it)")
    c.add_argument("--name", help="a name to recognise the token by")
    ls = tsub.add_parser("list", help="list tokens (ids, roles, names; never the tokens)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    r = tsub.add_parser("revoke", help="revoke a token by its id")
    r.add_argument("id", help="the token's id, as `token list` shows it")
    m = sub.add_parser(
        "migrate-emp-redis",
        help="import the jobs of an emp-redis deployment",
        description="Pending jobs keep their order; finished ones become history; the old "
        "keys are only read.",
    )
    m.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="REDIS_URL",
        help="the emp-redis deployment's Redis",
    )
    m.add_argument("--dry-run", action="store_true", help="count, write nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of emp-hub."""
    args = parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.command == "serve":
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = HubSettings(**overrides)
        if args.command == "serve":
            if args.workers > 1 and not settings.redis_url:
                print(
                    "emp-hub: --workers needs EMP_REDIS_URL (processes share one Redis)",
                    file=sys.stderr,
                )
                return 2
            serve(settings, args.workers)
            return 0
        if args.command == "migrate-emp-redis":
            return migrate_command(settings, args)
        return token_command(settings, args)
    except ValueError as exc:  # bad settings or arguments
        print(f"emp-hub: {exc}", file=sys.stderr)
        return 2
    except redis.exceptions.ConnectionError as exc:
        print(f"emp-hub: cannot reach Redis: {exc}", file=sys.stderr)
        return 1
    except DataDirLocked as exc:
        print(f"emp-hub: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
