"""``GET /healthz`` (the process is alive) and ``GET /readyz`` (every model loaded and warm)."""

from __future__ import annotations

from typing import Any

import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from app.clip.service import ClipStatus
from app.deps import get_serving
from app.errors import ErrorResponse
from app.generation.schemas import ModelKind
from app.generation.scorers import ClassifierScorer, ScorerUnavailable

ComponentStatus = ClipStatus  # the classifier is "ready" or "unavailable"


class ComponentHealth(BaseModel):
    status: ComponentStatus
    model: str | None = Field(default=None, description="what is (or was to be) loaded")
    message: str | None = Field(default=None, description="why it is unavailable, and how to provide it")


class ModelHealth(BaseModel):
    name: str
    kind: ModelKind
    precision: str = Field(description="the network's autocast dtype (FASHION_PRECISION)")
    parameters: int
    layout: str | None = Field(default=None, description="channels_last or nchw (FASHION_CHANNELS_LAST)")
    compiled: bool | None = Field(default=None, description="torch.compile'd (FASHION_COMPILE)")


class Health(BaseModel):
    status: str
    model: str | None = Field(default=None, description="the default model")
    device: str | None = None
    precision: str | None = Field(
        default=None, description="the default model's autocast dtype (FASHION_PRECISION); each model's in models"
    )
    models: list[ModelHealth] | None = Field(default=None, description="every served model, the default first")
    threads: int | None = Field(default=None, description="torch's intra-op CPU threads (FASHION_THREADS)")
    scheduler: str | None = Field(default=None, description="how jobs share network evaluations (FASHION_SCHEDULER)")
    clip: ComponentHealth | None = Field(
        default=None, description="CLIP (POST /clip/score, rerank by clip); the service is ready without it"
    )
    classifier: ComponentHealth | None = Field(default=None, description="the classifier behind rerank by classifier")


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
    """Ready: every model is loaded and warm and the engine runs; 503 otherwise. ``model`` and
    ``precision`` are the default model's; ``models`` lists each with its precision.

    CLIP and the classifier are reported beside it (``loading``, ``ready`` or ``unavailable`` with a
    message saying how to provide the weights); the service is ready, and generates, without them."""
    serving = get_serving(request)  # raises the 503 ApiError
    models = [
        ModelHealth(
            name=m.name,
            kind=m.kind,
            precision=m.runtime.precision,
            parameters=m.runtime.parameters,
            layout=m.runtime.layout,
            compiled=m.runtime.compiled,
        )
        for m in serving.models.values()
    ]
    health = Health(
        status="ready",
        model=models[0].name,
        device=serving.device,
        precision=models[0].precision,
        models=models,
        threads=torch.get_num_threads(),
        scheduler=serving.engine.policy.name,
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
