"""Fixtures for the service tests: a tiny real U-Net saved with save_weights, and real apps on it.

conftest modules are not importable, so the helpers below reach the tests as fixtures
(``decode_png``, ``parse_sse``, ``metric``, ``error_of``), as in tests/model/conftest.py.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.settings import Settings
from model.data import CLASS_NAMES
from model.io import save_weights
from model.unet import perturbed_unet, tiny_config

TINY = tiny_config()
REPO = Path(__file__).resolve().parents[2]
TEST_STEPS = 3  # the card's default steps: enough to exercise multistep solvers, cheap on 2 cores


STUDENT_STEPS = 4  # the student card's default steps, as the shipped student's
STUDENT_CARD = {  # a distilled student's card: consistency sampling, with guidance distilled into it
    "name": "tiny-student",
    "sampling": {"sampler": "consistency", "steps": STUDENT_STEPS, "guidance": 1.0, "guidance_interval": None},
    "distillation": {"teacher": "tiny-test", "method": "consistency distillation (test fixture)", "guidance": 1.35},
}


def build_tiny_weights(path: Path, seed: int = 0, **card: Any) -> Path:
    """A tiny U-Net with random (non-zero) weights, saved as <path>.safetensors + .json; ``card``
    replaces or adds top-level sections of the card (``STUDENT_CARD`` for a student's).

    A freshly initialised U-Net outputs zeros (its last convolutions start at zero), which would
    make every image the same; perturbing all weights gives seed-dependent, non-trivial images.
    v-prediction keeps the untrained network's x0 predictions bounded.
    """
    net = perturbed_unet(TINY, seed)
    base = {
        "name": "tiny-test",
        "unet": TINY.to_dict(),
        "diffusion": {"schedule": "cosine", "T": 1000, "prediction": "v"},
        "classes": list(CLASS_NAMES),
        "sampling": {"sampler": "dpm++", "steps": TEST_STEPS, "guidance": 2.0},
    }
    save_weights(net, {**base, **card}, path)
    return path


@pytest.fixture(scope="session")
def app_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny network for the whole session (the app never writes to it)."""
    return build_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


@pytest.fixture(scope="session")
def student_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny network with a distilled student's card (``STUDENT_CARD``), to serve beside ``app_weights``."""
    return build_tiny_weights(tmp_path_factory.mktemp("student") / "student.safetensors", seed=1, **STUDENT_CARD)


@pytest.fixture
def student_steps() -> int:
    return STUDENT_STEPS


@pytest.fixture
def test_steps() -> int:
    return TEST_STEPS


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """FASHION_* variables from the shell must not leak into the settings under test."""
    import os

    for name in list(os.environ):
        if name.startswith("FASHION_"):
            monkeypatch.delenv(name)


@pytest.fixture
def make_settings(app_weights: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"device": "cpu"}
        if "models" not in overrides:  # the two are one setting: FASHION_WEIGHTS is the one-model form
            values["weights"] = app_weights
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as c:
        yield c


# --- helpers ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A loopback port nobody listens on now."""
    return _free_port


@contextlib.contextmanager
def _in_thread(settings: Settings, log_level: str = "warning") -> Iterator[str]:
    port = _free_port()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()


@pytest.fixture(scope="session")
def serve_in_thread() -> Callable[..., contextlib.AbstractContextManager[str]]:
    """``with serve_in_thread(settings) as url:`` the real app under uvicorn in a thread, on a free
    loopback port; it stops by itself when the block ends."""
    return _in_thread


@pytest.fixture
def spawn_app(tmp_path: Path, app_weights: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[str], str]]]:
    """Start ``python -m app`` (or other ``args``) as a real process on a free loopback port, with
    ``FASHION_<NAME>`` settings from keyword arguments; wait for /readyz 200 unless ``ready=False``.
    Whatever is still running at the end of the test is killed."""
    procs: list[subprocess.Popen[str]] = []

    def spawn(*args: str, ready: bool = True, **settings: str) -> tuple[subprocess.Popen[str], str]:
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASHION_")}
        env.update(FASHION_DEVICE="cpu")
        if "models" not in settings:  # FASHION_WEIGHTS is the one-model form of FASHION_MODELS
            env.update(FASHION_WEIGHTS=str(app_weights))
        env.update({f"FASHION_{k.upper()}": v for k, v in settings.items()})
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        command = [sys.executable, *(args or ("-m", "app")), "--port", str(port)]
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while ready:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no /readyz 200 within 90 s"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        return proc, url

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _decode_png(data: bytes | str) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    image = Image.open(io.BytesIO(raw))
    image.load()
    assert image.format == "PNG"
    assert image.mode == "L"
    return np.asarray(image)


