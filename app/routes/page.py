"""``GET /``: the page that shows the model drawing (static files in ``app/static``, no build step, no
CDN), and ``GET /schedule``: the weights' noise schedule, which the page draws and uses for the
forward process."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.deps import ServingDep
from app.schemas import ScheduleOut

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/schedule", response_model=ScheduleOut, tags=["model"], summary="The noise schedule of the weights")
async def schedule(serving: ServingDep) -> ScheduleOut:
    """alpha_bar_t (the signal fraction of x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps), the log
    signal-to-noise ratio and the noise level sigma_t, for every timestep t = 0..T-1, from the weights card."""
    s = serving.engine.runtimes[serving.name].denoiser.schedule
    return ScheduleOut(
        name=s.name,
        T=s.T,
        alpha_bar=[float(v) for v in s.alpha_bar],
        log_snr=[float(v) for v in s.log_snr()],
        sigma=[float(v) for v in s.noise_level()],
    )
