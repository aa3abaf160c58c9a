"""The generation routes: ``POST /generate`` (n images of one class, as JSON with base64 PNGs or as one
PNG grid), the trajectory stream, ``GET /models`` and ``GET /schedule``.

The stream uses FastAPI's own SSE support. ``POST /generate/stream`` takes the ``/generate`` body;
``GET /generate/stream?class=dress&n=4`` the same fields as a query, for browsers' ``EventSource``.
Events, in order: ``start``; ``queued`` (position and estimated start) while the job waits for room
on the device; one ``step`` per sampler step (previews of x0 and x_t every ``preview_every`` steps);
then ``done`` with the final images as ``/generate`` returns them (with ``rerank``: the best n of the
candidates, scored after the last step; the steps preview all candidates), or ``error`` with the
error object (the 200 status line has gone out by then). The job is queued before the response
starts, so a full queue is still a plain 429; a client that disconnects cancels its job, which stops
within one tick.

``GET /models`` lists the served models in the shape of OpenAI's ``GET /v1/models``, each with its
card's sampling defaults and what it is (teacher or student, parameters, precision), the default first.

Each handler only chooses the representation; ``app.generation.serving`` does the rest.
"""

# No ``from __future__ import annotations``: FastAPI must see the per-app request models, which are
# local to build_router, as real objects rather than strings it cannot resolve.

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.deps import ServingDep, SettingsDep
from app.errors import error_responses
from app.generation import serving as flow
from app.generation import streaming
from app.generation.models import ServedModel
from app.generation.schemas import (
    GenerateRequestBase,
    GenerateResponse,
    ModelList,
    ModelOut,
    ScheduleOut,
    StreamRequestBase,
)
from model.samplers import SAMPLERS

ERRORS = error_responses(
    {
        401: "missing or wrong API key (when the server has one)",
        413: "request body too large",
        422: "invalid parameters: the message names the field and what it accepts",
        429: "the queue is full; retry after the Retry-After header's seconds",
        503: "the model is not loaded yet, the server is shutting down, or the rerank method is unavailable "
        "(the message says how to provide its weights)",
    }
)


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


def model_out(model: ServedModel, default: bool, device: str) -> ModelOut:
    d = model.defaults
    return ModelOut.model_validate(
        {
            "id": model.name,
            "created": model.created,
            "kind": model.kind,
            "parent": model.teacher,
            "default": default,
            "sampler": d.sampler,
            "steps": d.steps,
            "guidance": d.guidance,
            "guidance_interval": d.guidance_interval,
            "distilled_guidance": model.distilled_guidance,
            "guide": model.guide,
            "guidance_method": d.guidance_method,
            "sigma_min": d.sigma_min,
            "samplers": list(SAMPLERS),
            "T": model.T,
            "parameters": model.runtime.parameters,
            "precision": model.runtime.precision,
            "device": device,
        }
    )


def build_router(generate_model: type[GenerateRequestBase], stream_model: type[StreamRequestBase]) -> APIRouter:
    """The routes, with this app's request models (their bounds come from the settings)."""
    router = APIRouter()
    generate_routes(router, generate_model)
    stream_routes(router, stream_model)
    model_routes(router)
    return router


def generate_routes(router: APIRouter, body_model: type[GenerateRequestBase]) -> None:
    @router.post(
        "/generate",
        tags=["generate"],
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
        parameters give byte-identical PNGs whatever else shares the device. With ``Accept: image/png``
        the answer is one PNG grid (seeds in the ``X-Seeds`` header).

        With ``rerank``, ``candidates`` images (seeds ``seed``, ``seed + 1``, ...) are sampled and scored,
        and the best ``n`` come back best first, each with its own seed and score."""
        generated = await flow.generate(body, request, serving, settings)
        if wants_png(request.headers.get("accept")):
            png = await flow.grid_png(generated)
            return Response(png, media_type="image/png", headers=flow.png_headers(serving, generated))
        return await flow.response_body(serving, generated)


def stream_routes(router: APIRouter, body_model: type[StreamRequestBase]) -> None:
    async def open_post(
        body: body_model,  # type: ignore[valid-type]
        request: Request,
        serving: ServingDep,
        settings: SettingsDep,
    ) -> AsyncIterator[streaming.Stream]:
        async with streaming.open_stream(body, request, serving, settings) as stream:
            yield stream

    async def open_get(
        query: Annotated[body_model, Query()],  # type: ignore[valid-type]
        request: Request,
        serving: ServingDep,
        settings: SettingsDep,
    ) -> AsyncIterator[streaming.Stream]:
        async with streaming.open_stream(query, request, serving, settings) as stream:
            yield stream

    @router.post(
        "/generate/stream",
        response_class=EventSourceResponse,
        responses=ERRORS,
        tags=["generate"],
        summary="Stream a generation",
    )
    async def stream_post(stream: Annotated[streaming.Stream, Depends(open_post)]) -> AsyncIterator[ServerSentEvent]:
        """Server-sent events ``start``, ``queued``..., ``step``..., then ``done`` or ``error``."""
        async for event in streaming.stream_events(stream):
            yield event

    @router.get(
        "/generate/stream",
        response_class=EventSourceResponse,
        responses=ERRORS,
        tags=["generate"],
        summary="Stream (EventSource)",
    )
    async def stream_get(stream: Annotated[streaming.Stream, Depends(open_get)]) -> AsyncIterator[ServerSentEvent]:
        """The same stream, with the request fields as query parameters (``?class=dress&n=4``)."""
        async for event in streaming.stream_events(stream):
            yield event


async def list_models(serving: ServingDep) -> ModelList:
    """Every model this server samples with: ``model`` in a request is one of their ``id``s, and the
    first is the default. Each carries its card's sampler, steps, guidance and guidance interval."""
    default = serving.default.name
    return ModelList(data=[model_out(m, m.name == default, serving.device) for m in serving.models.values()])


def model_routes(router: APIRouter) -> None:
    router.add_api_route(
        "/models",
        list_models,
        methods=["GET"],
        response_model=ModelList,
        tags=["model"],
        summary="The served models and their defaults",
    )

    @router.get(
        "/schedule",
        response_model=ScheduleOut,
        responses=error_responses({404: "no such model"}),
        tags=["model"],
        summary="The noise schedule of a model",
    )
    async def schedule(serving: ServingDep, model: Annotated[str | None, Query(max_length=200)] = None) -> ScheduleOut:
        """alpha_bar_t (the signal fraction of x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps), the log
        signal-to-noise ratio and the noise level sigma_t, for every timestep t = 0..T-1, from the card of
        ``model`` (default: the default model); the page draws it and uses it for the forward process."""
        s = serving.model(model).runtime.denoiser.schedule
        return ScheduleOut(
            name=s.name,
            T=s.T,
            alpha_bar=[float(v) for v in s.alpha_bar],
            log_snr=[float(v) for v in s.log_snr()],
            sigma=[float(v) for v in s.noise_level()],
        )
