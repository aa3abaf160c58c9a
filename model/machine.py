"""One line that says what machine a number was measured on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device | str = "cpu", threads: int | None = None) -> str:
    """CPU or GPU model, torch version and CPU threads (``threads``: as configured, else torch's current)."""
    device = torch.device(device)
    torch_part = f"torch {torch.__version__}, {threads or torch.get_num_threads()} threads"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (host: {cpu_model()}), {torch_part}"
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, {torch_part}"
