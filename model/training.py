"""What the training scripts share (``model.train``, the teacher; ``model.distill``, the student).

- ``EMA``: the exponential moving averages of the weights that are validated and exported, and
  ``ema_weights``, which picks one of them (or the raw weights) out of a checkpoint;
- the learning-rate schedule's pieces: a linear warm-up, cosine or inverse-square-root decay, a
  linear cooldown to zero;
- ``uses_bfloat16`` and ``training_autocast``: the precision rule of the forward and backward passes;
- ``step_generator`` (each step's random draws from (seed, step), so a resumed run draws what it
  would have), ``optimizer_step`` and ``progress_bar``;
- ``Log``: the run's metrics.jsonl and its printed lines;
- ``add_config_arguments`` and ``config_from_args``: a command line built from a config
  dataclass's fields, one option per field (EDM's ``generate.py``; nanoGPT's configurator), so a
  new field is one line in its dataclass.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import json
import math
import re
import sys
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.machine import autocast

PRECISIONS = ("auto", "float32", "bfloat16")


# --- precision -----------------------------------------------------------------------------------


def uses_bfloat16(precision: str, device: torch.device) -> bool:
    """Whether the forward and backward passes run under bfloat16 autocast. The loss, the optimizer
    and the EMAs stay in float32 either way; on CPUs with AVX512_BF16 or AMX bfloat16 is faster."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    return precision == "bfloat16" or (precision == "auto" and device.type == "cuda")


def training_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast the network's passes run under for ``precision`` on ``device`` (float32: none)."""
    return autocast(device.type, torch.bfloat16 if uses_bfloat16(precision, device) else torch.float32)


# --- weights -------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of the weights, with the usual warm-up of the decay
    ((1 + n) / (10 + n), as in Tensorflow's ExponentialMovingAverage) so that a short run
    does not keep traces of the random initialisation.

    The warm-up caps every decay at (1 + n) / (10 + n) for the first 9 / (1 - decay) steps (9,000
    for 0.999), so EMAs of different decays stay identical that long. A warm start from trained
    weights has no initialisation to forget: it runs without the warm-up (``warmup=False``)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        ema = list(self.model.state_dict().values())
        new = list(model.state_dict().values())
        floats = [(e, n) for e, n in zip(ema, new, strict=True) if e.dtype.is_floating_point]
        torch._foreach_lerp_([e for e, _ in floats], [n for _, n in floats], 1 - d)


def ema_weights(kept: Mapping[str, dict], raw: dict, decay: float, where: object) -> dict:
    """The state dict a checkpoint keeps for the EMA of ``decay`` (``kept``: by ``str(decay)``);
    decay 0 is the raw weights ``raw`` (after a cooldown to a zero learning rate they can be best)."""
    if decay == 0:
        return raw
    if str(decay) not in kept:
        allowed = ", ".join([*kept, "0 (the raw weights)"])
        raise ValueError(f"{where} keeps no EMA with decay {decay}; allowed: {allowed}")
    return kept[str(decay)]


# --- the learning rate ---------------------------------------------------------------------------


def warmup(step: int, steps: int) -> float:
    """Linear warm-up from 1 / steps to 1 over the first ``steps`` steps (0: none)."""
    return min(1.0, (step + 1) / steps) if steps else 1.0


def cosine(progress: float, min_ratio: float) -> float:
    """Cosine decay from 1 to ``min_ratio`` over ``progress`` in [0, 1] (Loshchilov & Hutter 2017)."""
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def rsqrt(step: int, ref_steps: int) -> float:
    """1 up to ``ref_steps``, then sqrt(ref_steps / step) (EDM2, Karras et al. 2024): no end point, so
    a finished run resumed with a larger budget carries on unchanged."""
    return math.sqrt(ref_steps / max(step + 1, ref_steps))


def cooldown(step: int, total_steps: int, steps: int) -> float:
    """Linear decay to 0 over the last ``steps`` of ``total_steps`` (WSD, Hägele et al. 2024; 0: none)."""
    return min(1.0, max(0.0, (total_steps - step) / steps)) if steps else 1.0


# --- a step ----------------------------------------------------------------------------------------


def step_generator(generator: torch.Generator, seed: int, step: int) -> torch.Generator:
    """``generator`` re-seeded from (``seed``, ``step``): a step's draws depend on nothing before it,
    so a resumed run (and every torchrun rank) draws what one uninterrupted process would have."""
    entropy = np.random.SeedSequence((seed, step)).generate_state(1, np.uint64)[0]
    return generator.manual_seed(int(entropy))


def optimizer_step(
    loss: torch.Tensor, model: torch.nn.Module, opt: torch.optim.Optimizer, grad_clip: float, emas: Iterable[EMA]
) -> None:
    """Back-propagate ``loss``, clip the gradient norm to ``grad_clip``, step ``opt`` and every EMA."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    for ema in emas:
        ema.update(model)


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0, unit: str = "step") -> tqdm:
    """A tqdm bar on stderr; redrawn at most once a minute where stderr is a log file, not a terminal."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        unit=unit,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 60,
    )


