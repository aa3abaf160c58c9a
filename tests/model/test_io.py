"""model/io.py: weights + card on disk, and every way loading them can fail."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from model.io import CardSampling, WeightsError, card_sampling, load_weights, read_card, save_weights
from model.unet import UNet


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 1, 28, 28, generator=g), torch.tensor([0.0, 10.0, 500.0, 999.0]), torch.tensor([0, 3, 9, 10])


def test_save_then_load_gives_the_same_network_and_card(tiny_weights, tiny_unet, tiny_card):
    assert sorted(p.name for p in tiny_weights.parent.iterdir()) == ["tiny.json", "tiny.safetensors"]  # no .part
    loaded = load_weights(tiny_weights)
    assert loaded.card == json.loads(json.dumps(tiny_card)) and loaded.path == tiny_weights  # tuples -> lists
    assert loaded.model.config == tiny_unet.config
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    with torch.no_grad():
        assert torch.equal(loaded.model(*inputs()), tiny_unet(*inputs()))
    den = loaded.denoiser
    assert (den.schedule.name, den.schedule.T, den.prediction, den.null_class) == ("cosine", 1000, "v", 10)


def test_load_accepts_the_path_without_its_suffix(tiny_weights):
    assert load_weights(tiny_weights.with_suffix("")).path == tiny_weights
    assert load_weights(tiny_weights.with_suffix(".json")).path == tiny_weights


def test_saving_again_replaces_both_files(tiny_weights, tiny_unet_config, tiny_card):
    other = UNet(tiny_unet_config)
    save_weights(other, {**tiny_card, "name": "second"}, tiny_weights)
    loaded = load_weights(tiny_weights)
    assert loaded.card["name"] == "second"
    for key, value in other.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert sorted(p.name for p in tiny_weights.parent.iterdir()) == ["tiny.json", "tiny.safetensors"]


def _edit_card(path, edit):
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    edit(card)
    card_path.write_text(json.dumps(card))


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match=r"nothing\.safetensors: weights file not found"):
        load_weights(tmp_path / "nothing.safetensors")


def test_missing_card(tiny_weights):
    tiny_weights.with_suffix(".json").unlink()
    with pytest.raises(WeightsError, match=r"tiny\.json: card not found"):
        load_weights(tiny_weights)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b"\x00" * 5, "not a readable safetensors file"),
        (lambda b: b"this is not a tensor file at all, just some words" * 3, "not a readable safetensors file"),
        (lambda b: b[: len(b) // 2], "not a readable safetensors file"),  # cut short: header promises more
    ],
)
def test_corrupt_safetensors(tiny_weights, damage, message):
    tiny_weights.write_bytes(damage(tiny_weights.read_bytes()))
    with pytest.raises(WeightsError, match=rf"{tiny_weights}: {message}"):
        load_weights(tiny_weights)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"unet": {', r"tiny\.json: not valid JSON"),
        ("[1, 2]", r"tiny\.json: expected a JSON object, got list"),
        (
            '{"diffusion": {"schedule": "cosine", "T": 1000, "prediction": "v"}}',
            r"tiny\.json: missing the 'unet' section",
        ),
    ],
)
def test_bad_card(tiny_weights, text, message):
    tiny_weights.with_suffix(".json").write_text(text)
    with pytest.raises(WeightsError, match=message):
        load_weights(tiny_weights)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["unet"].update(colour="blue"), r"unexpected keyword argument 'colour'"),
        (lambda c: c["unet"].update(stem_patch=3), r"not divisible by stem_patch 3"),
        (lambda c: c["diffusion"].update(schedule="sigmoid"), r"unknown schedule 'sigmoid'"),
        (lambda c: c["diffusion"].update(prediction="x0"), r"unknown prediction 'x0'; allowed: eps, v"),
        (lambda c: c["diffusion"].pop("T"), r"'T'"),
    ],
)
def test_card_with_an_invalid_config(tiny_weights, edit, message):
    _edit_card(tiny_weights, edit)
    with pytest.raises(WeightsError, match=rf"tiny\.json: invalid config \(.*{message}"):
        load_weights(tiny_weights)


def test_the_cards_guidance_interval_reaches_the_denoiser(tiny_weights):
    assert load_weights(tiny_weights).denoiser.guidance_interval is None
    _edit_card(tiny_weights, lambda c: c.setdefault("sampling", {}).update(guidance_interval=[0.3, 6]))
    assert load_weights(tiny_weights).denoiser.guidance_interval == (0.3, 6.0)


@pytest.mark.parametrize(
    ("interval", "message"),
    [
        ([0.3], r"invalid config \(not enough values"),
        ([5, 1], r"invalid sampling.guidance_interval \(guidance_interval"),
    ],
)
def test_a_bad_guidance_interval_in_the_card(tiny_weights, interval, message):
    _edit_card(tiny_weights, lambda c: c.setdefault("sampling", {}).update(guidance_interval=interval))
    with pytest.raises(WeightsError, match=rf"tiny\.json: {message}"):
        load_weights(tiny_weights)


def test_card_sampling_fills_what_the_card_leaves_out():
    assert card_sampling({}) == CardSampling("dpm++", 20, 1.0, None)
    card = {"sampling": {"sampler": "ddim", "steps": 30, "guidance": 0, "guidance_interval": [0.3, 6]}}
    assert card_sampling(card) == CardSampling("ddim", 30, 0.0, (0.3, 6.0))  # guidance 0 is a value, not absent
    with pytest.raises(ValueError):
        card_sampling({"sampling": {"guidance": "strong"}})


def test_tensors_that_do_not_match_the_card(tiny_weights, tiny_unet_config, tiny_card):
    # Weights of a wider network under the tiny card: every tensor name exists, the shapes differ.
    save_weights(UNet(replace(tiny_unet_config, base_channels=16)), tiny_card, tiny_weights)
    with pytest.raises(WeightsError, match=rf"{tiny_weights}: tensors do not match the card's config \(size mismatch"):
        load_weights(tiny_weights)
    # A card for attention in stage 0 expects tensors the file does not have.
    _edit_card(tiny_weights, lambda c: c["unet"].update(base_channels=16, attention_stages=[0]))
    with pytest.raises(WeightsError, match=r"tensors do not match the card's config \(Missing key"):
        load_weights(tiny_weights)


def test_read_card_alone(tiny_weights, tiny_card):
    assert read_card(tiny_weights) == json.loads(json.dumps(tiny_card))
