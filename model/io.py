"""Weights on disk: safetensors tensors plus a JSON card, loaded without pickle."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Required, TypedDict, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.atomic import atomic_path, atomic_write_bytes
from model.diffusion import PREDICTIONS, Schedule
from model.samplers import GUIDANCE_METHODS, Denoiser, check_sigma_min
from model.unet import UNet, UNetConfig


class WeightsError(RuntimeError):
    """Weights or their card are missing or unusable; the message names the file and the problem."""


class Card(TypedDict, total=False):
    """A weights card: the JSON object beside a .safetensors file. ``read_card`` checks that it has its
    two required sections; ``check_card`` checks everything else a server relies on.

    A TypedDict rather than a dataclass: a card is JSON that training writes, scripts edit and readers
    (the service, the dataset exporter, tests) read as a dict, and its sections are open records (a
    ``training`` record grows a field when training does); the type names the sections and their roles."""

    name: str  # the model's name: its id in the service (absent: the weights file's stem, ``model_name``)
    unet: Required[dict[str, Any]]  # UNetConfig's fields: the network is UNet(UNetConfig(**card["unet"]))
    diffusion: Required[dict[str, Any]]  # "schedule", "T" and "prediction" (model.diffusion)
    classes: list[str]  # the class names, by label
    sampling: dict[str, Any]  # how to sample it by default: CardSampling's fields (``card_sampling``)
    distillation: dict[str, Any]  # a student's: "teacher", "method", the "guidance" distilled into it
    training: dict[str, Any]  # what training did and cost (model.train's or model.distill's record)
    quality: dict[str, Any]  # model.evaluate's figures (--write-card)
    guide_of: dict[str, Any]  # a guide network's: the model it guides


def atomic_torch_save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_weights_file(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state dict as safetensors, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


def save_weights(model: UNet, card: Mapping[str, Any], safetensors_path: Path) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` atomically; returns the card's path."""
    save_weights_file(model.state_dict(), safetensors_path)
    card_path = safetensors_path.with_suffix(".json")
    atomic_write_bytes(card_path, (json.dumps(card, indent=2) + "\n").encode())
    return card_path


def read_card(path: str | os.PathLike) -> Card:
    """The card beside ``path`` (its .json), checked to be an object with ``unet`` and ``diffusion``."""
    card_path = Path(path).with_suffix(".json")
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError as err:
        raise WeightsError(f"{card_path}: card not found (it must sit beside the .safetensors file)") from err
    except json.JSONDecodeError as err:
        raise WeightsError(f"{card_path}: not valid JSON ({err})") from err
    if not isinstance(card, dict):
        raise WeightsError(f"{card_path}: expected a JSON object, got {type(card).__name__}")
    for key in ("unet", "diffusion"):
        if key not in card:
            raise WeightsError(f"{card_path}: missing the {key!r} section")
    return cast(Card, card)


@dataclass(frozen=True)
class LoadedWeights:
    denoiser: Denoiser
    card: Card
    path: Path

    @property
    def model(self) -> UNet:
        return self.denoiser.model  # type: ignore[return-value]


def card_guidance_interval(card: Card) -> tuple[float, float] | None:
    """The card's ``sampling.guidance_interval`` as (sigma_lo, sigma_hi), None when absent (guidance at
    every step). A malformed entry raises TypeError or ValueError; the Denoiser checks the bounds."""
    interval = (card.get("sampling") or {}).get("guidance_interval")
    if interval is None:
        return None
    lo, hi = (float(v) for v in interval)
    return lo, hi


@dataclass(frozen=True)
class CardSampling:
    """How the weights are meant to be sampled: the card's ``sampling`` section, and what applies
    where the card leaves a field out."""

    sampler: str = "dpm++"
    steps: int = 20
    guidance: float = 1.0  # the plain conditional model
    guidance_interval: tuple[float, float] | None = None  # guide every step
    guide: str | None = None  # a guide network's weights file, beside these, for autoguidance (None: none)
    guidance_method: str = "classifier-free"  # one of GUIDANCE_METHODS; "autoguidance" when a guide is named
    sigma_min: float | None = None  # Heun's lowest noise level (model.samplers.karras_timesteps); None: the schedule's


