"""A job survives its server: ``python -m app`` killed with SIGKILL mid-job resumes it at the next start
from its last committed chunk, and the result is byte-identical to that of an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import httpx
import pytest

from testkit.jobs import ended, wait_job
from testkit.servers import Spawner

pytestmark = pytest.mark.timeout(180)
BODY = {"counts": [8] * 10, "sampler": "ddim", "steps": 12, "seed": 21, "format": "parquet"}


# Without access logs: the spawner keeps the output in a pipe, which a log line per status poll would fill.
QUIET = ("-m", "app", "--log-level", "warning")


def settings(tmp_path: Path) -> dict[str, str]:
    return {
        "job_dir": str(tmp_path / "jobs"),
        "job_chunk_images": "8",
        "clip_enabled": "false",
        "classifier_weights": "",
        "threads": "1",
    }


def test_a_job_killed_mid_way_resumes_and_gives_the_same_bytes(spawn_app: Spawner, tmp_path: Path) -> None:
    proc, url = spawn_app(*QUIET, **settings(tmp_path))
    with httpx.Client(base_url=url, timeout=30) as http:
        job = http.post("/jobs", json=BODY, headers={"Idempotency-Key": "resume-1"}).json()
        before = wait_job(http, job["id"], lambda s: s["images_done"] >= s["chunk_images"], "did not commit a chunk")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert before["state"] == "running" and before["images_done"] < 80, "the job ended before the kill"

    _, url = spawn_app(*QUIET, **settings(tmp_path))  # the same job directory
    with httpx.Client(base_url=url, timeout=30) as http:
        resumed = http.get(job["url"]).json()
        assert resumed["images_done"] >= before["images_done"]  # from its last committed chunk, not from 0
        assert resumed["state"] in ("running", "succeeded") and resumed["started"] == before["started"]
        again = http.post("/jobs", json=BODY, headers={"Idempotency-Key": "resume-1"})
        assert again.status_code == 200 and again.json()["id"] == job["id"]  # the key outlives the process
        twin = http.post("/jobs", json=BODY).json()  # the same spec, drawn without interruption

        results = []
        for j in (job, twin):
            status = ended(http, j["id"])
            assert status["state"] == "succeeded" and status["images_done"] == 80
            body = http.get(status["result"]["url"]).content
            assert hashlib.sha256(body).hexdigest() == status["result"]["sha256"]
            results.append(body)
    assert results[0] == results[1]


def test_sigterm_stops_a_job_at_once_and_the_next_start_finishes_it(spawn_app: Spawner, tmp_path: Path) -> None:
    """The drain gives interactive work its time; a job's pieces stop at once and the job stays running."""
    proc, url = spawn_app(*QUIET, **settings(tmp_path), drain_seconds="60")
    with httpx.Client(base_url=url, timeout=30) as http:
        job = http.post("/jobs", json=BODY).json()
        wait_job(http, job["id"], lambda s: s["images_done"] >= s["chunk_images"], "did not commit a chunk")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0  # without waiting out the 60 s drain

    _, url = spawn_app(*QUIET, **settings(tmp_path))
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get(job["url"]).json()["state"] in ("running", "succeeded")
        assert ended(http, job["id"])["state"] == "succeeded"
