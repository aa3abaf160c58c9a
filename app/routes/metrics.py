"""``GET /metrics``: Prometheus exposition of this app's own registry."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus text format (scrape it; parse it with prometheus_client's parser)."""
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
