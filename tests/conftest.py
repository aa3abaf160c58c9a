"""Fixtures shared by every test package: a tiny U-Net, its card, and its weights on disk, built by
the test toolkit (``testkit.weights``), which the benches and scripts use too.

The tiny network keeps the whole suite fast on two CPU cores.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from model.data import ENV_DIR, FILES
from model.io import save_weights
from model.teacher import TrainConfig
from model.unet import UNet, UNetConfig, perturbed_unet
from testkit.weights import TINY_UNET
from testkit.weights import tiny_card as card_for

# $FASHION_MNIST_DIR if set, else ../shared/data/fashion-mnist beside the checkout.
DATA_DIR = Path(os.environ.get(ENV_DIR) or Path(__file__).resolve().parents[2] / "shared/data/fashion-mnist")


@pytest.fixture
def tiny_unet_config() -> UNetConfig:
    return TINY_UNET


@pytest.fixture
def tiny_unet(tiny_unet_config) -> UNet:
    return perturbed_unet(tiny_unet_config)


@pytest.fixture
def tiny_card(tiny_unet_config) -> dict:
    return card_for(tiny_unet_config)


@pytest.fixture
def tiny_weights(tmp_path, tiny_unet, tiny_card) -> Path:
    """``tmp_path/tiny.safetensors`` (+ ``tiny.json``), written by model.io.save_weights."""
    path = tmp_path / "tiny.safetensors"
    save_weights(tiny_unet, tiny_card, path)
    return path


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The real Fashion-MNIST files ($FASHION_MNIST_DIR or ../shared/data/fashion-mnist); skips without them."""
    if not all((DATA_DIR / f).exists() for f in FILES.values()):
        pytest.skip(f"Fashion-MNIST not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_train_config(fashion_mnist_dir: Path) -> Callable[..., TrainConfig]:
    """``make(root, **changes)``: 2 epochs of the tiny U-Net on 512 real images (8 steps of 64 each),
    its run and weights under ``root``."""

    def make(root: Path, **changes) -> TrainConfig:
        cfg = TrainConfig(
            data_dir=str(fashion_mnist_dir),
            run_dir=str(root / "run"),
            weights_dir=str(root / "weights"),
            name="tiny",
            unet=TINY_UNET,
            epochs=2,
            batch_size=64,
            train_limit=512,
            val_size=200,
            lr=6e-3,
            warmup_steps=2,
            sample_steps=2,
            device="cpu",
        )
        return replace(cfg, **changes)

    return make
