"""The image-to-image routes, each as JSON (pictures as base64) or multipart/form-data (pictures as file
parts, the other fields as text parts):

- ``POST /edits``: ``image`` without ``mask``: n variations (SDEdit at ``strength``); with ``mask``: the
  white region redrawn, the rest kept byte for byte (RePaint's merge; ``resamplings`` adds its resampling).
- ``POST /interpolations``: ``frames`` images between two ``seeds`` or two ``images``, and a GIF of them.
- ``.../stream`` of each: server-sent events ``start``, ``queued``, ``step`` (x_t and x0 previews, the kept
  region visible in x_t), then ``done`` with the answer, as ``/generate/stream``.

Each handler only parses; ``app.edits.serving`` does the rest.
"""

# No ``from __future__ import annotations``: FastAPI must see the per-app request models as real objects.
import base64
import binascii
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, ValidationError

from app.deps import ServingDep, SettingsDep
from app.edits import serving as edits
from app.edits.inputs import EditInput, read_edit, read_picture
from app.edits.schemas import EditRequestBase, EditResponse, InterpolateRequestBase, InterpolateResponse
from app.errors import ApiError, error_responses, validation_message
from app.generation import serving as generation
from app.generation import streaming
from app.multipart import read_form
from app.settings import Settings
from app.uploads import UploadLimits, decode_base64_image
from model.images import png_bytes

ERRORS = error_responses(
    {
        400: "a mask of another size than the image, or one that edits nothing or everything",
        401: "missing or wrong API key (when the server has one)",
        413: "a picture or the body is too large (bytes, or pixels read from its header)",
        422: "invalid parameters or an unreadable picture: the message names the field and what it accepts",
        429: "the queue is full; retry after the Retry-After header's seconds",
        503: "the model is not loaded yet, or the server is shutting down",
    }
)
PICTURE_FIELDS = ("image", "mask", "images")
# The routes that take pictures, with their own body limit (Settings.edit_max_body_bytes).
EDIT_PATHS = ("/edits", "/edits/stream", "/interpolations", "/interpolations/stream")


def upload_limits(settings: Settings) -> UploadLimits:
    return UploadLimits(max_images=2, max_bytes=settings.edit_max_image_bytes, max_pixels=settings.edit_max_pixels)


