"""Bodies of the job routes: ``POST /jobs`` (a dataset to draw), a job's status, the list, and the
webhook payload.

The request's bounds come from the settings (``job_request_model``), as ``app.generation.schemas``
builds its request models; the static base carries the same fields for code that reads a validated
request. A dataset is per-class counts (``counts``, ten numbers) or one class (``class`` + ``n``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, create_model
from pydantic_core import PydanticCustomError

from app.datasets.formats import FORMATS
from app.fields import ClassField, NonNegativeFloat, PositiveInt, SamplerName, Seed, bounded_float, bounded_int
from app.generation.schemas import GUIDANCE_METHOD_DESCRIPTION, GuidanceMethod, Limits, ModelId, allowed_values
from model.data import NUM_CLASSES

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]  # app.metrics.JOB_STATES
ACTIVE: tuple[JobState, ...] = ("queued", "running")
WebhookState = Literal["pending", "delivered", "failed"]
COUNTS_ALLOWED = f"a list of {NUM_CLASSES} image counts >= 0, one per class (class 0 first), or class and n"


def format_value(value: Any) -> str:
    """A format of ``app.datasets.formats.FORMATS``, or a ``format_value`` error naming them."""
    if not isinstance(value, str) or value not in FORMATS:
        raise PydanticCustomError("format_value", "must be one of {allowed}", {"allowed": ", ".join(FORMATS)})
    return value


# The API's formats are the exporters' keys: a new exporter is served here as it is added there.
FormatName = Annotated[
    str,
    BeforeValidator(format_value),
    WithJsonSchema({"type": "string", "enum": list(FORMATS), "description": "an export format"}),
]
Count = Annotated[int, Field(ge=0)]


# --- requests --------------------------------------------------------------------------------


class JobRequestBase(BaseModel):
    """Body of ``POST /jobs``; the served model is ``job_request_model(...)``, with the settings' bounds."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    model: ModelId | None = Field(default=None, description="a model id of GET /models; default: the first listed")
    counts: list[Count] | None = Field(
        default=None, min_length=NUM_CLASSES, max_length=NUM_CLASSES, description=COUNTS_ALLOWED
    )
    class_: ClassField | None = Field(default=None, alias="class", description="with n: n images of this class")
    n: PositiveInt | None = Field(default=None, description="with class: how many images")
    sampler: SamplerName | None = Field(default=None, description="default: the model's")
    steps: PositiveInt | None = Field(default=None, description="default: the model's")
    guidance: NonNegativeFloat | None = Field(default=None, description="default: the model's")
    guidance_method: GuidanceMethod | None = Field(default=None, description=GUIDANCE_METHOD_DESCRIPTION)
    seed: Seed | None = Field(
        default=None, description="image i (class by class, class 0 first) is drawn from seed + i; omitted: random"
    )
    format: FormatName = Field(default="npz", description="the result's format: " + ", ".join(FORMATS))
    webhook_url: str | None = Field(
        default=None,
        min_length=1,
        max_length=2048,
        description="told of the job's end (job.succeeded, job.failed, job.cancelled), signed per Standard Webhooks",
    )


def job_request_model(limits: Limits, max_images: int) -> type[JobRequestBase]:
    """The request model with this server's limits in its bounds (and so in the OpenAPI page)."""
    return create_model(
        "JobRequest",
        __base__=JobRequestBase,
        __doc__=JobRequestBase.__doc__,
        n=(bounded_int(1, max_images) | None, Field(default=None, description="with class: how many images")),
        steps=(bounded_int(1, limits.max_steps) | None, Field(default=None, description="default: the model's")),
        guidance=(
            bounded_float(0.0, limits.max_guidance) | None,
            Field(default=None, description="classifier-free guidance scale; default: the model's"),
        ),
    )


def job_allowed(model: type[BaseModel]) -> dict[str, str]:
    """What each field of ``POST /jobs`` accepts, for its validation errors."""
    return allowed_values(model) | {"counts": COUNTS_ALLOWED, "webhook_url": "an http(s) URL of another service"}


# --- responses -------------------------------------------------------------------------------


class Sampling(BaseModel):
    """The parameters the job draws with, the model's defaults filled in."""

    sampler: SamplerName
    steps: int
    guidance: float
    guidance_method: GuidanceMethod
    sigma_min: float | None = Field(default=None, description="heun only: its lowest noise level")


class JobError(BaseModel):
    code: str = Field(
        description=(
            "disk_full, job_dir_missing, chunk_corrupt, io_error, sampling_failed, model_not_served, internal_error"
        )
    )
    message: str


class ResultOut(BaseModel):
    url: str = Field(description="GET it: Content-Length, ETag (the sha256) and Range (206, 416)")
    file: str = Field(description="its file name")
    format: str
    bytes: int
    sha256: str
    images: int = Field(description="images in it: all of them, or a cancelled job's prefix")
    partial: bool = Field(description="true for a cancelled job: images 0..images-1 of the dataset")


class WebhookAttempt(BaseModel):
    attempt: int = Field(description="1-based")
    event: str
    at: datetime
    status_code: int | None = Field(default=None, description="the receiver's HTTP status; null: no answer")
    error: str | None = Field(default=None, description="why it failed; null: delivered (2xx)")


class WebhookOut(BaseModel):
    url: str
    state: WebhookState | None = Field(default=None, description="null until the job ends")
    attempts: list[WebhookAttempt]


class JobStatus(BaseModel):
    """A job as ``GET /jobs/{id}`` shows it."""

    model_config = ConfigDict(serialize_by_alias=True, validate_by_name=True, validate_by_alias=True)

    id: str
    object: Literal["job"] = "job"
    state: JobState
    model: str
    sampling: Sampling
    counts: list[int] = Field(description="images of each class, class 0 first")
    seed: int = Field(description="image i is drawn from seed + i")
    format: str
    chunk_images: int = Field(description="images per committed chunk")
    images_done: int = Field(description="images committed to disk")
    images_total: int
    images_per_second: float | None = Field(default=None, description="in its current run; null before a chunk")
    estimated_finish: datetime | None = Field(default=None, description="while running, at images_per_second")
    queue_position: int | None = Field(default=None, description="while queued: 1 is next")
    created: datetime
    started: datetime | None = None
    finished: datetime | None = None
    error: JobError | None = None
    result: ResultOut | None = None
    webhook: WebhookOut | None = None
    replica: str = Field(description="the replica that keeps it (jobs are pinned to it), as in X-Replica")
    url: str = Field(description="this status")
    events_url: str = Field(description="this status as server-sent events until the job ends")


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobStatus] = Field(description="newest first")
    has_more: bool
    last_id: str | None = Field(default=None, description="pass as after= for the next page")


class Deleted(BaseModel):
    id: str
    object: Literal["job"] = "job"
    deleted: bool = True


class WebhookPayload(BaseModel):
    """The body of a webhook: Standard Webhooks' ``type``, ``timestamp`` and ``data`` (the job's status)."""

    type: Literal["job.succeeded", "job.failed", "job.cancelled"]
    timestamp: datetime
    data: JobStatus
