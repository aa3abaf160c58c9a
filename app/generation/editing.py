"""Image-to-image jobs in the engine: what an edit brings (``Edit``), the state it starts from, and the
network evaluations it costs, in one place. The methods themselves are ``model.editing``'s and
``model.samplers``' (SDEdit, RePaint's merge and resampling, consistency models' zero-shot editing, DDIM
inversion, spherical interpolation); every one of them runs as a sampler state that the engine advances
in its shared ticks like any generation, so an edit's bytes depend only on its inputs, seeds and parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from model.diffusion import Schedule
from model.editing import (
    RePaint,
    inpainting_evaluations,
    inversion_timesteps,
    start_from_image,
    start_inpainting,
    start_inversion,
)
from model.samplers import SamplerState, evaluations, start_at

EditKind = Literal["variation", "inpaint", "invert", "frames"]


@dataclass(frozen=True, eq=False)
class Edit:
    """What an image-to-image job starts from, one row per image of the job.

    variation: each image noised to ``strength`` (SDEdit); inpaint: ``mask`` generated, the rest kept
    byte for byte (RePaint's merge, with ``repaint``'s resampling where set); invert: DDIM inversion of
    each image up to ``strength``'s level (guidance 1); frames: deterministic DDIM from each row's
    ``latents`` (an interpolation's frames: slerped x_T of two seeds, strength None, or of two inverted
    images, at the inversion's strength)."""

    kind: EditKind
    strength: float | None = 1.0  # the starting level (SDEdit's); None: pure noise (frames between seeds)
    images: np.ndarray | None = None  # uint8 (n, 28, 28): each row's input, as mapped to the model
    mask: np.ndarray | None = None  # bool (n, 28, 28): True where the image is generated (inpaint)
    repaint: RePaint | None = None  # inpaint: RePaint's resampling; None: the merge alone
    latents: np.ndarray | None = None  # float32 (n, 1, 28, 28): each frame's starting x (frames)
    work: int = 0  # network evaluations per image (``evaluations``), filled in when the engine takes the job


def to_model_range(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 (n, H, W) -> float (n, 1, H, W) in [-1, 1], u / 127.5 - 1 (which ``to_uint8`` maps back exactly)."""
    return (torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1.0).unsqueeze(1).to(device)


def edit_evaluations(edit: Edit, sampler: str, steps: int, schedule: Schedule) -> int:
    """Network evaluations per image (before guidance's reference rows) of an edit's run."""
    if edit.kind == "inpaint":
        return inpainting_evaluations(sampler, steps, edit.strength or 1.0, edit.repaint)
    if edit.kind == "invert":
        return len(inversion_timesteps(schedule, steps, edit.strength or 1.0)[0])
    return evaluations(sampler, steps, edit.strength)


def start_edit(
    edit: Edit,
    sampler: str,
    schedule: Schedule,
    steps: int,
    generators: Sequence[torch.Generator],
    device: torch.device | str,
    sigma_min: float | None = None,
) -> SamplerState:
    """The state an edit's run starts from (``model.editing``'s starts, on the job's device)."""
    if edit.kind == "frames":
        assert edit.latents is not None
        x = torch.from_numpy(edit.latents).to(device)
        return start_at(sampler, schedule, steps, generators, x, edit.strength, sigma_min=sigma_min)
    assert edit.images is not None
    image = to_model_range(edit.images, device)  # (n, 1, 28, 28)
    strength = edit.strength or 1.0
    if edit.kind == "variation":
        return start_from_image(sampler, schedule, steps, generators, image, strength, sigma_min=sigma_min)
    if edit.kind == "inpaint":
        assert edit.mask is not None
        mask = torch.from_numpy(np.ascontiguousarray(edit.mask)).unsqueeze(1).to(device)  # (n, 1, 28, 28)
        return start_inpainting(
            sampler, schedule, steps, generators, image, mask, strength, sigma_min=sigma_min, repaint=edit.repaint
        )
    return start_inversion(schedule, steps, image, strength, generators)
