"""End to end: uvicorn on a free loopback port, spoken to over real HTTP with httpx and httpx-sse."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from app import client as cli
from app.settings import Settings
from model.machine import native_bfloat16

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def live(app_weights: Path, serve_in_thread: Callable) -> Iterator[str]:
    """The real app under uvicorn in a thread; stops by itself at the end of the module."""
    with serve_in_thread(Settings(weights=app_weights, device="cpu", api_key=None)) as url:
        yield url


def test_generate_over_http(live: str, decode_png: Callable, metric: Callable) -> None:
    with httpx.Client(base_url=live, timeout=60) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz").json()
        assert (ready["status"], ready["model"], ready["device"]) == ("ready", "tiny-test", "cpu")
        assert ready["precision"] == ("bfloat16" if native_bfloat16() else "float32")  # FASHION_PRECISION=auto
        assert ready["clip"]["status"] in ("loading", "unavailable")  # no CLIP weights here; ready all the same
        r = http.post("/generate", json={"class": "sneaker", "n": 4, "seed": 9})
        assert r.status_code == 200
        images = [decode_png(img["png"]) for img in r.json()["images"]]
        assert [a.shape for a in images] == [(28, 28)] * 4
        grid = http.post("/generate", json={"class": "sneaker", "n": 4, "seed": 9}, headers={"Accept": "image/png"})
        assert grid.headers["content-type"] == "image/png"
        assert (decode_png(grid.content)[2:30, 2:30] == images[0]).all()
        bad = http.post("/generate", json={"class": 3, "n": 1000})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "n"
        text = http.get("/metrics").text
        assert metric(text, "fashion_http_requests_total", route="/generate", status="200") >= 2


def test_stream_over_http(live: str) -> None:
    with httpx.Client(base_url=live, timeout=60) as http:
        body = {"class": 9, "n": 2, "seed": 1, "steps": 4, "preview_every": 2}
        with connect_sse(http, "POST", "/generate/stream", json=body) as source:
            assert source.response.status_code == 200
            events = [(e.event, json.loads(e.data)) for e in source.iter_sse()]
        assert [name for name, _ in events] == ["start", "step", "step", "step", "step", "done"]
        assert [data["index"] for name, data in events if name == "step"] == [0, 1, 2, 3]
        plain = http.post("/generate", json={k: v for k, v in body.items() if k != "preview_every"}).json()
        assert events[-1][1]["images"] == plain["images"]
        # The browser flavour: GET with a query string.
        with connect_sse(http, "GET", "/generate/stream", params={"class": "ankle boot", "n": 1, "steps": 2}) as source:
            names = [e.event for e in source.iter_sse()]
        assert names == ["start", "step", "step", "done"]


def test_client_disconnect_cancels_the_job(live: str, metric: Callable) -> None:
    with httpx.Client(base_url=live, timeout=60) as http:
        before = metric(http.get("/metrics").text, "fashion_jobs_cancelled_total", stage="running")
        body = {"class": 2, "n": 1, "sampler": "ddim", "steps": 1000, "preview_every": 1000}
        with connect_sse(http, "POST", "/generate/stream", json=body) as source:
            for event in source.iter_sse():
                if event.event == "step":
                    break  # closing the response drops the connection
        deadline = time.monotonic() + 30
        while metric(http.get("/metrics").text, "fashion_jobs_cancelled_total", stage="running") == before:
            assert time.monotonic() < deadline, "the job was not cancelled"
            time.sleep(0.02)
        steps = metric(http.get("/metrics").text, "fashion_sampler_steps_total")
        time.sleep(0.2)
        assert metric(http.get("/metrics").text, "fashion_sampler_steps_total") == steps  # nothing runs any more


def test_plain_generate_is_cancelled_when_its_client_gives_up(live: str, metric: Callable) -> None:
    with httpx.Client(base_url=live, timeout=60) as http:
        before = metric(http.get("/metrics").text, "fashion_jobs_cancelled_total", stage="running")
        body = {"class": 2, "n": 1, "sampler": "ddim", "steps": 1000}
        with pytest.raises(httpx.ReadTimeout):
            http.post("/generate", json=body, timeout=httpx.Timeout(60, read=0.3))  # hangs up after 0.3 s
        deadline = time.monotonic() + 30
        while metric(http.get("/metrics").text, "fashion_jobs_cancelled_total", stage="running") == before:
            assert time.monotonic() < deadline, "the job was not cancelled"
            time.sleep(0.02)
        text = http.get("/metrics").text
        assert metric(text, "fashion_http_requests_total", route="/generate", status="499") >= 1


def test_command_line_client(
    live: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], decode_png: Callable
) -> None:
    common = ["--url", live]
    out = tmp_path / "gen"
    assert (
        cli.main([*common, "generate", "--class", "dress", "-n", "3", "-o", str(out), "--seed", "4", "--steps", "2"])
        == 0
    )
    files = sorted(p.name for p in out.iterdir())
    assert files == ["dress_000_seed4.png", "dress_001_seed5.png", "dress_002_seed6.png"]
    assert decode_png((out / files[0]).read_bytes()).shape == (28, 28)

    grid_dir = tmp_path / "grid"
    assert cli.main([*common, "generate", "--class", "3", "-n", "4", "--grid", "-o", str(grid_dir), "--seed", "4"]) == 0
    assert [p.name for p in grid_dir.iterdir()] == ["grid_seed4.png"]

    streamed = tmp_path / "stream"
    args = [*common, "stream", "--class", "ankle boot", "-n", "2", "-o", str(streamed), "--steps", "2", "--previews"]
    assert cli.main(args) == 0
    assert len(list(streamed.glob("ankle-boot_*.png"))) == 2
    previews = sorted(p.name for p in (streamed / "previews").iterdir())  # 2 steps: a preview on each
    assert previews == ["step0000_x0.png", "step0000_xt.png", "step0001_x0.png", "step0001_xt.png"]
    assert "step 2/2" in capsys.readouterr().out

    assert cli.main([*common, "generate", "--class", "hat", "-o", str(tmp_path / "x")]) == 1
    assert "422" in capsys.readouterr().err

    assert cli.main([*common, "models"]) == 0
    assert capsys.readouterr().out.startswith("tiny-test (teacher, the default;")
    assert cli.main([*common, "generate", "--class", "3", "--model", "nope", "-o", str(tmp_path / "x")]) == 1
    assert "404 model_not_found" in capsys.readouterr().err


def test_python_m_app_serves_and_stops(app_weights: Path, spawn_app: Callable) -> None:
    proc, url = spawn_app("-m", "app", "--weights", str(app_weights))
    r = httpx.post(f"{url}/generate", json={"class": 1, "n": 2, "steps": 2}, timeout=60)
    assert r.status_code == 200 and len(r.json()["images"]) == 2
    proc.terminate()
    output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output  # drained and shut down: a clean exit, not death by SIGTERM
    assert "Application shutdown complete" in output


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_bad_weights_stop_startup_with_a_clear_message(
    app_weights: Path, tmp_path: Path, problem: str, spawn_app: Callable
) -> None:
    weights = tmp_path / "w" / "broken.safetensors"
    weights.parent.mkdir()
    args = ("-m", "app")
    if problem == "corrupt":
        weights.write_bytes(b"\x00\x01 definitely not safetensors")
        weights.with_suffix(".json").write_text(app_weights.with_suffix(".json").read_text())
        args = ("-m", "uvicorn", "app.main:app")  # the other way to start it
    proc, _ = spawn_app(*args, ready=False, weights=str(weights))
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    assert str(weights) in output
    assert ("weights file not found" if problem == "missing" else "not a readable safetensors file") in output
