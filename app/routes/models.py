"""``GET /models``: the served models, in the shape of OpenAI's ``GET /v1/models``, each with its card's
sampling defaults and what it is (teacher or student, parameters, precision), the default first."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ServingDep
from app.models import ServedModel
from app.schemas import ModelList, ModelOut
from model.samplers import SAMPLERS

router = APIRouter(tags=["model"])


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
            "samplers": list(SAMPLERS),
            "T": model.T,
            "parameters": model.runtime.parameters,
            "precision": model.runtime.precision,
            "device": device,
        }
    )


@router.get("/models", response_model=ModelList, summary="The served models and their defaults")
async def models(serving: ServingDep) -> ModelList:
    """Every model this server samples with: ``model`` in a request is one of their ``id``s, and the
    first is the default. Each carries its card's sampler, steps, guidance and guidance interval."""
    default = serving.default.name
    return ModelList(data=[model_out(m, m.name == default, serving.device) for m in serving.models.values()])
