"""emp: submit and follow jobs from the command line.

    emp submit comfyui --payload @workflow.json --priority 5 --wait
    emp status JOB_ID        emp cancel JOB_ID       emp retry JOB_ID
    emp jobs --status failed emp workers             emp queues
    emp workers drain WORKER_ID   emp workers resume WORKER_ID   emp workers shutdown WORKER_ID

The hub is EMP_HUB_URL (default http://127.0.0.1:8001) and the token EMP_TOKEN, or
--hub and --token. Errors are one line on stderr; the exit status is 2 for a command line
that cannot work, 1 for an operation that failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import httpx
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from emp_client import AuthError, Client, EmpError, HubUnreachable, JobNotFound, WorkerNotFound

console = Console()


class UsageError(Exception):
    """A command line that cannot work; str() says what to give instead."""


def hub_url(value: str) -> str:
    """The hub's URL, checked to be one."""
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https", "ws", "wss") or not url.host:
        raise UsageError(
            f"the hub URL {value} is not a URL like http://127.0.0.1:8001; "
            "set EMP_HUB_URL or --hub to the hub's URL"
        )
    return value


def json_object(option: str, value: str | None) -> dict[str, Any] | None:
    """The JSON object given to `option`: JSON text, or @file with JSON in it."""
    if value is None:
        return None
    given = f"{option} {value}" if value.startswith("@") else option
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text()
        except FileNotFoundError:
            raise UsageError(f"{given}: no such file") from None
        except OSError as exc:
            raise UsageError(f"{given}: cannot read it ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise UsageError(f"{given}: not UTF-8 text") from None
    what = "give a JSON object or @file.json"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        raise UsageError(f"{given} is not JSON: {where}; {what}") from None
    if not isinstance(data, dict):
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}
        raise UsageError(
            f"{given} is a JSON {kind.get(type(data), 'number')}, not an object; {what}"
        )
    return data


#: How often `--wait` asks again why a waiting job has no worker.
WAITING_CHECK_S = 5.0


