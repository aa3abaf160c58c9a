"""Putting loaded weights on the device the way the engine runs them.

The one idea here is ``FixedRows``. Convolution and matmul kernels choose their blocking,
and so their summation order, from the tensor shapes: on CPU a batch of 1 and a batch of
13 give the same image results that differ in the last float bits, and over 20 sampler
steps that can flip a uint8 pixel. Running the network on chunks of one fixed number of
rows (padding the last) makes every row's arithmetic independent of what else is in the
batch, so a seed gives byte-identical PNGs whatever it was batched with. Rows do not
interact anywhere in the U-Net (GroupNorm and attention are per sample), so padding rows
cannot change real ones. A single shape is also what CUDA graphs and torch.compile want.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from model import machine
from model.io import LoadedWeights
from model.samplers import Denoiser
from model.unet import count_parameters

log = logging.getLogger("app")

# The CPU chunk. Measured with the shipped network on 2 cores (ms per row): 3.30 at 8 rows, 2.76 at
# 16, 2.30 at 32. 16 serves a default request (n=16, guided: 32 rows) at the speed of unchunked
# sampling and fills up under load, at the cost of padding a lone 1-image request from 2 rows to 16.
CPU_ROWS = 16


def resolve_device(name: str) -> torch.device:
    """The device FASHION_DEVICE names, by model.machine's rules (``auto``: CUDA when present, else CPU;
    an explicit device that is absent is a RuntimeError)."""
    return machine.resolve_device(name, setting="FASHION_DEVICE")


class FixedRows(nn.Module):
    """Evaluate ``net(x, t, y)`` on chunks of exactly ``rows`` rows, padding the last chunk."""

    def __init__(self, net: nn.Module, rows: int, clone_outputs: bool = False) -> None:
        super().__init__()
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self.net = net
        self.rows = rows
        self.clone_outputs = clone_outputs  # CUDA graphs reuse their output buffer between calls

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = len(x)
        pad = (-n) % self.rows
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])  # (n + pad, C, H, W)
            t = torch.cat([t, t[:1].expand(pad)])
            y = torch.cat([y, y[:1].expand(pad)])
        outs = []
        for i in range(0, n + pad, self.rows):
            out = self.net(x[i : i + self.rows], t[i : i + self.rows], y[i : i + self.rows])  # (rows, C, H, W)
            outs.append(out.clone() if self.clone_outputs else out)
        return torch.cat(outs)[:n]


@dataclass(frozen=True)
class Runtime:
    """How the engine runs the network: the wrapped denoiser, its device and its autocast dtype."""

    denoiser: Denoiser
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 means no autocast
    rows: int  # FixedRows chunk, 0 when off
    parameters: int
    layout: str = "channels_last"  # or "nchw"
    compiled: bool = False
    layout_s: Mapping[str, float] = field(default_factory=dict)  # one evaluation per layout, where measured

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return machine.autocast(self.device.type, self.dtype)

    @property
    def precision(self) -> str:
        """The autocast dtype's name: float32, bfloat16 or float16."""
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> dict[str, str]:
        return {
            "device": str(self.device),
            "precision": self.precision,
            "fixed_rows": str(self.rows),
            "layout": self.layout,
            "compiled": str(self.compiled).lower(),
            "parameters": str(self.parameters),
        }


def prepare(
    loaded: LoadedWeights,
    device: torch.device,
    *,
    precision: str = "auto",
    channels_last: bool | str = True,
    compile: bool | str = False,
    fixed_rows: int | None = None,
    max_rows: int = 64,
) -> Runtime:
    """Wrap loaded weights (already on ``device``) for serving; ``loaded`` itself is left as it is."""
    dtype = machine.autocast_dtype(precision, device)
    compile = machine.compile_pays(device) if compile == "auto" else bool(compile)
    cudagraphs = compile and device.type == "cuda"  # a replayed graph reuses its output buffer
    rows = fixed_rows if fixed_rows is not None else (max_rows if device.type == "cuda" else CPU_ROWS)
    layout_s: dict[str, float] = {}
    if channels_last == "auto":  # timed on one chunk, the shape every evaluation runs
        cfg = loaded.model.config
        shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        channels_last, layout_s = machine.faster_layout(loaded.model, dtype, shape, rows or CPU_ROWS)
    channels_last = bool(channels_last)

    def wrap(network: nn.Module) -> nn.Module:
        net = machine.serving_network(network, dtype, channels_last, compile)
        return FixedRows(net, rows, clone_outputs=cudagraphs) if rows else net

    guide = loaded.denoiser.guide  # an autoguided model's guide runs on fixed rows too: its bytes stay the job's own
    denoiser = replace(loaded.denoiser, model=wrap(loaded.model), guide=None if guide is None else wrap(guide))
    layout = "channels_last" if channels_last else "nchw"
    return Runtime(denoiser, device, dtype, rows, count_parameters(loaded.model), layout, bool(compile), layout_s)
