"""From a validated request to its answer, in one pass: the model and its defaults, seeds, the engine
job, waiting with disconnect handling, one mapping of engine and scorer errors to API errors, and the
response.

Routes call ``generate`` (``POST /generate``), or ``app.generation.streaming``'s ``open_stream`` and
``stream_events`` (the SSE routes, built on the same steps), and only choose the representation.
Everything here runs on the event loop; the device work happens on the engine's threads.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request

from app.errors import ApiError, not_ready
from app.fields import SEED_MAX
from app.generation import rerank
from app.generation.engine import Engine
from app.generation.jobs import (
    EngineClosed,
    Job,
    JobCancelled,
    JobResult,
    JobSpec,
    JobTooLarge,
    QueueFull,
)
from app.generation.models import ServedModel
from app.generation.schemas import (
    GenerateRequestBase,
    GenerateResponse,
    ImageOut,
    Params,
    RerankOut,
    Timings,
)
from app.generation.scorers import Scorer
from app.metrics import Metrics
from app.settings import Settings
from model import images
from model.data import CLASS_NAMES
from model.io import check_distilled_guidance
from model.samplers import sampler_named


@dataclass
class Serving:
    """Everything the lifespan loaded; ``app.state.serving`` is None until every model is warm."""

    engine: Engine
    models: dict[str, ServedModel]  # by name, in the settings' order: the first is the default
    device: str
    metrics: Metrics
    scorers: dict[str, Scorer] = field(default_factory=dict)  # rerank methods: "clip", "classifier"
    replica: str = ""  # this process's name (Settings.replica)

    @property
    def default(self) -> ServedModel:
        """The model of requests that name none."""
        return next(iter(self.models.values()))

    def model(self, name: str | None) -> ServedModel:
        """The model a request names (None: the default); 404 naming the served ones for any other."""
        if name is None:
            return self.default
        try:
            return self.models[name]
        except KeyError:
            raise ApiError(
                404,
                f"model: this server has no model {name!r}; allowed: {', '.join(self.models)} (GET /models)",
                code="model_not_found",
                param="model",
            ) from None


@dataclass(frozen=True)
class Generated:
    """A finished /generate: what was asked, what came back, and (with rerank) the chosen order."""

    model: str
    params: Params
    result: JobResult
    ranked: rerank.Ranked | None
    accepted: float  # time.monotonic() when the request was accepted

    @property
    def chosen(self) -> Any:
        """uint8 (n, 28, 28): the images the client gets, best first with rerank."""
        return self.result.images if self.ranked is None else self.result.images[self.ranked.order]

    @property
    def seeds(self) -> list[int]:
        order = range(self.params.n) if self.ranked is None else [int(i) for i in self.ranked.order]
        return [self.params.seed + i for i in order]


# --- errors: the one mapping -----------------------------------------------------------------


def api_error(err: BaseException) -> ApiError:
    """The API error for anything the engine (or a job) can raise."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, QueueFull):
        return ApiError(429, str(err), code="queue_full", headers={"Retry-After": str(err.retry_after)})
    if isinstance(err, JobTooLarge):
        return ApiError(422, str(err), code="too_many_rows", param="n")
    if isinstance(err, EngineClosed):
        return not_ready(str(err))
    if isinstance(err, JobCancelled):
        return ApiError(499, str(err), code="client_closed")
    return ApiError(500, f"sampling failed: {type(err).__name__}: {err}", code="sampling_failed")


async def until_disconnected(request: Request) -> None:
    """Return when the client goes away (the one disconnect watcher)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- request -> job --------------------------------------------------------------------------


def _steps(body: GenerateRequestBase, sampler: str, default: int, T: int, settings: Settings) -> int:
    """The steps the sampler's registry entry takes for this request, within the schedule and at most
    ``max_steps`` network evaluations; a 422 naming the sampler where the request left the steps to it."""
    entry = sampler_named(sampler)
    param = "steps" if body.steps is not None else "sampler"
    try:
        steps = entry.steps_for(body.steps, default, T)
        entry.check_steps(steps, T, settings.max_steps)
    except ValueError as err:
        raise ApiError(422, f"{param}: {err}", code="steps_for_sampler", param=param) from err
    return steps


def resolve(
    body: GenerateRequestBase, serving: Serving, settings: Settings, candidates: int | None = None
) -> tuple[JobSpec, Params]:
    """Pick the model and fill in its defaults and the seeds; the checks that need the loaded models
    (which exist, ddpm's T, a student's distilled guidance) happen here.

    With ``candidates`` (rerank) the job samples that many images, seeds ``seed .. seed + candidates - 1``;
    ``params.n`` stays the number the client gets back."""
    model = serving.model(body.model)
    defaults = model.defaults
    sampler = body.sampler or defaults.sampler
    guidance = body.guidance if body.guidance is not None else defaults.guidance
    try:
        check_distilled_guidance(model.distilled_guidance, guidance, model.name)
    except ValueError as err:
        raise ApiError(
            422,
            f"guidance: {err} (its card's distillation section), so it takes no classifier-free guidance on top; "
            "allowed: 1.0 or omit guidance",
            code="guidance_distilled",
            param="guidance",
        ) from err
    method = body.guidance_method or defaults.guidance_method
    if method == "autoguidance" and model.guide is None:
        raise ApiError(
            422,
            f"guidance_method: {model.name} has no guide network (its card names none); allowed: classifier-free",
            code="no_guide",
            param="guidance_method",
        )
    steps = _steps(body, sampler, defaults.steps, model.T, settings)
    base = body.seed if body.seed is not None else secrets.randbelow(SEED_MAX + 1)
    seeds = tuple(base + i for i in range(candidates or body.n))
    spec = JobSpec(
        label=body.class_,
        seeds=seeds,
        sampler=sampler,
        steps=steps,
        guidance=float(guidance),
        model=model.name,
        autoguide=method == "autoguidance",
        sigma_min=defaults.sigma_min if sampler_named(sampler).takes_sigma_min else None,
    )
    params = Params.model_validate(
        {
            "class": body.class_,
            "class_name": CLASS_NAMES[body.class_],
            "n": body.n,
            "sampler": sampler,
            "steps": steps,
            "guidance": float(guidance),
            "guidance_interval": defaults.guidance_interval,
            "guidance_method": method,
            "guide": model.guide if method == "autoguidance" else None,
            "sigma_min": spec.sigma_min,
            "seed": base,
        }
    )
    return spec, params


async def submit(serving: Serving, spec: JobSpec, **kwargs: Any) -> Job:
    """The engine's job, or the API error for its refusal, raised once the refusal is counted."""
    try:
        return serving.engine.submit(spec, **kwargs)
    except (QueueFull, JobTooLarge, EngineClosed) as err:
        await serving.engine.reported()  # the output thread counts refusals; a client may read /metrics next
        raise api_error(err) from err


