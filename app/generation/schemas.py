"""Bodies of the generation routes: ``POST /generate``, the stream and its events, ``GET /models`` and
``GET /schedule``.

Limits depend on the settings, so the request models are built per app by
``request_models(limits)``; their ``Field`` bounds then show up in the OpenAPI page.
The static base classes carry the same fields for type checkers and for code that
only reads a validated request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from app.fields import (
    CLASS_ALLOWED,
    ClassField,
    NonNegativeFloat,
    PositiveInt,
    SamplerName,
    Seed,
    bounded_float,
    bounded_int,
)

RerankMethod = Literal["clip", "classifier"]


# --- rerank: sample more candidates and keep the best, a field of POST /generate and the stream


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


ModelKind = Literal["teacher", "student"]
GuidanceMethod = Literal["classifier-free", "autoguidance"]  # model.samplers.GUIDANCE_METHODS, spelled out
GUIDANCE_METHOD_DESCRIPTION = (
    "what guidance steers away from: classifier-free (the null class) or autoguidance (the model's guide "
    "network, GET /models' guide); default: the model's"
)
ModelId = Annotated[str, Field(min_length=1, max_length=200)]
MODEL_ALLOWED = "a model id of GET /models"


# --- requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    max_images: int
    max_steps: int
    max_guidance: float
    max_candidates: int = 64

    @property
    def default_n(self) -> int:
        return min(16, self.max_images)


def _limited_fields(limits: Limits) -> dict[str, Any]:
    """The fields whose bounds come from the settings, as ``create_model`` takes them."""
    return {
        "rerank": rerank_field(limits.max_candidates),
        "n": (bounded_int(1, limits.max_images), Field(default=limits.default_n, description="how many images")),
        "steps": (
            bounded_int(1, limits.max_steps) | None,
            Field(
                default=None, description="sampler steps; default: the server's (the weights card's); ddpm runs all T"
            ),
        ),
        "guidance": (
            bounded_float(0.0, limits.max_guidance) | None,
            Field(
                default=None, description="classifier-free guidance scale; 1 = plain conditional; default: the server's"
            ),
        ),
    }


class GenerateRequestBase(BaseModel):
    """Body of ``POST /generate``. The served model is ``request_models(limits)[0]``, which narrows
    ``n``, ``steps`` and ``guidance`` to the settings; this base is what code reads."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    model: ModelId | None = Field(
        default=None, description="the model to sample with, an id of GET /models; default: the first listed there"
    )
    class_: ClassField = Field(alias="class")
    n: PositiveInt = 16
    steps: PositiveInt | None = None
    sampler: SamplerName | None = Field(
        default=None,
        description=(
            "ddpm (ancestral), ddim, dpm++ (DPM-Solver++ 2M), heun (EDM's second-order sampler on Karras "
            "noise levels, two network evaluations per step) or consistency (multistep consistency sampling, "
            "for a distilled student); default: the model's"
        ),
    )
    guidance: NonNegativeFloat | None = None
    guidance_method: GuidanceMethod | None = Field(default=None, description=GUIDANCE_METHOD_DESCRIPTION)
    seed: Seed | None = Field(
        default=None, description="image i is drawn with seed + i; omitted: a random seed, reported back"
    )
    rerank: Annotated[RerankBase, BeforeValidator(rerank_shorthand)] | None = Field(
        default=None, description=RERANK_DESCRIPTION
    )


class StreamRequestBase(GenerateRequestBase):
    """Body of ``POST /generate/stream`` and the query of ``GET /generate/stream``."""

    preview_every: PositiveInt | None = None


def request_models(limits: Limits) -> tuple[type[GenerateRequestBase], type[StreamRequestBase]]:
    """The request models with this server's limits in their bounds (and so in the OpenAPI page)."""
    fields = _limited_fields(limits)
    generate = create_model(
        "GenerateRequest", __base__=GenerateRequestBase, __doc__=GenerateRequestBase.__doc__, **fields
    )
    stream = create_model(
        "StreamRequest",
        __base__=StreamRequestBase,
        __doc__=StreamRequestBase.__doc__,
        preview_every=(
            bounded_int(1, limits.max_steps) | None,
            Field(default=None, description="attach preview PNGs to every k-th step event; default: ~10 per run"),
        ),
        **fields,
    )
    return generate, stream


def allowed_values(model: type[BaseModel]) -> dict[str, str]:
    """Field (by its JSON name) -> what it accepts, read from the model's JSON schema, for error messages."""
    out: dict[str, str] = {}
    for key, prop in model.model_json_schema()["properties"].items():
        options = [o for o in prop.get("anyOf", [prop]) if o.get("type") != "null"]
        if key == "class":
            out[key] = CLASS_ALLOWED
        elif key == "rerank":
            out[key] = RERANK_ALLOWED
        elif key == "model":
            out[key] = MODEL_ALLOWED
        elif len(options) == 1 and "enum" in options[0]:
            out[key] = "one of " + ", ".join(map(str, options[0]["enum"]))
        elif len(options) == 1 and options[0].get("type") in ("integer", "number"):
            o = options[0]
            kind = "an integer" if o["type"] == "integer" else "a number"
            lo, hi = o.get("minimum", "-inf"), o.get("maximum", "inf")
            out[key] = f"{kind} in {lo}..{hi}"
        else:
            out[key] = "see the API docs"
    return out


