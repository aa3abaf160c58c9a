"""The service on Ray Serve: this FastAPI app, unchanged, in every replica, each with its own engine
on its own device.

    serve run deploy/ray/serve-cpu.yaml    # 2 CPU replicas, 1 thread each, on 127.0.0.1:8000
    serve run deploy/ray/serve.yaml        # one replica per GPU, autoscaled on ongoing requests

Ray's HTTP proxy routes each request to a replica; the replica runs the app of ``app.main.create_app``
(lifespan, engine, routes and middleware as in ``python -m app``) with its settings from the
``FASHION_*`` environment (the config's ``runtime_env``) and its Ray replica ID as ``replica``, which
every response names in ``X-Replica``. The engine's metrics also go to Ray's metrics agent, tagged
with the deployment and replica (``ray.serve.metrics``), so Prometheus, pointed at Ray's service
discovery file, sees every replica; ``GET /metrics`` through the proxy shows only the replica it
lands on. Ray replaces a replica whose health check fails or whose process dies.

Both configs set ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=app.ray.proxy:middlewares`` for Serve's
controller, whose environment the proxies inherit, so the proxy ends a dead replica's requests in the
service's error shape (``app.ray.proxy``). Only this module
and that one import Ray or run in it (the ``ray`` extra); ``python -m app`` never does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from app.generation.jobs import Job
from app.main import create_app
from app.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, STEP_BUCKETS, EngineMetrics, Evaluation, Metrics
from app.settings import Settings


class RayEngineMetrics(EngineMetrics):
    """The engine's Prometheus metrics, and the same events through Ray's metrics export under the
    same names (Ray prefixes ``ray_``), with Serve's deployment, replica and application tags."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(metrics)
        by_model = ("model",)
        self.tick_rows = Histogram(
            "fashion_tick_rows", "rows in one network evaluation", list(BATCH_BUCKETS), tag_keys=by_model
        )
        self.tick_jobs = Histogram(
            "fashion_tick_jobs", "jobs that shared one network evaluation", list(BATCH_BUCKETS), tag_keys=by_model
        )
        self.tick_duration = Histogram("fashion_tick_duration_seconds", "wall time of one tick", list(STEP_BUCKETS))
        self.queue_wait = Histogram(
            "fashion_queue_wait_seconds", "from a job's submission to its admission", list(LATENCY_BUCKETS)
        )
        self.time_to_first_step = Histogram(
            "fashion_time_to_first_step_seconds", "from a job's submission to its first step", list(LATENCY_BUCKETS)
        )
        self.queue_depth = Gauge("fashion_queue_depth", "jobs waiting for room in the row budget")
        self.jobs_active = Gauge("fashion_jobs_active", "jobs admitted and stepping on the device now")
        self.steps = Counter("fashion_sampler_steps_total", "sampler steps taken", tag_keys=by_model)
        # Ray annotates tag_keys as Tuple[str], a 1-tuple; any number of keys works.
        two_tags: Any = ("sampler", "model")
        self.images = Counter("fashion_images_generated_total", "images sampled", tag_keys=two_tags)
        self.rejected_jobs = Counter("fashion_jobs_rejected_total", "jobs refused at once", tag_keys=("reason",))
        self.cancelled_jobs = Counter(
            "fashion_jobs_cancelled_total", "jobs stopped because their client went away", tag_keys=("stage",)
        )
        self.failed_jobs = Counter("fashion_jobs_failed_total", "jobs that ended in an error", tag_keys=("reason",))

    def tick(self, evaluations: Sequence[Evaluation], seconds: float) -> None:
        super().tick(evaluations, seconds)
        for e in evaluations:
            tags = {"model": e.model}
            self.tick_rows.observe(e.rows, tags=tags)
            self.tick_jobs.observe(e.jobs, tags=tags)
            self.steps.inc(e.jobs, tags=tags)
        self.tick_duration.observe(seconds)

    def depth(self, queued: int, active: int) -> None:
        super().depth(queued, active)
        self.queue_depth.set(queued)
        self.jobs_active.set(active)

    def admitted(self, waited_s: float) -> None:
        super().admitted(waited_s)
        self.queue_wait.observe(waited_s)

    def first_step(self, seconds: float) -> None:
        super().first_step(seconds)
        self.time_to_first_step.observe(seconds)

    def rejected(self, reason: str) -> None:
        super().rejected(reason)
        self.rejected_jobs.inc(tags={"reason": reason})

    def done(self, job: Job) -> None:
        super().done(job)
        self.images.inc(job.spec.n, tags={"sampler": job.spec.sampler, "model": job.model})

    def cancelled(self, stage: str) -> None:
        super().cancelled(stage)
        self.cancelled_jobs.inc(tags={"stage": stage})

    def failed(self, error: BaseException) -> None:
        super().failed(error)
        self.failed_jobs.inc(tags={"reason": type(error).__name__})


# The config files set the replica counts, resources and environment; these are the defaults beneath them.
@serve.deployment(
    name="fashion",
    # Above the engine's own queue (FASHION_QUEUE_SIZE, 64) plus what one tick runs, so the app's 429 with
    # Retry-After answers overload; past that, Ray's proxy refuses with 503 rather than queueing unbounded.
    max_ongoing_requests=96,
    max_queued_requests=32,
    health_check_period_s=5,
    health_check_timeout_s=10,
    # Like FASHION_DRAIN_SECONDS for `python -m app`: a replica being stopped finishes its requests first.
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class FashionDiffusion:
    """One replica. ``settings`` (``FashionDiffusion.bind(weights=...)``) override the ``FASHION_*`` environment."""

    def __init__(self, **settings: Any) -> None:
        replica = serve.get_replica_context().replica_tag
        self.settings = Settings(**{"replica": replica, **settings})
        self.fastapi: FastAPI | None = None  # (``app`` is Serve's own attribute on this class)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve on the replica after ``__init__``; Serve then runs the app's lifespan."""
        self.fastapi = create_app(self.settings, engine_metrics=RayEngineMetrics)
        return self.fastapi

    def check_health(self) -> None:
        """Ray's periodic health check: a replica whose engine has stopped is replaced."""
        serving = self.fastapi.state.serving if self.fastapi is not None else None
        if serving is None or not serving.engine.running:
            raise RuntimeError(f"replica {self.settings.replica}: the engine is not running")


deployment = FashionDiffusion.bind()  # type: ignore[attr-defined]  # serve.deployment returns a Deployment
