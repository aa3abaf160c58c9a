"""``POST /generate``: n images of one class, as JSON (base64 PNGs) or one PNG grid."""

# No ``from __future__ import annotations``: FastAPI must see the per-app request models, which are
# local to build_router, as real objects rather than strings it cannot resolve.

from typing import Any

import anyio
from fastapi import APIRouter, Request, Response

from app import serving as flow
from app.deps import ServingDep, SettingsDep
from app.errors import error_responses
from app.output import grid_png
from app.schemas import GenerateRequestBase, GenerateResponse

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
        parameters give byte-identical PNGs whatever else shares the device. With ``Accept: image/png``
        the answer is one PNG grid (seeds in the ``X-Seeds`` header).

        With ``rerank``, ``candidates`` images (seeds ``seed``, ``seed + 1``, ...) are sampled and scored,
        and the best ``n`` come back best first, each with its own seed and score."""
        generated = await flow.generate(body, request, serving, settings)
        if wants_png(request.headers.get("accept")):
            png = await anyio.to_thread.run_sync(grid_png, generated.chosen)
            return Response(png, media_type="image/png", headers=flow.png_headers(serving, generated))
        return flow.response_body(serving, generated)

    return router
