"""POST /clip/score on the real app with a tiny open_clip model: loading, scoring, uploads, errors, metrics.

The reference numbers come from model.clip loaded independently in the test, from the same
spec, on the same decoded pixels: the route must add nothing and lose nothing on the way.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app import client as cli
from app.clip.service import ClipService, Overloaded
from app.generation.scorers import ScorerUnavailable
from app.main import create_app
from app.metrics import Metrics
from app.settings import Settings
from model.clip import TINY_MODEL, Clip, ClipSpec, load_clip
from model.images import png_bytes
from testkit import metrics, servers

pytestmark = pytest.mark.timeout(180)

TEXTS = ["a photo of a dress", "a sneaker", "a bag on a black background"]


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Two 28x28 grayscale images and one 40x30 colour image, as the route will decode them."""
    rng = np.random.default_rng(0)
    gray = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(2)]
    colour = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    return [*gray, colour]


@pytest.fixture(scope="module")
def encoded(images: list[np.ndarray]) -> list[bytes]:
    return [png_bytes(images[0]), png_bytes(images[1]), encode(Image.fromarray(images[2]), "PNG")]


@pytest.fixture(scope="module")
def reference() -> Clip:
    """The tiny model as the service loads it by name (random weights, seed 0), loaded here on its own."""
    return load_clip(ClipSpec(model=TINY_MODEL, pretrained=None, random_init=True))


# ---- scoring ------------------------------------------------------------------------------------------------------


def test_texts_json_gives_every_cosine_and_clip_score(
    clip_client: TestClient, images: list, encoded: list, reference: Clip
) -> None:
    r = clip_client.post("/clip/score", json={"images": [b64(e) for e in encoded], "texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == f"{TINY_MODEL} (random weights)"
    assert body["texts"] == TEXTS
    assert body["class"] is None and body["class_similarity"] is None
    sim = np.array(body["similarity"])
    assert sim.shape == (3, 3)
    np.testing.assert_allclose(sim, reference.score(images, TEXTS), atol=1e-5)
    assert not np.allclose(sim[0], sim[1])  # different images, different rows
    np.testing.assert_allclose(body["clip_score"], 100 * np.maximum(sim, 0), atol=1e-9)
    t = body["timings"]
    assert t["total_ms"] >= t["scoring_ms"] > 0 and t["queue_ms"] >= 0


@pytest.mark.parametrize("value", [3, "dress", "DRESS", "3"])
def test_class_by_index_or_name_uses_the_prompt_template(
    clip_client: TestClient, images: list, encoded: list, reference: Clip, value: object
) -> None:
    r = clip_client.post("/clip/score", json={"images": [b64(encoded[0])], "class": value})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["class"], body["class_name"]) == (3, "dress")
    assert body["texts"] == ["a photo of a dress, a type of clothing."]
    np.testing.assert_allclose(body["similarity"], reference.score(images[:1], body["texts"]), atol=1e-5)
    np.testing.assert_allclose(body["class_similarity"], reference.score_class(images[:1], 3), atol=1e-5)


def test_multipart_uploads_score_like_json(clip_client: TestClient, encoded: list) -> None:
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(encoded)]
    r = clip_client.post("/clip/score", files=files, data={"texts": TEXTS})
    assert r.status_code == 200, r.text
    as_json = clip_client.post("/clip/score", json={"images": [b64(e) for e in encoded], "texts": TEXTS}).json()
    assert r.json()["texts"] == TEXTS
    np.testing.assert_allclose(r.json()["similarity"], as_json["similarity"], atol=1e-6)
    r = clip_client.post("/clip/score", files=files[:1], data={"class": "ankle boot"})
    assert r.status_code == 200, r.text
    assert r.json()["class"] == 9 and r.json()["texts"] == ["a photo of a ankle boot, a type of clothing."]


