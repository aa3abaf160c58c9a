"""Webhooks of jobs, per the Standard Webhooks spec: the URL check at submission, the signature, and
delivery with retries.

An event (``job.succeeded``, ``job.failed``, ``job.cancelled``) is one message: its id
(``webhook-id``) and body are fixed when the job ends and kept in SQLite, so every attempt, and an
attempt after a restart, sends the same message with a fresh ``webhook-timestamp`` and signature
(``webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>``, by the ``standardwebhooks``
package, with ``FASHION_WEBHOOK_SECRET``). A 2xx answer delivers it; anything else is retried after
``webhook_backoff_seconds``, doubling, up to ``webhook_attempts`` attempts, each recorded (time, status
or error) and shown in the job's status. Redirects are not followed: a receiver answers itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
from fastapi import Request
from standardwebhooks import Webhook

from app.errors import ApiError
from app.jobs.db import Attempt, JobDB, JobRow
from app.metrics import Metrics
from app.settings import Settings

log = logging.getLogger("app")
EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}


def message_id(job_id: str, state: str) -> str:
    return f"msg_{job_id}_{state}"


def _refuse(why: str) -> ApiError:
    return ApiError(422, f"webhook_url: {why}", code="invalid_webhook_url", param="webhook_url")


def _is_local(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def check_url(url: str, request: Request, settings: Settings) -> str:
    """``url`` if a webhook may go there: http(s), a host, not this service (the request's host and port,
    or the address the server is bound to), and a secret to sign with; else 422 naming webhook_url."""
    if settings.webhook_secret is None:
        raise _refuse("this server has no FASHION_WEBHOOK_SECRET to sign webhooks with; omit webhook_url")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as err:
        raise _refuse(f"not a URL ({err})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise _refuse(f"must be an http:// or https:// URL with a host; got {url!r}")
    default = 443 if parsed.scheme == "https" else 80
    port = parsed.port or default
    host = parsed.host.lower()
    base = request.base_url
    ours: set[tuple[str, int]] = {((base.hostname or "").lower(), base.port or default)}
    server = request.scope.get("server")
    if server and server[1] is not None:
        ours.add((str(server[0]).lower(), int(server[1])))
    ports = {p for _, p in ours}
    if (host, port) in ours or (port in ports and _is_local(host)):
        raise _refuse(f"{url} points at this service itself; give the URL of another service")
    return url


class Webhooks:
    """Sends the webhook of each job that ends, on tasks of the event loop; ``close`` stops them (what was
    not delivered stays pending in SQLite and is sent again at the next start)."""

    def __init__(self, db: JobDB, settings: Settings, metrics: Metrics, changed: Callable[[], None]) -> None:
        self.db, self.settings, self.metrics, self.changed = db, settings, metrics, changed
        self._client = httpx.AsyncClient(timeout=settings.webhook_timeout_seconds, follow_redirects=False)
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, row: JobRow) -> None:
        """Deliver the webhook of a job that ended (its payload is in its row), in the background."""
        task = asyncio.create_task(self._deliver(row))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._client.aclose()

    def _headers(self, msg_id: str, body: bytes) -> dict[str, str]:
        secret = self.settings.webhook_secret
        if secret is None:
            raise RuntimeError("FASHION_WEBHOOK_SECRET is no longer set: cannot sign the webhook")
        now = datetime.now(UTC)
        return {
            "content-type": "application/json",
            "user-agent": "fashion-diffusion-webhooks",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(secret.get_secret_value()).sign(msg_id, now, body),
        }

    async def _post(self, url: str, msg_id: str, body: bytes) -> tuple[int | None, str | None]:
        """(status code, error): error None when delivered."""
        try:
            response = await self._client.post(url, content=body, headers=self._headers(msg_id, body))
        except RuntimeError as err:  # no secret any more (a restart without it): recorded, never sent unsigned
            return None, str(err)
        except httpx.HTTPError as err:
            return None, f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        if 200 <= response.status_code < 300:
            return response.status_code, None
        return response.status_code, f"HTTP {response.status_code}"

    async def _deliver(self, row: JobRow) -> None:
        assert row.webhook_url is not None and row.webhook_payload is not None
        event, msg_id = EVENTS[row.state], message_id(row.id, row.state)
        body = row.webhook_payload.encode()
        limit, base = self.settings.webhook_attempts, self.settings.webhook_backoff_seconds
        start = len(await self.db.attempts(row.id)) + 1  # after a restart: the attempts left
        for attempt in range(start, limit + 1):
            if attempt > 1:
                await asyncio.sleep(base * 2 ** (attempt - 2))
            at = time.time()
            status, error = await self._post(row.webhook_url, msg_id, body)
            last = error is None or attempt == limit
            state = "delivered" if error is None else "failed" if last else "pending"
            await self.db.attempt(row.id, Attempt(attempt, event, at, status, error), state)
            self.metrics.webhook_deliveries.labels(
                "delivered" if error is None else "gave_up" if last else "retry"
            ).inc()
            self.changed()
            if error is not None:
                log.warning("webhook %s of job %s, attempt %d of %d: %s", event, row.id, attempt, limit, error)
            if last:
                return
