"""Starting the service for ``bench.load``: the shipped teacher and student (or tiny random ones),
this checkout's server or another checkout's, on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from app.settings import default_weights_dir
from model.io import save_weights
from model.machine import describe
from model.unet import perturbed_unet, tiny_config

if TYPE_CHECKING:
    from bench.load import Engine

READY_TIMEOUT_S = 600  # torch.compile at warm-up can take a minute on a busy CPU


def tiny_models(directory: Path) -> tuple[Path, Path]:
    """A tiny random teacher and a 'student' distilled from it (random too), named as the shipped ones."""
    config = tiny_config()
    paths: list[Path] = []
    for name, sampling, extra in (
        ("fashion-unet", {"sampler": "dpm++", "steps": 20, "guidance": 1.35}, {}),
        (
            "fashion-student",
            {"sampler": "consistency", "steps": 4, "guidance": 1.0},
            {"distillation": {"teacher": "fashion-unet", "guidance": 1.35}},
        ),
    ):
        card = {
            "name": name,
            "unet": config.to_dict(),
            "diffusion": {"schedule": "cosine", "T": 1000, "prediction": "v"},
            "sampling": sampling,
            **extra,
        }
        path = directory / f"{name}.safetensors"
        save_weights(perturbed_unet(config, seed=len(paths)), card, path)
        paths.append(path)
    return paths[0], paths[1]


def machine_line() -> str:
    """The CPU, torch, and the CPUs this process may run on (``taskset``), with the load average."""
    line = describe("cpu")
    if hasattr(os, "sched_getaffinity"):
        line += f"; pinned to CPU {','.join(map(str, sorted(os.sched_getaffinity(0))))}"
    if hasattr(os, "getloadavg"):
        line += f"; load average {os.getloadavg()[0]:.1f} at the end"
    return line


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(engine: Engine, tmp: Path, threads: int, *, tiny: bool = False) -> Iterator[str]:
    """``python -m app`` of ``engine.repo`` (cwd and PYTHONPATH there, so that checkout is what runs),
    serving the teacher, and the student too where the engine can; yields its URL once /readyz is 200."""
    if tiny:
        teacher, student = tiny_models(tmp)
    else:
        teacher, student = (
            default_weights_dir() / "fashion-unet.safetensors",
            default_weights_dir() / "fashion-student.safetensors",
        )
    env = {
        **os.environ,
        "PYTHONPATH": str(engine.repo),
        "OMP_NUM_THREADS": str(threads),
        "FASHION_THREADS": str(threads),
        "FASHION_DEVICE": "cpu",
        "FASHION_CLIP_ENABLED": "false",
        "FASHION_CLASSIFIER_WEIGHTS": "",  # no rerank here; a checkout without weights/ starts too
        **engine.env,
    }
    if engine.multi_model:
        env["FASHION_MODELS"] = json.dumps([str(teacher), str(student)])
    else:
        env["FASHION_WEIGHTS"] = str(teacher)
    port = free_port()
    cmd = [sys.executable, "-m", "app", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, cwd=engine.repo)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server of {engine.label} exited with {proc.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"the server of {engine.label} was not ready in {READY_TIMEOUT_S} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
