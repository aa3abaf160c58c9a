"""Settings: environment prefix, defaults resolved from the package, fail-fast validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

import app
from app.generation.models import Defaults, sampling_defaults
from app.settings import Settings, default_weights_path
from model.io import WeightsError

pytestmark = pytest.mark.timeout(60)


def test_defaults_match_the_issue() -> None:
    s = Settings()
    assert s.device == "auto"
    assert (s.max_images, s.max_steps, s.queue_size, s.max_rows, s.drain_seconds) == (64, 1000, 64, 128, 30.0)
    assert s.api_key is None


def test_default_weights_resolve_from_the_package_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    repo = Path(app.__file__).resolve().parent.parent
    assert default_weights_path() == repo / "weights" / "fashion-unet.safetensors"
    shipped = [p for p in (repo / "weights/fashion-unet.safetensors", repo / "weights/fashion-student.safetensors")]
    assert Settings().model_paths == tuple(
        p for p in shipped if p.exists()
    )  # the teacher, and the student once shipped
    assert Settings().model_paths[0] == shipped[0]


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASHION_WEIGHTS", str(tmp_path / "w.safetensors"))
    monkeypatch.setenv("FASHION_MAX_IMAGES", "8")
    monkeypatch.setenv("FASHION_API_KEY", "k")
    monkeypatch.setenv("FASHION_DEVICE", "CPU")
    s = Settings()
    assert s.weights == tmp_path / "w.safetensors" and s.model_paths == (tmp_path / "w.safetensors",)
    assert s.max_images == 8
    assert s.api_key is not None and s.api_key.get_secret_value() == "k"
    assert s.device == "cpu"


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"max_images": 129}, "max_rows"),
        ({"device": "tpu"}, "device must be"),
        ({"steps": 2000}, "max_steps"),
        ({"guidance": 30.0}, "max_guidance"),
        ({"queue_size": 0}, "queue_size"),
        ({"sampler": "euler"}, "sampler"),
        ({"guidance_interval": (5.0, 1.0)}, "guidance_interval must be"),
    ],
)
def test_bad_settings_fail_fast(values: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        Settings(**values)


def test_empty_api_key_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_API_KEY", "")
    assert Settings().api_key is None


def test_sampling_defaults_precedence() -> None:
    card = {"sampling": {"sampler": "ddim", "steps": 30, "guidance": 2.5}}
    assert sampling_defaults(Settings(), card, 1000) == Defaults("ddim", 30, 2.5)
    assert sampling_defaults(Settings(steps=7, guidance=1.0), card, 1000) == Defaults("ddim", 7, 1.0)
    assert sampling_defaults(Settings(), {}, 1000) == Defaults("dpm++", 20, 1.0)
    assert sampling_defaults(Settings(sampler="ddpm"), {}, 1000).steps == 1000
    card["sampling"]["guidance_interval"] = [0.3, 5]
    assert sampling_defaults(Settings(), card, 1000).guidance_interval == (0.3, 5.0)
    assert sampling_defaults(Settings(guidance_interval=(1, 2)), card, 1000).guidance_interval == (1.0, 2.0)
    assert sampling_defaults(Settings(guidance_interval="all"), card, 1000).guidance_interval is None
    with pytest.raises(WeightsError, match="steps"):
        sampling_defaults(Settings(max_steps=10), card, 1000)
    heun = {"sampling": {"sampler": "heun", "steps": 600}}  # 1,200 evaluations
    with pytest.raises(WeightsError, match="600 steps of heun take 1200 network evaluations, over the 1000 allowed"):
        sampling_defaults(Settings(), heun, 1000)
