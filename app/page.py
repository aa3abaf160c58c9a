"""``GET /``: the page that shows the model drawing (static files in ``app/static``, no build step, no
CDN; the page reads ``GET /models`` and ``GET /schedule`` of the generation routes, and its edit panel and
interpolation strip stream ``POST /edits/stream`` and ``POST /interpolations/stream``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")
