"""The served models: each listed model's weights and card, its sampling defaults, and what it is.

``load_models`` reads every card first and checks what can be checked without tensors (the files
exist, the names differ, the sampling sections and a student's distillation section make sense), so
a misconfigured list fails at startup before anything heavy loads; then it loads and prepares each
network for the engine. A model is a *student* when its card has a ``distillation`` section (the
teacher it was distilled from, the method, the guidance scale distilled into it) and a *teacher*
otherwise. Guidance distilled into a student is part of its network: requests may not add more.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from app.generation.device import Runtime, prepare
from app.generation.schemas import ModelKind
from app.settings import Settings
from model.io import WeightsError, card_sampling, load_weights, read_card
from model.samplers import SAMPLERS


@dataclass(frozen=True)
class Defaults:
    sampler: str
    steps: int
    guidance: float
    guidance_interval: tuple[float, float] | None = None  # noise levels where guidance applies; None: all


@dataclass(frozen=True)
class ServedModel:
    """One model the engine serves, under ``name`` (its card's)."""

    name: str
    path: Path
    card: dict[str, Any]
    defaults: Defaults
    runtime: Runtime
    distilled_guidance: float | None = None  # the guidance scale distilled into a student; None: a teacher
    created: int = 0  # the weights file's modification time, Unix seconds

    @property
    def kind(self) -> ModelKind:
        return "student" if "distillation" in self.card else "teacher"

    @property
    def teacher(self) -> str | None:
        """The model a student was distilled from (its card's ``distillation.teacher``)."""
        return (self.card.get("distillation") or {}).get("teacher")

    @property
    def T(self) -> int:
        """Diffusion steps of the schedule (ddpm always runs all of them)."""
        return self.runtime.denoiser.schedule.T

    def describe(self) -> dict[str, str]:
        """For the ``fashion_model_info`` metric."""
        return {"kind": self.kind, "weights": self.path.name, **self.runtime.describe()}


def model_name(card: dict[str, Any], path: Path) -> str:
    return str(card.get("name") or path.stem)


def distilled_guidance(card: dict[str, Any], path: Path) -> float | None:
    """A student card's ``distillation.guidance`` (1.0 when it leaves it out); None without the section."""
    section = card.get("distillation")
    if section is None:
        return None
    try:
        guidance = float(section.get("guidance", 1.0))
    except (AttributeError, TypeError, ValueError) as err:
        raise WeightsError(f"{path.with_suffix('.json')}: invalid distillation section ({err})") from err
    if not guidance >= 0:
        raise WeightsError(f"{path.with_suffix('.json')}: distillation.guidance must be >= 0, got {guidance}")
    return guidance


def sampling_defaults(
    settings: Settings, card: dict[str, Any], T: int, *, overrides: bool = True, distilled: float | None = None
) -> Defaults:
    """The card's "sampling" section (model.io.card_sampling, which fills what the card leaves out), under
    the settings' ``sampler``/``steps``/``guidance``/``guidance_interval`` when ``overrides`` (the default
    model only). ``distilled``: a student's distilled guidance, which allows only guidance 1 on top."""
    try:
        from_card = card_sampling(card)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"card sampling section is invalid ({err})") from err
    sampler = settings.sampler if overrides and settings.sampler else from_card.sampler
    steps = settings.steps if overrides and settings.steps else from_card.steps
    guidance = settings.guidance if overrides and settings.guidance is not None else from_card.guidance
    if sampler == "ddpm":
        steps = T
    if sampler not in SAMPLERS:
        raise WeightsError(f"card sampling.sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    if not 1 <= int(steps) <= min(T, settings.max_steps):
        raise WeightsError(
            f"default steps {steps} outside 1..{min(T, settings.max_steps)} (FASHION_STEPS / FASHION_MAX_STEPS)"
        )
    if not 0 <= float(guidance) <= settings.max_guidance:
        raise WeightsError(f"default guidance {guidance} outside 0..{settings.max_guidance} (FASHION_GUIDANCE)")
    if distilled not in (None, 1.0) and float(guidance) != 1.0:
        raise WeightsError(
            f"default guidance {guidance}: guidance {distilled} is distilled into this model; allowed: 1.0"
        )
    if not overrides or settings.guidance_interval is None:
        interval = from_card.guidance_interval
    else:
        interval = None if settings.guidance_interval == "all" else settings.guidance_interval
    return Defaults(sampler=sampler, steps=int(steps), guidance=float(guidance), guidance_interval=interval)


def read_cards(paths: tuple[Path, ...]) -> list[tuple[Path, dict[str, Any]]]:
    """Every model's card, after checking that each file exists and that no two models share a name."""
    cards: list[tuple[Path, dict[str, Any]]] = []
    names: dict[str, Path] = {}
    for path in paths:
        path = path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")
        if not path.exists():
            raise WeightsError(f"{path}: weights file not found")
        card = read_card(path)
        name = model_name(card, path)
        if name in names:
            raise WeightsError(
                f"{path}: the model name {name!r} is taken by {names[name]}; each served model needs its own "
                'name (the card\'s "name")'
            )
        names[name] = path
        cards.append((path, card))
    return cards


def load_models(settings: Settings, device: torch.device) -> list[ServedModel]:
    """Check every listed model, then load and prepare each (blocking: run it on a fresh thread)."""
    cards = read_cards(settings.model_paths)
    models: list[ServedModel] = []
    for i, (path, _) in enumerate(cards):
        loaded = load_weights(path, device)
        name = model_name(loaded.card, path)
        distilled = distilled_guidance(loaded.card, path)
        try:
            defaults = sampling_defaults(
                settings, loaded.card, loaded.denoiser.schedule.T, overrides=i == 0, distilled=distilled
            )
        except WeightsError as err:
            raise WeightsError(f"{path.with_suffix('.json')}: {err}") from err
        loaded = replace(loaded, denoiser=replace(loaded.denoiser, guidance_interval=defaults.guidance_interval))
        runtime = prepare(
            loaded,
            device,
            precision=settings.precision,
            channels_last=settings.channels_last,
            compile=settings.compile,
            fixed_rows=settings.fixed_rows,
            max_batch=settings.max_batch,
        )
        created = int(loaded.path.stat().st_mtime)
        models.append(ServedModel(name, loaded.path, loaded.card, defaults, runtime, distilled, created))
    return models
