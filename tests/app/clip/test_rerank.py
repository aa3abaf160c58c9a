"""rerank on POST /generate and the stream: K candidates through the engine, scored, the best n kept.

The scores are checked against the scorers run independently in the test on the candidates a
plain /generate draws with the same seeds, so the ranking, the seeds and the PNGs must all agree.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from model.classifier import load_classifier, predict
from model.clip import TINY_MODEL, ClipSpec, load_clip
from model.data import to_model_range

pytestmark = pytest.mark.timeout(180)


def candidates(client: TestClient, decode_png: Callable, cls: int, seed: int, k: int) -> tuple[np.ndarray, list[str]]:
    """What a plain /generate draws for seeds seed .. seed + k - 1: uint8 (k, 28, 28) and the base64 PNGs."""
    r = client.post("/generate", json={"class": cls, "n": k, "seed": seed})
    assert r.status_code == 200, r.text
    pngs = [img["png"] for img in r.json()["images"]]
    return np.stack([decode_png(p) for p in pngs]), pngs


def classifier_scores(path: Path, images: np.ndarray, cls: int) -> np.ndarray:
    probs, _ = predict(load_classifier(path), to_model_range(images))
    return probs[:, cls]


def check_ranking(body: dict, pngs: list[str], expected: np.ndarray, seed: int, n: int) -> None:
    """n images, best first, each the candidate its seed names, with the expected score."""
    rerank = body["rerank"]
    np.testing.assert_allclose(rerank["scores"], expected, rtol=1e-4, atol=1e-6)
    images = body["images"]
    assert [img["index"] for img in images] == list(range(n))
    scores = [img["score"] for img in images]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(float(np.max(expected)), abs=1e-6)
    top = np.argsort(-expected, kind="stable")[:n]
    assert sorted(top.tolist()) != list(range(n))  # the seeds in these tests make "the first n" a wrong answer
    assert [img["seed"] for img in images] == [seed + int(i) for i in top]
    for img in images:
        assert img["png"] == pngs[img["seed"] - seed]  # the same PNG bytes as the plain generation
        assert img["score"] == pytest.approx(rerank["scores"][img["seed"] - seed])
    assert body["params"]["n"] == n and body["params"]["seed"] == seed


def test_rerank_by_classifier_keeps_the_most_confident(
    clip_client: TestClient, decode_png: Callable, tiny_classifier: Path
) -> None:
    body = clip_client.post(
        "/generate", json={"class": "dress", "n": 3, "seed": 100, "rerank": {"by": "classifier", "candidates": 8}}
    ).json()
    assert body["rerank"]["by"] == "classifier" and body["rerank"]["candidates"] == 8
    assert "classifier" in body["rerank"]["measure"] and body["rerank"]["scoring_ms"] >= 0
    images, pngs = candidates(clip_client, decode_png, 3, 100, 8)
    check_ranking(body, pngs, classifier_scores(tiny_classifier, images, 3), 100, 3)


def test_rerank_by_clip_keeps_the_closest_to_the_prompt(clip_client: TestClient, decode_png: Callable) -> None:
    body = clip_client.post(
        "/generate", json={"class": 7, "n": 2, "seed": 5, "rerank": {"by": "clip", "candidates": 6}}
    ).json()
    assert body["rerank"]["by"] == "clip" and "CLIP" in body["rerank"]["measure"]
    images, pngs = candidates(clip_client, decode_png, 7, 5, 6)
    reference = load_clip(ClipSpec(model=TINY_MODEL, pretrained=None, random_init=True))
    check_ranking(body, pngs, reference.score_class(images, 7).astype(np.float64), 5, 2)


def test_kept_seeds_reproduce_alone(clip_client: TestClient) -> None:
    body = clip_client.post(
        "/generate", json={"class": 1, "n": 2, "seed": 40, "rerank": {"by": "classifier", "candidates": 5}}
    ).json()
    for img in body["images"]:
        alone = clip_client.post("/generate", json={"class": 1, "n": 1, "seed": img["seed"]}).json()
        assert alone["images"][0]["png"] == img["png"]
        assert "score" not in alone["images"][0] and "rerank" not in alone  # plain answers are unchanged


def test_shorthand_and_default_candidates(clip_client: TestClient, clip_settings: Callable[..., Settings]) -> None:
    body = clip_client.post("/generate", json={"class": 0, "n": 2, "seed": 1, "rerank": "classifier"}).json()
    assert body["rerank"]["candidates"] == 8  # 4 n
    assert len(body["images"]) == 2 and len(body["rerank"]["scores"]) == 8
    with TestClient(create_app(clip_settings(rerank_max_candidates=5))) as c:
        body = c.post("/generate", json={"class": 0, "n": 2, "seed": 1, "rerank": "classifier"}).json()
        assert body["rerank"]["candidates"] == 5  # capped at the server's limit


def test_shipped_classifier_ranks_too(make_settings: Callable[..., Settings], decode_png: Callable) -> None:
    shipped = Path(__file__).resolve().parents[3] / "weights" / "classifier.safetensors"
    with TestClient(create_app(make_settings(clip_enabled=False))) as c:  # the default classifier path
        ready = c.get("/readyz").json()
        assert ready["classifier"] == {"status": "ready", "model": str(shipped)}
        body = c.post("/generate", json={"class": "bag", "n": 2, "seed": 9, "rerank": "classifier"}).json()
        images, pngs = candidates(c, decode_png, 8, 9, 8)
    check_ranking(body, pngs, classifier_scores(shipped, images, 8), 9, 2)
    assert all(0.0 <= s <= 1.0 for s in body["rerank"]["scores"])


def test_png_grid_holds_the_kept_images(clip_client: TestClient, decode_png: Callable) -> None:
    request = {"class": 4, "n": 2, "seed": 3, "rerank": {"by": "classifier", "candidates": 4}}
    as_json = clip_client.post("/generate", json=request).json()
    r = clip_client.post("/generate", json=request, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seeds"] == ",".join(str(img["seed"]) for img in as_json["images"])
    assert r.headers["x-rerank"] == "classifier;candidates=4"
    grid = decode_png(r.content)
    assert np.array_equal(grid[2:30, 2:30], decode_png(as_json["images"][0]["png"]))
    assert np.array_equal(grid[2:30, 32:60], decode_png(as_json["images"][1]["png"]))


def test_stream_done_event_carries_the_rerank(clip_client: TestClient, parse_sse: Callable) -> None:
    request = {"class": 2, "n": 2, "seed": 21, "rerank": {"by": "clip", "candidates": 4}}
    plain = clip_client.post("/generate", json=request).json()
    r = clip_client.post("/generate/stream", json=request)
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert [name for name, _ in events][-1] == "done"
    done = events[-1][1]
    assert done["rerank"]["candidates"] == 4 and done["rerank"]["scores"] == pytest.approx(plain["rerank"]["scores"])
    assert [(i["seed"], i["png"]) for i in done["images"]] == [(i["seed"], i["png"]) for i in plain["images"]]
    assert events[0][1]["params"]["n"] == 2
    # EventSource: the method alone, as a query parameter.
    r = clip_client.get("/generate/stream?class=2&n=2&seed=21&rerank=classifier")
    done = parse_sse(r.text)[-1]
    assert done[0] == "done" and done[1]["rerank"]["by"] == "classifier" and len(done[1]["images"]) == 2


@pytest.mark.parametrize(
    ("rerank", "n", "param", "needle"),
    [
        ({"by": "clip", "candidates": 2}, 3, "rerank.candidates", "at least n (3)"),
        ({"by": "clip", "candidates": 65}, 3, "rerank.candidates", "64"),
        ({"by": "beauty"}, 3, "rerank.by", "clip"),
        ({"by": "clip", "k": 3}, 3, "rerank.k", "unknown field"),
        ("magic", 3, "rerank.by", "classifier"),
    ],
)
def test_bad_rerank_is_422_before_sampling(
    clip_client: TestClient, error_of: Callable, metric: Callable, rerank: object, n: int, param: str, needle: str
) -> None:
    before = metric(clip_client.get("/metrics").text, "fashion_images_generated_total")
    err = error_of(clip_client.post("/generate", json={"class": 1, "n": n, "rerank": rerank}), 422)
    assert err["param"] == param and needle in err["message"], err
    assert metric(clip_client.get("/metrics").text, "fashion_images_generated_total") == before


def test_too_many_images_for_the_default_candidates(clip_settings: Callable[..., Settings], error_of: Callable) -> None:
    with TestClient(create_app(clip_settings(rerank_max_candidates=4))) as c:
        err = error_of(c.post("/generate", json={"class": 1, "n": 5, "rerank": "classifier"}), 422)
        assert err["param"] == "n" and "4 candidates" in err["message"]


def test_rerank_by_clip_without_clip_is_503_before_sampling(
    make_settings: Callable[..., Settings],
    tiny_classifier: Path,
    wait_for_clip: Callable,
    error_of: Callable,
    metric: Callable,
    tmp_path: Path,
) -> None:
    settings = make_settings(clip_cache_dir=tmp_path, classifier_weights=tiny_classifier)
    with TestClient(create_app(settings)) as c:
        assert wait_for_clip(c)["clip"]["status"] == "unavailable"
        before = metric(c.get("/metrics").text, "fashion_images_generated_total")
        r = c.post("/generate", json={"class": 1, "n": 2, "rerank": {"by": "clip", "candidates": 4}})
        err = error_of(r, 503)
        assert err["code"] == "clip_unavailable" and err["param"] == "rerank"
        assert "FASHION_CLIP_CHECKPOINT" in err["message"]
        error_of(c.post("/generate/stream", json={"class": 1, "n": 2, "rerank": "clip"}), 503)
        assert metric(c.get("/metrics").text, "fashion_images_generated_total") == before  # nothing was sampled
        # The classifier needs no CLIP.
        r = c.post("/generate", json={"class": 1, "n": 2, "rerank": "classifier"})
        assert r.status_code == 200 and len(r.json()["images"]) == 2


def test_rerank_by_classifier_without_weights_is_503(
    clip_settings: Callable[..., Settings], error_of: Callable, tmp_path: Path
) -> None:
    missing = tmp_path / "none.safetensors"
    with TestClient(create_app(clip_settings(classifier_weights=missing))) as c:
        ready = c.get("/readyz").json()
        assert ready["classifier"]["status"] == "unavailable" and str(missing) in ready["classifier"]["message"]
        err = error_of(c.post("/generate", json={"class": 1, "n": 2, "rerank": "classifier"}), 503)
        assert err["code"] == "classifier_unavailable" and "FASHION_CLASSIFIER_WEIGHTS" in err["message"]
        assert c.post("/generate", json={"class": 1, "n": 2}).status_code == 200


def test_rerank_metrics_move(clip_client: TestClient, metric: Callable) -> None:
    before = clip_client.get("/metrics").text
    for by, k in (("clip", 4), ("classifier", 6), ("classifier", 3)):
        r = clip_client.post("/generate", json={"class": 1, "n": 2, "rerank": {"by": by, "candidates": k}})
        assert r.status_code == 200
    after = clip_client.get("/metrics").text

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, default=0.0, **labels)

    assert moved("fashion_rerank_requests_total", method="clip") == 1
    assert moved("fashion_rerank_requests_total", method="classifier") == 2
    assert moved("fashion_rerank_candidates_total", method="classifier") == 9
    assert moved("fashion_clip_images_scored_total", use="rerank") == 4
    assert moved("fashion_images_generated_total") == 13  # every candidate was sampled


def test_openapi_documents_rerank(clip_client: TestClient) -> None:
    schemas = clip_client.get("/openapi.json").json()["components"]["schemas"]
    rerank = schemas["Rerank"]["properties"]
    assert rerank["by"]["enum"] == ["clip", "classifier"]
    assert rerank["candidates"]["anyOf"][0]["maximum"] == 64
    assert "rerank" in schemas["GenerateRequest"]["properties"]
