"""One optimizer step and what sets it, shared by ``model.train`` (the teacher) and ``model.distill``
(the student):

- the learning-rate schedule's pieces: a linear warm-up, cosine or inverse-square-root decay, a
  linear cooldown to zero;
- ``uses_bfloat16`` and ``training_autocast``: the precision of the forward and backward passes;
- ``step_generator``: each step's random draws from (seed, step), so a resumed run draws what it
  would have;
- ``optimizer_step``: back-propagate, clip, step the optimizer and the EMAs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from model.ema import EMA
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
