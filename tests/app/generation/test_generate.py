"""POST /generate on the real app, real engine and a tiny network."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from model.diffusion import Schedule
from model.samplers import SAMPLERS, karras_timesteps, sampler_named

pytestmark = pytest.mark.timeout(120)


def test_returns_n_valid_pngs_with_params_and_timings(client: TestClient, decode_png, test_steps: int) -> None:
    r = client.post("/generate", json={"class": "dress", "n": 5, "seed": 42})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-test"
    # Defaults come from the card's "sampling" section.
    assert body["params"] == {
        "class": 3,
        "class_name": "dress",
        "n": 5,
        "sampler": "dpm++",
        "steps": test_steps,
        "guidance": 2.0,
        "guidance_method": "classifier-free",
        "seed": 42,
    }
    assert [img["index"] for img in body["images"]] == [0, 1, 2, 3, 4]
    assert [img["seed"] for img in body["images"]] == [42, 43, 44, 45, 46]
    arrays = [decode_png(img["png"]) for img in body["images"]]
    assert all(a.shape == (28, 28) and a.dtype == np.uint8 for a in arrays)
    assert len({a.tobytes() for a in arrays}) == 5  # different seeds, different images
    t = body["timings"]
    assert t["total_ms"] >= t["sampling_ms"] > 0
    assert t["batch_images"] >= 5 and t["batch_jobs"] >= 1


def test_accept_png_returns_one_grid(client: TestClient, decode_png) -> None:
    r = client.post("/generate", json={"class": 7, "n": 5, "seed": 1}, headers={"Accept": "image/png"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    grid = decode_png(r.content)
    assert grid.shape == (2 * 30 + 2, 3 * 30 + 2)  # 3 columns x 2 rows of 28 px tiles, 2 px apart
    assert r.headers["x-seeds"] == "1,2,3,4,5"
    # The grid holds exactly the images the JSON answer carries.
    tiles = client.post("/generate", json={"class": 7, "n": 5, "seed": 1}).json()["images"]
    assert np.array_equal(grid[2:30, 32:60], decode_png(tiles[1]["png"]))


def test_json_wins_unless_png_is_preferred(client: TestClient) -> None:
    for accept in ("application/json", "*/*", "image/png;q=0.5, application/json", ""):
        r = client.post("/generate", json={"class": 1, "n": 1, "seed": 0, "steps": 1}, headers={"Accept": accept})
        assert r.headers["content-type"] == "application/json", accept


@pytest.mark.parametrize(
    ("value", "index"),
    [
        ("dress", 3),
        ("DRESS", 3),
        ("t-shirt", 0),
        ("tshirt", 0),
        ("T-Shirt/Top", 0),
        ("top", 0),
        ("ankle boot", 9),
        ("ankle-boot", 9),
        ("Ankle_Boot", 9),
        ("sneaker", 7),
        ("4", 4),
        (8, 8),
    ],
)
def test_class_by_index_or_name(client: TestClient, value: object, index: int) -> None:
    r = client.post("/generate", json={"class": value, "n": 1, "steps": 1})
    assert r.status_code == 200, r.text
    assert r.json()["params"]["class"] == index


def test_random_seed_is_reported_and_reproduces(client: TestClient) -> None:
    first = client.post("/generate", json={"class": 2, "n": 2}).json()
    seed = first["params"]["seed"]
    assert [img["seed"] for img in first["images"]] == [seed, seed + 1]
    again = client.post("/generate", json={"class": 2, "n": 2, "seed": seed}).json()
    assert [img["png"] for img in again["images"]] == [img["png"] for img in first["images"]]


def test_seeds_reproduce_across_different_batch_mixes(make_settings: Callable[..., Settings]) -> None:
    """The same request alone, then merged with others (at another position of a bigger batch). The tick
    cap is raised above one chunk so that each mix shares a single evaluation."""
    mine = {"class": 3, "n": 2, "seed": 100, "guidance": 1.5}
    with TestClient(create_app(make_settings(tick_rows=64))) as c:
        solo = c.post("/generate", json=mine).json()
        assert solo["timings"]["batch_jobs"] == 1
        mixes = [
            [{"class": 1, "n": 3, "seed": 5, "guidance": 1.5}, mine, {"class": "bag", "n": 6, "guidance": 1.5}],
            [mine, {"class": 0, "n": 9, "seed": 7, "guidance": 1.5}],
        ]
        for mix in mixes:
            with ThreadPoolExecutor(len(mix)) as pool:
                answers = list(pool.map(lambda body: c.post("/generate", json=body).json(), mix))
            got = answers[mix.index(mine)]
            assert got["timings"]["batch_jobs"] == len(mix), got["timings"]
            assert [img["png"] for img in got["images"]] == [img["png"] for img in solo["images"]]
        # Image i depends on seed + i only, not on n.
        one = c.post("/generate", json={**mine, "n": 1, "seed": 101}).json()
        assert one["images"][0]["png"] == solo["images"][1]["png"]


def test_samplers_and_explicit_parameters(client: TestClient) -> None:
    r = client.post("/generate", json={"class": 5, "n": 2, "sampler": "ddim", "steps": 2, "guidance": 1.0, "seed": 3})
    assert r.status_code == 200, r.text
    assert r.json()["params"] | {} == {
        "class": 5,
        "class_name": "sandal",
        "n": 2,
        "sampler": "ddim",
        "steps": 2,
        "guidance": 1.0,
        "guidance_method": "classifier-free",
        "seed": 3,
    }


@pytest.mark.timeout(300)  # ddpm runs all 1000 steps of the schedule: minutes on a loaded 2-core machine
def test_every_sampler_of_model_samplers_is_served(client: TestClient, metric: Callable) -> None:
    """The service's one list of samplers is model.samplers' registry; the API's field derives from it."""
    field = client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"]["sampler"]
    assert [s["enum"] for s in field["anyOf"] if "enum" in s] == [list(SAMPLERS)]
    assert Settings(sampler="consistency").sampler == "consistency"
    for sampler in SAMPLERS:
        steps = 1000 if sampler_named(sampler).all_steps else 2
        r = client.post("/generate", json={"class": 6, "n": 1, "seed": 4, "sampler": sampler, "steps": steps})
        assert r.status_code == 200, r.text
        assert (r.json()["params"]["sampler"], r.json()["params"]["steps"]) == (sampler, steps)
    text = client.get("/metrics").text
    assert all(metric(text, "fashion_images_generated_total", sampler=s) == 1 for s in SAMPLERS)


