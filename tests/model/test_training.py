"""model/training.py: what the training scripts share, and the command line built from a config."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import pytest
import torch

from model.training import EMA, add_config_arguments, config_from_args, cooldown, cosine, ema_weights, rsqrt, warmup


@dataclass(frozen=True)
class Inner:
    width: int = 8  # channels, of the first stage
    fixed: int = 1  # not an option


@dataclass(frozen=True)
class Outer:
    source: str  # where the data is (required: no default)
    inner: Inner = field(default_factory=Inner)
    steps: int = 10  # optimizer steps, 100% of them
    rate: float = 0.5
    limit: int | None = None  # at most this many images (None: all)
    decays: tuple[float, ...] = (0.9,)  # EMAs kept
    fast: bool = False  # go fast
    mode: str = "a"  # "a" or "b"


def parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_config_arguments(p, Outer, {"mode": ("a", "b")}, skip=("fixed",), **kw)
    return p


def test_every_field_is_an_option_typed_by_its_annotation_and_the_config_comes_back():
    args = parser().parse_args(
        ["--source", "d", "--width", "16", "--steps", "3", "--rate", "1e-3", "--limit", "7"]
        + ["--decays", "0.5", "0.25", "--fast", "--mode", "b"]
    )
    cfg = config_from_args(Outer, args)
    assert cfg == Outer("d", Inner(width=16), 3, 1e-3, 7, (0.5, 0.25), True, "b")
    assert isinstance(cfg.decays, tuple) and isinstance(cfg.steps, int)
    # The defaults are the dataclass's; an empty list of values is the empty tuple; --no-X turns a bool off.
    assert config_from_args(Outer, parser().parse_args(["--source", "d"])) == Outer("d")
    cfg = config_from_args(Outer, parser().parse_args(["--source", "d", "--decays", "--no-fast"]))
    assert (cfg.decays, cfg.fast) == ((), False)


def test_options_check_types_choices_and_required_fields_and_skip_what_they_are_told():
    for argv in (["--steps", "3"], ["--source", "d", "--steps", "x"], ["--source", "d", "--mode", "c"]):
        with pytest.raises(SystemExit):
            parser().parse_args(argv)
    with pytest.raises(SystemExit):
        parser().parse_args(["--source", "d", "--fixed", "2"])


def test_the_help_is_each_fields_trailing_comment():
    text = parser().format_help()
    for line in ("where the data is", "channels, of the first stage", "optimizer steps, 100% of them", "go fast"):
        assert line in " ".join(text.split())
    assert "inner (Inner)" in text  # the nested config's options come as a group


def test_a_new_field_is_a_new_option():
    @dataclass(frozen=True)
    class Grown(Outer):
        patience: int = 3  # epochs without progress before stopping

    p = argparse.ArgumentParser()
    add_config_arguments(p, Grown)
    assert config_from_args(Grown, p.parse_args(["--source", "d", "--patience", "5"])).patience == 5
    help = " ".join(p.format_help().split())
    assert "epochs without progress before stopping" in help and "where the data is" in help


def test_a_field_of_a_type_with_no_option_must_be_skipped():
    @dataclass(frozen=True)
    class Notes:
        notes: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="notes: no option for a field of type"):
        add_config_arguments(argparse.ArgumentParser(), Notes)
    add_config_arguments(argparse.ArgumentParser(), Notes, skip=("notes",))


def test_the_learning_rate_pieces():
    assert [warmup(s, 4) for s in (0, 1, 3, 10)] == [0.25, 0.5, 1.0, 1.0]
    assert warmup(0, 0) == 1.0  # no warm-up
    assert cosine(0.0, 0.1) == 1.0 and cosine(0.5, 0.1) == pytest.approx(0.55) and cosine(2.0, 0.1) == 0.1
    assert rsqrt(99, 100) == 1.0 and rsqrt(399, 100) == pytest.approx(0.5)
    assert [cooldown(s, 100, 10) for s in (80, 90, 95, 100, 120)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert cooldown(99, 100, 0) == 1.0  # no cooldown
    assert math.isclose(cosine(1.0, 0.0), 0.0, abs_tol=1e-12)


def test_a_checkpoints_weights_by_ema_decay_or_the_raw_weights():
    kept, raw = {"0.999": {"w": 1}, "0.9": {"w": 2}}, {"w": 0}
    assert ema_weights(kept, raw, 0.9, "ckpt") == {"w": 2}
    assert ema_weights(kept, raw, 0, "ckpt") is raw
    with pytest.raises(ValueError, match=r"ckpt keeps no EMA with decay 0.5; allowed: 0.999, 0.9, 0 \(the raw"):
        ema_weights(kept, raw, 0.5, "ckpt")


def test_the_ema_warm_up_caps_every_decay_and_a_warm_start_goes_without_it():
    net = torch.nn.Linear(3, 3)
    warm = [EMA(net, decay) for decay in (0.999, 0.9998)]
    cold = [EMA(net, decay, warmup=False) for decay in (0.999, 0.9998)]
    for _ in range(20):
        with torch.no_grad():
            net.weight.add_(1.0)
        for ema in warm + cold:
            ema.update(net)
    # (1 + n) / (10 + n) is below both decays for 20 steps: the two warmed-up EMAs are the same.
    assert torch.equal(warm[0].model.weight, warm[1].model.weight)
    assert not torch.allclose(cold[0].model.weight, cold[1].model.weight)
    start = net.weight - 20
    assert (cold[0].model.weight - start).abs().max() < 0.25  # 0.999 over 20 steps hardly moves
