"""Fixtures for the service tests: a tiny real U-Net saved with save_weights, and real apps on it.

The toolkit (``testkit``: weights, servers, metrics) is importable; the helpers below reach the tests
as fixtures too (``decode_png``, ``parse_sse``, ``metric``, ``error_of``), as in tests/model/conftest.py.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from testkit import servers
from testkit.metrics import metric as read_metric
from testkit.weights import STUDENT_CARD, tiny_weights

TEST_STEPS = 3  # the card's default steps: enough to exercise multistep solvers, cheap on 2 cores


@pytest.fixture(scope="session")
def app_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny network for the whole session (the app never writes to it)."""
    return tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors", name="tiny-test", steps=TEST_STEPS)


@pytest.fixture(scope="session")
def student_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny network with a distilled student's card (``STUDENT_CARD``), to serve beside ``app_weights``."""
    return tiny_weights(tmp_path_factory.mktemp("student") / "student.safetensors", seed=1, **STUDENT_CARD)


@pytest.fixture(scope="session")
def guided_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher whose card names a guide (so autoguidance is its default), the guide beside it: another
    tiny network named ``tiny-guide``."""
    folder = tmp_path_factory.mktemp("guided")
    tiny_weights(folder / "guide.safetensors", seed=3, name="tiny-guide")
    sampling = {"sampler": "dpm++", "steps": 3, "guidance": 2.0, "guide": "guide"}
    return tiny_weights(folder / "guided.safetensors", seed=2, name="tiny-guided", sampling=sampling)


@pytest.fixture
def student_steps() -> int:
    return int(STUDENT_CARD["sampling"]["steps"])


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


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A loopback port nobody listens on now."""
    return servers.free_port


@pytest.fixture(scope="session")
def serve_in_thread() -> Callable[..., contextlib.AbstractContextManager[str]]:
    """``with serve_in_thread(settings) as url:`` the real app under uvicorn in a thread, on a free
    loopback port; it stops by itself when the block ends."""
    return servers.serve_in_thread


def _spawner(cwd: Path, app_weights: Path) -> servers.Spawner:
    # FASHION_WEIGHTS is the one-model form of FASHION_MODELS: the tiny weights unless either is given.
    return servers.Spawner({"device": "cpu", "weights": str(app_weights)}, cwd=cwd)


@pytest.fixture
def spawn_app(tmp_path: Path, app_weights: Path) -> Iterator[servers.Spawner]:
    """``spawn_app(*args, ready=True, **settings)``: ``python -m app`` (or other ``args``) as a real
    process on a free loopback port, with ``FASHION_<NAME>`` settings from keyword arguments, once
    /readyz says 200 unless ``ready=False`` (``testkit.servers.Spawner``). Whatever is still running at
    the end of the test is killed."""
    with _spawner(tmp_path, app_weights) as spawn:
        yield spawn


@pytest.fixture(scope="module")
def spawn_app_for_module(tmp_path_factory: pytest.TempPathFactory, app_weights: Path) -> Iterator[servers.Spawner]:
    """``spawn_app`` for a server that the tests of one module share; killed at the module's end."""
    with _spawner(tmp_path_factory.mktemp("spawned"), app_weights) as spawn:
        yield spawn


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
    """``testkit.metrics.metric``: the sum of a metric's samples in an exposition text."""
    return read_metric


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
    bodies: list[dict[str, Any]] = []

    def loaded() -> bool:
        bodies.append(client.get("/readyz").json())
        return bool(bodies[-1]["clip"]["status"] != "loading")

    servers.wait_for(loaded, "CLIP did not finish loading", timeout, interval=0.05)
    return bodies[-1]


@pytest.fixture
def wait_for_clip() -> Callable[..., dict[str, Any]]:
    return _wait_for_clip


@pytest.fixture
def clip_client(clip_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """A real app with the tiny CLIP ready and the tiny classifier loaded."""
    with TestClient(create_app(clip_settings())) as c:
        assert _wait_for_clip(c)["clip"]["status"] == "ready"
        yield c
