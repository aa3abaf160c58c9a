"""Prometheus metrics, one ``CollectorRegistry`` per app so tests can build several apps.

Names follow the Prometheus conventions: a ``fashion_`` namespace, base units
(seconds), ``_total`` on counters, ``_info`` for the constant model description.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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

from app.generation.jobs import Job
from model.samplers import SAMPLERS

NAMESPACE = "fashion"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
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
        self._engine_metrics()
        self._clip_metrics()
        self._job_metrics()
        # Known label values start at zero, so rate() and alerts see the series before the first event.
        for stage in ("queued", "running"):
            self.jobs_cancelled.labels(stage)
        self.jobs_rejected.labels("queue_full")
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

    def _engine_metrics(self) -> None:
        """The engine's, fed by EngineMetrics on its output thread."""
        r, ns = self.registry, NAMESPACE
        # Engine: one tick is one network evaluation per model, over the rows of that model's active jobs.
        self.queue_depth = Gauge("queue_depth", "jobs waiting for room in the row budget", namespace=ns, registry=r)
        self.jobs_active = Gauge(
            "jobs_active", "jobs admitted and stepping on the device now", namespace=ns, registry=r
        )
        self.tick_rows = Histogram(
            "tick_rows",
            "rows in one network evaluation (images, plus a null-class row per guided image), by model",
            ["model"],
            namespace=ns,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.tick_jobs = Histogram(
            "tick_jobs",
            "jobs that shared one network evaluation, by model",
            ["model"],
            namespace=ns,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.tick_duration = Histogram(
            "tick_duration_seconds",
            "wall time of one tick: every model's network evaluation and every job's sampler step",
            namespace=ns,
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "queue_wait_seconds",
            "time from a job's submission to its admission",
            namespace=ns,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_step = Histogram(
            "time_to_first_step_seconds",
            "time from a job's submission to the end of its first step",
            namespace=ns,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "images_generated",
            "images sampled (rerank candidates included), by sampler and model",
            ["sampler", "model"],
            namespace=ns,
            registry=r,
        )
        self.steps = Counter(
            "sampler_steps",
            "sampler steps taken, one per active job per tick, by model",
            ["model"],
            namespace=ns,
            registry=r,
        )
        self.jobs_cancelled = Counter(
            "jobs_cancelled", "jobs stopped because their client went away", ["stage"], namespace=ns, registry=r
        )
        self.jobs_rejected = Counter("jobs_rejected", "jobs refused at once", ["reason"], namespace=ns, registry=r)
        self.jobs_failed = Counter("jobs_failed", "jobs that ended in an error", ["reason"], namespace=ns, registry=r)
        self.background_rows = Counter(
            "background_rows",
            "rows of background work (long jobs' images) evaluated in rows that interactive jobs left idle, by model",
            ["model"],
            namespace=ns,
            registry=r,
        )
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
        self.steps.labels(name)
        self.background_rows.labels(name)
        self.job_images.labels(name)
        for sampler in SAMPLERS:
            self.images.labels(sampler, name)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class Evaluation:
    """One model's network evaluation within a tick."""

    model: str
    rows: int  # images, plus a null-class row per guided image
    jobs: int  # jobs that shared it
    background_rows: int = 0  # of ``rows``, those of background work (long jobs' images) in idle rows


class Observer(Protocol):
    """What the engine reports for metrics, called on its output thread only (``app.generation.output``);
    ``EngineMetrics`` is the Prometheus one."""

    def tick(self, evaluations: Sequence[Evaluation], seconds: float) -> None:
        """A tick: one evaluation per model with active jobs, ``seconds`` of wall time for all of them."""

    def depth(self, queued: int, active: int) -> None: ...

    def admitted(self, waited_s: float) -> None: ...

    def first_step(self, seconds: float) -> None: ...

    def rejected(self, reason: str) -> None: ...

    def done(self, job: Job) -> None: ...

    def cancelled(self, stage: str) -> None: ...

    def failed(self, error: BaseException) -> None: ...


class EngineMetrics:
    """The engine's observer (``Observer``), on Prometheus metrics; called on the output thread."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def tick(self, evaluations: Sequence[Evaluation], seconds: float) -> None:
        for e in evaluations:
            self.m.tick_rows.labels(e.model).observe(e.rows)
            self.m.tick_jobs.labels(e.model).observe(e.jobs)
            self.m.steps.labels(e.model).inc(e.jobs)
            if e.background_rows:
                self.m.background_rows.labels(e.model).inc(e.background_rows)
        self.m.tick_duration.observe(seconds)

    def depth(self, queued: int, active: int) -> None:
        self.m.queue_depth.set(queued)
        self.m.jobs_active.set(active)

    def admitted(self, waited_s: float) -> None:
        self.m.queue_wait.observe(waited_s)

    def first_step(self, seconds: float) -> None:
        self.m.time_to_first_step.observe(seconds)

    def rejected(self, reason: str) -> None:
        self.m.jobs_rejected.labels(reason).inc()

    def done(self, job: Job) -> None:
        self.m.images.labels(job.spec.sampler, job.model).inc(job.spec.n)

    def cancelled(self, stage: str) -> None:
        self.m.jobs_cancelled.labels(stage).inc()

    def failed(self, error: BaseException) -> None:
        self.m.jobs_failed.labels(type(error).__name__).inc()


router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus text format (scrape it; parse it with prometheus_client's parser)."""
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
