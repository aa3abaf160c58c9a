"""The served models: each listed model's weights and card, its sampling defaults, and what it is.

``load_models`` reads every listed model's card first and checks all of it that the service relies on
(``check_cards``: the files exist, the names differ, the schedule, the sampling section under the
settings, a student's distillation section, the guide an autoguided model's card names), so a
misconfigured list fails at startup before any tensor loads; then it loads and prepares each network
for the engine. A model is a *student* when its card has a ``distillation`` section (the teacher it
was distilled from, the method, the guidance scale distilled into it) and a *teacher* otherwise.
Guidance distilled into a student is part of its network: requests may not add more.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from app.generation.device import Runtime, prepare
from app.generation.schemas import ModelKind
from app.settings import Settings
from model.diffusion import Schedule
from model.io import (
    WeightsError,
    card_guide_path,
    card_sampling,
    check_guide_card,
    load_weights,
    read_card,
    with_guide,
)
from model.samplers import check_sigma_min, sampler_named


@dataclass(frozen=True)
class Defaults:
    sampler: str
    steps: int
    guidance: float
    guidance_interval: tuple[float, float] | None = None  # noise levels where guidance applies; None: all
    guidance_method: str = "classifier-free"  # or "autoguidance", with the model's guide (model.samplers)
    sigma_min: float | None = None  # Heun's lowest noise level, the card's; None: the schedule's lowest


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
    guide: str | None = None  # the guide network's name (its card's), loaded beside it for autoguidance

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
    try:
        entry = sampler_named(sampler)
    except ValueError as err:
        raise WeightsError(f"card sampling.sampler {sampler!r}: {err}") from err
    steps = entry.steps_for(None, int(steps), T)
    try:
        entry.check_steps(steps, T, settings.max_steps)
    except ValueError as err:
        raise WeightsError(f"default steps: {err} (FASHION_STEPS / FASHION_MAX_STEPS)") from err
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
    return Defaults(sampler, int(steps), float(guidance), interval, from_card.guidance_method, from_card.sigma_min)


@dataclass(frozen=True)
class CheckedCard:
    """A listed model's card, checked, and what the service takes from it."""

    path: Path  # the .safetensors file
    card: dict[str, Any]
    name: str
    defaults: Defaults
    distilled_guidance: float | None
    guide: Path | None = None  # the guide network's .safetensors file, its card checked against this one's


def schedule_steps(card: dict[str, Any], path: Path) -> int:
    """T of the card's named schedule (``model.diffusion.Schedule.named``, which load_weights builds too)."""
    try:
        return Schedule.named(card["diffusion"]["schedule"], card["diffusion"]["T"]).T
    except (TypeError, KeyError, ValueError) as err:
        raise WeightsError(f"{path.with_suffix('.json')}: invalid diffusion section ({err})") from err


def check_cards(settings: Settings) -> list[CheckedCard]:
    """Every listed model's card, each checked before any tensors load: the weights file exists, no two
    models share a name, the schedule is a named one, the sampling defaults fit the settings (the
    first model's under their overrides), and a student's distillation section makes sense."""
    checked: list[CheckedCard] = []
    names: dict[str, Path] = {}
    for i, path in enumerate(settings.model_paths):
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
        distilled = distilled_guidance(card, path)
        T = schedule_steps(card, path)
        try:
            defaults = sampling_defaults(settings, card, T, overrides=i == 0, distilled=distilled)
            if defaults.sigma_min is not None:
                check_sigma_min(Schedule.named(card["diffusion"]["schedule"], T), defaults.sigma_min)
        except ValueError as err:
            raise WeightsError(f"{path.with_suffix('.json')}: sampling.sigma_min: {err}") from err
        except WeightsError as err:
            raise WeightsError(f"{path.with_suffix('.json')}: {err}") from err
        checked.append(CheckedCard(path, card, name, defaults, distilled, check_guide(path, card, name)))
    return checked


def check_guide(path: Path, card: dict[str, Any], name: str) -> Path | None:
    """The guide network that the card's ``sampling.guide`` names, its card checked against this one
    (model.io.check_guide_card) before any tensor loads; None when the card names none."""
    try:
        guide = card_guide_path(path, card)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{path.with_suffix('.json')}: {err}") from err
    if guide is None:
        return None
    if not guide.exists():
        raise WeightsError(f"{guide}: the guide that {path.with_suffix('.json')} names is not there")
    check_guide_card(card, read_card(guide), guide, name)
    return guide


def load_models(settings: Settings, device: torch.device) -> list[ServedModel]:
    """Check every listed model's card, then load and prepare each (blocking: run it on a fresh thread)."""
    models: list[ServedModel] = []
    for c in check_cards(settings):
        loaded = load_weights(c.path, device)
        interval = c.defaults.guidance_interval
        loaded = replace(loaded, denoiser=replace(loaded.denoiser, guidance_interval=interval))
        guide = load_weights(c.guide, device) if c.guide is not None else None
        if guide is not None:
            loaded = with_guide(loaded, guide)
        runtime = prepare(
            loaded,
            device,
            precision=settings.precision,
            channels_last=settings.channels_last,
            compile=settings.compile,
            fixed_rows=settings.fixed_rows,
            max_rows=settings.max_rows,
        )
        created = int(loaded.path.stat().st_mtime)
        guide_name = model_name(guide.card, guide.path) if guide is not None else None
        models.append(
            ServedModel(
                c.name, loaded.path, loaded.card, c.defaults, runtime, c.distilled_guidance, created, guide_name
            )
        )
    return models
