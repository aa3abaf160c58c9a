"""The FastAPI application: ``create_app(settings)``, and ``app`` for ``uvicorn app.main:app``.

Nothing heavy happens at import: the lifespan loads every listed model (safetensors + JSON
card, no pickle; ``app.generation.models``) onto the device, starts the engine, runs a warm-up batch
per model, and only then reports ready. Weights that are missing or corrupt, or two models
with one name, stop startup with a message naming the file and the problem, and uvicorn
exits non-zero.

The rerank scorers come next: the classifier (small, loaded before ready; missing weights only
disable rerank by classifier) and CLIP, which loads on a background thread after the service
is ready (``app.clip.service``); /readyz reports both beside the main model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import version

import anyio
import torch
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app import health, metrics, page
from app.clip import routes as clip_routes
from app.clip.service import ClipScorer, ClipService
from app.edits import routes as edit_routes
from app.edits.routes import EDIT_PATHS
from app.edits.schemas import edit_models
from app.errors import install_handlers
from app.generation import routes as generation_routes
from app.generation.device import resolve_device
from app.generation.engine import Engine
from app.generation.jobs import JobSpec
from app.generation.metrics import EngineMetrics
from app.generation.models import ServedModel, load_models
from app.generation.schemas import Limits, allowed_values, request_models
from app.generation.scorers import Scorer, load_classifier_scorer
from app.generation.serving import Serving
from app.jobs import routes as job_routes
from app.jobs.schemas import job_allowed, job_request_model
from app.jobs.serving import Jobs
from app.metrics import Metrics
from app.middleware import ApiKeyMiddleware, BodyLimitMiddleware, MetricsMiddleware, ReplicaMiddleware
from app.openai import routes as openai_routes
from app.settings import Settings
from app.threads import on_fresh_thread
from model.io import WeightsError
from model.samplers import sampler_named

log = logging.getLogger("app")


def warmup_job(model: ServedModel) -> JobSpec:
    """One image, two steps, with the model's default sampler and guidance (ddim for ddpm's 1000 steps),
    autoguided where the model has a guide, so its guide network is warm too (the main network runs
    either way)."""
    d = model.defaults
    sampler = "ddim" if sampler_named(d.sampler).all_steps else d.sampler
    return JobSpec(0, (0,), sampler, min(2, model.T), d.guidance, model.name, autoguide=model.guide is not None)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    if settings.threads:  # before any torch work: every thread's OpenMP team takes it from here
        torch.set_num_threads(settings.threads)
    try:
        device = resolve_device(settings.device)
        clip_service = ClipService(settings, metrics, str(device))  # "loading" until started below
        served = await on_fresh_thread(load_models, settings, device)
    except (WeightsError, RuntimeError) as err:
        log.error("cannot start: %s", err)
        raise
    observer: EngineMetrics = app.state.observer
    runtimes = {m.name: m.runtime for m in served}
    engine = Engine(
        runtimes,
        observer,
        queue_size=settings.queue_size,
        max_rows=settings.max_rows,
        policy=settings.scheduler,
        tick_rows=settings.tick_rows,
        background_rows=settings.background_rows,
    )
    engine.start()
    jobs: Jobs | None = None
    try:
        if settings.warmup:
            await asyncio.gather(*(engine.run(warmup_job(m), record=False) for m in served))
        classifier = await on_fresh_thread(load_classifier_scorer, settings.classifier_weights, device)
        scorers: dict[str, Scorer] = {"clip": ClipScorer(clip_service), "classifier": classifier}
        for m in served:
            metrics.add_model(m.name, m.describe())
            observer.add_model(m.name)
        metrics.ready.set(1)
        app.state.clip = clip_service
        app.state.serving = Serving(
            engine, {m.name: m for m in served}, str(device), metrics, scorers, replica=settings.replica
        )
        jobs = app.state.jobs = Jobs(settings, app.state.serving, metrics)
        await jobs.start()  # after the engine; resumes the jobs a stop left running or queued
        described = ", ".join(f"{m.name} ({m.kind}, {m.runtime.parameters} parameters)" for m in served)
        log.info("ready on %s: %s", device, described)
        clip_service.start()  # after ready: CLIP never delays the service
        yield
    finally:
        app.state.jobs = None
        if jobs is not None:  # before the engine: the running job stays running in SQLite
            await jobs.stop()
        app.state.serving = None
        app.state.clip = None
        clip_service.close()
        metrics.ready.set(0)
        await anyio.to_thread.run_sync(engine.stop)


def begin_drain(app: FastAPI) -> None:
    """SIGTERM: refuse new generations (503, /readyz too) and give running and queued jobs, streams
    included, ``drain_seconds`` to finish; what is left then ends in 503 or a stream ``error`` event.
    The server (``app.__main__``) keeps its connections open meanwhile and exits once they are done."""
    serving: Serving | None = getattr(app.state, "serving", None)
    settings: Settings = app.state.settings
    app.state.metrics.ready.set(0)
    if serving is not None:
        serving.engine.drain(settings.drain_seconds)


def create_app(
    settings: Settings | None = None, engine_metrics: Callable[[Metrics], EngineMetrics] = EngineMetrics
) -> FastAPI:
    """A new app with its own settings, metrics registry and (once started) engine. ``engine_metrics``
    builds the engine's observer on the app's metrics (``app.ray.deployment`` adds Ray's metrics export)."""
    settings = settings or Settings()
    limits = Limits(settings.max_images, settings.max_steps, settings.max_guidance, settings.max_candidates)
    generate_model, stream_model = request_models(limits)
    edit_model, interpolate_model = edit_models(limits)
    job_model = job_request_model(limits, settings.job_max_images)
    app = FastAPI(
        title="Fashion-MNIST diffusion",
        version=version("fashion-diffusion"),
        description="Class-conditional 28x28 Fashion-MNIST images from a diffusion model, batched on one device.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.observer = engine_metrics(app.state.metrics)  # the engine's metrics, registered once per app
    app.state.serving = None
    app.state.clip = None
    app.state.jobs = None
    install_handlers(app, allowed_values(stream_model), {"/jobs": job_allowed(job_model)})
    routers = [  # the HTTP shell's, then one per feature
        page.router,
        health.router,
        metrics.router,
        generation_routes.build_router(generate_model, stream_model),
        clip_routes.build_router(settings),
        edit_routes.build_router(edit_model, interpolate_model, settings),
        openai_routes.build_router(limits),
        job_routes.build_router(job_model),
    ]
    for router in routers:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    paths = {str(getattr(route, "path", "")) for router in routers for route in router.routes}
    # add_middleware puts each one outside the previous: body limit innermost, metrics outermost.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        path_limits={
            "/clip/score": settings.clip_max_body_bytes,
            **dict.fromkeys((*EDIT_PATHS, *openai_routes.UPLOAD_PATHS), settings.edit_max_body_bytes),
        },
    )
    app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value() if settings.api_key else None)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, paths=paths)
    app.add_middleware(ReplicaMiddleware, replica=settings.replica)
    return app


app = create_app()
