"""``GET /``: the page that shows the model drawing (static files in ``app/static``, no build step, no
CDN), and ``GET /schedule``: the weights' noise schedule, which the page draws and uses for the
forward process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from app.deps import ServingDep
from app.errors import error_responses
from app.schemas import ScheduleOut

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


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
    ``model`` (default: the default model)."""
    s = serving.model(model).runtime.denoiser.schedule
    return ScheduleOut(
        name=s.name,
        T=s.T,
        alpha_bar=[float(v) for v in s.alpha_bar],
        log_snr=[float(v) for v in s.log_snr()],
        sigma=[float(v) for v in s.noise_level()],
    )
