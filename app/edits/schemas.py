"""Bodies of the image-to-image routes. Images travel as base64 strings (optionally data URLs) in JSON,
or as file parts of multipart/form-data with the other fields as text parts."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from app.fields import ClassField, PositiveInt, SamplerName, Seed, bounded_float, bounded_int
from app.generation.schemas import GUIDANCE_METHOD_DESCRIPTION, GenerateResponse, GuidanceMethod, ImageOut, Limits
from model.images import INVERT_CHOICES

Invert = Literal["auto", "yes", "no"]  # model.images.INVERT_CHOICES
assert tuple(Invert.__args__) == INVERT_CHOICES  # type: ignore[attr-defined]
VARIATION_STRENGTH = 0.6  # a variation's default: keeps the garment's shape, redraws its detail (docs/editing.md)
INVERT_DESCRIPTION = (
    "the picture's polarity: auto inverts a picture whose border is light (a dark garment on white becomes a "
    "light garment on black, as Fashion-MNIST draws them); yes; no"
)


class EditRequestBase(BaseModel):
    """Body of ``POST /edits``: variations of a picture, or a masked region of it redrawn."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    image: str = Field(description="the picture: base64 PNG, JPEG or WebP (or a data URL), any size and mode")
    mask: str | None = Field(
        default=None,
        description="the region to redraw: a picture of the image's size, white (>= 128 in grayscale) where the "
        "model draws, black where the image is kept byte for byte; omitted: a variation of the whole image",
    )
    model: str | None = Field(default=None, description="an id of GET /models; default: the first listed there")
    class_: ClassField | None = Field(
        default=None, alias="class", description="the class to draw; default: the classifier's reading of the image"
    )
    n: PositiveInt = 4
    sampler: SamplerName | None = None
    steps: PositiveInt | None = None
    guidance: float | None = None
    guidance_method: GuidanceMethod | None = Field(default=None, description=GUIDANCE_METHOD_DESCRIPTION)
    seed: Seed | None = Field(default=None, description="image i is drawn with seed + i; omitted: a random seed")
    strength: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description=f"how far the image is noised before the sampler redraws it: 1 from (almost) pure noise; the "
        f"network evaluations scale with it (int(steps * strength) steps run); default: {VARIATION_STRENGTH} for a "
        "variation, 1 with a mask",
    )
    invert: Invert = Field(default="auto", description=INVERT_DESCRIPTION)
    resamplings: int | None = Field(
        default=None,
        ge=1,
        le=20,
        description="with a mask: RePaint's resampling, each stretch of jump_length steps denoised this many times "
        "(more evaluations, better harmony at the seams); ddim only; default: none",
    )
    jump_length: int | None = Field(default=None, ge=1, le=50, description="RePaint's jump length; default: 10")
    preview_every: PositiveInt | None = Field(default=None, description="streams: previews every k-th step")


class InterpolateRequestBase(BaseModel):
    """Body of ``POST /interpolations``: frames between two seeds or between two pictures."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    seeds: list[Seed] | None = Field(default=None, description="two seeds: the frames walk between their x_T")
    images: list[str] | None = Field(
        default=None, description="two pictures (base64): inverted with DDIM, the frames walk between their latents"
    )
    model: str | None = None
    class_: ClassField = Field(alias="class")
    frames: int = Field(default=8, ge=2, le=32, description="frames, both ends included")
    sampler: Literal["ddim", "dpm++", "heun"] | None = Field(
        default=None, description="between seeds: a deterministic sampler; between images: ddim; default: ddim"
    )
    steps: PositiveInt | None = None
    guidance: float | None = Field(default=None, description="between seeds; between images it is 1 (inversion)")
    strength: float = Field(
        default=1.0, gt=0.0, le=1.0, description="between images: how high the inversion climbs (1: to pure noise)"
    )
    invert: Invert = Field(default="auto", description=INVERT_DESCRIPTION)
    preview_every: PositiveInt | None = None


def edit_models(limits: Limits) -> tuple[type[EditRequestBase], type[InterpolateRequestBase]]:
    """The request models with this server's limits in their bounds (and so in the OpenAPI page)."""
    bounded: dict[str, Any] = {
        "n": (bounded_int(1, limits.max_images), Field(default=min(4, limits.max_images), description="how many")),
        "steps": (bounded_int(1, limits.max_steps) | None, Field(default=None, description="default: the model's")),
        "guidance": (
            bounded_float(0.0, limits.max_guidance) | None,
            Field(default=None, description="classifier-free guidance scale; default: the model's"),
        ),
    }
    edit = create_model("EditRequest", __base__=EditRequestBase, __doc__=EditRequestBase.__doc__, **bounded)
    interpolate = create_model(
        "InterpolateRequest",
        __base__=InterpolateRequestBase,
        __doc__=InterpolateRequestBase.__doc__,
        steps=bounded["steps"],
        guidance=bounded["guidance"],
    )
    return edit, interpolate


class EditResponse(GenerateResponse):
    kind: Literal["variation", "inpaint"]
    strength: float = Field(description="the strength it ran at")
    evaluations: int = Field(description="network evaluations per image (before guidance's reference rows)")
    input_png: str = Field(description="base64 PNG of the picture as the model saw it: 28x28, light on black")
    inverted: bool = Field(description="whether the picture's polarity was inverted (invert)")
    mask_png: str | None = Field(
        default=None, description="base64 PNG of the 28x28 mask as applied: white where the model drew"
    )


class InterpolateResponse(BaseModel):
    model: str
    kind: Literal["seeds", "images"]
    frames: list[ImageOut] = Field(description="the frames in order, both ends included")
    animation_gif: str = Field(description="base64 GIF of the frames, back and forth, 4x scaled")
    inputs_png: list[str] | None = Field(default=None, description="between images: each picture as the model saw it")
    evaluations: int = Field(description="network evaluations per frame (and per image of the inversion)")
