"""The weights the service ships: they load, their card is complete, and they draw the class asked for.

Marked slow (a few seconds of real sampling); deselect with ``-m 'not slow'``.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.classifier import load_classifier, predict
from model.data import NUM_CLASSES, to_model_range
from model.io import load_weights
from model.samplers import generators_from_seeds, sample, to_uint8

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
pytestmark = pytest.mark.slow


def test_the_card_records_config_training_and_quality():
    card = json.loads((WEIGHTS / "fashion-unet.json").read_text())
    assert {"unet", "diffusion", "sampling", "training", "quality"} <= card.keys()
    record = card["training"]
    assert record["images_seen"] > 0 and record["wall_minutes"] > 0 and record["hardware"]
    quality = card["quality"]
    # Measured by model.evaluate with a fast solver on 500+ samples per class (see README).
    assert quality["per_class"] >= 500 and quality["steps"] <= 25
    assert quality["accuracy"] >= 0.95
    assert quality["classifier_test_accuracy"] >= 0.92


def test_shipped_weights_draw_the_requested_class():
    torch.set_num_threads(1)
    weights = load_weights(WEIGHTS / "fashion-unet.safetensors")
    classifier = load_classifier(WEIGHTS / "classifier.safetensors")
    per_class = 3
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    s = weights.card["sampling"]
    x = sample(
        weights.denoiser, labels, generators_from_seeds(range(len(labels))), s["sampler"], s["steps"], s["guidance"]
    )
    probs, _ = predict(classifier, to_model_range(to_uint8(x)))
    # 30 samples: the shipped model is >= 95% accurate, so 80% leaves room for chance, none for a broken model.
    assert (probs.argmax(1) == labels.numpy()).mean() >= 0.8
    assert np.isfinite(x.numpy()).all() and x.abs().max() <= 1.5
