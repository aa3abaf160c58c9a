"""The served models: each listed model's weights and card, its sampling defaults, and what it is.

``load_models`` reads every listed model's card first and checks all of it that the service relies on
(``check_cards``: what the cards alone tell, in ``model.io.check_card``: the files exist, the schedule,
the sampling section, a student's distillation section, the guide an autoguided model's card names;
and here what needs the settings: the names differ, the sampling defaults fit the settings), so a
misconfigured list fails at startup before any tensor loads; then it loads and prepares each network
for the engine. A model is a *student* when its card has a ``distillation`` section (the teacher it
was distilled from, the method, the guidance scale distilled into it) and a *teacher* otherwise.
Guidance distilled into a student is part of its network: requests may not add more
(``model.io.check_distilled_guidance``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from app.generation.device import Runtime, prepare
from app.generation.schemas import ModelKind
from app.settings import Settings
from model.io import (
    Card,
    CheckedCard,
    WeightsError,
    card_sampling,
    check_card,
    check_distilled_guidance,
    load_weights,
    model_name,
    with_guide,
)
from model.samplers import sampler_named


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
    card: Card
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


def sampling_defaults(
    settings: Settings, card: Card, T: int, *, overrides: bool = True, distilled: float | None = None
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
    try:
        check_distilled_guidance(distilled, guidance, "this model")
    except ValueError as err:
        raise WeightsError(f"default guidance {guidance}: {err}; allowed: 1.0") from err
    if not overrides or settings.guidance_interval is None:
        interval = from_card.guidance_interval
    else:
        interval = None if settings.guidance_interval == "all" else settings.guidance_interval
    return Defaults(sampler, int(steps), float(guidance), interval, from_card.guidance_method, from_card.sigma_min)


def check_cards(settings: Settings) -> list[tuple[CheckedCard, Defaults]]:
    """Every listed model's card, each checked before any tensors load: what the cards alone can tell
    (``model.io.check_card``), no two models share a name, and the sampling defaults fit the settings
    (the first model's under their overrides)."""
    checked: list[tuple[CheckedCard, Defaults]] = []
    names: dict[str, Path] = {}
    for i, path in enumerate(settings.model_paths):
        card = check_card(path)
        if card.name in names:
            raise WeightsError(
                f"{card.path}: the model name {card.name!r} is taken by {names[card.name]}; each served model "
                'needs its own name (the card\'s "name")'
            )
        names[card.name] = card.path
        try:
            defaults = sampling_defaults(
                settings, card.card, card.T, overrides=i == 0, distilled=card.distilled_guidance
            )
        except WeightsError as err:
            raise WeightsError(f"{card.path.with_suffix('.json')}: {err}") from err
        checked.append((card, defaults))
    return checked


def load_models(settings: Settings, device: torch.device) -> list[ServedModel]:
    """Check every listed model's card, then load and prepare each (blocking: run it on a fresh thread)."""
    models: list[ServedModel] = []
    for c, defaults in check_cards(settings):
        loaded = load_weights(c.path, device)
        interval = defaults.guidance_interval
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
            ServedModel(c.name, loaded.path, loaded.card, defaults, runtime, c.distilled_guidance, created, guide_name)
        )
    return models
