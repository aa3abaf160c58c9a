"""What routes share: the serving state the lifespan builds, dependencies as ``Annotated`` aliases,
and the translation of a validated request into an engine job."""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from app.clip_service import ClipService
from app.engine import Engine, EngineClosed, Job, JobResult, JobSpec, ProgressCallback, QueueFull
from app.errors import ApiError
from app.schemas import SEED_MAX, GenerateRequestBase, GenerateResponse, ImageOut, Params, RerankOut, Timings
from app.scorers import Scorer
from app.settings import Settings
from model.data import CLASS_NAMES

if TYPE_CHECKING:
    from app.rerank import Ranked


@dataclass(frozen=True)
class Defaults:
    sampler: str
    steps: int
    guidance: float
    guidance_interval: tuple[float, float] | None = None  # noise levels where guidance applies; None: all


@dataclass
class Serving:
    """Everything the lifespan loaded; ``app.state.serving`` is None until the model is warm."""

    engine: Engine
    name: str  # the weights' name, from the card
    defaults: Defaults
    T: int  # diffusion steps of the schedule (ddpm always runs all of them)
    device: str
    card: dict[str, Any]
    scorers: dict[str, Scorer] = field(default_factory=dict)  # rerank methods: "clip", "classifier"


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_serving(request: Request) -> Serving:
    serving: Serving | None = getattr(request.app.state, "serving", None)
    if serving is None or not serving.engine.running:
        raise ApiError(
            503,
            "the model is not ready (loading, warming up or shutting down)",
            code="not_ready",
            headers={"Retry-After": "5"},
        )
    return serving


def get_clip(request: Request) -> ClipService:
    clip: ClipService | None = getattr(request.app.state, "clip", None)
    if clip is None:
        raise ApiError(503, "the server is starting or shutting down", code="not_ready", headers={"Retry-After": "5"})
    return clip


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServingDep = Annotated[Serving, Depends(get_serving)]
ClipDep = Annotated[ClipService, Depends(get_clip)]


def resolve(
    body: GenerateRequestBase, serving: Serving, settings: Settings, candidates: int | None = None
) -> tuple[JobSpec, Params]:
    """Fill in defaults and seeds; the checks that need the loaded weights (ddpm's T) happen here.

    With ``candidates`` (rerank) the job samples that many images, seeds ``seed .. seed + candidates - 1``;
    ``params.n`` stays the number the client gets back."""
    sampler = body.sampler or serving.defaults.sampler
    steps = body.steps if body.steps is not None else serving.defaults.steps
    guidance = body.guidance if body.guidance is not None else serving.defaults.guidance
    if sampler == "ddpm":
        if body.steps is None:
            steps = serving.T
        elif body.steps != serving.T:
            raise ApiError(
                422,
                f"steps: ddpm always runs all {serving.T} steps of the schedule; allowed: {serving.T} or omit steps "
                "(use ddim or dpm++ for fewer)",
                code="steps_for_sampler",
                param="steps",
            )
        if steps > settings.max_steps:
            raise ApiError(
                422,
                f"sampler: ddpm needs {serving.T} steps but this server allows at most {settings.max_steps}; "
                "allowed: ddim, dpm++",
                code="sampler_unavailable",
                param="sampler",
            )
    base = body.seed if body.seed is not None else secrets.randbelow(SEED_MAX + 1)
    seeds = tuple(base + i for i in range(candidates or body.n))
    spec = JobSpec(label=body.class_, seeds=seeds, sampler=sampler, steps=steps, guidance=float(guidance))
    params = Params.model_validate(
        {
            "class": body.class_,
            "class_name": CLASS_NAMES[body.class_],
            "n": body.n,
            "sampler": sampler,
            "steps": steps,
            "guidance": float(guidance),
            "guidance_interval": serving.defaults.guidance_interval,
            "seed": base,
        }
    )
    return spec, params


def submit(engine: Engine, spec: JobSpec, on_progress: ProgressCallback | None = None, preview_every: int = 0) -> Job:
    """Queue a job, turning a full queue into 429 and a stopped engine into 503."""
    try:
        return engine.submit(spec, on_progress=on_progress, preview_every=preview_every)
    except QueueFull as err:
        raise ApiError(429, str(err), code="queue_full", headers={"Retry-After": str(err.retry_after)}) from err
    except EngineClosed as err:
        raise ApiError(503, "the server is shutting down", code="not_ready", headers={"Retry-After": "5"}) from err


def response_body(
    serving: Serving, params: Params, result: JobResult, accepted: float, ranked: Ranked | None = None
) -> GenerateResponse:
    """The answer to /generate (and the stream's ``done``); with ``ranked``, the best n candidates, best first."""
    chosen = range(len(result.pngs)) if ranked is None else [int(i) for i in ranked.order]
    images = [
        ImageOut(
            index=rank,
            seed=params.seed + i,
            png=base64.b64encode(result.pngs[i]).decode("ascii"),
            score=None if ranked is None else float(ranked.scores[i]),
        )
        for rank, i in enumerate(chosen)
    ]
    rerank = None
    if ranked is not None:
        rerank = RerankOut(
            by=ranked.by,
            candidates=len(ranked.scores),
            measure=ranked.measure,
            scores=[float(s) for s in ranked.scores],
            scoring_ms=round(ranked.scoring_s * 1e3, 2),
        )
    timings = Timings(
        queue_ms=round(result.queued_s * 1e3, 2),
        sampling_ms=round(result.sampling_s * 1e3, 2),
        total_ms=round((time.monotonic() - accepted) * 1e3, 2),
        batch_images=result.batch_images,
        batch_jobs=result.batch_jobs,
    )
    return GenerateResponse(model=serving.name, params=params, images=images, timings=timings, rerank=rerank)
