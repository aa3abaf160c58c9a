"""What routes depend on: the settings, the serving state the lifespan built, and CLIP, as
``Annotated`` aliases. A missing or stopping model is a 503 here, before any route code runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.clip.service import ClipService
from app.errors import not_ready
from app.generation.serving import Serving
from app.jobs.serving import Jobs
from app.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_serving(request: Request) -> Serving:
    serving: Serving | None = getattr(request.app.state, "serving", None)
    if serving is None or not serving.engine.running:
        raise not_ready("the model is not ready (loading, warming up or shutting down)")
    return serving


def get_clip(request: Request) -> ClipService:
    clip: ClipService | None = getattr(request.app.state, "clip", None)
    if clip is None:
        raise not_ready("the server is starting or shutting down")
    return clip


def get_jobs(request: Request) -> Jobs:
    jobs: Jobs | None = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise not_ready("the server is starting or shutting down")
    return jobs


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServingDep = Annotated[Serving, Depends(get_serving)]
ClipDep = Annotated[ClipService, Depends(get_clip)]
JobsDep = Annotated[Jobs, Depends(get_jobs)]