async def read_body(
    request: Request, model: type[BaseModel], limits: UploadLimits
) -> tuple[Any, dict[str, list[bytes]]]:
    """The body as ``model`` and the pictures' bytes by field: base64 strings of a JSON body, or the file
    parts of a multipart one (whose text parts are the other fields)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        form = await read_form(request.stream(), request.headers["content-type"], limits, PICTURE_FIELDS)
        values: dict[str, Any] = {k: v if k in ("seeds",) else v[-1] for k, v in form.fields.items()}
        if "seeds" in values:
            values["seeds"] = [s for item in values["seeds"] for s in item.split(",")]
        pictures = form.files
        placeholders = {k: "" for k in pictures if k in model.model_fields}
        if "images" in pictures:
            placeholders["images"] = [""] * len(pictures["images"])  # type: ignore[assignment]
        values.update(placeholders)
    elif media == "application/json" or media.endswith("+json"):
        try:
            values = json.loads(await request.body())
        except json.JSONDecodeError as err:
            raise ApiError(422, f"body: not valid JSON ({err})", code="json_invalid", param="body") from err
        if not isinstance(values, dict):
            raise ApiError(422, "body: must be a JSON object", code="model_attributes_type", param="body")
        pictures = {}
    else:
        raise ApiError(
            415,
            "send application/json (pictures as base64) or multipart/form-data (pictures as files)",
            code="unsupported_media_type",
        )
    try:
        body = model.model_validate(values)
    except ValidationError as err:
        message, param, code = validation_message([{**e, "loc": ("body", *e["loc"])} for e in err.errors()], {})
        raise ApiError(422, message, code=code, param=param) from err
    if not pictures:  # JSON: decode the base64 strings now, within the same limits
        for name in PICTURE_FIELDS:
            value = values.get(name)
            if isinstance(value, str):
                pictures[name] = [_raw(value, limits, name)]
            elif isinstance(value, list):
                pictures[name] = [_raw(v, limits, f"{name}[{i}]") for i, v in enumerate(value) if isinstance(v, str)]
    return body, pictures


def _raw(text: str, limits: UploadLimits, param: str) -> bytes:
    """A base64 picture's bytes (decoding checks them against the limits once more when it maps them)."""
    payload = text.partition(",")[2] if text.startswith("data:") else text
    if (len(payload) // 4) * 3 - 3 > limits.max_bytes:
        decode_base64_image(text, limits, param)  # raises the 413 naming the field
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(422, f"{param}: not valid base64: {err}", code="invalid_base64", param=param) from err


def _one(pictures: dict[str, list[bytes]], name: str, required: bool = True) -> bytes | None:
    got = pictures.get(name, [])
    if len(got) > 1:
        raise ApiError(422, f"{name}: send one picture", code="too_many_images", param=name)
    if not got and required:
        raise ApiError(422, f"{name}: required: a PNG, JPEG or WebP picture", code="missing", param=name)
    return got[0] if got else None


async def edit_inputs(body: EditRequestBase, pictures: dict[str, list[bytes]], limits: UploadLimits) -> EditInput:
    image, mask = _one(pictures, "image"), _one(pictures, "mask", required=False)
    assert image is not None
    return await anyio.to_thread.run_sync(read_edit, image, mask, limits, body.invert, "white")


def build_router(
    edit_model: type[EditRequestBase], interpolate_model: type[InterpolateRequestBase], settings: Settings
) -> APIRouter:
    """The routes, with this app's request models and upload limits."""
    router = APIRouter(tags=["image to image"])
    limits = upload_limits(settings)
    body_doc = {
        "requestBody": {
            "content": {
                "application/json": {"schema": edit_model.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "image": {"type": "string", "format": "binary"},
                            "mask": {"type": "string", "format": "binary"},
                        },
                    }
                },
            }
        }
    }

    @router.post(
        "/edits",
        response_model=EditResponse,
        response_model_exclude_none=True,
        responses=ERRORS,
        summary="Variations or inpainting of a picture",
        openapi_extra=body_doc,
    )
    async def edit(request: Request, serving: ServingDep, settings: SettingsDep) -> EditResponse:
        """A picture (``image``) and, for inpainting, a ``mask`` (white = redraw), with the generation's fields
        and ``strength``, ``invert``, ``resamplings``/``jump_length``; see docs/editing.md."""
        body, pictures = await read_body(request, edit_model, limits)
        inputs = await edit_inputs(body, pictures, limits)
        return await edits.edit(body, inputs, request, serving, settings)

    async def open_edit(
        request: Request, serving: ServingDep, settings: SettingsDep
    ) -> AsyncIterator[streaming.Stream]:
        body, pictures = await read_body(request, edit_model, limits)
        inputs = await edit_inputs(body, pictures, limits)
        plan = await edits.plan_edit(body, inputs, serving, settings)

        async def finish(generated: generation.Generated) -> EditResponse:
            return await edits.edit_response(serving, plan, generated)

        async with streaming.open_job_stream(
            plan.spec, plan.params, request, serving, body.preview_every, None, finish
        ) as stream:
            yield stream

    @router.post("/edits/stream", response_class=EventSourceResponse, responses=ERRORS, summary="Stream an edit")
    async def edit_stream(stream: Annotated[streaming.Stream, Depends(open_edit)]) -> AsyncIterator[ServerSentEvent]:
        """Server-sent events ``start``, ``queued``..., ``step``..., then ``done`` (the answer of ``/edits``)."""
        async for event in streaming.stream_events(stream):
            yield event

    async def plan_interpolation(
        request: Request, serving: generation.Serving, settings: Settings
    ) -> tuple[Any, edits.Interpolation]:
        body, pictures = await read_body(request, interpolate_model, limits)
        kind = edits.endpoints(body)
        if kind == "seeds":
            return body, edits.seed_interpolation(body, serving, settings)
        read: Callable[..., Any] = read_picture
        mapped = [
            await anyio.to_thread.run_sync(read, data, limits, body.invert, f"images[{i}]")
            for i, data in enumerate(pictures.get("images", []))
        ]
        images = [m[0] for m in mapped]
        spec, params = edits.invert_spec(body, images, serving, settings)
        job = await generation.submit(serving, spec)
        latents = (await generation.wait(job, request, serving)).images
        frames = edits.frames_spec(body, spec, latents)
        params = params.model_copy(update={"n": body.frames})
        return body, edits.Interpolation("images", frames, params, images)

    async def interpolation_response(
        serving: generation.Serving, plan: edits.Interpolation, result: Any
    ) -> InterpolateResponse:
        gif = await anyio.to_thread.run_sync(edits.animation, result.images)
        assert plan.spec.edit is not None
        return InterpolateResponse(
            model=plan.spec.model or serving.default.name,
            kind=plan.kind,  # type: ignore[arg-type]
            frames=edits.frame_images(result, plan.spec),
            animation_gif=edits._b64(gif),
            inputs_png=None if plan.inputs is None else [edits._b64(png_bytes(i)) for i in plan.inputs],
            evaluations=plan.spec.edit.work,
        )

    @router.post(
        "/interpolations",
        response_model=InterpolateResponse,
        response_model_exclude_none=True,
        responses=ERRORS,
        summary="Frames between two seeds or two pictures",
    )
    async def interpolate(request: Request, serving: ServingDep, settings: SettingsDep) -> InterpolateResponse:
        """``seeds`` (two) or ``images`` (two pictures), ``class``, ``frames``; see docs/editing.md."""
        _, plan = await plan_interpolation(request, serving, settings)
        job = await generation.submit(serving, plan.spec)
        result = await generation.wait(job, request, serving)
        return await interpolation_response(serving, plan, result)

    async def open_interpolation(
        request: Request, serving: ServingDep, settings: SettingsDep
    ) -> AsyncIterator[streaming.Stream]:
        body, plan = await plan_interpolation(request, serving, settings)

        async def finish(generated: generation.Generated) -> InterpolateResponse:
            return await interpolation_response(serving, plan, generated.result)

        async with streaming.open_job_stream(
            plan.spec, plan.params, request, serving, body.preview_every, None, finish
        ) as stream:
            yield stream

    @router.post(
        "/interpolations/stream",
        response_class=EventSourceResponse,
        responses=ERRORS,
        summary="Stream an interpolation's frames",
    )
    async def interpolate_stream(
        stream: Annotated[streaming.Stream, Depends(open_interpolation)],
    ) -> AsyncIterator[ServerSentEvent]:
        """The frames' job as server-sent events (between pictures, after their inversion), then ``done``."""
        async for event in streaming.stream_events(stream):
            yield event

    return router
