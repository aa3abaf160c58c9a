"""From a validated edit or interpolation request to its answer: the inputs mapped to the model, the
generation's defaults and seeds (``app.generation.serving.resolve``), the ``Edit`` each engine job starts
from, waiting, and the answer with the input and the mask as applied. The device work is the engine's."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass, replace
from typing import Any

import anyio
import numpy as np
import torch
from fastapi import Request
from PIL import Image

from app.edits.inputs import EditInput
from app.edits.schemas import VARIATION_STRENGTH, EditRequestBase, EditResponse, InterpolateRequestBase
from app.errors import ApiError
from app.generation import serving as generation
from app.generation.editing import Edit, edit_evaluations, start_edit
from app.generation.jobs import JobResult, JobSpec
from app.generation.schemas import GenerateRequestBase, ImageOut, Params
from app.generation.scorers import ClassifierScorer
from app.settings import Settings
from model.editing import RePaint, seed_frames, slerp_frames
from model.images import png_bytes
from model.samplers import generators_from_seeds

DETERMINISTIC = ("ddim", "dpm++", "heun")  # an interpolation's frames must depend on their x_T alone


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def class_of(body_class: int | None, image: np.ndarray, serving: generation.Serving) -> int:
    """The class the request names, else the classifier's reading of the image."""
    if body_class is not None:
        return body_class
    scorer = serving.scorers.get("classifier")
    if not isinstance(scorer, ClassifierScorer):
        raise ApiError(
            422,
            "class: required here (this server has no classifier to read it from the image)",
            code="missing",
            param="class",
        )
    labels = await anyio.to_thread.run_sync(scorer.classify, image[None])
    return int(labels[0])


def _as_generation(body: Any, label: int, n: int, **fields: Any) -> GenerateRequestBase:
    """The generation body an edit means, for ``generation.resolve`` (the same defaults, checks and seeds)."""
    values = {
        "model": body.model,
        "class_": label,
        "n": n,
        "sampler": body.sampler,
        "steps": body.steps,
        "guidance": body.guidance,
        "guidance_method": getattr(body, "guidance_method", None),
        "seed": getattr(body, "seed", None),
        "rerank": None,
    }
    return GenerateRequestBase.model_construct(**{**values, **fields})


def _checked(spec: JobSpec, serving: generation.Serving, param: str) -> JobSpec:
    """The spec with its work counted, after a dry start of one row on the CPU: an edit the method cannot run
    (a strength that keeps no step, RePaint on another sampler) is a 422 naming ``param`` before it queues."""
    assert spec.edit is not None
    model = serving.model(spec.model)
    schedule = model.runtime.denoiser.schedule
    edit = spec.edit
    one = replace(
        edit,
        images=None if edit.images is None else edit.images[:1],
        mask=None if edit.mask is None else edit.mask[:1],
        latents=None if edit.latents is None else edit.latents[:1],
    )
    try:
        start_edit(one, spec.sampler, schedule, spec.steps, generators_from_seeds([0]), "cpu", spec.sigma_min)
        work = edit_evaluations(edit, spec.sampler, spec.steps, schedule)
    except ValueError as err:
        raise ApiError(422, f"{param}: {err}", code="invalid_edit", param=param) from err
    return replace(spec, edit=replace(edit, work=work))


@dataclass(frozen=True)
class EditPlan:
    spec: JobSpec
    params: Params
    edit: Edit
    inputs: EditInput


async def plan_edit(
    body: EditRequestBase, inputs: EditInput, serving: generation.Serving, settings: Settings
) -> EditPlan:
    """The engine job of an edit: a variation without a mask, an inpainting with one."""
    label = await class_of(body.class_, inputs.image, serving)
    spec, params = generation.resolve(_as_generation(body, label, body.n), serving, settings)
    inpaint = inputs.mask is not None
    strength = body.strength if body.strength is not None else (1.0 if inpaint else VARIATION_STRENGTH)
    repaint = None
    if body.resamplings is not None or body.jump_length is not None:
        if not inpaint:
            raise ApiError(
                422, "resamplings: RePaint's resampling needs a mask", code="invalid_edit", param="resamplings"
            )
        repaint = RePaint(body.jump_length or 10, body.resamplings or 10)
    images = np.repeat(inputs.image[None], body.n, axis=0)
    masks = None if inputs.mask is None else np.repeat(inputs.mask[None], body.n, axis=0)
    edit = Edit("inpaint" if inpaint else "variation", strength, images, masks, repaint)
    spec = _checked(replace(spec, edit=edit), serving, "resamplings" if repaint else "strength")
    assert spec.edit is not None
    return EditPlan(spec, params, spec.edit, inputs)


