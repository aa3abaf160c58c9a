"""A middleware for Ray Serve's HTTP proxy, so that a request whose replica dies still ends clearly.

When a replica's process dies with requests on it, Ray's proxy returns without an answer for those
that have not started (the HTTP server then sends a bare ``500 Internal Server Error``), and cuts
those that have (a stream) without ending the chunked body: the client sees a broken connection.
Ray's own refusals (503 while no replica is up, or past ``max_queued_requests``) are plain text too.
This middleware gives the first the service's error shape (``replica_failed``, with Retry-After: the same seed gives
the same images on any replica, so a retry is safe) and ends the second with the stream's ``error``
event. An answer of the service itself carries ``X-Replica`` and passes through unchanged.

Ray's hook for proxy middlewares loads it: ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=app.ray.proxy:middlewares``,
which deploy/ray/*.yaml set under ``controller_options`` (the proxies inherit the Serve controller's
environment), so ``serve run deploy/ray/serve-cpu.yaml`` alone gives clean answers. The proxy imports
this module: it must stay light (no torch, no model).
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_bytes, error_payload

RETRY_AFTER_S = 1  # Ray starts a replacement at once; the other replicas take the retry meanwhile


def failure_message(ray_text: str) -> str:
    return f"the replica serving this request failed ({ray_text.strip() or 'no answer'}); retry it"


class ReplicaFailureMiddleware:
    """Rewrites Ray's own 5xx answers into the service's error shape and ends cut-off SSE streams."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # Ray's own 5xx start, held until its body is read
        held_body = b""
        started = event_stream = ended = False

        async def send_wrapper(message: Message) -> None:
            nonlocal held, held_body, started, event_stream, ended
            if message["type"] == "http.response.start":
                started = True
                headers = Headers(raw=message.get("headers", []))
                if message["status"] >= 500 and "x-replica" not in headers:
                    held = message
                    return
                event_stream = headers.get("content-type", "").startswith("text/event-stream")
            elif message["type"] == "http.response.body":
                if held is not None:
                    held_body += message.get("body", b"")
                    if not message.get("more_body", False):
                        await self._send_error(send, held["status"], held_body.decode("utf-8", "replace"))
                        ended = True
                    return
                ended = not message.get("more_body", False)
            await send(message)

        await self.app(scope, receive, send_wrapper)
        if not started:  # the replica died before answering: Ray leaves the answer to the HTTP server
            await self._send_error(send, 500, "")
        elif event_stream and not ended:  # the stream's replica went away mid-stream
            payload = error_payload(failure_message("the stream was cut off"), "server_error", None, "replica_failed")
            event = f"event: error\ndata: {json.dumps(payload)}\n\n".encode()
            await send({"type": "http.response.body", "body": event, "more_body": False})

    @staticmethod
    async def _send_error(send: Send, status: int, ray_text: str) -> None:
        body = error_bytes(status, failure_message(ray_text), code="replica_failed")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_S).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def middlewares() -> list[Middleware]:
    """Ray's proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): the middlewares it adds."""
    return [Middleware(ReplicaFailureMiddleware)]
