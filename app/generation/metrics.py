"""The engine's metrics: one table (``ENGINE``) of what the engine reports, the ``Observer`` it reports to,
and ``EngineMetrics``, which turns each report into updates of the table's metrics in the app's Prometheus
registry. ``app.ray.deployment.RayEngineMetrics`` builds Ray's export from the same table, so a metric is
defined once, whichever exporter shows it.

Names follow the Prometheus conventions: the ``fashion_`` namespace, base units, ``_total`` on counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from prometheus_client import Counter, Gauge, Histogram

from app.generation.jobs import Job
from app.metrics import LATENCY_BUCKETS, NAMESPACE, Metrics
from model.samplers import SAMPLERS

STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Spec:
    """One engine metric: its kind, name (without the namespace; counters gain ``_total``), help and labels."""

    kind: Literal["counter", "gauge", "histogram"]
    name: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


ENGINE: tuple[Spec, ...] = (
    Spec("gauge", "queue_depth", "jobs waiting for room in the row budget"),
    Spec("gauge", "jobs_active", "jobs admitted and stepping on the device now"),
    Spec(
        "histogram",
        "tick_rows",
        "rows in one network evaluation (images, plus a null-class row per guided image), by model",
        ("model",),
        BATCH_BUCKETS,
    ),
    Spec("histogram", "tick_jobs", "jobs that shared one network evaluation, by model", ("model",), BATCH_BUCKETS),
    Spec(
        "histogram",
        "tick_duration_seconds",
        "wall time of one tick: every model's network evaluation and every job's sampler step",
        buckets=STEP_BUCKETS,
    ),
    Spec("histogram", "queue_wait_seconds", "time from a job's submission to its admission", buckets=LATENCY_BUCKETS),
    Spec(
        "histogram",
        "time_to_first_step_seconds",
        "time from a job's submission to the end of its first step",
        buckets=LATENCY_BUCKETS,
    ),
    Spec(
        "counter",
        "images_generated",
        "images sampled (rerank candidates included), by sampler and model",
        ("sampler", "model"),
    ),
    Spec("counter", "sampler_steps", "sampler steps taken, one per active job per tick, by model", ("model",)),
    Spec("counter", "jobs_cancelled", "jobs stopped because their client went away", ("stage",)),
    Spec("counter", "jobs_rejected", "jobs refused at once", ("reason",)),
    Spec("counter", "jobs_failed", "jobs that ended in an error", ("reason",)),
    Spec(
        "counter",
        "background_rows",
        "rows of background work (long jobs' images) evaluated in rows that interactive jobs left idle, by model",
        ("model",),
    ),
)


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


def prometheus(spec: Spec, metrics: Metrics) -> Any:
    """The Prometheus metric of a spec, in the app's registry."""
    common: dict[str, Any] = {"namespace": NAMESPACE, "registry": metrics.registry, "labelnames": spec.labels}
    if spec.kind == "counter":
        return Counter(spec.name, spec.help, **common)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, **common)
    return Histogram(spec.name, spec.help, buckets=spec.buckets, **common)


class EngineMetrics:
    """The engine's observer (``Observer``): each report becomes ``record`` calls on the table's metrics, in
    the app's Prometheus registry. Called on the output thread."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self.specs = {spec.name: spec for spec in ENGINE}
        self.prom = {spec.name: prometheus(spec, metrics) for spec in ENGINE}
        # Known label values start at zero, so rate() and alerts see the series before the first event.
        for stage in ("queued", "running"):
            self.prom["jobs_cancelled"].labels(stage)
        self.prom["jobs_rejected"].labels("queue_full")

    def record(self, name: str, value: float, **labels: str) -> None:
        """The one place a report updates a metric: a counter grows by ``value``, a gauge is set to it, a
        histogram observes it."""
        metric = self.prom[name]
        child = metric.labels(**labels) if labels else metric
        kind = self.specs[name].kind
        if kind == "counter":
            child.inc(value)
        elif kind == "gauge":
            child.set(value)
        else:
            child.observe(value)

    def add_model(self, name: str) -> None:
        """A served model's series at zero."""
        self.prom["sampler_steps"].labels(name)
        self.prom["background_rows"].labels(name)
        for sampler in SAMPLERS:
            self.prom["images_generated"].labels(sampler, name)

    def tick(self, evaluations: Sequence[Evaluation], seconds: float) -> None:
        for e in evaluations:
            self.record("tick_rows", e.rows, model=e.model)
            self.record("tick_jobs", e.jobs, model=e.model)
            self.record("sampler_steps", e.jobs, model=e.model)
            if e.background_rows:
                self.record("background_rows", e.background_rows, model=e.model)
        self.record("tick_duration_seconds", seconds)

    def depth(self, queued: int, active: int) -> None:
        self.record("queue_depth", queued)
        self.record("jobs_active", active)

    def admitted(self, waited_s: float) -> None:
        self.record("queue_wait_seconds", waited_s)

    def first_step(self, seconds: float) -> None:
        self.record("time_to_first_step_seconds", seconds)

    def rejected(self, reason: str) -> None:
        self.record("jobs_rejected", 1, reason=reason)

    def done(self, job: Job) -> None:
        self.record("images_generated", job.spec.n, sampler=job.spec.sampler, model=job.model)

    def cancelled(self, stage: str) -> None:
        self.record("jobs_cancelled", 1, stage=stage)

    def failed(self, error: BaseException) -> None:
        self.record("jobs_failed", 1, reason=type(error).__name__)
