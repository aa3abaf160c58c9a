"""OpenAI's ``POST /v1/images/edits`` and ``POST /v1/images/variations``, through the service's own edit path
(``app.edits.serving``): the same defaults, seeds, engine jobs, queue and bytes as ``POST /edits``.

What is OpenAI's own: multipart/form-data as the SDK sends it (``image`` or ``image[]``, ``mask``, the other
fields as text parts, ``extra_body`` among them), the mask's convention (transparent pixels mark the area to
edit), the prompt naming the class, 400 where the service says 422, and the answer's shape and stream events.
One image per request: a second one is refused (``n`` draws several edits of the one image).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Request

from app.edits import serving as edits
from app.edits.inputs import EditInput, read_edit
from app.edits.routes import upload_limits
from app.edits.schemas import EditRequestBase
from app.errors import ApiError
from app.generation import serving as generation
from app.generation import streaming
from app.multipart import read_form
from app.openai.schemas import (
    ImageEditRequestBase,
    ImageOut,
    ImagesResponse,
    ImageVariationRequestBase,
    size_side,
)
from app.openai.serving import Encoding, ImageStream, _b64, quality_of, validated
from app.settings import Settings
from model.data import CLASS_NAMES, parse_class

IMAGE_FIELDS = ("image", "image[]", "mask")


async def read_request(request: Request, settings: Settings) -> tuple[dict[str, Any], bytes, bytes | None]:
    """The multipart body: its text fields (one value each), its one image and its mask, if any."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "multipart/form-data":
        raise ApiError(400, "image: send multipart/form-data with the image as a file part", code="invalid_value",
                       param="image")  # fmt: skip
    limits = upload_limits(settings)
    form = await read_form(request.stream(), request.headers["content-type"], limits, IMAGE_FIELDS)
    images = [*form.files_of("image"), *form.files_of("image[]")]
    if not images:
        raise ApiError(400, "image: required: a PNG, JPEG or WebP file", code="missing", param="image")
    if len(images) > 1:
        raise ApiError(
            400,
            f"image: {len(images)} images sent; this service edits one image per request (n draws several edits of "
            "it): send one",
            code="too_many_images",
            param="image",
        )
    masks = form.files_of("mask")
    if len(masks) > 1:
        raise ApiError(400, "mask: send one mask", code="too_many_images", param="mask")
    fields = {name: values[-1] for name, values in form.fields.items()}
    return fields, images[0], masks[0] if masks else None


def _edit_body(asked: Any, label: int | None, n: int) -> EditRequestBase:
    """The ``POST /edits`` body an OpenAI request means (validated already, field by field)."""
    return EditRequestBase.model_construct(
        image="", mask=None, model=asked.model, class_=label, n=n, sampler=asked.sampler, steps=asked.steps,
        guidance=asked.guidance, guidance_method=getattr(asked, "guidance_method", None), seed=asked.seed,
        strength=asked.strength, invert="auto", resamplings=None, jump_length=None, preview_every=None,
    )  # fmt: skip


async def _inputs(image: bytes, mask: bytes | None, settings: Settings) -> EditInput:
    return await anyio.to_thread.run_sync(read_edit, image, mask, upload_limits(settings), "auto", "transparent")


async def _answer(
    plan: edits.EditPlan, generated: generation.Generated, encoding: Encoding, quality: Any, safety: str | None
) -> ImagesResponse:
    files = await anyio.to_thread.run_sync(encoding.files, generated.chosen)
    name = CLASS_NAMES[generated.params.class_]
    seeds = generated.seeds
    return ImagesResponse(
        created=int(time.time()),
        data=[ImageOut(b64_json=_b64(f), revised_prompt=name, seed=s) for f, s in zip(files, seeds, strict=True)],
        output_format=encoding.output_format,
        quality=quality,
        size=encoding.size,
        safety_identifier=safety,
        model=generated.model,
    )


async def plan_edit(
    body_model: type[ImageEditRequestBase], request: Request, serving: generation.Serving, settings: Settings
) -> tuple[ImageEditRequestBase, edits.EditPlan, Encoding]:
    fields, image, mask = await read_request(request, settings)
    asked = validated(body_model, fields, "body")  # type: ignore[type-var]
    if asked.partial_images and not asked.stream:
        raise ApiError(400, "partial_images: partial images are stream events; allowed: 0 without stream: true",
                       code="partial_images_without_stream", param="partial_images")  # fmt: skip
    encoding = Encoding.checked(asked.output_format or "png", size_side(asked.size), asked.output_compression)
    inputs = await _inputs(image, mask, settings)
    plan = await edits.plan_edit(_edit_body(asked, parse_class(asked.prompt), asked.n), inputs, serving, settings)
    return asked, plan, encoding


async def edit(
    body_model: type[ImageEditRequestBase], request: Request, serving: generation.Serving, settings: Settings
) -> ImagesResponse:
    """``POST /v1/images/edits`` without stream."""
    accepted = time.monotonic()
    asked, plan, encoding = await plan_edit(body_model, request, serving, settings)
    job = await generation.submit(serving, plan.spec)
    result = await generation.wait(job, request, serving)
    generated = generation.Generated(job.model, plan.params, result, None, accepted)
    quality = quality_of(asked, serving.models[job.model])  # type: ignore[arg-type]
    return await _answer(plan, generated, encoding, quality, asked.safety_identifier or asked.user)


@asynccontextmanager
async def open_edit_stream(
    body_model: type[ImageEditRequestBase], request: Request, serving: generation.Serving, settings: Settings
) -> AsyncIterator[ImageStream]:
    """``POST /v1/images/edits`` with ``stream``: partial images at evenly spaced steps, then each image."""
    asked, plan, encoding = await plan_edit(body_model, request, serving, settings)
    partials = asked.partial_images or 0
    work = plan.spec.evaluations
    every = max(1, math.ceil(work / (partials + 1))) if partials else work
    async with streaming.open_job_stream(plan.spec, plan.params, request, serving, every) as stream:
        quality = quality_of(asked, serving.models[stream.job.model])  # type: ignore[arg-type]
        yield ImageStream(stream, encoding, quality, partials, asked.safety_identifier or asked.user, "image_edit")


async def variation(
    body_model: type[ImageVariationRequestBase], request: Request, serving: generation.Serving, settings: Settings
) -> ImagesResponse:
    """``POST /v1/images/variations``: the class from the classifier, a variation at the default strength."""
    accepted = time.monotonic()
    fields, image, mask = await read_request(request, settings)
    if mask is not None:
        raise ApiError(400, "mask: variations take no mask; use /v1/images/edits", code="invalid_value", param="mask")
    asked = validated(body_model, fields, "body")  # type: ignore[type-var]
    encoding = Encoding.checked("png", size_side(asked.size), None)
    inputs = await _inputs(image, None, settings)
    plan = await edits.plan_edit(_edit_body(asked, None, asked.n), inputs, serving, settings)
    job = await generation.submit(serving, plan.spec)
    result = await generation.wait(job, request, serving)
    generated = generation.Generated(job.model, plan.params, result, None, accepted)
    quality = "low" if serving.models[job.model].kind == "student" else "high"
    return await _answer(plan, generated, encoding, quality, asked.user)
