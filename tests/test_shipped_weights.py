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
from model.io import card_guide_path, card_sampling, load_weights, with_guide
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
    seeds = range(len(labels))
    # Its default, and Heun from the card's lowest noise level (docs/guidance.md measured both).
    for x in (
        sample(weights.denoiser, labels, generators_from_seeds(seeds), s["sampler"], s["steps"], s["guidance"]),
        sample(
            weights.denoiser, labels, generators_from_seeds(seeds), "heun", 18, s["guidance"], sigma_min=s["sigma_min"]
        ),
    ):
        probs, _ = predict(classifier, to_model_range(to_uint8(x)))
        # 30 samples: the shipped model is >= 95% accurate, so 80% leaves room for chance, none for a broken model.
        assert (probs.argmax(1) == labels.numpy()).mean() >= 0.8
        assert np.isfinite(x.numpy()).all() and x.abs().max() <= 1.5


def test_the_student_card_names_its_teacher_method_defaults_and_cost():
    card = json.loads((WEIGHTS / "fashion-student.json").read_text())
    teacher = json.loads((WEIGHTS / "fashion-unet.json").read_text())
    assert card["distillation"]["teacher"] == teacher["name"]
    assert card["distillation"]["guidance"] == teacher["sampling"]["guidance"]  # distilled at the card's scale
    assert card["distillation"]["method"] and card["unet"] == teacher["unet"]
    assert card["sampling"]["guidance"] == 1.0 and card["sampling"]["steps"] <= 4
    assert 0 < card["training"]["total_cpu_minutes"] <= 240  # the budget: 4 CPU-hours
    assert card["quality"]["per_class"] >= 500 and card["quality"]["steps"] == card["sampling"]["steps"]


def test_the_student_draws_the_requested_class_in_its_few_steps():
    torch.set_num_threads(1)
    student = load_weights(WEIGHTS / "fashion-student.safetensors")
    classifier = load_classifier(WEIGHTS / "classifier.safetensors")
    labels = torch.arange(NUM_CLASSES).repeat_interleave(3)
    s = student.card["sampling"]
    calls = []
    student.model.register_forward_hook(lambda *_: calls.append(1))
    x = sample(student.denoiser, labels, generators_from_seeds(range(30)), s["sampler"], s["steps"], s["guidance"])
    assert len(calls) == s["steps"]  # one evaluation per step: guidance is distilled in
    probs, _ = predict(classifier, to_model_range(to_uint8(x)))
    assert (probs.argmax(1) == labels.numpy()).mean() >= 0.8


def test_the_teachers_guide_fits_it_and_autoguides_the_requested_class():
    torch.set_num_threads(1)
    teacher = load_weights(WEIGHTS / "fashion-unet.safetensors")
    guide_path = card_guide_path(teacher.path, teacher.card)
    assert guide_path == WEIGHTS / "fashion-guide.safetensors"
    assert card_sampling(teacher.card).guidance_method == "classifier-free"  # the measured best stays the default
    guided = with_guide(teacher, load_weights(guide_path))
    guide_card = json.loads(guide_path.with_suffix(".json").read_text())
    assert guide_card["guide_of"]["model"] == teacher.card["name"] and guide_card["quality"]["screens"]
    labels = torch.arange(NUM_CLASSES).repeat_interleave(3)
    x = sample(guided.denoiser, labels, generators_from_seeds(range(30)), "dpm++", 20, 1.4)
    probs, _ = predict(load_classifier(WEIGHTS / "classifier.safetensors"), to_model_range(to_uint8(x)))
    assert (probs.argmax(1) == labels.numpy()).mean() >= 0.75  # autoguided at 1.4 measured 0.90 on val
