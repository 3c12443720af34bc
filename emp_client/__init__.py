"""emp_client: a small async Python client of the hub's HTTP API, for applications, and
the `emp` command (emp_client/cli.py, with the `client` extra).

    async with Client("http://127.0.0.1:8001", token="emp_...") as emp:
        job_id = await emp.submit("comfyui", {"prompt": {...}}, priority=5)
        async for event in emp.events(job_id):
            print(event["type"], event.get("progress"))
        job = await emp.get(job_id)

Only httpx is needed (no Redis, no FastAPI). Errors are `EmpError`s with a readable message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx


class EmpError(Exception):
    """Something went wrong talking to the hub; str() says what, for a person."""


class HubUnreachable(EmpError):
    """The hub did not answer, or not as a hub does (wrong URL, not running, network)."""


class AuthError(EmpError):
    """The hub refused the token (401) or its role (403)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class JobNotFound(EmpError):
    """No such job (or not visible to this token)."""


class WorkerNotFound(EmpError):
    """No live worker has this id."""


class Rejected(EmpError):
    """The hub refused the request (4xx) with a reason."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"the hub refused the request ({status}): {_reason(detail)}")


def _reason(detail: Any) -> str:
    if isinstance(detail, list):  # FastAPI validation errors
        return "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}" for e in detail
        )
    return str(detail)


class Client:
    """The hub's HTTP API: submit, get, wait, stream events, cancel, retry, list."""

    def __init__(
        self, url: str = "http://127.0.0.1:8001", token: str | None = None, timeout: float = 30
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise HubUnreachable(f"cannot reach the hub at {self.url} ({exc!s})") from None
        return self._check(response)

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code < 400:
            try:
                return response.json()
            except ValueError:
                kind = response.headers.get("content-type", "no content type").split(";")[0]
                raise HubUnreachable(
                    f"{self.url} did not answer {response.request.method} "
                    f"{response.request.url.path} as an emp hub does ({kind}, not JSON)"
                ) from None
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        if response.status_code in (401, 403):
            raise AuthError(
                response.status_code, f"the hub at {self.url} refused the token: {detail}"
            )
        if response.status_code == 404:
            raise JobNotFound(str(detail))
        raise Rejected(response.status_code, detail)

    async def submit(
        self,
        service: str,
        payload: dict[str, Any] | None = None,
        *,
        priority: int = 0,
        job_id: str | None = None,
        requirements: dict[str, Any] | None = None,
        customer: str | None = None,
        max_attempts: int | None = None,
        job_timeout: float = 0,
        idempotency_key: str | None = None,
        urgency: str | None = None,
        deadline: float | None = None,
        deadline_in_s: float | None = None,
    ) -> str:
        """Submit a job; returns its id. `urgency` (low, normal, high, critical) and a
        deadline (epoch seconds, or seconds from now) count where the hub's priority policy
        weighs them (docs/scheduling.md)."""
        body: dict[str, Any] = {
            "job_type": service,
            "payload": payload or {},
            "priority": priority,
            "job_timeout": job_timeout,
        }
        optional = {
            "job_id": job_id,
            "requirements": requirements,
            "customer": customer,
            "max_attempts": max_attempts,
            "idempotency_key": idempotency_key,
            "urgency": urgency,
            "deadline": deadline,
            "deadline_in_s": deadline_in_s,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        answer = await self._call("POST", "/api/jobs", json=body)
        job: str = answer["job_id"]
        return job

    async def get(self, job_id: str) -> dict[str, Any]:
        """The job's state."""
        job: dict[str, Any] = await self._call("GET", f"/api/jobs/{job_id}")
        return job

    async def events(self, job_id: str, after: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """The job's events (status, progress) as they happen, until it ends. Each has an
        `id` (pass the last one as `after` to resume), `type` and `ts`; `progress` is a
        number."""
        headers = {"Last-Event-ID": after} if after else {}
        try:
            async with self._http.stream(
                "GET", f"/api/jobs/{job_id}/events", headers=headers, timeout=None
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._check(response)
                event_id = None
                async for line in response.aiter_lines():
                    if line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: "):
                        yield {"id": event_id, **json.loads(line[6:])}
        except httpx.TransportError as exc:
            raise HubUnreachable(f"cannot reach the hub at {self.url} ({exc!s})") from None

    async def wait(self, job_id: str) -> dict[str, Any]:
        """Wait until the job has ended; returns its final state."""
        async for _ in self.events(job_id):
            pass
        return await self.get(job_id)

    async def cancel(self, job_id: str, reason: str = "Manually cancelled") -> dict[str, Any]:
        """Cancel a job; a running job's worker is told at once."""
        result: dict[str, Any] = await self._call(
            "POST", f"/api/jobs/{job_id}/cancel", json={"reason": reason}
        )
        return result

    async def retry(self, job_id: str) -> dict[str, Any]:
        """Re-queue a failed (dead-lettered) job."""
        job: dict[str, Any] = await self._call("POST", f"/api/jobs/{job_id}/retry")
        return job

    async def jobs(self, **filters: Any) -> dict[str, Any]:
        """A page of jobs (summaries): status, service, customer, limit, cursor, and
        include ("payload", "result" or "payload,result") for those fields, capped."""
        params = {k: v for k, v in filters.items() if v is not None}
        page: dict[str, Any] = await self._call("GET", "/api/jobs", params=params)
        return page

    async def workers(self) -> list[dict[str, Any]]:
        """Live workers: capabilities, state (active, draining, drained, stopping), the
        jobs they hold, last heartbeat (epoch seconds)."""
        workers: list[dict[str, Any]] = await self._call("GET", "/api/workers")
        return workers

    async def _worker_action(self, worker_id: str, action: str) -> dict[str, Any]:
        try:
            worker: dict[str, Any] = await self._call(
                "POST", f"/api/workers/{quote(worker_id, safe='')}/{action}"
            )
        except JobNotFound as exc:
            raise WorkerNotFound(str(exc)) from None
        return worker

    async def drain_worker(self, worker_id: str) -> dict[str, Any]:
        """Give a worker no more jobs (its running jobs finish); it stays drained until
        resumed. Its view after (admin token)."""
        return await self._worker_action(worker_id, "drain")

    async def resume_worker(self, worker_id: str) -> dict[str, Any]:
        """A drained worker takes jobs again (admin token)."""
        return await self._worker_action(worker_id, "resume")

    async def shutdown_worker(self, worker_id: str) -> dict[str, Any]:
        """Drain a worker, then have it exit 0 (admin token)."""
        return await self._worker_action(worker_id, "shutdown")

    async def queues(self) -> dict[str, Any]:
        """Queue depths per class and priority, unschedulable jobs."""
        queues: dict[str, Any] = await self._call("GET", "/api/queues")
        return queues
