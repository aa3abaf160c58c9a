"""Service settings: one pydantic-settings class, read from ``FASHION_*`` environment variables.

    FASHION_MODELS='["weights/fashion-unet.safetensors", "weights/fashion-student.safetensors"]' \
        FASHION_DEVICE=cuda python -m app

Every field fails fast with a message naming the variable and what is allowed, so a
misconfigured deployment stops at startup rather than at the first request.
"""

from __future__ import annotations

import base64
import os
import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.fields import SamplerName
from model.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED, DEFAULT_TEMPLATES
from model.samplers import check_guidance_interval

ENV_PREFIX = "FASHION_"
WEIGHTS_DIR = Path("weights")
SHIPPED_MODELS = ("fashion-unet", "fashion-student")  # the teacher, then the student distilled from it
WEIGHTS_RELATIVE = WEIGHTS_DIR / f"{SHIPPED_MODELS[0]}.safetensors"
CLASSIFIER_RELATIVE = WEIGHTS_DIR / "classifier.safetensors"
MiB = 1024 * 1024


def _shipped(relative: Path) -> Path:
    beside_package = Path(__file__).resolve().parent.parent / relative
    if beside_package.exists():
        return beside_package
    in_cwd = Path.cwd() / relative
    return in_cwd if in_cwd.exists() else beside_package


def default_weights_path() -> Path:
    """The shipped weights: ``<repo root>/weights/fashion-unet.safetensors``.

    Resolved from this package's location, so it is the same from any working directory and
    in a container that holds the repository at /app; an installed (site-packages) copy of
    the package falls back to ``./weights`` under the working directory.
    """
    return _shipped(WEIGHTS_RELATIVE)


def default_weights_dir() -> Path:
    """The shipped weights' directory, ``<repo root>/weights``, found the same way."""
    return _shipped(WEIGHTS_DIR)


def shipped_models(directory: Path) -> tuple[Path, ...]:
    """The shipped models in ``directory`` that exist, teacher first; the teacher alone when none does
    (so that startup fails naming the file it looked for)."""
    paths = tuple(directory / f"{name}.safetensors" for name in SHIPPED_MODELS)
    return tuple(path for path in paths if path.exists()) or paths[:1]


def default_classifier_path() -> Path:
    """The shipped evaluation classifier, ``<repo root>/weights/classifier.safetensors``, found the same way."""
    return _shipped(CLASSIFIER_RELATIVE)