def test_large_multipart_files_stay_in_memory(
    clip_settings: Callable[..., Settings], wait_for_clip: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Starlette's form parser would spool a part over 1 MiB to a temporary file; the route must not use it.
    import starlette.formparsers

    def no_disk(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a multipart part was spooled to disk")

    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", no_disk)
    big = np.random.default_rng(1).integers(0, 256, (900, 900), dtype=np.uint8)  # noise: ~800 kB as PNG
    data = encode(Image.fromarray(big)) + b"\0" * (1024 * 1024)  # bytes after the PNG's end: > 1 MiB, still a PNG
    with TestClient(create_app(clip_settings(clip_max_image_bytes=3 * 1024 * 1024))) as c:
        wait_for_clip(c)
        r = c.post("/clip/score", files=[("files", ("big.png", data, "image/png"))], data={"class": 0})
    assert r.status_code == 200, r.text
    assert len(r.json()["similarity"]) == 1


def test_custom_templates_are_averaged_for_the_class(
    clip_settings: Callable[..., Settings], wait_for_clip: Callable, images: list, encoded: list
) -> None:
    templates = ("a {}", "a photo of a {}.")
    with TestClient(create_app(clip_settings(clip_templates=templates))) as c:
        wait_for_clip(c)
        body = c.post("/clip/score", json={"images": [b64(encoded[0])], "class": "bag"}).json()
    assert body["texts"] == ["a bag", "a photo of a bag."]
    ref = load_clip(ClipSpec(model=TINY_MODEL, pretrained=None, random_init=True, templates=templates))
    np.testing.assert_allclose(body["class_similarity"], ref.score_class(images[:1], "bag"), atol=1e-5)
    assert len(body["similarity"][0]) == 2


def test_loads_a_local_checkpoint_file(
    clip_settings: Callable[..., Settings],
    wait_for_clip: Callable,
    tiny_clip_checkpoint: Path,
    images: list,
    encoded: list,
    reference: Clip,
) -> None:
    settings = clip_settings(clip_checkpoint=str(tiny_clip_checkpoint), clip_random_init=False)
    with TestClient(create_app(settings)) as c:
        ready = wait_for_clip(c)
        assert ready["clip"] == {"status": "ready", "model": f"{TINY_MODEL} from {tiny_clip_checkpoint}"}
        body = c.post("/clip/score", json={"images": [b64(e) for e in encoded], "texts": TEXTS}).json()
    from_file = load_clip(ClipSpec(model=TINY_MODEL, checkpoint=tiny_clip_checkpoint))
    np.testing.assert_allclose(body["similarity"], from_file.score(images, TEXTS), atol=1e-5)
    # The file holds other weights than the seed-0 random model: the scores show it was really read.
    assert not np.allclose(body["similarity"], reference.score(images, TEXTS), atol=1e-3)


# ---- bad requests -------------------------------------------------------------------------------------------------


@pytest.fixture
def strict_client(clip_settings: Callable[..., Settings], wait_for_clip: Callable) -> Iterator[TestClient]:
    """Small limits: 3 images, 4 kB each, 64x64 pixels."""
    settings = clip_settings(clip_max_images=3, clip_max_image_bytes=4096, clip_max_pixels=64 * 64, clip_max_texts=4)
    with TestClient(create_app(settings)) as c:
        assert wait_for_clip(c)["clip"]["status"] == "ready"
        yield c


def _noise_png(size: int, seed: int = 0) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8))


def _bad_json_cases() -> list[tuple[str, Any, int, str, str | None]]:
    ok = b64(_noise_png(28))
    big = b64(_noise_png(80))  # noise does not compress: ~6.5 kB > 4 kB
    wide = b64(encode(Image.new("L", (65, 64))))  # 4160 pixels > 4096, a few hundred bytes
    return [
        ("not an image", {"images": [ok, b64(b"plain text")], "class": 1}, 422, "invalid_image", "images[1]"),
        ("bad base64", {"images": ["not base64!!"], "class": 1}, 422, "invalid_base64", "images[0]"),
        ("over the size limit", {"images": [big], "class": 1}, 413, "image_too_large", "images[0]"),
        ("too many pixels", {"images": [ok, wide], "class": 1}, 413, "too_many_pixels", "images[1]"),
        ("too many images", {"images": [ok] * 4, "class": 1}, 422, "too_many_images", "images"),
        ("no images", {"images": [], "class": 1}, 422, "no_images", "images"),
        ("neither texts nor class", {"images": [ok]}, 422, "texts_or_class", "texts"),
        ("both texts and class", {"images": [ok], "texts": ["a"], "class": 1}, 422, "texts_or_class", "texts"),
        ("unknown class", {"images": [ok], "class": "hat"}, 422, "class_value", "class"),
        ("too many texts", {"images": [ok], "texts": ["a"] * 5}, 422, "too_many_texts", "texts"),
        ("empty text", {"images": [ok], "texts": [""]}, 422, "string_too_short", "texts"),
        ("text too long", {"images": [ok], "texts": ["dress " * 100]}, 422, "text_too_long", "texts"),
        ("unknown field", {"images": [ok], "class": 1, "colour": "red"}, 422, "extra_forbidden", "colour"),
        ("images missing", {"class": 1}, 422, "missing", "images"),
    ]


