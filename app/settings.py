"""Service settings: one pydantic-settings class, read from ``FASHION_*`` environment variables.

    FASHION_WEIGHTS=weights/fashion-unet.safetensors FASHION_DEVICE=cuda python -m app

Every field fails fast with a message naming the variable and what is allowed, so a
misconfigured deployment stops at startup rather than at the first request.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.samplers import SAMPLERS

ENV_PREFIX = "FASHION_"
WEIGHTS_RELATIVE = Path("weights") / "fashion-unet.safetensors"


def default_weights_path() -> Path:
    """The shipped weights: ``<repo root>/weights/fashion-unet.safetensors``.

    Resolved from this package's location, so it is the same from any working directory and
    in a container that holds the repository at /app; an installed (site-packages) copy of
    the package falls back to ``./weights`` under the working directory.
    """
    beside_package = Path(__file__).resolve().parent.parent / WEIGHTS_RELATIVE
    if beside_package.exists():
        return beside_package
    in_cwd = Path.cwd() / WEIGHTS_RELATIVE
    return in_cwd if in_cwd.exists() else beside_package


class Settings(BaseSettings):
    """Everything the service can be told; each field is also ``FASHION_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    # Weights and device.
    weights: Path = Field(
        default_factory=default_weights_path, description="the .safetensors file; its .json card sits beside it"
    )
    device: str = Field(default="auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    precision: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="autocast dtype of the network; auto is float16 on CUDA, float32 elsewhere"
    )
    channels_last: bool | None = Field(default=None, description="channels-last memory format; None: on for CUDA only")
    compile: bool = Field(default=False, description="torch.compile the network (CUDA graphs on CUDA)")
    fixed_rows: int | None = Field(
        default=None,
        ge=0,
        description=(
            "the network always runs on exactly this many rows (padding the last chunk), so an image never "
            "depends on which other images share its batch; None: 8 on CPU, 2 * max_batch on CUDA; 0: off"
        ),
    )

    # Sampling defaults; None takes the weights card's "sampling" section, then dpm++ / 20 / 1.0.
    sampler: Literal["ddpm", "ddim", "dpm++"] | None = None
    steps: int | None = Field(default=None, ge=1)
    guidance: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)

    # Limits.
    max_images: int = Field(default=64, ge=1, description="most images one request may ask for")
    max_steps: int = Field(default=1000, ge=1, description="most sampler steps one request may ask for")
    max_guidance: float = Field(
        default=20.0, ge=0.0, allow_inf_nan=False, description="largest guidance scale accepted"
    )
    queue_size: int = Field(default=64, ge=1, description="jobs waiting for the device; one more is refused with 429")
    max_batch: int = Field(default=64, ge=1, description="most images sampled together in one batch")
    batch_wait_ms: float = Field(default=5.0, ge=0.0, le=10_000.0, description="how long a job waits for company")
    max_body_bytes: int = Field(default=64 * 1024, ge=256, description="larger request bodies are refused with 413")

    # Access.
    api_key: SecretStr | None = Field(default=None, description="when set, every route but health and metrics needs it")

    warmup: bool = Field(default=True, description="run one small batch before reporting ready")

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

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_images > self.max_batch:
            raise ValueError(
                f"max_images ({self.max_images}) must not exceed max_batch ({self.max_batch}): "
                "one request must fit in one batch"
            )
        if self.steps is not None and self.steps > self.max_steps:
            raise ValueError(f"steps ({self.steps}) must not exceed max_steps ({self.max_steps})")
        if self.guidance is not None and self.guidance > self.max_guidance:
            raise ValueError(f"guidance ({self.guidance}) must not exceed max_guidance ({self.max_guidance})")
        if self.sampler is not None and self.sampler not in SAMPLERS:  # pragma: no cover - Literal guards it
            raise ValueError(f"sampler must be one of {SAMPLERS}")
        return self
