"""Autoguidance served: a teacher whose card names a guide network guides from it, in shared ticks."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from model.io import WeightsError

GUIDE = "tiny-guide"


@pytest.fixture
def both(make_settings: Callable[..., Settings], guided_weights: Path, app_weights: Path) -> Iterator[TestClient]:
    """The autoguided teacher (the default) beside a teacher with no guide."""
    with TestClient(create_app(make_settings(models=[guided_weights, app_weights]))) as c:
        yield c


def images(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [image["png"] for image in response.json()["images"]]


def test_get_models_names_each_models_guide_and_its_default_method(both: TestClient) -> None:
    guided, plain = both.get("/models").json()["data"]
    assert (guided["id"], guided["guide"], guided["guidance_method"]) == ("tiny-guided", GUIDE, "autoguidance")
    assert (plain["id"], plain["guide"], plain["guidance_method"]) == ("tiny-test", None, "classifier-free")


def test_a_request_is_autoguided_by_default_and_can_ask_for_classifier_free_guidance(both: TestClient) -> None:
    body = {"class": 4, "n": 2, "seed": 11}
    auto = both.post("/generate", json=body)
    assert auto.json()["params"]["guidance_method"] == "autoguidance" and auto.json()["params"]["guide"] == GUIDE
    cfg = both.post("/generate", json={**body, "guidance_method": "classifier-free"})
    assert cfg.json()["params"]["guidance_method"] == "classifier-free" and cfg.json()["params"].get("guide") is None
    assert images(auto) != images(cfg)  # a different reference, other images
    assert images(both.post("/generate", json={**body, "guidance_method": "autoguidance"})) == images(auto)
    # Guidance 1 is the conditional model alone, whatever it would have been guided from.
    unguided = [
        both.post("/generate", json={**body, "guidance": 1.0, "guidance_method": m})
        for m in ("autoguidance", "classifier-free")
    ]
    assert images(unguided[0]) == images(unguided[1])


def test_an_autoguided_job_keeps_its_bytes_when_it_shares_ticks(both: TestClient) -> None:
    body = {"class": 7, "n": 3, "seed": 5}
    alone = both.post("/generate", json=body).json()
    assert alone["timings"]["batch_jobs"] == 1
    long = {
        "class": 1,
        "n": 2,
        "sampler": "ddim",
        "steps": 1000,
        "preview_every": 1000,
        "guidance_method": "classifier-free",
    }
    first_step, stop = threading.Event(), threading.Event()

    def stream() -> None:  # a classifier-free job of the same model, running beside the autoguided one
        with both.stream("POST", "/generate/stream", json=long) as r:
            for line in r.iter_lines():
                if line.startswith("event: step"):
                    first_step.set()
                if stop.is_set():
                    break

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert first_step.wait(60)
        shared = both.post("/generate", json=body).json()
    finally:
        stop.set()
        thread.join(120)
    assert shared["timings"]["batch_jobs"] >= 2  # it did share its evaluations
    assert [i["png"] for i in shared["images"]] == [i["png"] for i in alone["images"]]


def test_autoguidance_of_a_model_without_a_guide_is_422(both: TestClient, error_of: Callable) -> None:
    r = both.post("/generate", json={"class": 1, "model": "tiny-test", "guidance_method": "autoguidance"})
    err = error_of(r, 422)
    assert (err["param"], err["code"]) == ("guidance_method", "no_guide")
    assert "tiny-test has no guide network" in err["message"] and "allowed: classifier-free" in err["message"]
    err = error_of(both.post("/generate", json={"class": 1, "guidance_method": "negative-prompt"}), 422)
    assert "classifier-free" in err["message"] and "autoguidance" in err["message"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"diffusion": {"schedule": "cosine", "T": 1000, "prediction": "eps"}}, "guide's diffusion"),
        ({"unet": {"num_classes": 5}}, "guide's unet.num_classes is 5"),
        ({"missing": True}, "the guide that .*guided.json names is not there"),
    ],
)
def test_a_guide_that_does_not_fit_is_refused_before_any_tensor_loads(
    make_settings: Callable[..., Settings],
    guided_weights: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: dict,
    match: str,
) -> None:
    from app.generation import models

    for suffix in (".safetensors", ".json"):
        shutil.copy(guided_weights.with_suffix(suffix), tmp_path / f"guided{suffix}")
        shutil.copy(guided_weights.with_name("guide").with_suffix(suffix), tmp_path / f"guide{suffix}")
    guide_card = tmp_path / "guide.json"
    if change.pop("missing", False):
        (tmp_path / "guide.safetensors").unlink()
    else:
        card = json.loads(guide_card.read_text())
        if "unet" in change:
            change = {"unet": {**card["unet"], **change["unet"]}}
        guide_card.write_text(json.dumps({**card, **change}))
    loaded: list[Path] = []
    monkeypatch.setattr(models, "load_weights", lambda path, device: loaded.append(path))
    with pytest.raises(WeightsError, match=match):
        models.load_models(make_settings(models=[tmp_path / "guided.safetensors"]), torch.device("cpu"))
    assert loaded == []


def test_the_openai_images_api_takes_guidance_method_and_its_urls_redraw_the_same_bytes(
    make_settings: Callable[..., Settings], guided_weights: Path, app_weights: Path
) -> None:
    """Through the official SDK (its HTTP client the in-process app): ``guidance_method`` in ``extra_body``
    gives POST /generate's bytes, and a signed URL carries the method, so it redraws an autoguided image."""
    import base64
    from urllib.parse import parse_qs, urlencode, urlsplit

    import openai

    settings = make_settings(models=[guided_weights, app_weights], api_key="k")
    with TestClient(create_app(settings), headers={"Authorization": "Bearer k"}) as c:
        sdk = openai.OpenAI(base_url=f"{c.base_url}/v1", api_key="k", http_client=c, max_retries=0)
        for method in ("autoguidance", "classifier-free"):
            answer = sdk.images.generate(prompt="coat", n=2, extra_body={"seed": 11, "guidance_method": method})
            files = [d.b64_json for d in answer.data or []]
            assert files == images(
                c.post("/generate", json={"class": 4, "n": 2, "seed": 11, "guidance_method": method})
            )
            [linked] = (
                sdk.images.generate(
                    prompt="coat", response_format="url", extra_body={"seed": 11, "guidance_method": method}
                ).data
                or []
            )
            url = urlsplit(linked.url or "")
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            assert query.get("guidance_method") == (method if method == "autoguidance" else None)
            assert base64.b64encode(c.get(f"{url.path}?{url.query}").content).decode() == files[0]
            if method == "autoguidance":  # the signature covers the method: the other one is not drawn
                tampered = c.get(f"{url.path}?{urlencode({**query, 'guidance_method': 'classifier-free'})}")
                assert tampered.status_code == 401, tampered.text
        err = c.post(
            "/v1/images/generations", json={"prompt": "coat", "model": "tiny-test", "guidance_method": "autoguidance"}
        )
        assert err.status_code in (400, 422) and err.json()["error"]["param"] == "guidance_method", err.text
