"""emp: submit and follow jobs from the command line.

    emp submit comfyui --payload @workflow.json --priority 5 --wait
    emp status JOB_ID        emp cancel JOB_ID       emp retry JOB_ID
    emp jobs --status failed emp workers             emp queues

The hub is EMP_HUB_URL (default http://127.0.0.1:8001) and the token EMP_TOKEN, or
--hub and --token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from emp_hub.client import Client, EmpError

console = Console()
errors = Console(stderr=True)


def payload_arg(value: str) -> dict[str, Any]:
    """--payload: JSON text, or @file with JSON in it."""
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    data = json.loads(text)
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError("the payload must be a JSON object")
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


def show_job(job: dict[str, Any]) -> None:
    colour = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(
        job["status"], "cyan"
    )
    console.print(
        f"[bold]{job['job_id']}[/]  [{colour}]{job['status']}[/]  "
        f"service={job['job_type']} priority={job['priority']} "
        f"progress={job['progress']:.0f}%"
    )
    for key in ("worker_id", "position", "attempt", "failures", "error", "message"):
        if job.get(key) not in (None, "", 0):
            console.print(f"  {key}: {job[key]}")
    if job.get("result") is not None:
        console.print_json(json.dumps(job["result"]))


async def run(args: argparse.Namespace) -> int:
    async with Client(args.hub, args.token) as emp:
        if args.command == "submit":
            job_id = await emp.submit(
                args.service,
                args.payload,
                priority=args.priority,
                job_id=args.id,
                customer=args.customer,
                requirements=args.requirements,
            )
            if not args.wait:
                console.print(job_id)
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
            table = Table("job", "status", "service", "priority", "progress", "worker")
            for job in page["jobs"]:
                table.add_row(
                    job["job_id"],
                    job["status"],
                    job["job_type"],
                    str(job["priority"]),
                    f"{job['progress']:.0f}%",
                    job["worker_id"] or "-",
                )
            console.print(table)
        elif args.command == "workers":
            table = Table("worker", "services", "gpus")
            for w in await emp.workers():
                caps = w["capabilities"]
                gpus = ", ".join(f"{g['name']} {g['memory_gb']:g}GB" for g in caps["gpus"])
                table.add_row(w["worker_id"], ", ".join(sorted(caps["services"])), gpus or "-")
            console.print(table)
        else:
            q = await emp.queues()
            table = Table("service", "pending", "by priority", "workers", "")
            for c in q["classes"]:
                table.add_row(
                    c["requirements"]["service"],
                    str(c["pending"]),
                    " ".join(f"{p}:{n}" for p, n in c["by_priority"].items()),
                    str(c["matching_workers"]),
                    "[red]unschedulable[/]" if c["unschedulable"] else "",
                )
            console.print(table)
            console.print(
                f"pending {q['pending']}, active {q['active']}, delayed "
                f"{q['delayed']}, dead {q['dead']}, live workers {q['live_workers']}"
            )
    return 0


def parser() -> argparse.ArgumentParser:
    """The emp command line."""
    p = argparse.ArgumentParser(prog="emp", description="Submit and follow emp jobs.")
    p.add_argument(
        "--hub",
        default=os.environ.get("EMP_HUB_URL", "http://127.0.0.1:8001"),
        help="the hub's URL (EMP_HUB_URL)",
    )
    p.add_argument("--token", default=os.environ.get("EMP_TOKEN"), help="token (EMP_TOKEN)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="submit a job")
    s.add_argument("service", help="the service (job_type), e.g. comfyui")
    s.add_argument("--payload", type=payload_arg, default={}, help="JSON, or @file.json")
    s.add_argument("--priority", type=int, default=0, help="-1000..1000, higher first")
    s.add_argument("--id", help="a job id of your own (must be new)")
    s.add_argument("--customer", help="the customer the job belongs to")
    s.add_argument("--requirements", type=payload_arg, help="JSON: models, gpu_memory_gb, ...")
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
    sub.add_parser("workers", help="list live workers")
    sub.add_parser("queues", help="queue depths and unschedulable jobs")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of emp."""
    args = parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except EmpError as exc:
        errors.print(f"emp: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
