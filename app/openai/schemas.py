"""Request and response bodies of the OpenAI Images API, in the shapes of openai-python's
``types/image_generate_params.py``, ``types/images_response.py`` and ``types/image_gen_stream_event.py``.

Fields OpenAI has and this service cannot honour are refused with a 400 that says what is allowed,
never silently ignored; the service's own parameters (``seed``, ``sampler``, ``steps``, ``guidance``,
``guidance_method``)
arrive through the SDK's ``extra_body``. As in ``app.generation.schemas``, the bounds that come from
the settings are put in by ``request_model(limits)``; the static base is what code reads.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, WithJsonSchema, create_model
from pydantic_core import PydanticCustomError

from app.fields import (
    NonNegativeFloat,
    PositiveInt,
    SamplerName,
    Seed,
    bounded_float,
    bounded_int,
    class_index,
)
from app.generation.schemas import (
    GUIDANCE_METHOD_DESCRIPTION,
    MODEL_ALLOWED,
    GuidanceMethod,
    Limits,
    ModelId,
    allowed_values,
)
from model.data import CLASS_NAMES, IMAGE_SIZE, class_allowed

MAX_SIZE = 1024  # largest side a sample is resampled to
MAX_PROMPT_CHARS = 32000  # OpenAI's limit
MAX_PARTIAL_IMAGES = 3  # OpenAI's limit

Quality = Literal["auto", "low", "medium", "high"]
QualityOut = Literal["low", "medium", "high"]  # what was served: auto is reported as what it picked
OutputFormat = Literal["png", "jpeg", "webp"]
ResponseFormat = Literal["b64_json", "url"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

SIZE_ALLOWED = f"auto ({IMAGE_SIZE}x{IMAGE_SIZE}) or a square NxN with {IMAGE_SIZE} <= N <= {MAX_SIZE}, e.g. 256x256"
PROMPT_ALLOWED = f"a text naming one class, {class_allowed()}"
_SIZE = re.compile(r"(\d+)x(\d+)")


def size_side(size: str | None) -> int:
    """The side in pixels of a validated ``size`` ("auto" or None: the model's own 28)."""
    if size is None or size == "auto":
        return IMAGE_SIZE
    return int(size.partition("x")[0])


def _size(value: str) -> str:
    if value == "auto":
        return value
    match = _SIZE.fullmatch(value.strip().lower())
    if match is None or match[1] != match[2] or not IMAGE_SIZE <= int(match[1]) <= MAX_SIZE:
        raise PydanticCustomError("size_value", "must be auto or a square size")
    return f"{int(match[1])}x{int(match[1])}"


def _prompt(value: str) -> str:
    class_index(value)  # the class field's check and its class_value error, whose message lists the classes
    return value


Size = Annotated[
    str,
    AfterValidator(_size),
    WithJsonSchema({"type": "string", "description": SIZE_ALLOWED, "examples": ["auto", "256x256", "1024x1024"]}),
]
Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_prompt)]


