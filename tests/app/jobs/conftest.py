"""Fixtures for the job tests: settings for a tiny model with a job directory, one real server per module,
and a slow job's body. Waiting for a job and the webhook receiver are in ``testkit.jobs``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.settings import Settings
from testkit.jobs import WEBHOOK_SECRET
from testkit.servers import serve_in_thread


@pytest.fixture(scope="module")
def job_settings(app_weights: Path) -> Callable[..., Settings]:
    """``job_settings(job_dir, **overrides)``: the tiny model on the CPU, no CLIP, jobs in ``job_dir`` in
    chunks of 8 images, webhooks signed with ``WEBHOOK_SECRET`` and retried 4 times, 50 ms apart at first."""

    def make(job_dir: Path, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "device": "cpu",
            "weights": app_weights,
            "threads": 1,  # beside the test process and a busy core, one OpenMP thread is faster than two
            "clip_enabled": False,
            "classifier_weights": None,
            "job_dir": job_dir,
            "job_chunk_images": 8,
            "webhook_secret": WEBHOOK_SECRET,
            "webhook_backoff_seconds": 0.05,
            "webhook_attempts": 4,
        }
        return Settings(**(values | overrides))

    return make


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The job directory of the module's server."""
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def server(job_settings: Callable[..., Settings], server_dir: Path) -> Iterator[str]:
    """One real server (uvicorn in a thread) for a module's tests: 2 jobs may queue, a 4 MB disk quota."""
    with serve_in_thread(job_settings(server_dir, job_queue_size=2, job_disk_quota_bytes=4_000_000)) as url:
        yield url


@pytest.fixture
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


@pytest.fixture
def slow_body() -> dict[str, Any]:
    """A job that runs for a while on the tiny model (200 images of 40 ddim steps): tests cancel it."""
    return {"counts": [20] * 10, "sampler": "ddim", "steps": 40, "seed": 11}
