"""Exponential moving averages of a network's weights: what training validates, samples and exports.

``EMA`` keeps one average and updates it after each optimizer step; ``ema_weights`` picks one of a
checkpoint's averages (or its raw weights) by decay. ``model.train`` (the teacher) and
``model.distill`` (the student) both keep several.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch


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