class Log:
    """The run's metrics file (one JSON object a line) and its printed lines. Only the main rank writes:
    every other rank's Log (``enabled=False``) is silent."""

    def __init__(self, path: Path, enabled: bool = True):
        self.enabled = enabled
        self.file = path.open("a") if enabled else None

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file:
            self.file.close()

    def row(self, row: dict) -> None:
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def say(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)


# --- the command line ----------------------------------------------------------------------------


def field_comments(cls: type) -> dict[str, str]:
    """Each field's trailing comment in the source of ``cls`` and its bases (``name: type = default  # comment``)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        found = re.finditer(r"^ {4}(\w+)\s*:[^#\n]*#\s*(.+)$", source, re.MULTILINE)
        comments.update({m.group(1): m.group(2).strip() for m in found})
    return comments


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def option(name: str, tp: Any, default: Any, help: str, choices: Iterable[str] | None) -> dict[str, Any]:
    """argparse's keywords for a field annotated ``tp``: ``X | None`` parses as X; ``tuple[X, ...]``
    takes any number of X (none: the empty tuple); ``bool`` is a ``--flag`` / ``--no-flag`` pair."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        (tp,) = [a for a in args if a is not type(None)]
        args = typing.get_args(tp)
    kwargs: dict[str, Any] = {"default": default, "help": help.replace("%", "%%"), "metavar": tp.__name__.upper()}
    if tp is bool:
        return {**kwargs, "action": argparse.BooleanOptionalAction, "metavar": None}
    if typing.get_origin(tp) is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{name}: only tuple[X, ...] fields have an option, not {tp}")
        return {**kwargs, "type": args[0], "nargs": "*", "default": list(default), "metavar": args[0].__name__.upper()}
    if tp not in (int, float, str):
        raise TypeError(f"{name}: no option for a field of type {tp}; pass it in skip")
    if choices:
        return {**kwargs, "type": tp, "choices": tuple(choices), "metavar": None}
    return {**kwargs, "type": tp}


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    choices: Mapping[str, Iterable[str]] | None = None,
    skip: Iterable[str] = (),
) -> None:
    """One option per field of the dataclass ``cls`` (``--batch-size`` for ``batch_size``), its type
    from the annotation, its default the field's, its help the field's trailing comment. A field that
    is itself a config dataclass adds its own fields' options in a group. ``choices``: the names
    allowed for some str fields; ``skip``: fields (of ``cls`` or a nested config) with no option."""
    hints, comments, skip = typing.get_type_hints(cls), field_comments(cls), set(skip)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        if is_config(tp):
            group = parser.add_argument_group(f"{f.name} ({tp.__name__})", comments.get(f.name))
            add_config_arguments(group, tp, choices, skip)
            continue
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        kwargs = option(f.name, tp, default, comments.get(f.name, ""), (choices or {}).get(f.name))
        parser.add_argument(flag(f.name), dest=f.name, required=required, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The ``cls`` that ``add_config_arguments(parser, cls, ...)``'s options in ``args`` describe
    (a skipped field keeps its default; lists become the fields' tuples)."""
    hints, values = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if is_config(tp):
            values[f.name] = config_from_args(tp, args)
        elif hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)