@pytest.mark.parametrize(("case", "body", "status", "code", "param"), _bad_json_cases(), ids=lambda v: v)
def test_bad_json_requests(
    strict_client: TestClient, error_of: Callable, case: str, body: Any, status: int, code: str, param: str | None
) -> None:
    err = error_of(strict_client.post("/clip/score", json=body), status)
    assert (err["code"], err["param"]) == (code, param), err
    assert err["type"] == "invalid_request_error"
    if code == "texts_or_class":
        assert "texts" in err["message"] and "class" in err["message"]


def test_bad_multipart_requests(strict_client: TestClient, error_of: Callable) -> None:
    ok = _noise_png(28)

    def post(files: list[bytes], data: dict[str, Any] | None = None) -> Any:
        parts = [("files", (f"{i}.png", f, "image/png")) for i, f in enumerate(files)]
        return strict_client.post("/clip/score", files=parts, data=data if data is not None else {"class": 2})

    cases = [
        (post([ok, b"GIF89a but not really"]), 422, "invalid_image", "files[1]"),
        (post([ok, _noise_png(80)]), 413, "image_too_large", "files[1]"),
        (post([encode(Image.new("L", (65, 64)))]), 413, "too_many_pixels", "files[0]"),
        (post([ok] * 4), 422, "too_many_images", "files"),
        (post([ok], {}), 422, "texts_or_class", "texts"),
        (post([ok], {"class": "2", "texts": "a shirt"}), 422, "texts_or_class", "texts"),
        (post([ok], {"class": "2", "colour": "red"}), 422, "extra_forbidden", "colour"),
        (post([ok], {"class": "12"}), 422, "class_value", "class"),
    ]
    for response, status, code, param in cases:
        err = error_of(response, status)
        assert (err["code"], err["param"]) == (code, param), err
    r = strict_client.post("/clip/score", files={"class": (None, "2")})  # multipart without files
    assert error_of(r, 422)["code"] == "no_images"
    r = strict_client.post("/clip/score", data={"class": "2"})  # urlencoded: no way to send images
    assert error_of(r, 415)["code"] == "unsupported_media_type"
    r = strict_client.post(
        "/clip/score",
        content=b'--xx\r\nContent-Disposition: form-data; name="class"\r\n\r\n2',  # no closing boundary
        headers={"content-type": "multipart/form-data; boundary=xx"},
    )
    assert error_of(r, 400)["code"] == "invalid_multipart"
    r = strict_client.post("/clip/score", content=b"x", headers={"content-type": "multipart/form-data"})
    assert error_of(r, 400)["code"] == "invalid_multipart"


def test_oversized_body_and_other_media_types(strict_client: TestClient, error_of: Callable) -> None:
    limit = strict_client.app.state.settings.clip_max_body_bytes  # type: ignore[attr-defined]
    r = strict_client.post(
        "/clip/score", content=b"x" * (limit + 1), headers={"content-type": "multipart/form-data; boundary=xx"}
    )
    err = error_of(r, 413)
    assert err["code"] == "body_too_large" and str(limit) in err["message"]
    err = error_of(strict_client.post("/clip/score", content=b"images", headers={"content-type": "text/plain"}), 415)
    assert err["code"] == "unsupported_media_type" and "multipart/form-data" in err["message"]
    err = error_of(
        strict_client.post("/clip/score", content=b"{nope", headers={"content-type": "application/json"}), 422
    )
    assert "not valid JSON" in err["message"]


