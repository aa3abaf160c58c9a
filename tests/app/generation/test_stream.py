"""Server-sent events: the event sequence, previews, GET for EventSource, errors, disconnects."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from model.diffusion import Schedule
from model.samplers import karras_timesteps

pytestmark = pytest.mark.timeout(120)


def test_event_sequence_is_complete_and_ordered(client: TestClient, parse_sse: Callable, decode_png: Callable) -> None:
    body = {"class": "coat", "n": 3, "seed": 11, "sampler": "ddim", "steps": 5, "preview_every": 2}
    r = client.post("/generate/stream", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    names = [name for name, _ in events]
    assert names == ["start", "step", "step", "step", "step", "step", "done"]

    start = events[0][1]
    assert start["params"] == {
        "class": 4,
        "class_name": "coat",
        "n": 3,
        "sampler": "ddim",
        "steps": 5,
        "guidance": 2.0,
        "guidance_interval": None,
        "guidance_method": "classifier-free",
        "guide": None,
        "sigma_min": None,
        "seed": 11,
    }
    assert start["job"] and start["queue_depth"] >= 0

    steps = [data for name, data in events if name == "step"]
    assert [s["index"] for s in steps] == [0, 1, 2, 3, 4]
    assert all(s["total"] == 5 for s in steps)
    assert [s["t"] for s in steps] == sorted((s["t"] for s in steps), reverse=True)
    with_preview = [s["index"] for s in steps if s["x0_png"] is not None]
    assert with_preview == [1, 3, 4]  # every 2nd step, and the last
    for s in steps:
        assert (s["xt_png"] is None) == (s["x0_png"] is None)
    x0 = decode_png(steps[1]["x0_png"])
    assert x0.shape == (62, 62)  # 3 tiles on a 2 x 2 grid of 28 px tiles, 2 px apart

    done = events[-1][1]
    assert [img["seed"] for img in done["images"]] == [11, 12, 13]
    # The final images are exactly what /generate returns for the same request.
    plain = client.post("/generate", json={k: v for k, v in body.items() if k != "preview_every"}).json()
    assert [i["png"] for i in done["images"]] == [i["png"] for i in plain["images"]]
    # The last preview of x0 is the final image (ddim's last step returns x0_pred).
    last = decode_png(steps[-1]["x0_png"])
    assert (last[2:30, 2:30] == decode_png(done["images"][0]["png"])).all()


def test_a_heun_stream_shows_every_evaluation_at_its_noise_level(client: TestClient, parse_sse: Callable) -> None:
    """Heun's steps take two evaluations (the correction, then the Euler step from the level reached); the
    stream shows each, and its t, and the default previews are spread over all of them."""
    body = {"class": 2, "n": 1, "seed": 5, "sampler": "heun", "steps": 3}
    events = parse_sse(client.post("/generate/stream", json=body).text)
    steps = [data for name, data in events if name == "step"]
    pure_noise, first, *levels = karras_timesteps(Schedule.named("cosine"), 3)  # the test weights' schedule
    assert [s["t"] for s in steps] == [pure_noise, first, *(t for t in levels for _ in (0, 1))]
    assert [s["index"] for s in steps] == list(range(6)) and {s["total"] for s in steps} == {6}
    assert events[0][1]["params"]["steps"] == 3
    plain = client.post("/generate", json=body).json()
    assert [i["png"] for i in events[-1][1]["images"]] == [i["png"] for i in plain["images"]]


def test_get_for_eventsource_matches_post(client: TestClient, parse_sse: Callable) -> None:
    got = parse_sse(client.get("/generate/stream?class=dress&n=2&seed=5&steps=2").text)
    posted = parse_sse(client.post("/generate/stream", json={"class": 3, "n": 2, "seed": 5, "steps": 2}).text)
    assert [name for name, _ in got] == ["start", "step", "step", "done"]
    assert got[-1][1]["images"] == posted[-1][1]["images"]
    # Default previews: about ten per run, and always on the last step.
    assert got[2][1]["x0_png"] is not None


def test_disconnect_cancels_the_job(make_settings: Callable[..., Settings], metric: Callable) -> None:
    with TestClient(create_app(make_settings())) as c:
        body = {"class": 1, "n": 1, "sampler": "ddim", "steps": 1000, "preview_every": 1000}
        with c.stream("POST", "/generate/stream", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("event: step"):
                    break  # hang up after the first step
        deadline = time.monotonic() + 30
        while metric(c.get("/metrics").text, "fashion_jobs_cancelled_total", stage="running") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        text = c.get("/metrics").text
        steps_run = metric(text, "fashion_sampler_steps_total")
        assert steps_run < 1000
        time.sleep(0.2)
        assert metric(c.get("/metrics").text, "fashion_sampler_steps_total") == steps_run  # it stopped
        assert metric(text, "fashion_images_generated_total") == 0
        assert c.post("/generate", json={"class": 1, "n": 1, "steps": 1}).status_code == 200  # the device is free


def test_error_event_when_the_server_stops_mid_stream(client: TestClient, parse_sse: Callable) -> None:
    body = {"class": 1, "n": 1, "sampler": "ddim", "steps": 1000, "preview_every": 1000}
    lines: list[str] = []
    with client.stream("POST", "/generate/stream", json=body) as r:
        stopped = False
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith("event: step") and not stopped:
                client.app.state.serving.engine.stop()  # what the lifespan does on shutdown
                stopped = True
    events = parse_sse("\n".join(lines))
    assert events[0][0] == "start" and events[1][0] == "step"
    name, data = events[-1]
    assert name == "error"
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["code"] == "not_ready" and data["error"]["type"] == "unavailable_error"
    assert "done" not in [n for n, _ in events]
    assert client.get("/readyz").status_code == 503
