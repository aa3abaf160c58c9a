"""Trajectory streaming over server-sent events, with FastAPI's own SSE support.

``POST /generate/stream`` takes the ``/generate`` body; ``GET /generate/stream?class=dress&n=4``
the same fields as a query, for browsers' ``EventSource``. Events, in order: ``start``;
``queued`` (position and estimated start) while the job waits for room on the device; one
``step`` per sampler step (previews of x0 and x_t every ``preview_every`` steps); then ``done``
with the final images as ``/generate`` returns them (with ``rerank``: the best n of the candidates,
scored after the last step; the steps preview all candidates), or ``error`` with the error object
(the 200 status line has gone out by then). The job is queued before the response starts, so a
full queue is still a plain 429; a client that disconnects cancels its job, which stops within
one tick.
"""

# No ``from __future__ import annotations``: FastAPI must see the per-app request models, which are
# local to build_router, as real objects rather than strings it cannot resolve.

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app import serving as flow
from app.deps import ServingDep, SettingsDep
from app.routes.generate import ERRORS
from app.schemas import StreamRequestBase


def build_router(body_model: type[StreamRequestBase]) -> APIRouter:
    """The router, with this app's request model (its bounds come from the settings)."""
    router = APIRouter(tags=["generate"])

    async def open_post(
        body: body_model,  # type: ignore[valid-type]
        request: Request,
        serving: ServingDep,
        settings: SettingsDep,
    ) -> AsyncIterator[flow.Stream]:
        async with flow.open_stream(body, request, serving, settings) as stream:
            yield stream

    async def open_get(
        query: Annotated[body_model, Query()],  # type: ignore[valid-type]
        request: Request,
        serving: ServingDep,
        settings: SettingsDep,
    ) -> AsyncIterator[flow.Stream]:
        async with flow.open_stream(query, request, serving, settings) as stream:
            yield stream

    @router.post(
        "/generate/stream", response_class=EventSourceResponse, responses=ERRORS, summary="Stream a generation"
    )
    async def stream_post(stream: Annotated[flow.Stream, Depends(open_post)]) -> AsyncIterator[ServerSentEvent]:
        """Server-sent events ``start``, ``queued``..., ``step``..., then ``done`` or ``error``."""
        async for event in flow.stream_events(stream):
            yield event

    @router.get(
        "/generate/stream", response_class=EventSourceResponse, responses=ERRORS, summary="Stream (EventSource)"
    )
    async def stream_get(stream: Annotated[flow.Stream, Depends(open_get)]) -> AsyncIterator[ServerSentEvent]:
        """The same stream, with the request fields as query parameters (``?class=dress&n=4``)."""
        async for event in flow.stream_events(stream):
            yield event

    return router