# ---- CLIP unavailable, loading, busy ------------------------------------------------------------------------------


def test_unavailable_clip_is_503_with_how_to_and_generation_still_works(
    make_settings: Callable[..., Settings], wait_for_clip: Callable, error_of: Callable, tmp_path: Path
) -> None:
    # The defaults (ViT-B-32 with its laion2b tag), an empty cache and no downloads: unavailable at once.
    with TestClient(create_app(make_settings(clip_cache_dir=tmp_path))) as c:
        ready = wait_for_clip(c, timeout=60)
        assert ready["status"] == "ready" and ready["model"] == "tiny-test"
        assert ready["clip"]["status"] == "unavailable"
        assert ready["clip"]["model"] == "ViT-B-32 (laion2b_s34b_b79k)"
        assert "downloads are off" in ready["clip"]["message"]
        assert "FASHION_CLIP_CHECKPOINT" in ready["clip"]["message"]
        r = c.post("/clip/score", json={"images": [b64(_noise_png(28))], "class": 1})
        err = error_of(r, 503)
        assert err["code"] == "clip_unavailable" and err["type"] == "unavailable_error"
        assert "FASHION_CLIP_CHECKPOINT" in err["message"] and "FASHION_CLIP_PRETRAINED" in err["message"]
        assert "retry-after" not in r.headers  # waiting will not help
        assert c.post("/generate", json={"class": 1, "n": 2, "seed": 0}).status_code == 200


def test_turned_off_or_missing_checkpoint_say_so(
    make_settings: Callable[..., Settings], wait_for_clip: Callable, error_of: Callable, tmp_path: Path
) -> None:
    with TestClient(create_app(make_settings(clip_enabled=False))) as c:
        assert "FASHION_CLIP_ENABLED" in wait_for_clip(c)["clip"]["message"]
        err = error_of(c.post("/clip/score", json={"images": [], "class": 1}), 503)
        assert "FASHION_CLIP_ENABLED" in err["message"]
    missing = tmp_path / "nope.safetensors"
    with TestClient(create_app(make_settings(clip_model=TINY_MODEL, clip_checkpoint=missing))) as c:
        message = wait_for_clip(c)["clip"]["message"]
        assert str(missing) in message and "not found" in message


def test_while_loading_routes_answer_503_with_retry_after(
    clip_settings: Callable[..., Settings],
    wait_for_clip: Callable,
    error_of: Callable,
    metric: Callable,
    monkeypatch: pytest.MonkeyPatch,
    encoded: list,
) -> None:
    import app.clip.service

    gate = threading.Event()
    real = app.clip.service.load_clip

    def held(spec: ClipSpec) -> Clip:  # the real loader, started only when the test says so
        assert gate.wait(60)
        return real(spec)

    monkeypatch.setattr(app.clip.service, "load_clip", held)
    body = {"images": [b64(encoded[0])], "class": 1}
    with TestClient(create_app(clip_settings())) as c:
        try:
            ready = c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["clip"]["status"] == "loading"
            r = c.post("/clip/score", json=body)
            err = error_of(r, 503)
            assert err["code"] == "clip_loading" and r.headers["retry-after"] == "5"
            r = c.post("/generate", json={"class": 1, "n": 1, "rerank": "clip"})
            assert error_of(r, 503)["code"] == "clip_loading" and r.headers["retry-after"] == "5"
            assert c.post("/generate", json={"class": 1, "n": 1, "rerank": "classifier"}).status_code == 200
            assert metric(c.get("/metrics").text, "fashion_clip_status", fashion_clip_status="loading") == 1
        finally:
            gate.set()
        assert wait_for_clip(c)["clip"]["status"] == "ready"
        assert c.post("/clip/score", json=body).status_code == 200
        assert metric(c.get("/metrics").text, "fashion_clip_status", fashion_clip_status="ready") == 1