def _parse_sse(text: str) -> list[tuple[str, Any]]:
    """(event, decoded JSON data) for each event of an SSE body; comments are skipped."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events


def _metric(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``, parsed with prometheus-client;
    ``default`` when there is none (else KeyError, so a misspelt name fails loudly)."""
    total, found = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
                found = True
    if not found and default is not None:
        return default
    if not found:
        raise KeyError(f"no sample {name} {labels}")
    return total


def _error_of(response: Any, status: int) -> dict[str, Any]:
    """Assert the one error shape and return its inner object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.fixture
def decode_png() -> Callable[[bytes | str], np.ndarray]:
    """PNG bytes or base64 -> uint8 array, asserting a grayscale PNG."""
    return _decode_png


@pytest.fixture
def parse_sse() -> Callable[[str], list[tuple[str, Any]]]:
    return _parse_sse


@pytest.fixture
def metric() -> Callable[..., float]:
    return _metric


@pytest.fixture
def error_of() -> Callable[[Any, int], dict[str, Any]]:
    return _error_of


# --- CLIP and the classifier, for scoring and rerank ----------------------------------------------------------


@pytest.fixture(scope="session")
def empty_clip_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clip-cache")


@pytest.fixture(autouse=True)
def _hermetic_clip(_clean_env: None, empty_clip_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Apps built from default settings look for CLIP in an empty cache (and never download): CLIP is
    unavailable at once, whatever this machine's huggingface cache holds, and no test loads a real model."""
    monkeypatch.setenv("FASHION_CLIP_CACHE_DIR", str(empty_clip_cache))


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Fashion-MNIST classifier (safetensors + card), for rerank by classifier."""
    from model.classifier import Classifier, ClassifierConfig
    from model.io import save_weights_file

    torch.manual_seed(0)
    model = Classifier(ClassifierConfig(widths=(8, 16, 32))).eval()
    with torch.no_grad():  # an untrained head gives every image about 0.1 for every class; spread them out
        model.head.weight.mul_(200.0)
    path = tmp_path_factory.mktemp("classifier") / "clf.safetensors"
    save_weights_file(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({"kind": "classifier", "config": {"widths": [8, 16, 32]}}))
    return path


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny open_clip architecture with seed-7 random weights, saved as a local checkpoint file."""
    from model.clip import TINY_MODEL, ClipSpec, load_clip, save_checkpoint

    clip = load_clip(ClipSpec(model=TINY_MODEL, pretrained=None, random_init=True, seed=7))
    return save_checkpoint(clip.model, tmp_path_factory.mktemp("clip") / "tiny-clip.safetensors")


@pytest.fixture
def clip_settings(make_settings: Callable[..., Settings], tiny_classifier: Path) -> Callable[..., Settings]:
    """Settings for the tiny CLIP loaded by name with random weights (no network: downloads stay off)."""
    from model.clip import TINY_MODEL

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "clip_model": TINY_MODEL,
            "clip_pretrained": "",
            "clip_random_init": True,
            "clip_download": False,
            "classifier_weights": tiny_classifier,
        }
        values.update(overrides)
        return make_settings(**values)

    return make


def _wait_for_clip(client: TestClient, timeout: float = 120.0) -> dict[str, Any]:
    """Poll /readyz until CLIP has finished loading (it loads in the background); the /readyz body then."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        body = client.get("/readyz").json()
        if body["clip"]["status"] != "loading":
            return body
        assert time.monotonic() < deadline, "CLIP did not finish loading"
        time.sleep(0.05)


@pytest.fixture
def wait_for_clip() -> Callable[..., dict[str, Any]]:
    return _wait_for_clip


@pytest.fixture
def clip_client(clip_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """A real app with the tiny CLIP ready and the tiny classifier loaded."""
    with TestClient(create_app(clip_settings())) as c:
        assert _wait_for_clip(c)["clip"]["status"] == "ready"
        yield c