# --- responses -------------------------------------------------------------------------------


class ImageOut(BaseModel):
    index: int = Field(description="position in the answer, 0-based (with rerank: the rank, best first)")
    seed: int = Field(description="the seed this image was drawn with (base seed + index; with rerank: + candidate)")
    png: str = Field(description="base64 of a 28x28 grayscale PNG")
    score: float | None = Field(default=None, description="with rerank only: the image's score, higher is better")


class Params(BaseModel):
    """The parameters a request was served with, defaults filled in."""

    model_config = ConfigDict(serialize_by_alias=True, validate_by_name=True, validate_by_alias=True)

    class_: int = Field(alias="class")
    class_name: str
    n: int
    sampler: SamplerName
    steps: int
    guidance: float
    guidance_interval: tuple[float, float] | None = Field(
        default=None,
        description=(
            "guidance applied only at noise levels sigma_lo < sigma_t <= sigma_hi (the server's); absent: every step"
        ),
    )
    guidance_method: GuidanceMethod = "classifier-free"
    guide: str | None = Field(default=None, description="with autoguidance: the guide network it steered from")
    sigma_min: float | None = Field(
        default=None, description="with heun: its lowest noise level, the model's (null: the schedule's lowest)"
    )
    seed: int = Field(description="base seed; image i used seed + i")


class Timings(BaseModel):
    queue_ms: float = Field(description="waiting for room in the device's row budget")
    sampling_ms: float = Field(description="from admission to the last step, sharing every step with other requests")
    total_ms: float = Field(description="from accepting the request to the response")
    batch_images: int = Field(description="most images that shared one network evaluation with this request")
    batch_jobs: int = Field(description="most requests that shared one network evaluation with it")
    replica: str = Field(description="the replica (process) that sampled it, as in the X-Replica header")


class GenerateResponse(BaseModel):
    model: str = Field(description="name of the weights that drew the images")
    params: Params
    images: list[ImageOut]
    timings: Timings
    rerank: RerankOut | None = Field(default=None, description="with rerank only: how the images were chosen")


class StartEvent(BaseModel):
    job: str
    model: str = Field(description="the model sampling it")
    params: Params
    queue_depth: int = Field(description="jobs waiting for its model ahead of it, including this one")
    replica: str = Field(description="the replica (process) sampling it, as in the X-Replica header")


class ModelOut(BaseModel):
    """One served model, as an entry of OpenAI's ``GET /v1/models`` list, with its card's sampling defaults."""

    id: str = Field(description="the name requests give as model (the card's name)")
    object: Literal["model"] = "model"
    created: int = Field(description="when the weights file was written, in Unix seconds")
    owned_by: str = "fashion-diffusion"
    kind: ModelKind = Field(description="student: distilled from a teacher (its card's distillation section)")
    parent: str | None = Field(default=None, description="a student's teacher")
    default: bool = Field(description="the model of requests that name none")
    sampler: SamplerName = Field(description="the default sampler")
    steps: int = Field(description="the default steps")
    guidance: float = Field(description="the default guidance scale")
    guidance_interval: tuple[float, float] | None = Field(
        default=None, description="noise levels (sigma_lo, sigma_hi) where guidance applies; null: every step"
    )
    distilled_guidance: float | None = Field(
        default=None, description="a student's guidance scale, distilled into it: requests then take guidance 1 only"
    )
    guide: str | None = Field(
        default=None, description="its guide network for autoguidance (Karras et al. 2024); null: it has none"
    )
    guidance_method: GuidanceMethod = Field(description="the default guidance_method of its requests")
    sigma_min: float | None = Field(
        default=None, description="heun's lowest noise level for it, from which it jumps to x0; null: the schedule's"
    )
    samplers: list[SamplerName] = Field(description="the samplers it can be asked for")
    T: int = Field(description="diffusion timesteps of its schedule")
    parameters: int
    precision: str = Field(description="its network's autocast dtype")
    device: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut] = Field(description="every served model, the default first")


class ScheduleOut(BaseModel):
    name: str = Field(description="the named schedule (model.diffusion.Schedule)")
    T: int = Field(description="diffusion timesteps; t runs 0..T-1")
    alpha_bar: list[float] = Field(description="signal fraction of x_t for each t")
    log_snr: list[float] = Field(description="log(alpha_bar / (1 - alpha_bar)) for each t")
    sigma: list[float] = Field(description="noise level sqrt((1 - alpha_bar) / alpha_bar) for each t")


class QueuedEvent(BaseModel):
    position: int = Field(description="place among the jobs waiting for the device; 1 is next")
    estimated_start_s: float = Field(description="estimated seconds until it starts, at the measured tick time")


class StepEvent(BaseModel):
    index: int = Field(description="0-based step")
    total: int
    t: int = Field(description="timestep the network was evaluated at")
    x0_png: str | None = Field(default=None, description="base64 PNG grid of the current clean-image prediction")
    xt_png: str | None = Field(default=None, description="base64 PNG grid of the noisy sample x_t")
