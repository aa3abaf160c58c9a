"""A job runs in the rows interactive work leaves idle: a /generate beside a running job is evaluated in
ticks of its own rows (no background piece joins a tick it fills), no tick grows past one chunk for
background work, and the job goes on around it; read through the answer's timings and /metrics."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from testkit.jobs import wait_job
from testkit.metrics import metric, moved
from testkit.servers import wait_for

pytestmark = pytest.mark.timeout(120)


def test_an_interactive_request_beside_a_running_job_gets_its_own_ticks(
    http: httpx.Client, slow_body: dict[str, Any]
) -> None:
    job = http.post("/jobs", json=slow_body).json()
    try:
        wait_job(http, job["id"], lambda s: s["state"] == "running", "did not start")
        before = http.get("/metrics").text
        wait_for(
            lambda: moved(before, http.get("/metrics").text, "fashion_background_rows_total", model="tiny-test") > 0,
            "no background rows were evaluated",
        )
        # 8 guided images: 16 rows, one whole CPU chunk, so no idle row is left for the job's pieces
        answer = http.post("/generate", json={"class": 2, "n": 8, "seed": 3})
        assert answer.status_code == 200, answer.text
        timings = answer.json()["timings"]
        assert (timings["batch_jobs"], timings["batch_images"]) == (1, 8)
        middle = http.get("/metrics").text
        wait_for(
            lambda: moved(middle, http.get("/metrics").text, "fashion_background_rows_total", model="tiny-test") > 0,
            "the job did not go on after the interactive request",
        )
        after = http.get("/metrics").text
        evaluations = moved(before, after, "fashion_tick_rows_count", model="tiny-test")
        within_a_chunk = moved(before, after, "fashion_tick_rows_bucket", model="tiny-test", le="16.0")
        assert evaluations > 0 and within_a_chunk == evaluations  # background never added a chunk to a tick
        assert metric(after, "fashion_long_jobs", state="running") == 1
    finally:
        http.delete(job["url"])
