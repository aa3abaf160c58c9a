"""``POST /clip/score``: CLIP similarity of every image with every text (or with a class's prompts).

Images come as base64 strings in a JSON body, or as ``files`` parts of a multipart/form-data body
(read into memory by ``app.multipart``: nothing is written to disk). The body's size is refused
from its Content-Length before it is read (``BodyLimitMiddleware``), the count of images before
any is decoded, each image's bytes before decoding and its pixel count from its header (bombs).
Decoding and scoring run on a worker thread; at most ``clip_concurrency`` at once, with at most
``clip_queue_size`` more waiting (then 429).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import ValidationError

from app.clip.schemas import ClipScoreRequest, ClipScoreResponse, ClipTargets, ClipTimings
from app.clip.service import ClipService, Overloaded, similarities
from app.deps import ClipDep
from app.errors import ApiError, error_responses, validation_message
from app.fields import CLASS_ALLOWED
from app.generation.scorers import ScorerUnavailable
from app.multipart import read_form
from app.settings import Settings
from app.uploads import UploadError, UploadLimits, check_count, decode_base64_images, decode_files
from model.clip import Clip
from model.data import CLASS_NAMES

FILE_FIELD = "files"
FORM_FIELDS = ("texts", "class")

ERRORS = error_responses(
    {
        400: "a malformed multipart body",
        401: "missing or wrong API key (when the server has one)",
        413: "the body, an image's bytes or an image's pixels over the limit",
        415: "a body that is neither application/json nor multipart/form-data",
        422: "not an image, bad base64, too many images or texts, neither or both of texts and class",
        429: "every scoring thread is busy and the waiting room is full; retry after Retry-After seconds",
        503: "CLIP is loading (Retry-After) or unavailable: the message says how to provide weights",
    }
)


@dataclass(frozen=True)
class Parsed:
    """A request, read and validated but with its images still encoded (decoding is thread work)."""

    encoded: list[Any]  # base64 strings (JSON) or bytes (multipart)
    field: str  # "images" or "files", for error messages
    texts: list[str] | None
    class_index: int | None


def _request_body(limits: UploadLimits, max_texts: int) -> dict[str, Any]:
    """The OpenAPI requestBody: the JSON model, or the same fields as multipart/form-data."""
    json_schema = ClipScoreRequest.model_json_schema()
    json_schema["properties"]["images"]["maxItems"] = limits.max_images
    json_schema["properties"]["images"]["minItems"] = 1
    form_schema = {
        "type": "object",
        "properties": {
            FILE_FIELD: {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "minItems": 1,
                "maxItems": limits.max_images,
                "description": f"image files, at most {limits.max_images}, each at most {limits.max_bytes} bytes",
            },
            "texts": {"type": "array", "items": {"type": "string"}, "maxItems": max_texts, "description": "prompts"},
            "class": {"type": "string", "description": CLASS_ALLOWED},
        },
        "required": [FILE_FIELD],
    }
    return {
        "required": True,
        "content": {"application/json": {"schema": json_schema}, "multipart/form-data": {"schema": form_schema}},
    }


def _upload_error(err: UploadError) -> ApiError:
    return ApiError(err.status, err.message, code=err.code, param=err.param)


def _targets(values: dict[str, Any], max_texts: int) -> tuple[list[str] | None, int | None]:
    """Validated ``texts`` xor ``class``; 422 naming the fields otherwise."""
    try:
        targets = ClipTargets.model_validate(values)
    except ValidationError as err:
        raise _invalid(err) from err
    return _one_of(targets.texts, targets.class_, max_texts)


def _one_of(texts: list[str] | None, class_: int | None, max_texts: int) -> tuple[list[str] | None, int | None]:
    if (texts is None) == (class_ is None):
        which = "both were given" if texts is not None else "neither was given"
        raise ApiError(
            422,
            f"texts, class: send exactly one of texts (a list of prompts) or class ({CLASS_ALLOWED}); {which}",
            code="texts_or_class",
            param="texts",
        )
    if texts is not None and not 1 <= len(texts) <= max_texts:
        raise ApiError(422, f"texts: send 1..{max_texts} texts; got {len(texts)}", code="too_many_texts", param="texts")
    return texts, class_


def _invalid(err: ValidationError) -> ApiError:
    allowed = {"texts": "a list of prompts", "class": CLASS_ALLOWED, "images": "a list of base64 images"}
    errors = [{**e, "loc": ("body", *e["loc"])} for e in err.errors()]
    message, param, code = validation_message(errors, allowed)
    return ApiError(422, message, code=code, param=param)


async def _parse(request: Request, limits: UploadLimits, max_texts: int) -> Parsed:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        try:
            body = ClipScoreRequest.model_validate_json(await request.body())
        except ValidationError as err:
            raise _invalid(err) from err
        texts, class_index = _one_of(body.texts, body.class_, max_texts)
        check_count(len(body.images), limits, "images")
        return Parsed(body.images, "images", texts, class_index)
    if media == "multipart/form-data":
        form = await read_form(request.stream(), content_type, limits, (FILE_FIELD,))
        unknown = sorted(set(form.fields) - set(FORM_FIELDS))
        if unknown:
            raise ApiError(
                422,
                f"{unknown[0]}: unknown form field; known fields: {FILE_FIELD} (files), texts, class",
                code="extra_forbidden",
                param=unknown[0],
            )
        if len(form.fields.get("class", [])) > 1:
            raise ApiError(422, "class: give one class", code="invalid_value", param="class")
        values: dict[str, Any] = {}
        if "texts" in form.fields:
            values["texts"] = form.fields["texts"]
        if "class" in form.fields:
            values["class"] = form.fields["class"][0]
        texts, class_index = _targets(values, max_texts)
        check_count(len(form.files_of(FILE_FIELD)), limits, FILE_FIELD)
        return Parsed(form.files_of(FILE_FIELD), FILE_FIELD, texts, class_index)
    raise ApiError(
        415,
        f"send application/json (images as base64) or multipart/form-data (images as {FILE_FIELD}); "
        f"got {media or 'no Content-Type'}",
        code="unsupported_media_type",
    )


def _work(clip: Clip, parsed: Parsed, limits: UploadLimits) -> tuple[list[str], Any, float]:
    """Decode, then score (blocking: runs on a worker thread). Returns (texts, similarities, start time)."""
    started = time.perf_counter()
    if parsed.texts is not None:
        texts = parsed.texts
    else:
        assert parsed.class_index is not None  # _one_of guarantees one of them
        texts = clip.prompts(parsed.class_index)
    try:
        clip.tokenize(texts)
    except ValueError as err:
        raise ApiError(422, f"texts: {err}", code="text_too_long", param="texts") from err
    if parsed.field == FILE_FIELD:
        images = decode_files(parsed.encoded, limits, FILE_FIELD)
    else:
        images = decode_base64_images(parsed.encoded, limits, parsed.field)
    return texts, similarities(clip, images, texts, parsed.class_index), started


def _outcome(status: int) -> str:
    if status == 503:
        return "unavailable"
    if status == 429:
        return "overloaded"
    if status == 413:
        return "too_large"
    return "invalid" if 400 <= status < 500 else "error"


def _rows(matrix: np.ndarray) -> list[list[float]]:
    return [[float(v) for v in row] for row in matrix]


def build_router(settings: Settings) -> APIRouter:
    """The router, with this app's upload limits (they are documented in the OpenAPI page)."""
    limits = UploadLimits(
        max_images=settings.clip_max_images,
        max_bytes=settings.clip_max_image_bytes,
        max_pixels=settings.clip_max_pixels,
    )
    max_texts = settings.clip_max_texts
    router = APIRouter(tags=["clip"])

    @router.post(
        "/clip/score",
        response_model=ClipScoreResponse,
        responses=ERRORS,
        summary="CLIP similarity of images with texts or a class",
        openapi_extra={"requestBody": _request_body(limits, max_texts)},
    )
    async def clip_score(request: Request, service: ClipDep) -> ClipScoreResponse:
        """Cosine similarity of every image with every text, and CLIPScore (``100 * max(cos, 0)``).

        Send the images as base64 in JSON (``{"images": [...], "texts": [...]}``) or as ``files`` in
        multipart/form-data, and either ``texts`` or ``class`` (its name fills the prompt templates;
        ``class_similarity`` then compares with the templates' average embedding, as rerank does)."""
        accepted = time.perf_counter()
        metrics = request.app.state.metrics
        outcome = "error"
        try:
            response = await _score(request, service, limits, max_texts, accepted)
            outcome = "ok"
            return response
        except ApiError as err:
            outcome = _outcome(err.status)
            raise
        finally:
            metrics.clip_requests.labels(outcome).inc()

    return router