def card_sampling(card: Card) -> CardSampling:
    """The card's sampling section over the defaults of ``CardSampling``. A malformed entry raises
    TypeError or ValueError; ranges are for the caller to check against its own limits."""
    section = card.get("sampling") or {}
    default = CardSampling()
    guide = section.get("guide") or None
    method = section.get("guidance_method") or ("autoguidance" if guide else default.guidance_method)
    if method not in GUIDANCE_METHODS:
        raise ValueError(f"sampling.guidance_method must be one of {', '.join(GUIDANCE_METHODS)}, got {method!r}")
    if method == "autoguidance" and guide is None:
        raise ValueError("sampling.guidance_method is autoguidance, but sampling.guide names no guide")
    return CardSampling(
        sampler=section.get("sampler") or default.sampler,
        steps=int(section.get("steps") or default.steps),
        guidance=float(section.get("guidance", default.guidance)),
        guidance_interval=card_guidance_interval(card),
        guide=guide,
        guidance_method=method,
        sigma_min=None if section.get("sigma_min") is None else float(section["sigma_min"]),
    )


def card_guide_path(weights_path: str | os.PathLike, card: Card) -> Path | None:
    """Where the guide that the card's ``sampling.guide`` names lies (beside the weights), None when the
    card names none."""
    name = card_sampling(card).guide
    if name is None:
        return None
    if Path(name).name != name:
        raise WeightsError(
            f"{Path(weights_path).with_suffix('.json')}: sampling.guide must be a file name, got {name!r}"
        )
    return Path(weights_path).with_name(name).with_suffix(".safetensors")


GUIDE_MUST_MATCH = ("image_size", "in_channels", "num_classes")


def check_guide_card(card: Card, guide_card: Card, guide_path: Path, name: str) -> None:
    """Refuse a guide that is not a model of the same images, classes, schedule and target as the model
    ``name`` of ``card``: autoguidance compares their outputs. Checks cards only, before any tensor loads."""
    for key in GUIDE_MUST_MATCH:
        if guide_card["unet"].get(key) != card["unet"].get(key):
            raise WeightsError(
                f"{guide_path}: guide's unet.{key} is {guide_card['unet'].get(key)!r}, "
                f"but {name}'s is {card['unet'].get(key)!r}"
            )
    if guide_card["diffusion"] != card["diffusion"]:
        raise WeightsError(
            f"{guide_path}: guide's diffusion {guide_card['diffusion']} differs from {name}'s {card['diffusion']}"
        )


def with_guide(weights: LoadedWeights, guide: LoadedWeights) -> LoadedWeights:
    """``weights`` autoguided by ``guide``'s network (Karras et al. 2024), once ``check_guide_card`` passes."""
    check_guide_card(weights.card, guide.card, guide.path, weights.path.name)
    return replace(weights, denoiser=replace(weights.denoiser, guide=guide.model))


def check_guide(path: Path, card: Card, name: str) -> Path | None:
    """The guide network that the card's ``sampling.guide`` names, there beside the weights, its card
    checked against this one (``check_guide_card``); None when the card names none."""
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


def model_name(card: Card, path: Path) -> str:
    """The model's name: the card's, else the weights file's stem."""
    return str(card.get("name") or path.stem)


def distilled_guidance(card: Card, path: Path) -> float | None:
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


def check_distilled_guidance(distilled: float | None, guidance: float, name: str) -> None:
    """Guidance distilled into a student is part of its network: on top of it only guidance 1 (the
    network alone) is allowed. ``distilled``: ``distilled_guidance``'s (None or 1.0: any guidance goes);
    ``name`` names the model in the message."""
    if distilled not in (None, 1.0) and float(guidance) != 1.0:
        raise ValueError(f"guidance {distilled} is distilled into {name}")


