"""``GET /healthz`` (the process is alive) and ``GET /readyz`` (weights loaded and warm)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.deps import get_serving
from app.schemas import ErrorResponse, Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, response_model_exclude_none=True)
async def healthz() -> Health:
    """Alive: answers as soon as the process serves HTTP."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    response_model_exclude_none=True,
    responses={503: {"model": ErrorResponse, "description": "not ready"}},
)
async def readyz(request: Request) -> Any:
    """Ready: the weights are loaded and warm and the engine runs; 503 otherwise."""
    serving = get_serving(request)  # raises the 503 ApiError
    return Health(status="ready", model=serving.name, device=serving.device)
