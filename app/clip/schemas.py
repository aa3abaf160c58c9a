"""Bodies of ``POST /clip/score``."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from app.fields import ClassField

MAX_TEXT_CHARS = 1000  # a prompt longer than this cannot fit CLIP's 77 tokens anyway


# --- POST /clip/score --------------------------------------------------------------------------

Prompt = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


class ClipTargets(BaseModel):
    """What to score the images against: ``texts``, or ``class`` (prompts from the class name)."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    texts: list[Prompt] | None = Field(default=None, description="prompts; each image is scored with each one")
    class_: ClassField | None = Field(
        default=None, alias="class", description="a class whose name fills the server's prompt templates"
    )


class ClipScoreRequest(ClipTargets):
    """Body of ``POST /clip/score`` as JSON; multipart/form-data sends the images as ``files`` instead."""

    images: list[str] = Field(
        description="base64-encoded images (PNG, JPEG, WebP, GIF or BMP; data: URLs too), any size up to the "
        "server's pixel limit; 28x28 grayscale is what the generator makes"
    )


class ClipTimings(BaseModel):
    queue_ms: float = Field(description="waiting for a free scoring thread")
    scoring_ms: float = Field(description="decoding, embedding and comparing, on the worker thread")
    total_ms: float = Field(description="from accepting the request to the response")


class ClipScoreResponse(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True, validate_by_name=True, validate_by_alias=True)

    model: str = Field(description="the CLIP model (architecture and weights)")
    texts: list[str] = Field(description="the prompts scored, in column order (the class's prompts with class)")
    class_: int | None = Field(default=None, alias="class")
    class_name: str | None = None
    similarity: list[list[float]] = Field(description="cosine similarity, [image][text], in [-1, 1]")
    clip_score: list[list[float]] = Field(description="CLIPScore, 100 * max(cos, 0), [image][text]")
    class_similarity: list[float] | None = Field(
        default=None, description="with class: cosine with the class embedding (its prompts averaged), per image"
    )
    timings: ClipTimings
