"""Tiny U-Net weights and their cards, in the shape model.train writes, for networks never trained.

A freshly built UNet outputs exactly zero (its output layer and every residual branch start at zero),
so the weights are perturbed with seeded noise (``model.unet.perturbed_unet``): the output then depends
on x_t, t and the class as a trained network's does. v-prediction keeps an untrained network's x0
predictions bounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.data import CLASS_NAMES
from model.io import save_weights
from model.unet import UNetConfig, perturbed_unet, tiny_config

TINY_UNET = tiny_config()

STUDENT_CARD: dict[str, Any] = {  # a distilled student's sections: consistency sampling, guidance distilled in
    "name": "tiny-student",
    "sampling": {"sampler": "consistency", "steps": 4, "guidance": 1.0, "guidance_interval": None},
    "distillation": {"teacher": "tiny-test", "method": "consistency distillation (test fixture)", "guidance": 1.35},
}


def tiny_card(
    config: UNetConfig = TINY_UNET,
    name: str = "tiny",
    *,
    prediction: str = "v",
    schedule: str = "cosine",
    steps: int = 10,
    **sections: Any,
) -> dict[str, Any]:
    """A weights card for ``config``, sampling with dpm++ for ``steps`` steps at guidance 2; ``sections``
    replace or add top-level sections (``**STUDENT_CARD`` for a student's)."""
    card = {
        "name": name,
        "unet": config.to_dict(),
        "diffusion": {"schedule": schedule, "T": 1000, "prediction": prediction},
        "classes": list(CLASS_NAMES),
        "sampling": {"sampler": "dpm++", "steps": steps, "guidance": 2.0},
        "training": {"epochs": 0, "images_seen": 0, "note": "test fixture, random weights"},
    }
    return {**card, **sections}


def tiny_weights(path: Path, seed: int = 0, config: UNetConfig = TINY_UNET, **card: Any) -> Path:
    """A perturbed tiny U-Net saved as ``path`` (.safetensors) with its .json card; ``card`` takes
    ``tiny_card``'s arguments."""
    save_weights(perturbed_unet(config, seed), tiny_card(config, **card), path)
    return path
