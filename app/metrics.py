"""Prometheus metrics, one ``CollectorRegistry`` per app so tests can build several apps.

Names follow the Prometheus conventions: a ``fashion_`` namespace, base units
(seconds), ``_total`` on counters, ``_info`` for the constant model description.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

NAMESPACE = "fashion"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CLIP_OUTCOMES = ("ok", "invalid", "too_large", "unavailable", "overloaded", "error")
CLIP_USES = ("score", "rerank")
CLIP_STATES = ("loading", "ready", "unavailable")
RERANK_METHODS = ("clip", "classifier")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")  # app.jobs.schemas.JobState
WEBHOOK_OUTCOMES = ("delivered", "retry", "gave_up")


class Metrics:
    """Every metric the service exports, registered in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._http_metrics()
        self._service_metrics()
        self._clip_metrics()
        self._job_metrics()
        # Known label values start at zero, so rate() and alerts see the series before the first event.
        for outcome in CLIP_OUTCOMES:
            self.clip_requests.labels(outcome)
        for use in CLIP_USES:
            self.clip_images.labels(use)
            self.clip_duration.labels(use)
        for method in RERANK_METHODS:
            self.rerank.labels(method)
            self.rerank_candidates.labels(method)
        for state in JOB_STATES:
            self.jobs_by_state.labels(state)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.labels(outcome)

    def _http_metrics(self) -> None:
        """Requests, recorded by the pure-ASGI middleware."""
        r, ns = self.registry, NAMESPACE
        # HTTP, recorded by the pure-ASGI middleware; route is the template, never the raw path.
        self.http_requests = Counter(
            "http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            namespace=ns,
            registry=r,
        )
        self.http_latency = Histogram(
            "http_request_duration_seconds",
            "time from the request's arrival to the end of its response (streams: the whole stream)",
            ["route", "method"],
            namespace=ns,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def _service_metrics(self) -> None:
        """What the service as a whole reports: readiness and each served model's description. The engine's own
        metrics are ``app.generation.metrics``'s table, registered here by its observer."""
        r, ns = self.registry, NAMESPACE
        self.model = Info(
            "model", "each served model: its weights, kind, device and precision", ["name"], namespace=ns, registry=r
        )
        self.ready = Gauge("ready", "1 when the weights are loaded and warm", namespace=ns, registry=r)

    def _clip_metrics(self) -> None:
        """CLIP scoring (POST /clip/score, rerank by clip) and reranking."""
        r, ns = self.registry, NAMESPACE
        # CLIP scoring (POST /clip/score, rerank by clip) and reranking.
        self.clip_requests = Counter(
            "clip_requests",
            "POST /clip/score requests by outcome (bodies refused by size before routing count only as HTTP 413s)",
            ["outcome"],
            namespace=ns,
            registry=r,
        )
        self.clip_images = Counter(
            "clip_images_scored", "images CLIP embedded and scored, by use", ["use"], namespace=ns, registry=r
        )
        self.clip_duration = Histogram(
            "clip_scoring_duration_seconds",
            "wall time of one CLIP scoring call on its worker thread (decoding included), by use",
            ["use"],
            namespace=ns,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.clip_status = Enum(
            "clip_status", "state of the CLIP model", states=list(CLIP_STATES), namespace=ns, registry=r
        )
        self.clip_model = Info("clip_model", "the CLIP model configured", namespace=ns, registry=r)
        self.rerank = Counter(
            "rerank_requests", "generations reranked, by method", ["method"], namespace=ns, registry=r
        )
        self.rerank_candidates = Counter(
            "rerank_candidates",
            "candidate images sampled for reranking, by method",
            ["method"],
            namespace=ns,
            registry=r,
        )

    def _job_metrics(self) -> None:
        """Jobs that outlive a request (``app.jobs``), fed by its runner and webhook sender."""
        r, ns = self.registry, NAMESPACE
        self.jobs_by_state = Gauge(
            "long_jobs", "jobs of POST /jobs in this replica's job store, by state", ["state"], namespace=ns, registry=r
        )
        self.job_images = Counter(
            "long_job_images",
            "images that jobs of POST /jobs committed to disk, by model",
            ["model"],
            namespace=ns,
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "webhook_deliveries",
            "webhook delivery attempts by outcome: delivered (2xx), retry (failed, tried again later), gave_up "
            "(the last attempt failed)",
            ["outcome"],
            namespace=ns,
            registry=r,
        )

    def add_model(self, name: str, info: dict[str, str]) -> None:
        """A served model: its info, and its series at zero, so rate() sees them before the first job."""
        self.model.labels(name).info(info)
        self.job_images.labels(name)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus text format (scrape it; parse it with prometheus_client's parser)."""
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