async def edit_response(serving: generation.Serving, plan: EditPlan, generated: generation.Generated) -> EditResponse:
    """``POST /edits``' answer: the generation's, and the input and mask as the model saw them."""
    body = await generation.response_body(serving, generated)
    mask = plan.inputs.mask
    return EditResponse(
        **body.model_dump(),
        kind=plan.edit.kind,  # type: ignore[arg-type]
        strength=float(plan.edit.strength or 1.0),
        evaluations=plan.edit.work,
        input_png=_b64(png_bytes(plan.inputs.image)),
        inverted=plan.inputs.inverted,
        mask_png=None if mask is None else _b64(png_bytes(mask.astype(np.uint8) * 255)),
    )


async def edit(
    body: EditRequestBase, inputs: EditInput, request: Request, serving: generation.Serving, settings: Settings
) -> EditResponse:
    accepted = time.monotonic()
    plan = await plan_edit(body, inputs, serving, settings)
    job = await generation.submit(serving, plan.spec)
    result = await generation.wait(job, request, serving)
    return await edit_response(serving, plan, generation.Generated(job.model, plan.params, result, None, accepted))


# --- interpolation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interpolation:
    kind: str  # "seeds" or "images"
    spec: JobSpec  # the frames' job
    params: Params
    inputs: list[np.ndarray] | None = None  # between images: each as the model saw it


def endpoints(body: InterpolateRequestBase) -> str:
    """Which kind of interpolation the body asks for: exactly two seeds or exactly two images."""
    given = [name for name in ("seeds", "images") if getattr(body, name) is not None]
    if len(given) != 1:
        raise ApiError(
            422, "seeds: give two seeds, or two images, to interpolate between", code="endpoints", param="seeds"
        )
    count = len(getattr(body, given[0]))
    if count != 2:
        raise ApiError(
            422, f"{given[0]}: an interpolation needs two endpoints, got {count}", code="endpoints", param=given[0]
        )
    return given[0]


def seed_interpolation(body: InterpolateRequestBase, serving: generation.Serving, settings: Settings) -> Interpolation:
    """Frames between two seeds: their x_T slerped, sampled with a deterministic sampler."""
    assert body.seeds is not None
    sampler = body.sampler or "ddim"
    if sampler not in DETERMINISTIC:
        raise ApiError(
            422,
            f"sampler: frames between seeds need one of {', '.join(DETERMINISTIC)}",
            code="invalid_edit",
            param="sampler",
        )
    spec, params = generation.resolve(
        _as_generation(body, body.class_, body.frames, sampler=sampler), serving, settings
    )
    a, b = generators_from_seeds(body.seeds)
    latents = seed_frames(a, b, body.frames).numpy().astype(np.float32)  # (K, 1, 28, 28)
    spec = _checked(replace(spec, edit=Edit("frames", None, latents=latents)), serving, "seeds")
    return Interpolation("seeds", spec, params)


def invert_spec(
    body: InterpolateRequestBase, images: list[np.ndarray], serving: generation.Serving, settings: Settings
) -> tuple[JobSpec, Params]:
    """The inversion job of two pictures: DDIM up to ``strength``'s level, with the conditional model alone."""
    gen = _as_generation(body, body.class_, 2, sampler="ddim", guidance=1.0, guidance_method="classifier-free")
    spec, params = generation.resolve(gen, serving, settings)
    edit = Edit("invert", body.strength, images=np.stack(images))
    return _checked(replace(spec, edit=edit), serving, "strength"), params


def frames_spec(body: InterpolateRequestBase, spec: JobSpec, latents: np.ndarray) -> JobSpec:
    """The frames between two inverted latents (float32 (2, 1, 28, 28)), sampled back down with DDIM."""
    frames = slerp_frames(torch.from_numpy(latents[0]), torch.from_numpy(latents[1]), body.frames)
    seeds = tuple(spec.seeds[0] + i for i in range(body.frames))  # DDIM at eta 0 draws no noise
    edit = Edit("frames", body.strength, latents=frames.numpy().astype(np.float32), work=spec.evaluations)
    return replace(spec, seeds=seeds, edit=edit)


def animation(frames: np.ndarray, scale: int = 4, ms: int = 120) -> bytes:
    """uint8 (K, 28, 28) -> an animated GIF that walks there and back, ``scale`` times larger."""
    order = [*range(len(frames)), *range(len(frames) - 2, 0, -1)]
    pictures = [
        Image.fromarray(frames[i], mode="L").resize((28 * scale, 28 * scale), Image.Resampling.NEAREST) for i in order
    ]
    buf = io.BytesIO()
    pictures[0].save(buf, format="GIF", save_all=True, append_images=pictures[1:], duration=ms, loop=0)
    return buf.getvalue()


def frame_images(result: JobResult, spec: JobSpec) -> list[ImageOut]:
    return [ImageOut(index=i, seed=spec.seeds[i], png=_b64(png_bytes(img))) for i, img in enumerate(result.images)]
