"""What machine this is: the one line that says what a number was measured on, the device to run on,
and how a network is laid out to run there."""

from __future__ import annotations

import contextlib
import copy
import os
import platform
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bfloat16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes bfloat16 in hardware (AVX512_BF16 or AMX): there, autocast to
    bfloat16 runs convolutions and matmuls faster than float32; elsewhere it emulates and is slower."""
    return bool({"avx512_bf16", "amx_bf16"} & (cpu_flags() if flags is None else flags))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # autocast by name


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype a precision setting names; ``auto``: float16 on CUDA, bfloat16 on a CPU that
    computes it natively, float32 elsewhere."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and native_bfloat16() else torch.float32
    return DTYPES[precision]


def autocast(device_type: str, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """Autocast of the network to ``dtype`` on ``device_type``; float32 is no autocast at all."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def stored_in(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``net`` with its convolutions and linear layers stored in ``dtype``, the dtype autocast runs them in.

    Autocast casts a float32 weight at every call and caches the cast only for weights that require
    grad, so a served network re-cast all its parameters at every evaluation: 5% of a 16-row
    bfloat16 evaluation of the shipped network on 2 Xeon cores in channels-last, 11% in the default
    layout. Cast once here, the outputs are bitwise the same (it is the same rounding); norms and
    embeddings stay float32, as autocast computes them. Changes ``net`` in place; float32 leaves it
    as it is."""
    if dtype != torch.float32:
        for layer in net.modules():
            if isinstance(layer, nn.Conv2d | nn.Linear):
                layer.to(dtype)
    return net


def serving_network(net: nn.Module, dtype: torch.dtype, channels_last: bool = True, compile: bool = False) -> nn.Module:
    """A copy of ``net`` laid out as the engine runs it: channels-last (the layout oneDNN's and cuDNN's
    convolutions compute in, so they skip a reorder per layer: a 16-row evaluation of the shipped
    network on 2 Xeon cores took 0.88x the time in float32 and 0.69x in bfloat16), and stored in
    the autocast dtype. ``net`` itself is left as it is.

    ``compile``: torch.compile for one fixed shape (callers keep the batch fixed), with CUDA graphs
    on CUDA ("reduce-overhead"); on the CPU, inductor's fused kernels and no Python between them
    took a 16-row bfloat16 evaluation from 41 to 26 ms on one Xeon core, after a 25-40 s compile."""
    net = stored_in(copy.deepcopy(net), dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if compile:
        on_cuda = next(net.parameters()).device.type == "cuda"
        net = cast(nn.Module, torch.compile(net, mode="reduce-overhead" if on_cuda else "default", dynamic=False))
    return net


def describe(device: torch.device | str = "cpu", threads: int | None = None) -> str:
    """CPU or GPU model, torch version and CPU threads (``threads``: as configured, else torch's current)."""
    device = torch.device(device)
    torch_part = f"torch {torch.__version__}, {threads or torch.get_num_threads()} threads"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (host: {cpu_model()}), {torch_part}"
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, {torch_part}"


def resolve_device(name: str, setting: str = "--device") -> torch.device:
    """``auto`` is CUDA when present, else CPU; an explicit device that is absent is an error that
    names ``setting``, the option or variable the name came from."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available (set {setting}=auto or cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {name!r} requested but MPS is not available")
    return device