async def wait(job: Job, request: Request, serving: Serving) -> JobResult:
    """The job's result; cancels the job if the client goes away or this task is cancelled."""
    gone = asyncio.ensure_future(until_disconnected(request))
    waiters: list[asyncio.Future[Any]] = [job.future, gone]
    try:
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not job.future.done():
            serving.engine.cancel(job)
    if job.future not in done:
        raise ApiError(499, "the client closed the request", code="client_closed")
    try:
        return job.future.result()
    except Exception as err:
        raise api_error(err) from err


async def rank_candidates(
    plan: rerank.RerankPlan | None, result: JobResult, label: int, serving: Serving
) -> rerank.Ranked | None:
    if plan is None:
        return None
    return await rerank.rank(plan, result, label, serving.metrics)


async def generate(body: GenerateRequestBase, request: Request, serving: Serving, settings: Settings) -> Generated:
    """``POST /generate`` up to the choice of representation."""
    accepted = time.monotonic()
    plan = rerank.plan(body.rerank, body.n, serving.scorers, settings)
    spec, params = resolve(body, serving, settings, candidates=plan.candidates if plan else None)
    job = await submit(serving, spec)
    result = await wait(job, request, serving)
    ranked = await rank_candidates(plan, result, spec.label, serving)
    return Generated(job.model, params, result, ranked, accepted)


async def grid_png(generated: Generated) -> bytes:
    """The answer's images as one PNG grid (the per-image PNGs are never encoded)."""
    return await anyio.to_thread.run_sync(images.grid_png, generated.chosen)


async def response_body(serving: Serving, generated: Generated) -> GenerateResponse:
    """The answer to /generate (and the stream's ``done``); with rerank, the best n candidates, best first.
    Only the images it returns are encoded, on a worker thread."""
    params, result, ranked = generated.params, generated.result, generated.ranked
    chosen = range(len(result.images)) if ranked is None else [int(i) for i in ranked.order]
    pngs = await anyio.to_thread.run_sync(lambda: [images.png_bytes(result.images[i]) for i in chosen])
    out = [
        ImageOut(
            index=rank,
            seed=params.seed + i,
            png=base64.b64encode(png).decode("ascii"),
            score=None if ranked is None else float(ranked.scores[i]),
        )
        for rank, (i, png) in enumerate(zip(chosen, pngs, strict=True))
    ]
    rerank_out = None
    if ranked is not None:
        rerank_out = RerankOut(
            by=ranked.by,
            candidates=len(ranked.scores),
            measure=ranked.measure,
            scores=[float(s) for s in ranked.scores],
            scoring_ms=round(ranked.scoring_s * 1e3, 2),
        )
    timings = Timings(
        queue_ms=round(result.queued_s * 1e3, 2),
        sampling_ms=round(result.sampling_s * 1e3, 2),
        total_ms=round((time.monotonic() - generated.accepted) * 1e3, 2),
        batch_images=result.batch_images,
        batch_jobs=result.batch_jobs,
        replica=serving.replica,
    )
    return GenerateResponse(model=generated.model, params=params, images=out, timings=timings, rerank=rerank_out)


def png_headers(serving: Serving, generated: Generated) -> dict[str, str]:
    """The parameters of a PNG-grid answer, which has no JSON body to carry them."""
    params, ranked = generated.params, generated.ranked
    headers = {
        "X-Model": generated.model,
        "X-Class": str(params.class_),
        "X-Sampler": params.sampler,
        "X-Steps": str(params.steps),
        "X-Guidance": str(params.guidance),
        "X-Seed": str(params.seed),
        "X-Seeds": ",".join(str(s) for s in generated.seeds),
    }
    if ranked is not None:
        headers["X-Rerank"] = f"{ranked.by};candidates={len(ranked.scores)}"
        headers["X-Scores"] = ",".join(f"{ranked.scores[int(i)]:.6g}" for i in ranked.order)
    return headers
