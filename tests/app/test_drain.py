"""Graceful drain on SIGTERM, with a real ``python -m app`` process: what runs or waits still gets its
images, what cannot finish in time gets a clear 503 or stream ``error``, and the process exits 0."""

from __future__ import annotations

import json
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from testkit.metrics import metric
from testkit.servers import wait_for

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]


def gauge(url: str, name: str) -> float:
    return metric(httpx.get(f"{url}/metrics", timeout=10).text, name)


def stream_in_thread(url: str, body: dict, events: list) -> threading.Thread:
    def run() -> None:
        with (
            httpx.Client(base_url=url, timeout=120) as http,
            connect_sse(http, "POST", "/generate/stream", json=body) as s,
        ):
            events.extend((e.event, json.loads(e.data)) for e in s.iter_sse())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def listening(url: str) -> bool:
    """Whether the server still accepts connections (a bare TCP connect: no request, so no job)."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError:
        return False
    return True


def post_in_thread(url: str, body: dict, answers: list) -> threading.Thread:
    thread = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/generate", json=body, timeout=120)))
    thread.start()
    return thread


def test_sigterm_drains_a_running_stream_a_running_generate_and_a_queued_job(spawn_app: Callable) -> None:
    # Budget 4 rows: the guided stream and /generate take 2 each, so the third job has to queue.
    proc, url = spawn_app(max_rows="4", max_images="2", drain_seconds="60")
    events: list = []
    running: list = []
    queued: list = []
    threads = [
        stream_in_thread(url, {"class": 1, "n": 1, "sampler": "ddim", "steps": 400, "preview_every": 400}, events)
    ]
    wait_for(lambda: gauge(url, "fashion_jobs_active") == 1, "the stream did not start")
    threads.append(post_in_thread(url, {"class": 2, "n": 1, "sampler": "ddim", "steps": 300, "seed": 5}, running))
    wait_for(lambda: gauge(url, "fashion_jobs_active") == 2, "the generate did not start")
    threads.append(post_in_thread(url, {"class": 3, "n": 1, "steps": 3, "seed": 6}, queued))
    wait_for(lambda: gauge(url, "fashion_queue_depth") == 1, "the third job did not queue")

    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: not listening(url), "the listener did not close on SIGTERM")
    with pytest.raises(httpx.TransportError):  # the listener is closed: nothing new gets in
        httpx.post(f"{url}/generate", json={"class": 4, "n": 1}, timeout=5)
    for thread in threads:
        thread.join(120)
    output = proc.communicate(timeout=60)[0]

    assert [name for name, _ in events][-1] == "done" and len(events[-1][1]["images"]) == 1
    assert [r.status_code for r in running + queued] == [200, 200]
    assert len(running[0].json()["images"]) == len(queued[0].json()["images"]) == 1
    assert proc.returncode == 0, output
    assert "draining: 2 running, 1 queued" in output


def test_what_cannot_finish_within_the_drain_gets_a_clear_error(spawn_app: Callable) -> None:
    proc, url = spawn_app(drain_seconds="0.5")
    events: list = []
    answers: list = []
    threads = [
        stream_in_thread(url, {"class": 1, "n": 1, "sampler": "ddim", "steps": 1000, "preview_every": 1000}, events)
    ]
    threads.append(post_in_thread(url, {"class": 2, "n": 1, "sampler": "ddim", "steps": 1000}, answers))
    wait_for(lambda: gauge(url, "fashion_jobs_active") == 2, "the jobs did not start")
    proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(60)
    output = proc.communicate(timeout=60)[0]

    name, data = events[-1]
    assert name == "error" and data["error"]["code"] == "not_ready", events[-1]
    assert "did not finish in time" in data["error"]["message"]
    assert answers[0].status_code == 503 and answers[0].json()["error"]["code"] == "not_ready"
    assert answers[0].headers["retry-after"]
    assert proc.returncode == 0, output
