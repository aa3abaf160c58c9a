"""Trajectory streaming over server-sent events, with FastAPI's own SSE support.

``POST /generate/stream`` takes the ``/generate`` body; ``GET /generate/stream?class=dress&n=4``
the same fields as a query, for browsers' ``EventSource``. Events, in order: ``start``;
one ``step`` per sampler step (previews of x0 and x_t every ``preview_every`` steps);
then ``done`` with the final images as ``/generate`` returns them (with ``rerank``: the best n of
the candidates, scored after the last step; the steps preview all candidates), or ``error`` with
the error object (the 200 status line has gone out by then). The job is queued before the
response starts, so a full queue is still a plain 429; a client that disconnects cancels
its job, which stops within one step.
"""

# No ``from __future__ import annotations``: FastAPI must see the per-app request models, which are
# local to build_router, as real objects rather than strings it cannot resolve.

import asyncio
import base64
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app import rerank
from app.deps import Serving, ServingDep, SettingsDep, resolve, response_body, submit
from app.engine import EngineClosed, Job, JobCancelled, Progress
from app.errors import TYPES, ApiError, error_payload
from app.routes.generate import ERRORS
from app.schemas import Params, StartEvent, StepEvent, StreamRequestBase
from app.settings import Settings

PREVIEWS_PER_RUN = 10
_DONE = object()  # put on a job's event queue once its future is settled


@dataclass
class StreamJob:
    job: Job
    params: Params
    events: asyncio.Queue[Any]
    serving: Serving
    accepted: float
    queue_depth: int
    plan: rerank.RerankPlan | None = None


async def _cancel_on_disconnect(request: Request, serving: Serving, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    serving.engine.cancel(job)


@asynccontextmanager
async def _opened(
    body: StreamRequestBase, request: Request, serving: Serving, settings: Settings
) -> AsyncIterator[StreamJob]:
    accepted = time.monotonic()
    plan = rerank.plan(body, serving, settings)
    spec, params = resolve(body, serving, settings, candidates=plan.candidates if plan else None)
    every = body.preview_every or max(1, math.ceil(spec.steps / PREVIEWS_PER_RUN))
    events: asyncio.Queue[Any] = asyncio.Queue()
    job = submit(serving.engine, spec, on_progress=events.put_nowait, preview_every=every)
    job.future.add_done_callback(lambda _: events.put_nowait(_DONE))
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, serving, job))
    try:
        yield StreamJob(job, params, events, serving, accepted, serving.engine.queue_depth, plan)
    finally:
        watcher.cancel()
        if not job.future.done():
            serving.engine.cancel(job)


def _b64(png: bytes | None) -> str | None:
    return base64.b64encode(png).decode("ascii") if png is not None else None


def _error_event(status: int, message: str, code: str, seq: int, param: str | None = None) -> ServerSentEvent:
    return ServerSentEvent(event="error", id=str(seq), data=error_payload(message, TYPES[status], param, code))


async def _events(sj: StreamJob) -> AsyncIterator[ServerSentEvent]:
    seq = 0
    start = StartEvent(job=sj.job.id, params=sj.params, queue_depth=sj.queue_depth)
    yield ServerSentEvent(event="start", id=str(seq), data=start.model_dump(mode="json", by_alias=True))
    try:
        while (item := await sj.events.get()) is not _DONE:
            assert isinstance(item, Progress)
            seq += 1
            step = StepEvent(
                index=item.index, total=item.total, t=item.t, x0_png=_b64(item.x0_png), xt_png=_b64(item.xt_png)
            )
            yield ServerSentEvent(event="step", id=str(seq), data=step.model_dump(mode="json"))
        seq += 1
        try:
            result = sj.job.future.result()
        except JobCancelled:
            return  # the client is gone; nobody to tell
        except EngineClosed:
            yield _error_event(503, "the server is shutting down", "not_ready", seq)
        except Exception as err:
            yield _error_event(500, f"sampling failed: {type(err).__name__}: {err}", "sampling_failed", seq)
        else:
            ranked = None
            if sj.plan is not None:
                try:
                    ranked = await rerank.rank(sj.plan, result, sj.job.spec.label, sj.serving.engine.metrics)
                except ApiError as err:
                    yield _error_event(err.status, err.message, err.code, seq, err.param)
                    return
            done = response_body(sj.serving, sj.params, result, sj.accepted, ranked)
            data = done.model_dump(mode="json", by_alias=True, exclude_none=True)
            yield ServerSentEvent(event="done", id=str(seq), data=data)
    finally:
        if not sj.job.future.done():
            sj.serving.engine.cancel(sj.job)


def build_router(body_model: type[StreamRequestBase]) -> APIRouter:
    """The router, with this app's request model (its bounds come from the settings)."""
    router = APIRouter(tags=["generate"])

    async def open_post(
        body: body_model,  # type: ignore[valid-type]
        request: Request,
        serving: ServingDep,
        settings: SettingsDep,
    ) -> AsyncIterator[StreamJob]:
        async with _opened(body, request, serving, settings) as sj:
            yield sj

    async def open_get(
        query: Annotated[body_model, Query()],  # type: ignore[valid-type]
        request: Request,
        serving: ServingDep,
        settings: SettingsDep,
    ) -> AsyncIterator[StreamJob]:
        async with _opened(query, request, serving, settings) as sj:
            yield sj

    @router.post(
        "/generate/stream", response_class=EventSourceResponse, responses=ERRORS, summary="Stream a generation"
    )
    async def stream_post(sj: Annotated[StreamJob, Depends(open_post)]) -> AsyncIterator[ServerSentEvent]:
        """Server-sent events ``start``, ``step``... , then ``done`` or ``error``."""
        async for event in _events(sj):
            yield event

    @router.get(
        "/generate/stream", response_class=EventSourceResponse, responses=ERRORS, summary="Stream (EventSource)"
    )
    async def stream_get(sj: Annotated[StreamJob, Depends(open_get)]) -> AsyncIterator[ServerSentEvent]:
        """The same stream, with the request fields as query parameters (``?class=dress&n=4``)."""
        async for event in _events(sj):
            yield event

    return router
