"""Bodies of ``POST /clip/score``, and the ``rerank`` part of a generation's request and answer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from app.fields import ClassField, PositiveInt, bounded_int

RerankMethod = Literal["clip", "classifier"]
MAX_TEXT_CHARS = 1000  # a prompt longer than this cannot fit CLIP's 77 tokens anyway


# --- rerank, a field of POST /generate and the stream -----------------------------------------


class RerankBase(BaseModel):
    """Sample ``candidates`` images, score each against the requested class, return the best ``n``."""

    model_config = ConfigDict(extra="forbid")

    by: RerankMethod = Field(
        description="clip: cosine similarity to the class prompt under CLIP; classifier: the project's "
        "Fashion-MNIST classifier's probability of the class (works without CLIP)"
    )
    candidates: PositiveInt | None = Field(
        default=None, description="images to sample and score, at least n; default: 4 n, capped at the server's limit"
    )


def rerank_shorthand(value: Any) -> Any:
    # "rerank": "clip" is {"by": "clip"} with the default number of candidates (also ?rerank=clip).
    return {"by": value} if isinstance(value, str) else value


RERANK_DESCRIPTION = (
    'keep the best n of more candidates: {"by": "clip" | "classifier", "candidates": K} with n <= K, or just '
    '"clip" / "classifier" for K = 4 n; candidate i is drawn with seed + i, and each returned image carries its '
    "seed and score"
)
RERANK_ALLOWED = '"clip", "classifier", or {"by": "clip" | "classifier", "candidates": K} with n <= K'


def rerank_field(max_candidates: int) -> tuple[Any, Any]:
    """The ``rerank`` field as ``create_model`` takes it, its candidates bounded by this server's limit."""
    rerank = create_model(
        "Rerank",
        __base__=RerankBase,
        __doc__=RerankBase.__doc__,
        candidates=(
            bounded_int(1, max_candidates) | None,
            Field(
                default=None,
                description="images to sample and score, at least n; default: 4 n, capped at the server's limit",
            ),
        ),
    )
    return (
        Annotated[rerank, BeforeValidator(rerank_shorthand)] | None,
        Field(default=None, description=RERANK_DESCRIPTION),
    )


class RerankOut(BaseModel):
    by: RerankMethod
    candidates: int = Field(description="images sampled and scored; candidate i was drawn with seed + i")
    measure: str = Field(description="what the score is")
    scores: list[float] = Field(description="every candidate's score, in seed order (candidate i: seed + i)")
    scoring_ms: float = Field(description="scoring the candidates, on a worker thread")


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