class ImageGenerateRequestBase(BaseModel):
    """Body of ``POST /v1/images/generations``. The served model is ``request_model(limits)``, which bounds
    ``n``, ``steps`` and ``guidance`` by the settings; this base is what code reads."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt = Field(
        description="names the class, read forgivingly: 'dress', 'Ankle boots', 'a pullover', '3'; "
        f"it must name exactly one of {', '.join(CLASS_NAMES)}"
    )
    model: ModelId | None = Field(
        default=None, description="an id of GET /v1/models; default: by quality (low: the student), else the default"
    )
    n: PositiveInt = Field(default=1, description="how many images; image i is drawn with seed + i")
    quality: Quality | None = Field(
        default=None,
        description="with model omitted: low picks the first served student (few steps), medium and high the first "
        "teacher, auto the default model; with model given it changes nothing",
    )
    size: Size | None = Field(default=None, description=SIZE_ALLOWED)
    response_format: ResponseFormat | None = Field(
        default=None,
        description="b64_json (default) or url: a signed URL of this server that draws the same bytes again",
    )
    output_format: OutputFormat | None = Field(default=None, description="png (default), jpeg or webp")
    output_compression: Annotated[int, Field(ge=0, le=100)] | None = Field(
        default=None,
        description="jpeg and webp only: their quality, 0-100; default 100 (jpeg at quality 100, webp lossless)",
    )
    background: Literal["auto", "opaque"] | None = Field(
        default=None, description="the images are always opaque grayscale; transparent is refused"
    )
    moderation: Literal["auto", "low"] | None = Field(default=None, description="accepted; nothing to moderate")
    stream: StrictBool | None = Field(default=None, description="true: server-sent events, partial images first")
    partial_images: Annotated[int, Field(ge=0, le=MAX_PARTIAL_IMAGES)] | None = Field(
        default=None, description="with stream: x0 predictions at evenly spaced steps before each final image (0-3)"
    )
    user: str | None = Field(default=None, description="accepted and ignored")
    safety_identifier: str | None = Field(default=None, description="accepted and echoed back")
    # The service's own parameters (the SDK's extra_body), as in POST /generate.
    seed: Seed | None = Field(default=None, description="image i is drawn with seed + i; omitted: a random seed")
    sampler: SamplerName | None = Field(default=None, description="default: the model's")
    steps: PositiveInt | None = Field(default=None, description="sampler steps; default: the model's")
    guidance: NonNegativeFloat | None = Field(default=None, description="the guidance scale; default: the model's")
    guidance_method: GuidanceMethod | None = Field(default=None, description=GUIDANCE_METHOD_DESCRIPTION)


def request_model(limits: Limits) -> type[ImageGenerateRequestBase]:
    """The request model with this server's limits in its bounds (and so in the OpenAPI page)."""
    return create_model(
        "ImageGenerateRequest",
        __base__=ImageGenerateRequestBase,
        __doc__=ImageGenerateRequestBase.__doc__,
        n=(
            bounded_int(1, limits.max_images),
            Field(default=1, description=f"how many images, at most {limits.max_images} (OpenAI's limit is 10)"),
        ),
        steps=(bounded_int(1, limits.max_steps) | None, Field(default=None, description="default: the model's")),
        guidance=(
            bounded_float(0.0, limits.max_guidance) | None,
            Field(default=None, description="the guidance scale; default: the model's"),
        ),
    )


def request_allowed(model: type[BaseModel]) -> dict[str, str]:
    """What each field accepts, for validation messages."""
    return allowed_values(model) | {
        "prompt": PROMPT_ALLOWED,
        "size": SIZE_ALLOWED,
        "model": MODEL_ALLOWED,
        "stream": "true or false",
        "user": "a string",
        "safety_identifier": "a string",
    }


class ImageFileQuery(BaseModel):
    """Query of ``GET /v1/images/files/{seed}.{output_format}``, as ``app.openai.urls.Recipe.query`` writes it."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    model: ModelId
    class_: Annotated[int, Field(ge=0, le=len(CLASS_NAMES) - 1)] = Field(alias="class")
    sampler: SamplerName
    steps: PositiveInt
    guidance: NonNegativeFloat
    guidance_method: GuidanceMethod = "classifier-free"
    size: Annotated[int, Field(ge=IMAGE_SIZE, le=MAX_SIZE)] = Field(description="side in pixels")
    output_compression: Annotated[int, Field(ge=0, le=100)] | None = None
    sig: str | None = Field(default=None, description="the server's signature, when it has an API key")


# --- responses -------------------------------------------------------------------------------


class ImageOut(BaseModel):
    """One image of ``data``: ``b64_json`` or ``url``."""

    b64_json: str | None = Field(default=None, description="the image file, base64")
    url: str | None = Field(default=None, description="GET it (no API key needed) for the same bytes")
    revised_prompt: str = Field(description="the class the prompt was read as")
    seed: int = Field(description="this service's addition: the seed the image was drawn with")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix seconds")
    data: list[ImageOut]
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat
    quality: QualityOut = Field(description="as asked; auto: low for a student, else high")
    size: str = Field(description="WxH of every image")
    safety_identifier: str | None = None
    model: str = Field(description="this service's addition: the model that drew the images")


class ImageEvent(BaseModel):
    """The fields of both stream events: one file of one of the ``n`` images."""

    b64_json: str
    background: Literal["opaque"] = "opaque"
    created_at: int
    output_format: OutputFormat
    quality: QualityOut
    size: str
    image_index: int = Field(description="this service's addition: which of the n images, 0-based")


class PartialImageEvent(ImageEvent):
    """Data of the ``image_generation.partial_image`` event: ``b64_json`` is the model's x0 prediction
    at this step, encoded as the final image is."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"] = "image_generation.partial_image"
    partial_image_index: int = Field(description="0-based, per image")


