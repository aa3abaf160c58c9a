"""Jobs of ``POST /jobs`` from the outside: waiting for a job's state through its status route, and a
webhook receiver on 127.0.0.1 that records what it is sent."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from testkit.servers import wait_for

WEBHOOK_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()  # a Standard Webhooks secret for tests
FINISHED = ("succeeded", "failed", "cancelled")


def wait_job(
    http: httpx.Client, job_id: str, until: Callable[[dict[str, Any]], bool], what: str, timeout: float = 90.0
) -> dict[str, Any]:
    """Poll ``GET /jobs/{id}`` until ``until(status)``; that status. AssertionError naming ``what`` after
    ``timeout`` seconds, or at once on an answer other than 200."""
    seen: list[dict[str, Any]] = []

    def check() -> bool:
        response = http.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        seen.append(response.json())
        return until(seen[-1])

    wait_for(check, f"job {job_id}: {what}", timeout=timeout, interval=0.05)
    return seen[-1]


def ended(http: httpx.Client, job_id: str, timeout: float = 90.0) -> dict[str, Any]:
    """The status of the job once it has succeeded, failed or been cancelled."""
    return wait_job(http, job_id, lambda s: s["state"] in FINISHED, "did not end", timeout)


class WebhookReceiver:
    """``with WebhookReceiver(fail=2) as hook:`` an HTTP server on 127.0.0.1 in a thread at ``hook.url``
    that records every POST (headers, body, the status it answered) and answers the first ``fail`` of
    them with 500, the rest with 204."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = 500 if len(receiver.received) < receiver.fail else 204
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body, _ in self.received]

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)