def test_clip_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASHION_CLIP_MODEL", "")  # compose passes unset variables as empty strings
    monkeypatch.setenv("FASHION_CLIP_PRETRAINED", "")
    monkeypatch.setenv("FASHION_CLIP_CHECKPOINT", str(tmp_path / "c.safetensors"))
    monkeypatch.setenv("FASHION_CLIP_TEMPLATES", '["a {}", "a photo of a {}"]')
    monkeypatch.setenv("FASHION_CLASSIFIER_WEIGHTS", "")
    s = Settings()
    assert (s.clip_model, s.clip_pretrained, s.clip_checkpoint) == ("ViT-B-32", None, tmp_path / "c.safetensors")
    assert s.clip_templates == ("a {}", "a photo of a {}") and s.classifier_weights is None
    assert s.clip_enabled and not s.clip_download  # on, but never touching the network unless told
    assert s.clip_max_body_bytes > s.clip_max_images * s.clip_max_image_bytes * 4 // 3
    with pytest.raises(ValueError, match="exactly one"):
        Settings(clip_templates=("no placeholder",))
    with pytest.raises(ValueError, match="max_rows"):
        Settings(max_rows=8, max_images=8, rerank_max_candidates=9)
    assert Settings(max_rows=8, max_images=8).max_candidates == 8


def test_loading_state_then_ready(clip_settings: Callable[..., Settings]) -> None:
    async def run() -> None:
        metrics = Metrics()
        service = ClipService(clip_settings(), metrics)
        assert service.status == "loading"
        with pytest.raises(ScorerUnavailable) as err:
            service.require()
        assert err.value.code == "clip_loading" and err.value.retry_after
        service.start()
        deadline = time.monotonic() + 120
        while service.status == "loading":  # it loads on a thread of its own
            assert time.monotonic() < deadline, "CLIP did not finish loading"
            await asyncio.sleep(0.05)
        assert service.status == "ready"
        assert service.require() is not None

    asyncio.run(run())


def test_admission_is_bounded(clip_settings: Callable[..., Settings]) -> None:
    async def run() -> None:
        service = ClipService(clip_settings(clip_concurrency=1, clip_queue_size=1), Metrics())
        with service.admitted(), service.admitted():
            with pytest.raises(Overloaded) as err, service.admitted():
                pass
            assert err.value.retry_after >= 1
        with service.admitted():  # slots come back
            pass

    asyncio.run(run())


def test_busy_scoring_is_429_not_an_endless_queue(
    clip_settings: Callable[..., Settings], wait_for_clip: Callable, error_of: Callable, encoded: list
) -> None:
    settings = clip_settings(clip_concurrency=1, clip_queue_size=0)
    body = {"images": [b64(encoded[0])], "class": 1}
    with TestClient(create_app(settings)) as c:
        wait_for_clip(c)
        service = c.app.state.clip  # type: ignore[attr-defined]
        portal = c.portal
        assert portal is not None
        token = object()
        portal.call(service.limiter.acquire_on_behalf_of_nowait, token)  # the only scoring thread is taken
        with ThreadPoolExecutor(1) as pool:
            try:
                first = pool.submit(c.post, "/clip/score", json=body)  # admitted; waits for the thread
                deadline = time.monotonic() + 30
                while portal.call(lambda: service.limiter.statistics().tasks_waiting) < 1:
                    assert time.monotonic() < deadline and not first.done()
                    time.sleep(0.01)
                r = c.post("/clip/score", json=body)  # one admitted, no room to wait: refused at once
                err = error_of(r, 429)
                assert err["code"] == "clip_busy" and int(r.headers["retry-after"]) >= 1
            finally:
                portal.call(service.limiter.release_on_behalf_of, token)
            assert first.result(timeout=60).status_code == 200
        assert c.post("/clip/score", json=body).status_code == 200


# ---- readiness, metrics, docs -------------------------------------------------------------------------------------


def test_readyz_reports_clip_and_classifier(clip_client: TestClient, tiny_classifier: Path) -> None:
    body = clip_client.get("/readyz").json()
    assert body["status"] == "ready" and body["model"] == "tiny-test"
    assert body["clip"] == {"status": "ready", "model": f"{TINY_MODEL} (random weights)"}
    assert body["classifier"] == {"status": "ready", "model": str(tiny_classifier)}