def test_heun_jumps_to_x0_from_the_cards_sigma_min(
    app_weights: Path, tmp_path: Path, make_settings: Callable[..., Settings], parse_sse: Callable
) -> None:
    """A card's sampling.sigma_min is Heun's lowest noise level: the last evaluation is there, the answer and
    GET /models say so, and other samplers are untouched by it."""
    weights = tmp_path / "low.safetensors"
    shutil.copy(app_weights, weights)
    card = json.loads(app_weights.with_suffix(".json").read_text())
    card["sampling"]["sigma_min"] = 0.2
    weights.with_suffix(".json").write_text(json.dumps(card))
    body = {"class": 4, "n": 1, "seed": 11, "sampler": "heun", "steps": 3}
    with TestClient(create_app(make_settings(weights=weights))) as c:
        assert c.get("/models").json()["data"][0]["sigma_min"] == 0.2
        events = parse_sse(c.post("/generate/stream", json=body).text)
        assert events[0][1]["params"]["sigma_min"] == 0.2
        last = [data["t"] for name, data in events if name == "step"][-1]
        assert last == karras_timesteps(Schedule.named("cosine"), 3, sigma_min=0.2)[-1] > 0
        low = c.post("/generate", json=body).json()
        ddim = c.post("/generate", json={**body, "sampler": "ddim"}).json()
    assert "sigma_min" not in ddim["params"]
    with TestClient(create_app(make_settings())) as c:
        full = c.post("/generate", json=body).json()
        plain_ddim = c.post("/generate", json={**body, "sampler": "ddim"}).json()
    assert "sigma_min" not in full["params"]
    assert low["images"][0]["png"] != full["images"][0]["png"]
    assert ddim["images"][0]["png"] == plain_ddim["images"][0]["png"]


def test_the_cards_guidance_interval_is_used_and_reported(
    app_weights: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """A card with sampling.guidance_interval guides only inside it; FASHION_GUIDANCE_INTERVAL=all turns it off."""
    interval = [0.5, 5.0]  # dpm++ at 3 steps evaluates sigma 20291, 1.76 and 0.59: the first step is not guided
    weights = tmp_path / "interval.safetensors"
    shutil.copy(app_weights, weights)
    card = json.loads(app_weights.with_suffix(".json").read_text())
    card["sampling"]["guidance_interval"] = interval
    weights.with_suffix(".json").write_text(json.dumps(card))
    body = {"class": 4, "n": 2, "seed": 11, "guidance": 3.0}

    def pngs_and_params(**settings: Any) -> tuple[list[str], dict[str, Any]]:
        with TestClient(create_app(make_settings(**settings))) as c:
            answer = c.post("/generate", json=body).json()
        return [img["png"] for img in answer["images"]], answer["params"]

    narrow, params = pngs_and_params(weights=weights)
    assert params["guidance_interval"] == interval
    everywhere, params = pngs_and_params(weights=weights, guidance_interval="all")
    assert "guidance_interval" not in params  # guided at every step
    assert everywhere == pngs_and_params()[0]  # the same as a card without an interval
    assert narrow != everywhere


def test_heuns_steps_count_two_evaluations_against_max_steps(make_settings: Callable[..., Settings], error_of) -> None:
    with TestClient(create_app(make_settings(max_steps=100))) as c:
        err = error_of(c.post("/generate", json={"class": 1, "sampler": "heun", "steps": 60}), 422)
        assert err["param"] == "steps" and "120 network evaluations" in err["message"]
        assert "at most 50 steps of heun" in err["message"]
        assert c.post("/generate", json={"class": 1, "n": 1, "sampler": "heun", "steps": 2}).status_code == 200
    with TestClient(create_app(make_settings())) as c:  # max_steps 1000, the schedule's T
        err = error_of(c.post("/generate", json={"class": 1, "sampler": "heun", "steps": 1000}), 422)
        assert err["param"] == "steps" and "1..999 for heun" in err["message"]
    with TestClient(create_app(make_settings(max_steps=3000))) as c:  # a limit above what the schedule has
        err = error_of(c.post("/generate", json={"class": 1, "sampler": "ddim", "steps": 1500}), 422)
        assert err["param"] == "steps" and "1..1000 for ddim, got 1500" in err["message"]


def test_ddpm_runs_all_T_steps_only(make_settings: Callable[..., Settings], error_of) -> None:
    with TestClient(create_app(make_settings())) as c:
        err = error_of(c.post("/generate", json={"class": 1, "sampler": "ddpm", "steps": 50}), 422)
        assert err["param"] == "steps" and "1000" in err["message"]
    with TestClient(create_app(make_settings(max_steps=100))) as c:
        err = error_of(c.post("/generate", json={"class": 1, "sampler": "ddpm"}), 422)
        assert err["param"] == "sampler" and "ddim" in err["message"]