async def follow(emp: Client, job_id: str) -> dict[str, Any]:
    """Show a progress bar until the job ends, and say why while no live worker can run
    it; returns its final state."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(job_id, total=100, status="pending")

        async def explain_waiting() -> None:
            said = None
            while True:
                job = await emp.get(job_id)
                if job["status"] not in ("pending", "delayed"):
                    return
                reason = job.get("unschedulable")
                if reason != said:
                    if reason:
                        bar.console.print(f"[yellow]{job_id} waits: {reason}[/]")
                    bar.update(task, status="unschedulable" if reason else job["status"])
                    said = reason
                await asyncio.sleep(WAITING_CHECK_S)

        explainer = asyncio.create_task(explain_waiting())
        try:
            async for event in emp.events(job_id):
                if event["type"] == "progress":
                    bar.update(
                        task,
                        completed=float(event["progress"]),
                        status=event.get("message") or "running",
                    )
                else:
                    status = event["status"]
                    bar.update(task, status=status)
                    if status == "completed":
                        bar.update(task, completed=100)
        finally:
            explainer.cancel()
            with contextlib.suppress(asyncio.CancelledError, EmpError):
                await explainer
    return await emp.get(job_id)


def _effective(job: dict[str, Any]) -> str:
    """ "effective=N " when the hub queues the job at another priority than asked."""
    effective = job.get("effective_priority")
    return f"effective={effective} " if effective not in (None, job["priority"]) else ""


def show_job(job: dict[str, Any]) -> None:
    colour = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(
        job["status"], "cyan"
    )
    console.print(
        f"[bold]{job['job_id']}[/]  [{colour}]{job['status']}[/]  "
        f"service={escape(job['job_type'])} priority={job['priority']} "
        f"{_effective(job)}"
        f"progress={job['progress']:.0f}%"
    )
    for key in ("worker_id", "position", "attempt", "failures", "error", "message", "deadline"):
        if job.get(key) not in (None, "", 0):
            console.print(f"  {key}: {escape(str(job[key]))}")
    if job.get("result") is not None:
        console.print_json(json.dumps(job["result"]))


def show_table(headers: Sequence[str], rows: Sequence[Sequence[str | Text]]) -> None:
    """A table where it fits the terminal; else (or piped) plain aligned columns, one line
    a row: a cell (a job id) is never cut or wrapped."""
    table = Table(*headers)
    for row in rows:
        table.add_row(*(Text(cell) if isinstance(cell, str) else cell for cell in row))
    natural = Measurement.get(console, console.options.update(max_width=1 << 20), table)
    if console.is_terminal and natural.maximum <= console.width:
        console.print(table)
        return
    lines = [list(headers), *([str(cell) or "-" for cell in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    for line in lines:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


async def run(args: argparse.Namespace) -> int:
    url = hub_url(args.hub)  # the command line is checked before the hub is asked
    if args.command == "submit":
        payload = json_object("--payload", args.payload)
        requirements = json_object("--requirements", args.requirements)
    async with Client(url, args.token) as emp:
        if args.command == "submit":
            job_id = await emp.submit(
                args.service,
                payload,
                priority=args.priority,
                job_id=args.id,
                customer=args.customer,
                requirements=requirements,
                urgency=args.urgency,
                deadline_in_s=args.deadline_in,
            )
            if not args.wait:
                print(job_id)
                return 0
            job = await follow(emp, job_id)
            show_job(job)
            return 0 if job["status"] == "completed" else 1
        if args.command == "status":
            show_job(await emp.get(args.job_id))
        elif args.command == "cancel":
            result = await emp.cancel(args.job_id, args.reason)
            told = f"; told worker {result['worker']}" if result.get("worker") else ""
            console.print(f"cancelled {args.job_id} (was {result['previous_status']}{told})")
        elif args.command == "retry":
            show_job(await emp.retry(args.job_id))
        elif args.command == "jobs":
            page = await emp.jobs(
                status=args.status, service=args.service, customer=args.customer, limit=args.limit
            )
            show_table(
                ("job", "status", "service", "priority", "progress", "worker"),
                [
                    (
                        job["job_id"],
                        job["status"],
                        job["job_type"],
                        str(job["priority"]),
                        f"{job['progress']:.0f}%",
                        job["worker_id"] or "-",
                    )
                    for job in page["jobs"]
                ],
            )
        elif args.command == "workers" and args.action:
            print(await control_worker(emp, args.action, args.worker_id))
        elif args.command == "workers":
            show_workers(await emp.workers())
        else:
            q = await emp.queues()
            show_table(
                ("service", "pending", "by priority", "workers", "state"),
                [
                    (
                        c["requirements"]["service"],
                        str(c["pending"]),
                        " ".join(f"{p}:{n}" for p, n in c["by_priority"].items()),
                        str(c["matching_workers"]),
                        Text("unschedulable", "red") if c["unschedulable"] else "ok",
                    )
                    for c in q["classes"]
                ],
            )
            console.print(
                f"pending {q['pending']}, active {q['active']}, delayed "
                f"{q['delayed']}, dead {q['dead']}, live workers {q['live_workers']}"
            )
    return 0


def age(then: float | None, now: float) -> str:
    """How long ago, for a person: 3s ago, 5m ago, 2h ago."""
    if then is None:
        return "-"
    seconds = max(0.0, now - then)
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def show_workers(workers: list[dict[str, Any]]) -> None:
    """The live workers: state, services, GPUs, the jobs they hold, last heartbeat."""
    colour = {"active": "green", "draining": "yellow", "drained": "yellow", "stopping": "red"}
    now = time.time()
    rows = []
    for w in workers:
        caps = w["capabilities"]
        gpus = ", ".join(f"{g['name']} {g['memory_gb']:g}GB" for g in caps["gpus"])
        state = w.get("state", "active")
        rows.append(
            (
                w["worker_id"],
                Text(state, colour.get(state, "")),
                ", ".join(sorted(caps["services"])),
                gpus or "-",
                ",".join(w.get("jobs", [])) or "-",
                age(w.get("last_heartbeat"), now),
            )
        )
    show_table(("worker", "state", "services", "gpus", "jobs", "heartbeat"), rows)


async def control_worker(emp: Client, action: str, worker_id: str) -> str:
    """Drain, resume or shut down a worker; one line saying what happened."""
    if action == "drain":
        worker = await emp.drain_worker(worker_id)
    elif action == "resume":
        worker = await emp.resume_worker(worker_id)
    else:
        worker = await emp.shutdown_worker(worker_id)
    running = len(worker["jobs"])
    jobs = f"{running} job{'' if running == 1 else 's'} running"
    state = worker["state"]
    if state == "draining":
        return f"worker {worker_id} draining: {jobs} will finish; it takes no new jobs"
    if state == "drained":
        return f"worker {worker_id} drained: no job running; it takes no new jobs"
    if state == "stopping":
        return f"worker {worker_id} stopping: {jobs}; it exits once they are done"
    return f"worker {worker_id} active: it takes jobs again ({jobs})"


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line that points at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}; see {self.prog} --help\n")


def parser() -> argparse.ArgumentParser:
    """The emp command line."""
    p = Parser(prog="emp", description="Submit and follow emp jobs.")
    p.add_argument(
        "--hub",
        default=os.environ.get("EMP_HUB_URL", "http://127.0.0.1:8001"),
        help="the hub's URL (EMP_HUB_URL)",
    )
    p.add_argument("--token", default=os.environ.get("EMP_TOKEN"), help="token (EMP_TOKEN)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="submit a job")
    s.add_argument("service", help="the service (job_type), e.g. comfyui")
    s.add_argument("--payload", help="a JSON object, or @file.json")
    s.add_argument("--priority", type=int, default=0, help="-1000..1000, higher first")
    s.add_argument("--id", help="a job id of your own (must be new)")
    s.add_argument("--customer", help="the customer the job belongs to")
    s.add_argument("--requirements", help="a JSON object (models, gpu_memory_gb, ...) or @file")
    s.add_argument("--urgency", choices=["low", "normal", "high", "critical"])
    s.add_argument(
        "--deadline-in", type=float, metavar="SECONDS", help="start within this many seconds"
    )
    s.add_argument("--wait", action="store_true", help="show progress until the job ends")
    for name, text in (("status", "show a job"), ("retry", "re-queue a failed job")):
        sub.add_parser(name, help=text).add_argument("job_id")
    c = sub.add_parser("cancel", help="cancel a job")
    c.add_argument("job_id")
    c.add_argument("--reason", default="Manually cancelled")
    j = sub.add_parser("jobs", help="list jobs, newest first")
    j.add_argument(
        "--status", choices=["pending", "active", "delayed", "completed", "failed", "cancelled"]
    )
    j.add_argument("--service")
    j.add_argument("--customer")
    j.add_argument("--limit", type=int, default=20)
    w = sub.add_parser(
        "workers",
        help="list live workers; drain, resume or shut one down",
        description="List the live workers (state, services, GPUs, jobs, last heartbeat), "
        "or act on one (an admin token): drain (no new jobs; running ones finish; it stays "
        "drained until resumed, across restarts), resume, shutdown (drain, then the worker "
        "exits 0).",
    )
    actions = w.add_subparsers(dest="action")
    for name, text in (
        ("drain", "give the worker no new jobs; its running jobs finish"),
        ("resume", "a drained worker takes jobs again"),
        ("shutdown", "drain the worker, then it exits 0"),
    ):
        actions.add_parser(name, help=text, description=text).add_argument(
            "worker_id", help="the worker's id (as `emp workers` lists it)"
        )
    sub.add_parser("queues", help="queue depths and unschedulable jobs")
    return p


def hint(exc: EmpError) -> str:
    """What to do about a failed operation, for a person at the command line."""
    if isinstance(exc, HubUnreachable):
        return "is it running there? set EMP_HUB_URL or --hub to its URL"
    if isinstance(exc, AuthError) and exc.status == 401:
        return "set EMP_TOKEN or --token to a token it issued (emp-hub token create --role client)"
    if isinstance(exc, AuthError):
        return "set EMP_TOKEN or --token to a token with that role"
    if isinstance(exc, JobNotFound):
        return "`emp jobs` lists the jobs this token can see"
    if isinstance(exc, WorkerNotFound):
        return "`emp workers` lists the live workers"
    return ""


def fail(message: str, status: int) -> int:
    """Say what went wrong on one line of stderr; the exit status."""
    print("emp: " + " ".join(message.split()), file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point of emp."""
    args = parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except UsageError as exc:
        return fail(str(exc), 2)
    except EmpError as exc:
        return fail("; ".join(filter(None, (str(exc), hint(exc)))), 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