def test_metrics_move(clip_client: TestClient, metric: Callable, encoded: list) -> None:
    before = clip_client.get("/metrics").text
    assert clip_client.post("/clip/score", json={"images": [b64(e) for e in encoded], "class": 1}).status_code == 200
    assert clip_client.post("/clip/score", json={"images": ["@@"], "class": 1}).status_code == 422
    after = clip_client.get("/metrics").text

    def moved(name: str, **labels: str) -> float:
        return metrics.moved(before, after, name, **labels)

    assert moved("fashion_clip_requests_total", outcome="ok") == 1
    assert moved("fashion_clip_requests_total", outcome="invalid") == 1
    assert moved("fashion_clip_images_scored_total", use="score") == 3
    assert moved("fashion_clip_scoring_duration_seconds_count", use="score") == 1
    assert metric(after, "fashion_clip_status", fashion_clip_status="ready") == 1
    assert metric(after, "fashion_clip_status", fashion_clip_status="loading") == 0
    assert metric(after, "fashion_clip_model_info", model=f"{TINY_MODEL} (random weights)") == 1


def test_openapi_documents_both_bodies_and_the_limits(strict_client: TestClient) -> None:
    op = strict_client.get("/openapi.json").json()["paths"]["/clip/score"]["post"]
    content = op["requestBody"]["content"]
    assert content["application/json"]["schema"]["properties"]["images"]["maxItems"] == 3
    form = content["multipart/form-data"]["schema"]["properties"]
    assert form["files"]["maxItems"] == 3 and form["files"]["items"]["format"] == "binary"
    assert {"413", "415", "422", "429", "503"} <= set(op["responses"])


# ---- over real HTTP, with the command-line client -----------------------------------------------------------------


@pytest.fixture(scope="module")
def live_clip(app_weights: Path, tiny_classifier: Path) -> Iterator[str]:
    """uvicorn on a free port with the tiny CLIP (loaded by name) and the tiny classifier."""
    settings = Settings(
        weights=app_weights,
        device="cpu",
        api_key=None,
        clip_model=TINY_MODEL,
        clip_pretrained="",
        clip_random_init=True,
        clip_download=False,
        classifier_weights=tiny_classifier,
    )
    with servers.serve_in_thread(settings) as url:
        servers.wait_ready(url, until=lambda r: r.status_code == 200 and r.json()["clip"]["status"] != "loading")
        yield url


def test_command_line_score_and_rerank(
    live_clip: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], encoded: list
) -> None:
    paths = []
    for i, data in enumerate(encoded[:2]):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(data)
    common = ["--url", live_clip]
    assert cli.main([*common, "score", *map(str, paths), "--class", "dress"]) == 0
    out = capsys.readouterr().out
    assert "a photo of a dress, a type of clothing." in out and "img0.png" in out and "img1.png" in out

    assert cli.main([*common, "score", *map(str, paths), "--text", "a boot", "--text", "a bag", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    direct = httpx.post(
        f"{live_clip}/clip/score", json={"images": [b64(e) for e in encoded[:2]], "texts": ["a boot", "a bag"]}
    ).json()
    np.testing.assert_allclose(printed["similarity"], direct["similarity"], atol=1e-6)

    assert cli.main([*common, "score", str(paths[0])]) == 2  # neither --class nor --text
    (tmp_path / "junk.png").write_bytes(b"not a png")
    assert cli.main([*common, "score", str(tmp_path / "junk.png"), "--class", "1"]) == 1
    assert "422" in capsys.readouterr().err

    out_dir = tmp_path / "gen"
    args = [*common, "generate", "--class", "dress", "-n", "2", "--seed", "3", "--rerank", "classifier"]
    assert cli.main([*args, "--candidates", "4", "-o", str(out_dir)]) == 0
    assert "kept the best 2 of 4 by classifier" in capsys.readouterr().out
    assert len(list(out_dir.glob("dress_*_seed*.png"))) == 2