async def _score(
    request: Request, service: ClipService, limits: UploadLimits, max_texts: int, accepted: float
) -> ClipScoreResponse:
    try:
        clip = service.require()
    except ScorerUnavailable as err:
        headers = {"Retry-After": str(err.retry_after)} if err.retry_after else None
        raise ApiError(503, err.message, code=err.code, headers=headers) from err
    try:
        with service.admitted():
            parsed = await _parse(request, limits, max_texts)
            n = len(parsed.encoded)
            queued = time.perf_counter()
            texts, sims, started = await service.run(service.timed("score", n, lambda: _work(clip, parsed, limits)))
    except Overloaded as err:
        raise ApiError(429, str(err), code="clip_busy", headers={"Retry-After": str(err.retry_after)}) from err
    except UploadError as err:
        raise _upload_error(err) from err
    done = time.perf_counter()
    class_index = parsed.class_index
    return ClipScoreResponse.model_validate(
        {
            "model": service.describe(),
            "texts": texts,
            "class": class_index,
            "class_name": CLASS_NAMES[class_index] if class_index is not None else None,
            "similarity": _rows(sims.similarity),
            "clip_score": _rows(sims.clip_score),
            "class_similarity": None if sims.class_similarity is None else [float(v) for v in sims.class_similarity],
            "timings": ClipTimings(
                queue_ms=round((started - queued) * 1e3, 2),
                scoring_ms=round((done - started) * 1e3, 2),
                total_ms=round((done - accepted) * 1e3, 2),
            ),
        }
    )
