"""Every error has one shape, {"error": {"message", "type", "param", "code"}}, and the right status."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("body", "param", "needles"),
    [
        ({"class": 10}, "class", ["0..9", "dress", "ankle boot", "got 10"]),
        ({"class": -1}, "class", ["0..9"]),
        ({"class": "hat"}, "class", ["t-shirt/top", "'hat'"]),
        ({"class": 3.5}, "class", ["0..9"]),
        ({"class": True}, "class", ["0..9"]),
        ({"class": 3, "n": 0}, "n", ["1..64", "got 0"]),
        ({"class": 3, "n": 65}, "n", ["1..64", "got 65"]),
        ({"class": 3, "n": "many"}, "n", ["integer", "1..64"]),
        ({"class": 3, "n": True}, "n", ["boolean", "1..64"]),
        ({"class": 3, "n": 2.5}, "n", ["1..64"]),
        ({"class": 3, "sampler": "euler"}, "sampler", ["ddpm", "ddim", "dpm++", "'euler'"]),
        ({"class": 3, "steps": 0}, "steps", ["1..1000"]),
        ({"class": 3, "steps": 1001}, "steps", ["1..1000"]),
        ({"class": 3, "guidance": -0.5}, "guidance", ["0.0..20.0"]),
        ({"class": 3, "guidance": 21}, "guidance", ["0.0..20.0"]),
        ({"class": 3, "guidance": "strong"}, "guidance", ["number"]),
        ({"class": 3, "seed": -1}, "seed", ["0..4294967295"]),
        ({"class": 3, "colour": "red"}, "colour", ["unknown field", "class", "seed"]),
        ({"n": 3}, "class", ["required", "0..9"]),
    ],
)
def test_bad_input_is_422_naming_the_field_and_what_it_accepts(
    client: TestClient, error_of: Callable, body: dict, param: str, needles: list[str]
) -> None:
    err = error_of(client.post("/generate", json=body), 422)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["message"].startswith(f"{param}:")
    for needle in needles:
        assert needle in err["message"], (needle, err["message"])


def test_limits_follow_the_settings(make_settings: Callable[..., Settings], error_of: Callable) -> None:
    app = create_app(make_settings(max_images=8, max_rows=8, max_steps=50))
    with TestClient(app) as c:
        err = error_of(c.post("/generate", json={"class": 3, "n": 9}), 422)
        assert "1..8" in err["message"]
        err = error_of(c.post("/generate", json={"class": 3, "steps": 51}), 422)
        assert "1..50" in err["message"]
    # The OpenAPI page documents the same bounds.
    schema = app.openapi()["components"]["schemas"]["GenerateRequest"]["properties"]
    assert schema["n"]["maximum"] == 8 and schema["n"]["minimum"] == 1
    assert schema["steps"]["anyOf"][0]["maximum"] == 50
    assert schema["guidance"]["anyOf"][0]["maximum"] == 20.0
    assert schema["class"]["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": 9}


def test_a_guided_request_over_the_row_budget_is_refused_naming_the_limit(
    make_settings: Callable[..., Settings], error_of: Callable
) -> None:
    with TestClient(create_app(make_settings(max_images=8, max_rows=8))) as c:
        err = error_of(c.post("/generate", json={"class": 3, "n": 5, "guidance": 2.0}), 422)
        assert (err["param"], err["code"]) == ("n", "too_many_rows")
        assert "10 rows" in err["message"] and "at most 8" in err["message"] and "n <= 4" in err["message"]
        error_of(c.post("/generate/stream", json={"class": 3, "n": 5, "guidance": 2.0}), 422)  # before it starts
        ok = c.post("/generate", json={"class": 3, "n": 5, "guidance": 1.0})  # unguided: one row per image
        assert ok.status_code == 200 and len(ok.json()["images"]) == 5


def test_malformed_bodies(client: TestClient, error_of: Callable) -> None:
    err = error_of(client.post("/generate", content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert "not valid JSON" in err["message"]
    err = error_of(client.post("/generate", json=[1, 2]), 422)
    assert "JSON object" in err["message"]
    err = error_of(client.post("/generate"), 422)
    assert "required" in err["message"]


def test_stream_validates_before_streaming(client: TestClient, error_of: Callable) -> None:
    err = error_of(client.get("/generate/stream?class=10&n=2"), 422)
    assert err["param"] == "class"
    err = error_of(client.get("/generate/stream?class=dress&n=0"), 422)
    assert err["param"] == "n"
    err = error_of(client.post("/generate/stream", json={"class": 1, "preview_every": 0}), 422)
    assert err["param"] == "preview_every"


def test_unknown_route_and_method(client: TestClient, error_of: Callable) -> None:
    err = error_of(client.get("/nope"), 404)
    assert err["type"] == "not_found_error" and "/nope" in err["message"]
    error_of(client.get("/generate"), 405)


def test_api_key_guards_everything_but_health_metrics_and_docs(
    make_settings: Callable[..., Settings], error_of: Callable
) -> None:
    with TestClient(create_app(make_settings(api_key="s3cret"))) as c:
        body = {"class": 1, "n": 1, "steps": 1}
        r = c.post("/generate", json=body)
        err = error_of(r, 401)
        assert err["type"] == "authentication_error" and err["code"] == "missing_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        err = error_of(c.post("/generate", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        assert err["code"] == "invalid_api_key"
        error_of(c.get("/generate/stream?class=1"), 401)
        assert c.post("/generate", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/generate", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert c.get(path).status_code == 200, path


def test_oversized_body_is_413(make_settings: Callable[..., Settings], error_of: Callable) -> None:
    with TestClient(create_app(make_settings(max_body_bytes=1024))) as c:
        big = {"class": 1, "n": 1, "pad": "x" * 2000}
        err = error_of(c.post("/generate", json=big), 413)
        assert "1024" in err["message"] and err["code"] == "body_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: refused while reading
            yield b'{"class": 1, "pad": "'
            for _ in range(40):
                yield b"y" * 100
            yield b'"}'

        err = error_of(c.post("/generate", content=chunks(), headers={"content-type": "application/json"}), 413)
        assert err["code"] == "body_too_large"

        def small() -> Iterator[bytes]:  # a chunked body under the limit still works
            yield b'{"class": 1, "n": 1, '
            yield b'"steps": 1}'

        assert c.post("/generate", content=small(), headers={"content-type": "application/json"}).status_code == 200


def test_not_ready_is_503(make_settings: Callable[..., Settings], error_of: Callable) -> None:
    # Without entering the context, the lifespan never runs: no weights, no engine.
    c = TestClient(create_app(make_settings()))
    r = c.post("/generate", json={"class": 1})
    err = error_of(r, 503)
    assert err["code"] == "not_ready" and r.headers["retry-after"] == "5"
    error_of(c.get("/readyz"), 503)
    error_of(c.get("/generate/stream?class=1"), 503)
    assert c.get("/healthz").json() == {"status": "ok"}


def test_full_queue_is_429_with_retry_after(
    make_settings: Callable[..., Settings], error_of: Callable, metric: Callable
) -> None:
    # A row budget of 2: the long guided 1-image stream takes all of it, so the next job must queue.
    with TestClient(create_app(make_settings(queue_size=1, max_rows=2, max_images=1))) as c:

        def poll(name: str, value: float, **labels: str) -> None:  # for what another thread does
            deadline = time.monotonic() + 30
            while metric(c.get("/metrics").text, name, **labels) != value:
                assert time.monotonic() < deadline, name
                time.sleep(0.01)

        # Keep the device busy with a long stream, which this test ends by hanging up.
        hang_up = threading.Event()

        def long_stream() -> None:
            body = {"class": 0, "n": 1, "sampler": "ddim", "steps": 1000, "preview_every": 1000}
            with c.stream("POST", "/generate/stream", json=body) as r:
                for _ in r.iter_lines():
                    if hang_up.is_set():
                        break

        answers: dict[str, int] = {}
        busy = threading.Thread(target=long_stream)
        busy.start()
        poll("fashion_jobs_active", 1)
        waiting = threading.Thread(
            target=lambda: answers.setdefault("queued", c.post("/generate", json={"class": 1, "steps": 1}).status_code)
        )
        waiting.start()
        poll("fashion_queue_depth", 1)
        t0 = time.monotonic()
        r = c.post("/generate", json={"class": 2, "n": 1})
        assert time.monotonic() - t0 < 1.0  # refused at once
        err = error_of(r, 429)
        assert err["code"] == "queue_full" and err["type"] == "overloaded_error"
        assert int(r.headers["retry-after"]) >= 1
        error_of(c.post("/generate/stream", json={"class": 2}), 429)  # streams are refused before they start
        # Counted before the answers went out: no waiting for it.
        assert metric(c.get("/metrics").text, "fashion_jobs_rejected_total", reason="queue_full") == 2
        hang_up.set()
        busy.join(60)
        waiting.join(60)
        assert answers == {"queued": 200}
        # The hung-up stream's job stops at the engine's next tick: no client waits for that count.
        poll("fashion_jobs_cancelled_total", 1, stage="running")
