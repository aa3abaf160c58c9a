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

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from app.generation.metrics import ENGINE, EngineMetrics, Spec
from app.main import create_app
from app.metrics import NAMESPACE, Metrics
from app.settings import Settings


class RayEngineMetrics(EngineMetrics):
    """The engine's Prometheus metrics, and the same reports through Ray's metrics export: one Ray metric per
    entry of the engine's table (``app.generation.metrics.ENGINE``) under the same name (Ray prefixes
    ``ray_``), with Serve's deployment, replica and application tags."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(metrics)
        self.ray = {spec.name: ray_metric(spec) for spec in ENGINE}

    def record(self, name: str, value: float, **labels: str) -> None:
        super().record(name, value, **labels)
        metric, kind = self.ray[name], self.specs[name].kind
        tags = labels or None
        if kind == "counter":
            metric.inc(value, tags=tags)
        elif kind == "gauge":
            metric.set(value, tags=tags)
        else:
            metric.observe(value, tags=tags)


def ray_metric(spec: Spec) -> Any:
    """Ray's metric of a spec of the engine's table, named as Prometheus names it (``fashion_``, ``_total``)."""
    name = f"{NAMESPACE}_{spec.name}" + ("_total" if spec.kind == "counter" else "")
    tags: Any = spec.labels  # Ray annotates tag_keys as Tuple[str], a 1-tuple; any number of keys works
    if spec.kind == "counter":
        return Counter(name, spec.help, tag_keys=tags)
    if spec.kind == "gauge":
        return Gauge(name, spec.help, tag_keys=tags)
    return Histogram(name, spec.help, list(spec.buckets), tag_keys=tags)


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
