"""Starting the service for ``bench.load`` with the test toolkit (``testkit``): the shipped teacher and
student (or tiny random ones), this checkout's server or another checkout's, on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.settings import default_weights_dir
from model.machine import describe
from testkit.servers import app_env, start_app, stop
from testkit.weights import STUDENT_CARD, tiny_weights

READY_TIMEOUT_S = 600  # loading two models and warming them up on one busy core


@dataclass(frozen=True)
class Engine:
    """A server to measure: a label, the checkout it runs from, and the FASHION_* settings it gets."""

    label: str
    repo: Path
    settings: dict[str, str]  # FASHION_<NAME> settings, by name
    multi_model: bool  # serves the student beside the teacher (this checkout); the previous engine does not


def tiny_models(directory: Path) -> tuple[Path, Path]:
    """A tiny random teacher and a 'student' distilled from it, under the shipped models' names (the mix
    asks for fashion-student by name)."""
    teacher = tiny_weights(directory / "fashion-unet.safetensors", name="fashion-unet", steps=20)
    student_card = {**STUDENT_CARD, "name": "fashion-student"}
    student = tiny_weights(directory / "fashion-student.safetensors", seed=1, **student_card)
    return teacher, student


def machine_line() -> str:
    """The CPU, torch, and the CPUs this process may run on (``taskset``), with the load average."""
    line = describe("cpu")
    if hasattr(os, "sched_getaffinity"):
        line += f"; pinned to CPU {','.join(map(str, sorted(os.sched_getaffinity(0))))}"
    if hasattr(os, "getloadavg"):
        line += f"; load average {os.getloadavg()[0]:.1f} at the end"
    return line


@contextlib.contextmanager
def serve(engine: Engine, tmp: Path, threads: int, *, tiny: bool = False) -> Iterator[str]:
    """``python -m app`` of ``engine.repo`` (cwd and PYTHONPATH there, so that checkout is what runs),
    serving the teacher, and the student too where the engine can; yields its URL once /readyz is 200."""
    if tiny:
        teacher, student = tiny_models(tmp)
    else:
        teacher = default_weights_dir() / "fashion-unet.safetensors"
        student = default_weights_dir() / "fashion-student.safetensors"
    settings = {
        "threads": str(threads),
        "device": "cpu",
        "clip_enabled": "false",
        "classifier_weights": "",  # no rerank here, and a checkout without weights/ starts too
        **({"models": json.dumps([str(teacher), str(student)])} if engine.multi_model else {"weights": str(teacher)}),
        **engine.settings,
    }
    env = app_env(settings, repo=engine.repo)
    env["OMP_NUM_THREADS"] = str(threads)  # the previous engine has no FASHION_THREADS
    proc, url = start_app(
        settings,
        args=("-m", "app", "--log-level", "warning"),
        repo=engine.repo,
        env=env,
        capture=False,
        timeout=READY_TIMEOUT_S,
    )
    try:
        yield url
    finally:
        stop(proc)