def schedule_steps(card: Card, path: Path) -> int:
    """T of the card's named schedule (``model.diffusion.Schedule.named``, which load_weights builds too)."""
    try:
        return Schedule.named(card["diffusion"]["schedule"], card["diffusion"]["T"]).T
    except (TypeError, KeyError, ValueError) as err:
        raise WeightsError(f"{path.with_suffix('.json')}: invalid diffusion section ({err})") from err


@dataclass(frozen=True)
class CheckedCard:
    """A weights file's card with everything checked that the cards alone can tell (``check_card``)."""

    path: Path  # the .safetensors file
    card: Card
    name: str  # the model's name (``model_name``)
    T: int  # diffusion steps of the card's named schedule
    sampling: CardSampling  # the card's sampling section over CardSampling's defaults
    distilled_guidance: float | None  # the guidance scale distilled into a student; None: a teacher
    guide: Path | None = None  # the guide network's .safetensors file, its card checked against this one's


def check_card(path: str | os.PathLike) -> CheckedCard:
    """Check one weights file by its cards, before any tensor loads: the file exists, its card reads, the
    distillation section makes sense, the schedule is a named one, the sampling section parses (Heun's
    ``sigma_min`` within the schedule), and the guide it names is there and fits. What depends on where
    the weights are used (a server's limits and overrides) is the caller's to check."""
    path = Path(path)
    path = path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")
    if not path.exists():
        raise WeightsError(f"{path}: weights file not found")
    card = read_card(path)
    name = model_name(card, path)
    distilled = distilled_guidance(card, path)
    T = schedule_steps(card, path)
    try:
        sampling = card_sampling(card)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{path.with_suffix('.json')}: card sampling section is invalid ({err})") from err
    if sampling.sigma_min is not None:
        try:
            check_sigma_min(Schedule.named(card["diffusion"]["schedule"], T), sampling.sigma_min)
        except ValueError as err:
            raise WeightsError(f"{path.with_suffix('.json')}: sampling.sigma_min: {err}") from err
    return CheckedCard(path, card, name, T, sampling, distilled, check_guide(path, card, name))


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedWeights:
    """Rebuild the network from its card and load the safetensors weights (no pickle involved)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if not path.exists():
        raise WeightsError(f"{path}: weights file not found")
    card = read_card(path)
    try:
        config = UNetConfig(**card["unet"])
        schedule = Schedule.named(card["diffusion"]["schedule"], card["diffusion"]["T"])
        prediction = card["diffusion"]["prediction"]
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
        interval = card_guidance_interval(card)
    except (TypeError, KeyError, ValueError) as err:
        raise WeightsError(f"{path.with_suffix('.json')}: invalid config ({err})") from err
    model = UNet(config)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        # torch's message opens with "Error(s) in loading state_dict for UNet:"; the first detail says what.
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:2])[:300]
        raise WeightsError(f"{path}: tensors do not match the card's config ({detail})") from err
    model.to(device).eval().requires_grad_(False)
    try:
        denoiser = Denoiser(model, schedule, prediction, config.num_classes, interval)
    except ValueError as err:
        raise WeightsError(f"{path.with_suffix('.json')}: invalid sampling.guidance_interval ({err})") from err
    return LoadedWeights(denoiser, card, path)


def load_matching(path: str | os.PathLike, unet: UNetConfig, diffusion: dict[str, object]) -> UNet:
    """The network at ``path`` for a warm start, checked to have this architecture and these diffusion
    settings (e.g. schedule, T, prediction). The rebuilt network's config is compared, not the card's
    dict: a card written before a field existed holds no entry for it, and its network has the default."""

    def as_json(config: UNetConfig) -> dict:  # tuples as the card's lists
        return json.loads(json.dumps(config.to_dict()))

    loaded = load_weights(path, "cpu")
    if as_json(loaded.model.config) != as_json(unet):
        raise ValueError(f"{path}: its UNetConfig {loaded.card.get('unet')} differs from this run's")
    for key, wanted in diffusion.items():
        if loaded.card["diffusion"].get(key) != wanted:
            raise ValueError(f"{path}: trained with {key}={loaded.card['diffusion'].get(key)!r}, not {wanted!r}")
    return loaded.model
