"""model/cli.py: the command line built from a config dataclass's fields."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from model.cli import add_config_arguments, config_from_args


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
