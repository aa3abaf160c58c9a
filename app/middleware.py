"""Pure ASGI middleware: request metrics, API key, body size limit.

``BaseHTTPMiddleware`` runs the app in a separate task and breaks disconnect detection
for streaming responses, so these wrap ``(scope, receive, send)`` directly.
Order, outermost first: metrics (so it sees every 401 and 413), API key, body limit.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_bytes
from app.metrics import Metrics

OPEN_PATHS = frozenset(
    {"/", "/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
# The page's own files (the page asks for the key itself), and the images of OpenAI's url answers, which a
# browser fetches without a header: with a key set, that route draws only URLs it signed (app.openai.urls).
OPEN_PREFIXES = ("/static/", "/v1/images/files/")
QUERY_KEY_PATHS = frozenset({"/generate/stream"})  # GET only: a browser's EventSource cannot set headers
QUERY_KEY = "api_key"


async def send_error(
    send: Send, status: int, message: str, *, code: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    body = error_bytes(status, message, code=code)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ReplicaMiddleware:
    """Names the answering process on every response (``X-Replica``), so that behind Ray Serve's proxy
    or a load balancer a client and a log line can tell which replica sampled an image."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Replica", self.replica)
            await send(message)

        await self.app(scope, receive, send_wrapper)


class MetricsMiddleware:
    """Counts requests by route template, method and status, and times them (streams until their end)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = frozenset(paths)  # route templates, for requests answered before routing (401, 413)

    def _route(self, scope: Scope) -> str:
        # The router leaves the matched route in the scope; the label is its template, never the raw
        # path, so unknown paths cannot blow up the label set.
        route = scope.get("route")
        path = getattr(route, "path", None)
        if isinstance(path, str) and path:
            return path
        return scope["path"] if scope["path"] in self.paths else "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route, method = self._route(scope), scope["method"]
            self.metrics.http_requests.labels(route, method, str(status)).inc()
            self.metrics.http_latency.labels(route, method).observe(time.perf_counter() - start)


class ApiKeyMiddleware:
    """When a key is set, every path but the page, health, metrics and docs needs ``Authorization:
    Bearer <key>`` or ``X-API-Key: <key>``; ``GET /generate/stream`` also takes ``?api_key=<key>``.

    The query parameter is removed from the request before anything else sees it, in place, so the
    route, its validation errors and uvicorn's access log (which prints the query string of this
    same scope) never hold the key."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None

    def _presented(self, scope: Scope) -> bytes | None:
        for name, value in scope.get("headers", []):
            if name == b"x-api-key":
                return bytes(value).strip()
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return bytes(value[7:]).strip()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from_query = take_query_key(scope)  # removed whether or not a key is set: it must never be logged
        if self.key is None or scope["type"] != "http" or _open(scope["path"]):
            await self.app(scope, receive, send)
            return
        presented = self._presented(scope) or from_query
        if presented is None or not hmac.compare_digest(presented, self.key):
            message = (
                "a valid API key is required (Authorization: Bearer <key> or X-API-Key: <key>; "
                "?api_key=<key> on GET /generate/stream)"
            )
            code = "missing_api_key" if presented is None else "invalid_api_key"
            await send_error(send, 401, message, code=code, headers=[(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def take_query_key(scope: Scope) -> bytes | None:
    """Remove ``api_key`` from the query string of any request, in place, so no log line holds it;
    return it for ``GET /generate/stream``, the one request that may authenticate that way."""
    if scope["type"] != "http" or QUERY_KEY.encode() not in scope.get("query_string", b""):
        return None
    pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
    keys = [v for k, v in pairs if k == QUERY_KEY]
    scope["query_string"] = urlencode([(k, v) for k, v in pairs if k != QUERY_KEY]).encode("latin-1")
    if not keys or scope["method"] != "GET" or scope["path"] not in QUERY_KEY_PATHS:
        return None
    return keys[-1].strip().encode()


class BodyLimitMiddleware:
    """Refuses bodies over ``max_bytes`` (or the path's own limit in ``path_limits``) with 413: at once
    from Content-Length, else while reading.

    Bodies are small JSON objects (or, on the paths with their own limit, uploads that the route
    reads into memory), so a chunked body is read up to the limit before the app sees it; later
    ``receive`` calls go straight through, keeping disconnect detection intact.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, path_limits: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = dict(path_limits or {})

    def _too_large(self, size: int | None, limit: int) -> str:
        got = f"{size} bytes" if size is not None else "more"
        return f"the request body is too large ({got}); the limit is {limit} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope["path"], self.max_bytes)
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        if declared is not None and declared > limit:
            await send_error(send, 413, self._too_large(declared, limit), code="body_too_large")
            return
        if declared is not None:
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): read the body here, refusing it once it passes the limit.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await send_error(send, 413, self._too_large(None, limit), code="body_too_large")
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
