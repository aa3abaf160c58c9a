"""``GET /healthz`` (the process is alive) and ``GET /readyz`` (weights loaded and warm)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.deps import get_serving
from app.schemas import ComponentHealth, ErrorResponse, Health
from app.scorers import ClassifierScorer, ScorerUnavailable

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
    """Ready: the weights are loaded and warm and the engine runs; 503 otherwise.

    CLIP and the classifier are reported beside it (``loading``, ``ready`` or ``unavailable`` with a
    message saying how to provide the weights); the service is ready, and generates, without them."""
    serving = get_serving(request)  # raises the 503 ApiError
    health = Health(
        status="ready",
        model=serving.name,
        device=serving.device,
        precision=serving.engine.runtimes[serving.name].describe()["precision"],
    )
    clip = getattr(request.app.state, "clip", None)
    if clip is not None:
        health.clip = ComponentHealth(status=clip.status, model=clip.describe(), message=clip.message)
    classifier = serving.scorers.get("classifier")
    if classifier is not None:
        try:
            classifier.check()
            name = str(classifier.path) if isinstance(classifier, ClassifierScorer) else classifier.describe()
            health.classifier = ComponentHealth(status="ready", model=name)
        except ScorerUnavailable as err:
            health.classifier = ComponentHealth(status="unavailable", message=err.message)
    return health
