"""A generation as server-sent events: the job queued before the response starts (so a full queue is
still a plain 429), then ``start``, ``queued`` while it waits, one ``step`` per sampler step, and
``done`` (the answer of ``POST /generate``) or ``error``, built on ``app.generation.serving``'s steps.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.sse import ServerSentEvent
from pydantic import BaseModel

from app.errors import TYPES, ApiError, error_payload
from app.generation import rerank
from app.generation.jobs import Event, Job, JobCancelled, JobSpec, Progress, Queued
from app.generation.schemas import Params, QueuedEvent, StartEvent, StepEvent, StreamRequestBase
from app.generation.serving import (
    Generated,
    Serving,
    api_error,
    rank_candidates,
    resolve,
    response_body,
    submit,
    until_disconnected,
)
from app.settings import Settings

PREVIEWS_PER_RUN = 10  # a stream's default: previews on about this many of its steps
_DONE = object()  # put on a stream's event queue once its job's future is settled


def error_event(err: ApiError, seq: int) -> ServerSentEvent:
    """A stream's ``error`` event: the 200 status line has gone out, so the error travels as data."""
    payload = error_payload(err.message, TYPES.get(err.status, err.type), err.param, err.code)
    return ServerSentEvent(event="error", id=str(seq), data=payload)


Finish = Callable[[Generated], Awaitable[BaseModel]]  # the ``done`` event's body from the finished job


@dataclass
class Stream:
    """A stream's job, opened before the response starts (so a full queue is still a plain 429)."""

    job: Job
    params: Params
    events: asyncio.Queue[Any]
    serving: Serving
    accepted: float
    queue_depth: int
    plan: rerank.RerankPlan | None = None
    finish: Finish | None = None  # None: the answer of POST /generate (``response_body``)


@asynccontextmanager
async def open_stream(
    body: StreamRequestBase, request: Request, serving: Serving, settings: Settings
) -> AsyncIterator[Stream]:
    """Queue the job and watch for the client leaving; the job is cancelled whenever the stream ends early."""
    plan = rerank.plan(body.rerank, body.n, serving.scorers, settings)
    spec, params = resolve(body, serving, settings, candidates=plan.candidates if plan else None)
    async with open_job_stream(spec, params, request, serving, body.preview_every, plan) as stream:
        yield stream


@asynccontextmanager
async def open_job_stream(
    spec: JobSpec,
    params: Params,
    request: Request,
    serving: Serving,
    preview_every: int | None = None,
    plan: rerank.RerankPlan | None = None,
    finish: Finish | None = None,
) -> AsyncIterator[Stream]:
    """``open_stream`` for a job already resolved (an edit's, say): submit it, watch for the client leaving,
    and cancel the job whenever the stream ends early."""
    accepted = time.monotonic()
    every = preview_every or max(1, math.ceil(spec.evaluations / PREVIEWS_PER_RUN))
    events: asyncio.Queue[Any] = asyncio.Queue()
    job = await submit(serving, spec, on_event=events.put_nowait, preview_every=every)
    job.future.add_done_callback(lambda _: events.put_nowait(_DONE))
    depth = serving.engine.queue_depth_of(job.model)

    async def cancel_when_gone() -> None:
        await until_disconnected(request)
        serving.engine.cancel(job)

    watcher = asyncio.ensure_future(cancel_when_gone())
    try:
        yield Stream(job, params, events, serving, accepted, depth, plan, finish)
    finally:
        watcher.cancel()
        if not job.future.done():
            serving.engine.cancel(job)


def _b64(png: bytes | None) -> str | None:
    return base64.b64encode(png).decode("ascii") if png is not None else None


def _event(item: Event, seq: int) -> ServerSentEvent:
    if isinstance(item, Queued):
        queued = QueuedEvent(position=item.position, estimated_start_s=round(item.estimated_start_s, 3))
        return ServerSentEvent(event="queued", id=str(seq), data=queued.model_dump(mode="json"))
    assert isinstance(item, Progress)
    step = StepEvent(index=item.index, total=item.total, t=item.t, x0_png=_b64(item.x0_png), xt_png=_b64(item.xt_png))
    return ServerSentEvent(event="step", id=str(seq), data=step.model_dump(mode="json"))


async def stream_events(stream: Stream) -> AsyncIterator[ServerSentEvent]:
    """``start``, ``queued`` while it waits, one ``step`` per sampler step, then ``done`` or ``error``."""
    seq = 0
    model = stream.job.model
    start = StartEvent(
        job=stream.job.id,
        model=model,
        params=stream.params,
        queue_depth=stream.queue_depth,
        replica=stream.serving.replica,
    )
    yield ServerSentEvent(event="start", id=str(seq), data=start.model_dump(mode="json", by_alias=True))
    try:
        while (item := await stream.events.get()) is not _DONE:
            seq += 1
            yield _event(item, seq)
        seq += 1
        try:
            result = stream.job.future.result()
            ranked = await rank_candidates(stream.plan, result, stream.job.spec.label, stream.serving)
        except JobCancelled:
            return  # the client is gone; nobody to tell
        except Exception as err:
            yield error_event(api_error(err), seq)
            return
        generated = Generated(model, stream.params, result, ranked, stream.accepted)
        finish = stream.finish or (lambda g: response_body(stream.serving, g))
        data = (await finish(generated)).model_dump(mode="json", by_alias=True, exclude_none=True)
        yield ServerSentEvent(event="done", id=str(seq), data=data)
    finally:
        if not stream.job.future.done():
            stream.serving.engine.cancel(stream.job)
