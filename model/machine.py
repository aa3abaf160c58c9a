"""What machine this is: the one line that says what a number was measured on, the device to run on,
and how a network is laid out to run there."""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import time
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


LAYOUT_MARGIN = 0.05  # the default layout (channels-last) gives way only to one measured this much faster


def faster_layout(
    net: nn.Module,
    dtype: torch.dtype,
    shape: tuple[int, int, int],
    rows: int,
    *,
    repeats: int = 5,
    margin: float = LAYOUT_MARGIN,
) -> tuple[bool, dict[str, float]]:
    """Whether ``net`` runs faster channels-last than in the default (NCHW) layout here, in ``dtype`` on
    batches of ``rows`` images of ``shape`` (C, H, W): (channels_last, median seconds of one evaluation
    per layout).

    Neither layout wins everywhere. On the Xeon these numbers come from, a 16-row evaluation took 0.69x
    the time channels-last in bfloat16 (0.88x in float32); on an AMD EPYC with AVX512_BF16 and no AMX,
    a 32-row bfloat16 evaluation took 89 ms in NCHW against 99 ms channels-last (float32: 137 ms NCHW,
    122 ms channels-last). So it is measured, both layouts in turn so that a drifting load hits both
    alike. Channels-last stays unless NCHW is ``margin`` faster: the layout can change a bfloat16
    image's last bits, and a near tie must not flip between two starts of the same machine."""
    device = next(net.parameters()).device
    nets = {layout: serving_network(net, dtype, layout) for layout in (True, False)}
    x = torch.randn(rows, *shape, device=device)
    t = torch.full((rows,), 500, device=device)
    y = torch.zeros(rows, dtype=torch.long, device=device)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    with torch.inference_mode(), autocast(device.type, dtype):
        for candidate in nets.values():
            candidate(x, t, y)  # first calls pick their kernels
        for _ in range(repeats):
            for layout, candidate in nets.items():
                t0 = time.perf_counter()
                candidate(x, t, y)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[layout].append(time.perf_counter() - t0)
    median = {layout: sorted(times)[len(times) // 2] for layout, times in seconds.items()}
    channels_last = median[False] >= (1 - margin) * median[True]
    return channels_last, {"channels_last": median[True], "nchw": median[False]}


def compile_pays(device: torch.device) -> bool:
    """Whether ``FASHION_COMPILE=auto`` compiles: on CUDA, where CUDA graphs take the launch of every
    small kernel of one evaluation out of Python; not on the CPU. There inductor's kernels ran a
    16-row bfloat16 evaluation in 26 ms against 41 ms on one idle Xeon core, but the compile took
    25-40 s of startup on 2 idle cores and 271 s on one core shared with another process, and raised
    the process's peak memory by 225 MiB (262 -> 506 MiB), for every model at every start: a restart
    or a new replica would not answer for minutes. Set FASHION_COMPILE=1 where that is worth it."""
    return device.type == "cuda"


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
