"""From an OpenAI images request to its answer, through the service's own generation path.

A request becomes the ``POST /generate`` body it means (the class its prompt names, the model its
``quality`` picks, the ``extra_body`` parameters) and goes through ``app.generation.serving`` (and
``streaming``) unchanged: the same
resolve, seeds, engine job, row budget, 429 with Retry-After, drain, disconnect handling and metrics,
so the same model, seed and parameters give the bytes ``POST /generate`` gives. What is OpenAI's own
lives here: 400 where the service says 422, the files (size, format), the stateless URLs
(``app.openai.urls``) and the stream's events.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import numpy as np
from fastapi import Request, Response
from fastapi.sse import ServerSentEvent
from PIL import Image
from pydantic import ValidationError

from app.errors import ApiError, validation_message
from app.generation import serving as flow
from app.generation import streaming
from app.generation.jobs import JobCancelled, Progress, Queued
from app.generation.models import ServedModel
from app.generation.schemas import GenerateRequestBase, StreamRequestBase, allowed_values
from app.generation.serving import Serving
from app.openai.schemas import (
    MEDIA_TYPES,
    CompletedEvent,
    ImageFileQuery,
    ImageGenerateRequestBase,
    ImageOut,
    ImagesResponse,
    OutputFormat,
    PartialImageEvent,
    QualityOut,
    dump,
    size_side,
)
from app.openai.urls import FILE_ROUTE, Recipe
from app.settings import Settings
from model.data import CLASS_NAMES, parse_class
from model.images import png_bytes

URL_MAX_AGE_S = 86400  # what caches may keep a drawn URL for; the bytes never change while the model is served

Body = TypeVar("Body", bound=GenerateRequestBase)


# --- errors ----------------------------------------------------------------------------------


def as_openai(err: ApiError) -> ApiError:
    """OpenAI answers every invalid request with 400 (the SDK's BadRequestError) where the service says 422."""
    if err.status != 422:
        return err
    return ApiError(400, err.message, code=err.code, param=err.param, headers=err.headers)


def validated(model: type[Body], fields: dict[str, Any], where: str) -> Body:
    """``model`` from ``fields``, or a 400 naming the field (``where``: "body" or "query")."""
    try:
        return model.model_validate(fields)
    except ValidationError as err:
        errors = [{**e, "loc": (where, *e["loc"])} for e in err.errors()]
        message, param, code = validation_message(errors, allowed_values(model))
        raise ApiError(400, message, code=code, param=param) from None


# --- files -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoding:
    """How a 28x28 sample becomes a file: resampled to ``side`` with nearest neighbours, then encoded."""

    output_format: OutputFormat
    side: int
    compression: int | None  # jpeg's quality, webp's (100 or None: lossless); never set for png

    @classmethod
    def checked(cls, output_format: OutputFormat, side: int, compression: int | None) -> Encoding:
        if compression is not None and output_format == "png":
            raise ApiError(
                400,
                "output_compression: applies to jpeg and webp only; allowed: omit it for png",
                code="compression_for_png",
                param="output_compression",
            )
        return cls(output_format, side, compression)

    @property
    def size(self) -> str:
        return f"{self.side}x{self.side}"

    def file(self, image: np.ndarray) -> bytes:
        """uint8 (28, 28) -> the file's bytes, the same for the same pixels."""
        picture = Image.fromarray(image, mode="L")
        if self.side != picture.width:
            picture = picture.resize((self.side, self.side), Image.Resampling.NEAREST)
        if self.output_format == "png":
            return png_bytes(picture)
        quality = 100 if self.compression is None else self.compression
        buf = io.BytesIO()
        if self.output_format == "jpeg":
            picture.save(buf, format="JPEG", quality=quality)
        elif quality == 100:  # exact, and smaller than lossy webp for blocky upscaled images
            picture.save(buf, format="WEBP", lossless=True)
        else:
            picture.save(buf, format="WEBP", quality=quality)
        return buf.getvalue()

    def files(self, images: np.ndarray) -> list[bytes]:
        """One file per image; a 28x28 PNG is ``png_bytes`` of the sample, byte for byte POST /generate's."""
        return [self.file(image) for image in images]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _secret(settings: Settings) -> str | None:
    return settings.api_key.get_secret_value() if settings.api_key else None


# --- request -> generation ---------------------------------------------------------------------


def check(body: ImageGenerateRequestBase) -> Encoding:
    """The rules between fields, each a 400 naming the field; the files' encoding."""
    if body.stream and body.response_format == "url":
        raise ApiError(
            400,
            "response_format: a stream's events carry b64_json; allowed: b64_json, or omit it with stream",
            code="url_with_stream",
            param="response_format",
        )
    if body.partial_images and not body.stream:
        raise ApiError(
            400,
            "partial_images: partial images are stream events; allowed: 0 or omit it without stream: true",
            code="partial_images_without_stream",
            param="partial_images",
        )
    return Encoding.checked(body.output_format or "png", size_side(body.size), body.output_compression)


def pick_model(body: ImageGenerateRequestBase, serving: Serving) -> str | None:
    """The model a request names; with none, ``quality`` chooses: low the first served student, medium
    and high the first teacher, auto (or none) the default. None: the default model."""
    if body.model is not None or body.quality in (None, "auto"):
        return body.model
    kind = "student" if body.quality == "low" else "teacher"
    return next((m.name for m in serving.models.values() if m.kind == kind), None)


def quality_of(body: ImageGenerateRequestBase, model: ServedModel) -> QualityOut:
    """The quality to report: as asked, auto as what it picked (low for a student, else high)."""
    if body.quality in ("low", "medium", "high"):
        return body.quality
    return "low" if model.kind == "student" else "high"


def generation_fields(body: ImageGenerateRequestBase, serving: Serving) -> dict[str, Any]:
    """The ``POST /generate`` body an images request means."""
    return {
        "model": pick_model(body, serving),
        "class": parse_class(body.prompt),
        "n": body.n,
        "seed": body.seed,
        "sampler": body.sampler,
        "steps": body.steps,
        "guidance": body.guidance,
        "guidance_method": body.guidance_method,
    }


def recipe(generated: flow.Generated, seed: int, encoding: Encoding) -> Recipe:
    p = generated.params
    return Recipe(
        generated.model, p.class_, seed, p.sampler, p.steps, p.guidance, encoding.side, encoding.output_format,
        encoding.compression, p.guidance_method,
    )  # fmt: skip


def file_url(request: Request, recipe: Recipe, secret: str | None) -> str:
    """The absolute URL that draws ``recipe`` again (from the request's host and root path)."""
    url = request.url_for(FILE_ROUTE, **recipe.path_params())
    return str(url.include_query_params(**recipe.query(secret)))


@dataclass(frozen=True)
class ImageStream:
    """An opened stream: the engine's job (``app.generation.streaming.Stream``) and how its events are told."""

    stream: streaming.Stream
    encoding: Encoding
    quality: QualityOut
    partials: int  # partial images per image, at most
    safety_identifier: str | None
    kind: str = "image_generation"  # the events' prefix: image_generation, or image_edit for an edit's stream

    def about(self, file: bytes, image_index: int) -> dict[str, Any]:
        """What every event of this stream says of image ``image_index``'s ``file`` (``ImageEvent``)."""
        e = self.encoding
        return {
            "b64_json": _b64(file),
            "created_at": int(time.time()),
            "output_format": e.output_format,
            "quality": self.quality,
            "size": e.size,
            "image_index": image_index,
        }


@dataclass(frozen=True)
class ImagesServing:
    """The OpenAI images routes' serving, with this app's bounded ``/generate`` request models."""

    generate_model: type[GenerateRequestBase]
    stream_model: type[StreamRequestBase]

    async def generate(
        self, body: ImageGenerateRequestBase, request: Request, serving: Serving, settings: Settings
    ) -> ImagesResponse:
        """``POST /v1/images/generations`` without stream: the images as files in base64, or as URLs."""
        encoding = check(body)
        asked = validated(self.generate_model, generation_fields(body, serving), "body")
        generated = await flow.generate(asked, request, serving, settings)
        name = CLASS_NAMES[generated.params.class_]
        if body.response_format == "url":
            secret = _secret(settings)
            links = [file_url(request, recipe(generated, seed, encoding), secret) for seed in generated.seeds]
            data = [ImageOut(url=u, revised_prompt=name, seed=s) for u, s in zip(links, generated.seeds, strict=True)]
        else:
            files = await anyio.to_thread.run_sync(encoding.files, generated.chosen)
            seeds = generated.seeds
            data = [ImageOut(b64_json=_b64(f), revised_prompt=name, seed=s) for f, s in zip(files, seeds, strict=True)]
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=encoding.output_format,
            quality=quality_of(body, serving.models[generated.model]),
            size=encoding.size,
            safety_identifier=body.safety_identifier or body.user,
            model=generated.model,
        )

    @asynccontextmanager
    async def open_stream(
        self, body: ImageGenerateRequestBase, request: Request, serving: Serving, settings: Settings
    ) -> AsyncIterator[ImageStream]:
        """Queue the stream's job before the response starts (a full queue is still a plain 429), with
        previews every ``steps // (partial_images + 1)`` steps: partial images at evenly spaced steps."""
        encoding = check(body)
        asked = validated(self.stream_model, generation_fields(body, serving), "body")
        partials = body.partial_images or 0
        spec, _ = flow.resolve(asked, serving, settings)  # only for its steps, to space the partial images
        every = max(1, spec.evaluations // (partials + 1)) if partials else spec.evaluations
        asked = asked.model_copy(update={"preview_every": every})
        async with streaming.open_stream(asked, request, serving, settings) as stream:
            quality = quality_of(body, serving.models[stream.job.model])
            yield ImageStream(stream, encoding, quality, partials, body.safety_identifier or body.user)

    async def image_file(
        self, seed: int, output_format: OutputFormat, query: ImageFileQuery, request: Request, serving: Serving,
        settings: Settings,
    ) -> Response:  # fmt: skip
        """``GET`` of a URL from ``response_format: "url"``: the same image drawn again."""
        encoding = Encoding.checked(output_format, query.size, query.output_compression)
        wanted = Recipe(
            query.model, query.class_, seed, query.sampler, query.steps, query.guidance, query.size, output_format,
            query.output_compression, query.guidance_method,
        )  # fmt: skip
        secret = _secret(settings)
        if secret is not None and not wanted.signed_by(secret, query.sig):
            raise ApiError(
                401,
                "sig: this image URL was not signed by this server (or by its current API key); "
                "ask POST /v1/images/generations for a new one",
                code="missing_signature" if query.sig is None else "invalid_signature",
                param="sig",
            )
        fields = {
            "model": query.model,
            "class": query.class_,
            "n": 1,
            "seed": seed,
            "sampler": query.sampler,
            "steps": query.steps,
            "guidance": query.guidance,
            "guidance_method": query.guidance_method,
        }
        generated = await flow.generate(validated(self.generate_model, fields, "query"), request, serving, settings)
        files = await anyio.to_thread.run_sync(encoding.files, generated.chosen)
        headers = flow.png_headers(serving, generated) | {"Cache-Control": f"max-age={URL_MAX_AGE_S}"}
        return Response(files[0], media_type=MEDIA_TYPES[output_format], headers=headers)


async def stream_events(opened: ImageStream) -> AsyncIterator[ServerSentEvent]:
    """Up to ``partial_images`` rounds of one ``image_generation.partial_image`` per image (previews before
    the last step), then one ``image_generation.completed`` per image; or ``error``."""
    stream, encoding = opened.stream, opened.encoding
    seq = sent = 0
    try:
        # streaming.open_stream ends the queue with a marker that is no engine event once the job's future settles.
        while isinstance(item := await stream.events.get(), Queued | Progress):
            # Only previews before the last step (whose preview is the image itself), while partials are owed.
            if isinstance(item, Queued) or item.x0 is None or item.index + 1 == item.total or sent == opened.partials:
                continue
            files = await anyio.to_thread.run_sync(encoding.files, item.x0)
            for i, file in enumerate(files):
                seq += 1
                partial = f"{opened.kind}.partial_image"
                event = PartialImageEvent(**opened.about(file, i), partial_image_index=sent, type=partial)  # type: ignore[arg-type]
                yield ServerSentEvent(event=partial, id=str(seq), data=dump(event))
            sent += 1
        try:
            result = stream.job.future.result()
        except JobCancelled:
            return  # the client is gone; nobody to tell
        except Exception as err:
            yield streaming.error_event(as_openai(flow.api_error(err)), seq + 1)
            return
        files = await anyio.to_thread.run_sync(encoding.files, result.images)
        for i, file in enumerate(files):
            seq += 1
            completed = f"{opened.kind}.completed"
            done = CompletedEvent(
                **opened.about(file, i),
                seed=stream.params.seed + i,
                safety_identifier=opened.safety_identifier,
                type=completed,  # type: ignore[arg-type]
            )
            yield ServerSentEvent(event=completed, id=str(seq), data=dump(done))
    finally:
        if not stream.job.future.done():
            stream.serving.engine.cancel(stream.job)