class Usage(BaseModel):
    """OpenAI counts tokens; a class-conditional diffusion model has none, so every count is 0."""

    input_tokens: int = 0
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"image_tokens": 0, "text_tokens": 0})
    output_tokens: int = 0
    total_tokens: int = 0


class CompletedEvent(ImageEvent):
    """Data of the ``image_generation.completed`` event, one per image: ``b64_json`` is the final image,
    the same bytes as without stream."""

    type: Literal["image_generation.completed", "image_edit.completed"] = "image_generation.completed"
    usage: Usage = Field(default_factory=Usage)
    seed: int = Field(description="this service's addition: the seed the image was drawn with")
    safety_identifier: str | None = None


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_none=True)


# --- edits and variations (multipart/form-data, as the SDK sends them) ------------------------------


class ImageEditRequestBase(BaseModel):
    """The text fields of ``POST /v1/images/edits``; ``image`` (or ``image[]``) and ``mask`` are file parts.
    The service's own fields (the SDK's ``extra_body``) travel as form fields too."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt = Field(description="names the class to draw (as for generations)")
    model: ModelId | None = None
    n: PositiveInt = Field(default=1, description="how many images; image i is drawn with seed + i")
    size: Size | None = Field(default=None, description=SIZE_ALLOWED)
    response_format: Literal["b64_json"] | None = Field(
        default=None, description="b64_json only: an edit's input cannot travel in a URL"
    )
    output_format: OutputFormat | None = None
    output_compression: Annotated[int, Field(ge=0, le=100)] | None = None
    quality: Quality | None = None
    background: Literal["auto", "opaque"] | None = None
    input_fidelity: Literal["low", "high"] | None = Field(default=None, description="accepted; strength decides")
    stream: bool | None = None  # a form field: "true" or "false"
    partial_images: Annotated[int, Field(ge=0, le=MAX_PARTIAL_IMAGES)] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    seed: Seed | None = None
    sampler: SamplerName | None = None
    steps: PositiveInt | None = None
    guidance: NonNegativeFloat | None = None
    guidance_method: GuidanceMethod | None = None
    strength: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        default=None, description="without a mask: how far the image is redrawn (default 0.6); with one: 1"
    )


class ImageVariationRequestBase(BaseModel):
    """The text fields of ``POST /v1/images/variations``; ``image`` is a file part. The class is the project
    classifier's reading of the image."""

    model_config = ConfigDict(extra="forbid")

    model: ModelId | None = None
    n: PositiveInt = 1
    size: Size | None = Field(default=None, description=SIZE_ALLOWED)
    response_format: Literal["b64_json"] | None = None
    user: str | None = None
    seed: Seed | None = None
    sampler: SamplerName | None = None
    steps: PositiveInt | None = None
    guidance: NonNegativeFloat | None = None
    strength: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(default=None, description="default 0.6")


def edit_request_models(limits: Limits) -> tuple[type[ImageEditRequestBase], type[ImageVariationRequestBase]]:
    """The edit and variation fields with this server's limits in their bounds."""
    bounded: dict[str, Any] = {
        "n": (bounded_int(1, limits.max_images), Field(default=1, description="how many images")),
        "steps": (bounded_int(1, limits.max_steps) | None, Field(default=None, description="default: the model's")),
        "guidance": (
            bounded_float(0.0, limits.max_guidance) | None,
            Field(default=None, description="the guidance scale; default: the model's"),
        ),
    }
    edit = create_model("ImageEditRequest", __base__=ImageEditRequestBase, **bounded)
    variation = create_model("ImageVariationRequest", __base__=ImageVariationRequestBase, **bounded)
    return edit, variation