class Settings(BaseSettings):
    """Everything the service can be told; each field is also ``FASHION_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    # The models and the device.
    models: tuple[Path, ...] | None = Field(
        default=None,
        description=(
            "the models to serve, as a JSON list of .safetensors files (each with its .json card beside it); the "
            "first is the default model of requests that name none. None: weights alone when set, else the shipped "
            "models of weights_dir that exist (fashion-unet, then fashion-student)"
        ),
    )
    weights: Path | None = Field(
        default=None, description='one model to serve, the same as models=["<weights>"] (older deployments set it)'
    )
    weights_dir: Path = Field(
        default_factory=default_weights_dir,
        description="where the shipped models are found when neither models nor weights is set",
    )
    device: str = Field(default="auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    precision: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description=(
            "autocast dtype of the network; auto is float16 on CUDA, bfloat16 on a CPU with AVX512_BF16 or AMX "
            "(faster there: docs/speed.md#precision), float32 elsewhere"
        ),
    )
    channels_last: Literal["auto"] | bool = Field(
        default=True,
        description=(
            "channels-last memory format (faster on the Xeons measured, slower in bfloat16 on an AMD EPYC); auto: "
            "measured at startup (model.machine.faster_layout: channels-last unless NCHW is 5% faster here). Not "
            "the default: in bfloat16 the layout changes an image's last bits, and two starts that measure a near "
            "tie differently would draw different bytes for one seed"
        ),
    )
    compile: Literal["auto"] | bool = Field(
        default="auto",
        description=(
            "torch.compile the network (CUDA graphs on CUDA); auto: on CUDA only (on the CPU a compile costs startup "
            "time and memory at every start, docs/speed.md#compiled: set 1 where that pays)"
        ),
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description=(
            "torch's intra-op CPU threads (torch.set_num_threads); None: torch's default, every CPU it may use. "
            "Beside another busy process, fewer threads than cores avoids threads waiting on each other"
        ),
    )
    fixed_rows: int | None = Field(
        default=None,
        ge=0,
        description=(
            "the network always runs on exactly this many rows (padding the last chunk), so an image never "
            "depends on which other images share its batch; None: 16 on CPU, max_rows on CUDA; 0: off"
        ),
    )

    # The default model's sampling defaults; None takes its card's "sampling" section, then dpm++ / 20 / 1.0.
    # Other models always take their own card's: a student's are not the teacher's.
    sampler: SamplerName | None = None
    steps: int | None = Field(default=None, ge=1)
    guidance: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    guidance_interval: tuple[float, float] | Literal["all"] | None = Field(
        default=None,
        description=(
            "guide only at noise levels sigma_lo < sigma_t <= sigma_hi, as JSON [lo, hi]; 'all': every step; "
            "None: the weights card's"
        ),
    )

    # Limits.
    max_images: int = Field(default=64, ge=1, description="most images one request may ask for")
    max_steps: int = Field(default=1000, ge=1, description="most sampler steps one request may ask for")
    max_guidance: float = Field(
        default=20.0, ge=0.0, allow_inf_nan=False, description="largest guidance scale accepted"
    )
    queue_size: int = Field(default=64, ge=1, description="jobs waiting for the device; one more is refused with 429")
    max_rows: int = Field(
        default=128,
        ge=1,
        description=(
            "the row budget: most rows in one network evaluation, shared by every active job (an image is one "
            "row, two while it is guided); a job needing more is refused with 422"
        ),
    )
    scheduler: str = Field(
        default="narrow-first",
        description=(
            "how the jobs share the network evaluations (app.generation.lane's policies; the engine refuses any "
            "other name at startup). narrow-first: a job's deadline is its arrival plus 3x its time alone (7x for "
            "a job wider than tick_rows); a tick evaluates the earliest deadlines first, up to tick_rows rows, so "
            "small jobs stay fast beside large ones and a large job's turn still comes, and the models take turns "
            "(another model's network only runs in a tick when one of its jobs is overdue). fcfs: first come, "
            "first served, every running job steps at every tick (docs/speed.md measures both)"
        ),
    )
    tick_rows: int | None = Field(
        default=None,
        ge=1,
        description="narrow-first: most rows one tick evaluates; None: one fixed-row chunk (16 on the CPU)",
    )
    drain_seconds: float = Field(
        default=30.0,
        ge=0.0,
        le=3600.0,
        description="on SIGTERM, how long running and queued jobs may take to finish before they get a 503",
    )
    max_body_bytes: int = Field(default=64 * 1024, ge=256, description="larger request bodies are refused with 413")
    edit_max_image_bytes: int = Field(
        default=4 * MiB, ge=1024, le=64 * MiB, description="largest picture (or mask) an edit may upload, encoded"
    )
    edit_max_pixels: int = Field(
        default=4096 * 4096,
        ge=28 * 28,
        le=64 * 1024 * 1024,
        description="most pixels (width x height) of a picture an edit may upload, read from its header first",
    )

    # Access.
    api_key: SecretStr | None = Field(default=None, description="when set, every route but health and metrics needs it")

    warmup: bool = Field(default=True, description="run one small batch before reporting ready")
    replica: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        min_length=1,
        max_length=128,
        pattern=r"^[\x21-\x7e]+$",
        description="this process's name in X-Replica and timings.replica (under Ray Serve: its replica ID)",
    )

    # Jobs that outlive a request (``POST /jobs``, ``app.jobs``): drawn in the engine's idle rows, kept on disk.
    job_dir: Path = Field(
        default=Path("data/jobs"),
        description=(
            "where jobs live: jobs.sqlite3 (their state) and one directory per job (its chunks and result), "
            "relative to the working directory; created at the first job. A second process on the same directory "
            "takes its own job store inside it (replica-1, ...), so each job is pinned to the process that keeps it"
        ),
    )
    job_max_images: int = Field(default=200_000, ge=1, description="most images one job may ask for")
    job_queue_size: int = Field(
        default=16, ge=1, description="jobs waiting behind the running one; one more is refused with 429"
    )
    job_disk_quota_bytes: int = Field(
        default=10 * 1024 * MiB,
        ge=1,
        description=(
            "disk the job store may use, estimated per image for the chunks and the export of every job it keeps "
            "(DELETE /jobs/{id} gives it back); a job that would pass it is refused with 413"
        ),
    )
    job_chunk_images: int = Field(
        default=256, ge=1, description="images per chunk: a job commits a chunk at a time and resumes from there"
    )
    job_piece_images: int = Field(
        default=4,
        ge=1,
        description=(
            "most images one background engine job of a job holds (fewer when one tick's rows cannot hold them): "
            "small pieces fit the idle rows that interactive ticks leave"
        ),
    )
    background_rows: int = Field(
        default=64,
        ge=1,
        description=(
            "rows a tick gives a long job's work while no interactive request runs (at least one tick's rows, at "
            "most max_rows). More fills an idle device better; an interactive request that arrives mid-tick waits "
            "for those rows. 64 (four CPU chunks) met both targets of docs/speed.md#long-jobs-in-the-idle-rows, "
            "16 did not"
        ),
    )
    job_inflight_rows: int = Field(
        default=32, ge=1, description="rows of a job's background engine jobs submitted at once (two CPU ticks' worth)"
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description=(
            "the Standard Webhooks secret (whsec_ and base64) that signs job webhooks; unset: a job that asks for a "
            "webhook_url is refused with 422"
        ),
    )
    webhook_attempts: int = Field(default=5, ge=1, le=50, description="deliveries tried per webhook event")
    webhook_backoff_seconds: float = Field(
        default=1.0, ge=0.0, le=3600.0, description="wait before the second attempt, doubling after each failure"
    )
    webhook_timeout_seconds: float = Field(default=10.0, gt=0.0, le=300.0, description="timeout of one attempt")

    # Reranking (``rerank`` on /generate) and the classifier it can rank by.
    classifier_weights: Path | None = Field(
        default_factory=default_classifier_path,
        description=(
            "the Fashion-MNIST classifier (.safetensors + .json card) behind rerank by classifier; "
            "empty: none (rerank by classifier answers 503)"
        ),
    )
    rerank_max_candidates: int | None = Field(
        default=None, ge=1, description="most candidates one rerank may sample; None: max_images"
    )

    # CLIP (``POST /clip/score`` and rerank by clip). It loads on a background thread once the main
    # model is ready: /readyz never waits for it and reports its status beside the main model's.
    clip_enabled: bool = Field(
        default=True, description="load CLIP as configured below; false: CLIP routes answer 503, generation works"
    )
    clip_model: str = Field(default=DEFAULT_MODEL, description="open_clip architecture name, e.g. ViT-B-32")
    clip_pretrained: str | None = Field(
        default=DEFAULT_PRETRAINED,
        description="open_clip pretrained tag for clip_model, looked up in clip_cache_dir; empty: none",
    )
    clip_checkpoint: Path | None = Field(
        default=None, description="a local state dict (.safetensors/.pt) for clip_model; wins over clip_pretrained"
    )
    clip_cache_dir: Path | None = Field(
        default=None, description="where pretrained tags are downloaded to and found; None: huggingface_hub's cache"
    )
    clip_download: bool = Field(
        default=False,
        description=(
            "download clip_pretrained from the model hub when clip_cache_dir lacks it. Off by default: the service "
            "then never touches the network, and a host without internet reports CLIP unavailable at once instead "
            "of after a minute of hub retries. Turn it on where the host has internet, or fetch once with "
            "`python -m model.clip fetch --cache-dir DIR` and point clip_cache_dir there"
        ),
    )
    clip_random_init: bool = Field(
        default=False,
        description="tests and smoke runs only: random CLIP weights when neither tag nor checkpoint is set",
    )
    clip_templates: tuple[str, ...] = Field(
        default=DEFAULT_TEMPLATES,
        description="prompt templates with one {} for the class name (a JSON list in the environment); averaged",
    )
    clip_max_images: int = Field(default=32, ge=1, le=1024, description="most images one /clip/score call may send")
    clip_max_image_bytes: int = Field(
        default=256 * 1024, ge=1024, le=64 * MiB, description="largest encoded image (file, or base64-decoded)"
    )
    clip_max_pixels: int = Field(
        default=1024 * 1024, ge=28 * 28, description="largest width * height, read from the header before decoding"
    )
    clip_max_texts: int = Field(default=64, ge=1, le=1024, description="most texts one /clip/score call may send")
    clip_concurrency: int = Field(default=1, ge=1, le=64, description="CLIP scoring calls running at once (threads)")
    clip_queue_size: int = Field(
        default=8, ge=0, description="scoring calls that may wait for a free thread; one more is refused with 429"
    )

    @field_validator("clip_pretrained", "clip_checkpoint", "clip_cache_dir", "classifier_weights", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("clip_model", mode="before")
    @classmethod
    def _clip_model(cls, value: object) -> object:
        return DEFAULT_MODEL if isinstance(value, str) and not value.strip() else value

    @field_validator("clip_templates")
    @classmethod
    def _templates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(t.count("{}") != 1 for t in value):
            raise ValueError(f"clip_templates must be a non-empty list of strings with exactly one {{}}; got {value}")
        return value

    @property
    def model_paths(self) -> tuple[Path, ...]:
        """The models to serve, the default first (see ``models``)."""
        if self.models is not None:
            return self.models
        if self.weights is not None:
            return (self.weights,)
        return shipped_models(self.weights_dir)

    @field_validator("models")
    @classmethod
    def _models(cls, value: tuple[Path, ...] | None) -> tuple[Path, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("models must list at least one .safetensors file")
        seen: set[Path] = set()
        for path in value:
            if path.resolve() in seen:
                raise ValueError(f"models lists {path} twice")
            seen.add(path.resolve())
        return value

    @property
    def max_candidates(self) -> int:
        return self.rerank_max_candidates or self.max_images

    @property
    def edit_max_body_bytes(self) -> int:
        """The largest image-to-image body: two pictures at their limit, base64 in JSON, plus the fields."""
        return max(self.max_body_bytes, 2 * (-(-self.edit_max_image_bytes // 3) * 4 + 1024) + 64 * 1024)

    @property
    def clip_max_body_bytes(self) -> int:
        """The largest /clip/score body: every image at its limit, base64 in JSON, plus room for the texts."""
        per_image = -(-self.clip_max_image_bytes // 3) * 4 + 1024  # base64, and multipart headers or JSON quoting
        return max(self.max_body_bytes, self.clip_max_images * per_image + self.clip_max_texts * 4096 + 64 * 1024)

    @field_validator("guidance_interval")
    @classmethod
    def _interval(cls, value: tuple[float, float] | str | None) -> tuple[float, float] | str | None:
        if isinstance(value, tuple):
            check_guidance_interval(*value)
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None  # FASHION_API_KEY="" means no key, not an empty key
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None  # FASHION_WEBHOOK_SECRET="" means no secret
        secret = value.get_secret_value().strip()
        try:
            key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except ValueError:
            key = b""
        if not secret.startswith("whsec_") or not 24 <= len(key) <= 64:
            raise ValueError(
                "webhook_secret must be a Standard Webhooks secret: whsec_ then the base64 of 24-64 random bytes, "
                "e.g. python -c \"import base64, os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
            )
        return SecretStr(value.get_secret_value().strip())

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.models is not None and self.weights is not None:
            raise ValueError(
                f"set models or weights, not both (models={[str(p) for p in self.models]}, weights={self.weights}): "
                "weights is the one-model form of models"
            )
        if self.max_images > self.max_rows:
            raise ValueError(
                f"max_images ({self.max_images}) must not exceed max_rows ({self.max_rows}): "
                "one request must fit in one network evaluation"
            )
        if self.steps is not None and self.steps > self.max_steps:
            raise ValueError(f"steps ({self.steps}) must not exceed max_steps ({self.max_steps})")
        if self.guidance is not None and self.guidance > self.max_guidance:
            raise ValueError(f"guidance ({self.guidance}) must not exceed max_guidance ({self.max_guidance})")
        if self.rerank_max_candidates is not None and self.rerank_max_candidates > self.max_rows:
            raise ValueError(
                f"rerank_max_candidates ({self.rerank_max_candidates}) must not exceed max_rows ({self.max_rows}): "
                "a rerank's candidates are sampled as one job"
            )
        return self
