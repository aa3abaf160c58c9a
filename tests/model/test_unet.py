"""model/unet.py: shapes, the config round trip, config validation, and what the output depends on."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from model.unet import UNet, UNetConfig, timestep_embedding, tiny_config

TINY = tiny_config()


def perturb(model: UNet, seed: int = 0) -> UNet:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def inputs(b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 28, 28, generator=g)
    t = torch.tensor([0.0, 500.0, 999.0, 250.5][:b])
    y = torch.tensor([0, 9, 10, 4][:b])  # 10: the null class
    return x, t, y


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        replace(TINY, stem_patch=1),
        replace(TINY, attention_stages=(0, 1)),
        replace(TINY, stem_patch=1, channel_mults=(1, 2, 2), attention_stages=(2,)),  # 28 -> 14 -> 7
        replace(TINY, blocks_per_stage=1, channel_mults=(1,)),  # a single stage, no resampling
        replace(TINY, full_res_channels=4),  # a thin 28x28 stage around the 2x2 fold
    ],
)
def test_output_has_the_input_shape(config):
    model = perturb(UNet(config))
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == (3, 1, 28, 28) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_a_fresh_network_outputs_zero():
    # Zero-initialised output layer: training starts from "predict 0" rather than from noise.
    x, t, y = inputs()
    assert torch.equal(UNet(TINY)(x, t, y), torch.zeros(3, 1, 28, 28))


def test_config_round_trips_through_json():
    config = replace(
        TINY, channel_mults=(1, 2, 2), stem_patch=1, attention_stages=(1, 2), dropout=0.1, extra={"note": "kept"}
    )
    card = json.loads(json.dumps(config.to_dict()))  # tuples become lists on the way
    rebuilt = UNetConfig(**card)
    assert rebuilt == config and isinstance(rebuilt.channel_mults, tuple)
    a, b = UNet(config), UNet(rebuilt)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"stem_patch": 3}, r"image_size 28 is not divisible by stem_patch 3"),
        ({"channel_mults": (1, 2, 2)}, r"3 stages halve the side 2 times, but 14 is not divisible by 4"),
        ({"attention_stages": (2,)}, r"attention_stages must index 0\.\.1"),
        ({"groups": 3}, r"groups 3 must divide the channels of every stage \[8, 16\]"),
        ({"attention_heads": 3}, r"attention_heads 3 must divide the channels \[16\]"),
        ({"base_channels": 0}, r"base_channels must be a positive integer, got 0"),
        ({"base_channels": 5, "groups": 5, "attention_heads": 5}, r"base_channels must be even"),
        ({"channel_mults": ()}, r"channel_mults must be one or more positive integers"),
        ({"blocks_per_stage": 0}, r"blocks_per_stage must be a positive integer"),
        ({"num_classes": 0}, r"num_classes must be a positive integer"),
        ({"stem_patch": 0}, r"stem_patch must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"full_res_channels": 4, "stem_patch": 1}, r"full_res_channels must be 0, or positive with stem_patch > 1"),
        ({"full_res_channels": 6}, r"groups 4 must divide full_res_channels 6"),
    ],
)
def test_bad_configs_raise_value_error_saying_what_is_allowed(changes, message):
    with pytest.raises(ValueError, match=message):
        replace(TINY, **changes)


def test_the_class_changes_the_output():
    model = perturb(UNet(TINY))
    x, t, _ = inputs(1)
    x, t = x.expand(11, -1, -1, -1), t.expand(11)
    out = model(x, t, torch.arange(11))  # the same x_t and t under every label, the null class included
    for a in range(11):
        for b in range(a + 1, 11):
            assert (out[a] - out[b]).abs().max() > 1e-3, (a, b)
    torch.testing.assert_close(model(x[:2], t[:2], torch.tensor([4, 4]))[1], out[4])  # same label: same output


def test_the_timestep_changes_the_output():
    model = perturb(UNet(TINY))
    x, _, _ = inputs(1)
    out = model(x.expand(3, -1, -1, -1), torch.tensor([10.0, 500.0, 990.0]), torch.tensor([3, 3, 3]))
    assert (out[0] - out[1]).abs().max() > 1e-3 and (out[1] - out[2]).abs().max() > 1e-3


def test_images_in_a_batch_do_not_influence_each_other():
    # GroupNorm normalises per image (BatchNorm would not): what a user gets cannot depend on the batch.
    model = perturb(UNet(replace(TINY, attention_stages=(1,))))
    x, t, y = inputs(3)
    batch = model(x, t, y)
    for i in range(3):
        torch.testing.assert_close(model(x[i : i + 1], t[i : i + 1], y[i : i + 1])[0], batch[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [replace(TINY, attention_stages=(0, 1)), replace(TINY, full_res_channels=4)])
def test_every_parameter_takes_part(config):
    model = perturb(UNet(config)).train()
    x, t, y = inputs(3)
    model(x, t, y).square().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert unused == []


def test_the_full_resolution_stage_is_built_around_the_fold_and_starts_at_zero():
    config = replace(TINY, full_res_channels=4)
    model = UNet(config)
    assert {"full_in.weight", "full_down.conv1.weight", "full_up.conv1.weight", "unstem.weight"} <= set(
        model.state_dict()
    )
    assert model.stem.in_channels == 4 * 2 * 2 and model.out_conv.in_channels == 4  # folded F channels
    x, t, y = inputs(1)
    assert torch.equal(model(x, t, y), torch.zeros(1, 1, 28, 28))  # zero init


def test_timestep_embedding_matches_the_transformer_formula():
    t = torch.tensor([0.0, 1.0, 250.5])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8)
    for i, ti in enumerate(t.tolist()):
        freqs = [math.exp(-math.log(10_000) * k / 4) for k in range(4)]
        want = [math.cos(ti * f) for f in freqs] + [math.sin(ti * f) for f in freqs]
        torch.testing.assert_close(emb[i], torch.tensor(want), atol=1e-4, rtol=1e-5)
