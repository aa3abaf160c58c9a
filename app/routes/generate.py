"""``POST /generate``: n images of one class, as JSON (base64 PNGs) or one PNG grid."""

# No ``from __future__ import annotations``: FastAPI must see the per-app request models, which are
# local to build_router, as real objects rather than strings it cannot resolve.

import asyncio
import math
import time
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response

from app import rerank
from app.deps import Serving, ServingDep, SettingsDep, resolve, response_body, submit
from app.engine import EngineClosed, Job, JobCancelled, JobResult
from app.errors import ApiError
from app.schemas import ErrorResponse, GenerateRequestBase, GenerateResponse, Params
from model.images import grid, png_bytes

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        401: "missing or wrong API key (when the server has one)",
        413: "request body too large",
        422: "invalid parameters: the message names the field and what it accepts",
        429: "the queue is full; retry after the Retry-After header's seconds",
        503: "the model is not loaded yet, the server is shutting down, or the rerank method is unavailable "
        "(the message says how to provide its weights)",
    }.items()
}


def wants_png(accept: str | None) -> bool:
    """True when the Accept header prefers image/png over JSON (q-values respected; JSON wins ties)."""
    best: dict[str, float] = {}
    for part in (accept or "").split(","):
        media, _, rest = part.strip().partition(";")
        q = 1.0
        for param in rest.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        best[media.strip().lower()] = max(q, best.get(media.strip().lower(), 0.0))
    png = best.get("image/png", 0.0)
    json_q = max(best.get("application/json", 0.0), best.get("*/*", 0.0), best.get("application/*", 0.0))
    return png > 0 and png > json_q


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_for_result(job: Job, request: Request, serving: Serving) -> JobResult:
    """The job's result; cancels the job if the client goes away or this task is cancelled."""
    gone = asyncio.ensure_future(_disconnected(request))
    waiters: list[asyncio.Future[Any]] = [job.future, gone]
    try:
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not job.future.done():
            serving.engine.cancel(job)
    if job.future not in done:
        raise ApiError(499, "the client closed the request", code="client_closed")
    try:
        return job.future.result()
    except JobCancelled as err:
        raise ApiError(499, str(err), code="client_closed") from err
    except EngineClosed as err:
        raise ApiError(503, "the server is shutting down", code="not_ready", headers={"Retry-After": "5"}) from err
    except Exception as err:
        raise ApiError(500, f"sampling failed: {type(err).__name__}: {err}", code="sampling_failed") from err


def grid_png(images: Any) -> bytes:
    return png_bytes(grid(images, ncol=math.ceil(math.sqrt(len(images)))))


def png_headers(serving: Serving, params: Params, ranked: rerank.Ranked | None = None) -> dict[str, str]:
    chosen = range(params.n) if ranked is None else [int(i) for i in ranked.order]
    headers = {
        "X-Model": serving.name,
        "X-Class": str(params.class_),
        "X-Sampler": params.sampler,
        "X-Steps": str(params.steps),
        "X-Guidance": str(params.guidance),
        "X-Seed": str(params.seed),
        "X-Seeds": ",".join(str(params.seed + i) for i in chosen),
    }
    if ranked is not None:
        headers["X-Rerank"] = f"{ranked.by};candidates={len(ranked.scores)}"
        headers["X-Scores"] = ",".join(f"{ranked.scores[i]:.6g}" for i in chosen)
    return headers


def build_router(body_model: type[GenerateRequestBase]) -> APIRouter:
    """The router, with this app's request model (its bounds come from the settings)."""
    router = APIRouter(tags=["generate"])

    @router.post(
        "/generate",
        response_model=GenerateResponse,
        response_model_exclude_none=True,
        responses={
            200: {"content": {"image/png": {}}, "description": "JSON, or one PNG grid with Accept: image/png"},
            **ERRORS,
        },
        summary="Generate n images of one class",
    )
    async def generate(body: body_model, request: Request, serving: ServingDep, settings: SettingsDep) -> Any:  # type: ignore[valid-type]
        """Sample ``n`` 28x28 images of ``class``. Image i uses seed ``seed + i``, so the same seed and
        parameters give byte-identical PNGs whatever else shares the batch. With ``Accept: image/png``
        the answer is one PNG grid (seeds in the ``X-Seeds`` header).

        With ``rerank``, ``candidates`` images (seeds ``seed``, ``seed + 1``, ...) are sampled and scored,
        and the best ``n`` come back best first, each with its own seed and score."""
        accepted = time.monotonic()
        plan = rerank.plan(body, serving, settings)
        spec, params = resolve(body, serving, settings, candidates=plan.candidates if plan else None)
        job = submit(serving.engine, spec)
        result = await wait_for_result(job, request, serving)
        ranked = await rerank.rank(plan, result, spec.label, serving.engine.metrics) if plan else None
        if wants_png(request.headers.get("accept")):
            chosen = result.images if ranked is None else result.images[ranked.order]
            png = await anyio.to_thread.run_sync(grid_png, chosen)
            return Response(png, media_type="image/png", headers=png_headers(serving, params, ranked))
        return response_body(serving, params, result, accepted, ranked)

    return router
