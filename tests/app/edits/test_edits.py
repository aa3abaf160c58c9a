"""Image to image over HTTP on a tiny model: variations, inpainting and interpolation, as JSON and multipart,
streamed, beside other jobs, cancelled, and refused with errors that name the field."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from model.images import png_bytes, to_model_image
from model.samplers import SAMPLERS, sampler_named

pytestmark = pytest.mark.timeout(300)


def picture(size: tuple[int, int] = (56, 40), seed: int = 0) -> np.ndarray:
    """A light garment-like blob on a dark ground, (H, W) uint8."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.zeros((h, w), dtype=np.uint8)
    img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 200
    return np.clip(img.astype(int) + rng.integers(0, 30, size), 0, 255).astype(np.uint8)


def b64png(pixels: np.ndarray | Image.Image) -> str:
    return base64.b64encode(png_bytes(pixels)).decode()


def left_half(size: tuple[int, int] = (56, 40)) -> np.ndarray:
    """A mask picture: white (edit) on the left half, black (keep) on the right."""
    mask = np.zeros(size, dtype=np.uint8)
    mask[:, : size[1] // 2] = 255
    return mask


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory, app_weights: Any) -> Any:
    settings = Settings(device="cpu", weights=app_weights)
    with TestClient(create_app(settings)) as c:
        yield c


def _png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))), dtype=np.uint8)


def test_a_variation_runs_strength_times_the_steps_and_answers_the_input_as_mapped(app_client: TestClient) -> None:
    body = {"image": b64png(picture()), "class": 3, "n": 2, "seed": 5, "sampler": "ddim", "steps": 10, "strength": 0.3}
    r = app_client.post("/edits", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["kind"] == "variation" and out["strength"] == 0.3 and "mask_png" not in out
    assert out["evaluations"] == 3  # int(10 * 0.3) of ddim's 10 steps
    assert len(out["images"]) == 2 and [i["seed"] for i in out["images"]] == [5, 6]
    mapped, inverted = to_model_image(picture())
    assert np.array_equal(_png(out["input_png"]), mapped) and out["inverted"] is inverted is False
    again = app_client.post("/edits", json=body).json()
    assert [i["png"] for i in again["images"]] == [i["png"] for i in out["images"]]  # bytes per seed


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpainting_keeps_the_known_pixels_byte_for_byte_under_every_sampler(
    app_client: TestClient, sampler: str
) -> None:
    """Multipart, as a browser or curl -F sends it; outside the mask the 28x28 output is the input as mapped."""
    entry = sampler_named(sampler)
    fields = {"class": "2", "n": "2", "seed": "1", "sampler": sampler, "guidance": "1.0"}
    fields["steps"] = "1000" if entry.all_steps else "4"
    if entry.all_steps:
        fields["strength"] = "0.01"  # 10 of ddpm's 1000 steps: the merge is the same at every step
    files = {
        "image": ("a.png", png_bytes(picture()), "image/png"),
        "mask": ("m.png", png_bytes(left_half()), "image/png"),
    }
    r = app_client.post("/edits", data=fields, files=files)
    assert r.status_code == 200, r.text
    out = r.json()
    mask = _png(out["mask_png"]) == 255
    assert out["kind"] == "inpaint" and mask.any() and not mask.all()
    # The left half of the 40-wide picture, padded to a 56 square (8 columns each side), at half the size.
    assert mask[:, 4:13].all() and not mask[:, :4].any() and not mask[:, 15:].any()
    source = _png(out["input_png"])
    for image in out["images"]:
        got = _png(image["png"])
        assert np.array_equal(got[~mask], source[~mask])  # byte for byte
        assert not np.array_equal(got[mask], source[mask])  # and the masked part was redrawn


def test_repaint_resampling_counts_its_extra_evaluations(app_client: TestClient) -> None:
    body = {"image": b64png(picture()), "mask": b64png(left_half()), "class": 1, "n": 1, "seed": 2}
    plain = app_client.post("/edits", json={**body, "sampler": "ddim", "steps": 10}).json()
    resampled = app_client.post(
        "/edits", json={**body, "sampler": "ddim", "steps": 10, "resamplings": 3, "jump_length": 2}
    )
    assert resampled.status_code == 200, resampled.text
    assert plain["evaluations"] == 10 and resampled.json()["evaluations"] == 10 + 2 * 8  # each of 4 jumps: 2 x 2 more
    mask = _png(resampled.json()["mask_png"]) == 255
    assert np.array_equal(_png(resampled.json()["images"][0]["png"])[~mask], _png(plain["input_png"])[~mask])


def test_a_dark_garment_on_white_is_inverted_by_default(app_client: TestClient) -> None:
    dark_on_white = 255 - picture()
    body = {"image": b64png(dark_on_white), "class": 0, "n": 1, "seed": 0, "steps": 2}
    auto = app_client.post("/edits", json=body).json()
    kept = app_client.post("/edits", json={**body, "invert": "no"}).json()
    assert auto["inverted"] is True and kept["inverted"] is False
    assert np.array_equal(_png(auto["input_png"]), 255 - _png(kept["input_png"]))


def test_edits_keep_their_bytes_beside_other_jobs(app_client: TestClient) -> None:
    """Every kind shares ticks with generations and with each other; each answer equals its answer alone."""
    requests = [
        ("/edits", {"image": b64png(picture()), "class": 3, "n": 2, "seed": 9, "steps": 8, "strength": 0.5}),
        (
            "/edits",
            {"image": b64png(picture()), "mask": b64png(left_half()), "class": 4, "n": 2, "seed": 3, "steps": 6},
        ),
        ("/interpolations", {"seeds": [1, 2], "class": 5, "frames": 4, "steps": 5}),
        ("/generate", {"class": 6, "n": 3, "seed": 4, "steps": 7}),
    ]

    def images(path: str, body: dict) -> list[str]:
        out = app_client.post(path, json=body).json()
        return [i["png"] for i in out.get("images", out.get("frames", []))]

    alone = [images(path, body) for path, body in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda pb: images(*pb), requests))
    assert together == alone and all(alone)


def test_an_edit_streams_steps_and_ends_with_the_mask_as_applied(app_client: TestClient, parse_sse: Callable) -> None:
    body = {"image": b64png(picture()), "mask": b64png(left_half()), "class": 1, "n": 1, "steps": 4, "preview_every": 1}
    r = app_client.post("/edits/stream", json=body)
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-1] == "done" and names.count("step") == 4
    assert all(data["xt_png"] for name, data in events if name == "step")
    assert events[-1][1]["mask_png"] and events[-1][1]["kind"] == "inpaint"


def test_frames_between_seeds_end_on_the_seeds_own_images(app_client: TestClient) -> None:
    r = app_client.post("/interpolations", json={"seeds": [11, 12], "class": 7, "frames": 5, "steps": 6})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["kind"] == "seeds" and len(out["frames"]) == 5 and out["evaluations"] == 6
    gif = Image.open(io.BytesIO(base64.b64decode(out["animation_gif"])))
    assert gif.format == "GIF" and gif.n_frames == 8  # there and back
    for end, seed in ((0, 11), (-1, 12)):
        alone = app_client.post("/generate", json={"class": 7, "n": 1, "seed": seed, "steps": 6, "sampler": "ddim"})
        diff = np.abs(_png(out["frames"][end]["png"]).astype(int) - _png(alone.json()["images"][0]["png"]).astype(int))
        assert diff.max() <= 1  # slerp's ends are the seeds' x_T, up to float rounding


def test_frames_between_two_pictures_go_through_their_inversion(app_client: TestClient) -> None:
    files = [
        ("images", ("a.png", png_bytes(picture(seed=1)), "image/png")),
        ("images", ("b.png", png_bytes(picture((30, 30), 2)), "image/png")),
    ]
    r = app_client.post("/interpolations", data={"class": "3", "frames": "3", "steps": "5"}, files=files)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["kind"] == "images" and len(out["frames"]) == 3 and len(out["inputs_png"]) == 2
    assert out["evaluations"] == 5


def test_hanging_up_cancels_an_edit_and_an_interpolation(app_client: TestClient, metric: Callable) -> None:
    before = metric(app_client.get("/metrics").text, "fashion_jobs_cancelled_total", stage="running")
    requests = [
        (
            "/edits/stream",
            {"image": b64png(picture()), "class": 1, "n": 1, "sampler": "ddim", "steps": 1000, "strength": 1.0},
        ),
        (
            "/edits/stream",
            {
                "image": b64png(picture()),
                "mask": b64png(left_half()),
                "class": 1,
                "n": 1,
                "sampler": "ddim",
                "steps": 1000,
            },
        ),
        ("/interpolations/stream", {"seeds": [1, 2], "class": 1, "frames": 2, "steps": 1000}),
    ]
    for i, (path, body) in enumerate(requests, 1):
        with app_client.stream("POST", path, json={**body, "preview_every": 1000}) as r:
            for line in r.iter_lines():
                if line.startswith("event: step"):
                    break  # hang up after the first step
        deadline = time.monotonic() + 60
        while metric(app_client.get("/metrics").text, "fashion_jobs_cancelled_total", stage="running") < before + i:
            assert time.monotonic() < deadline, path
            time.sleep(0.01)


@pytest.mark.parametrize(
    ("path", "body", "files", "status", "param"),
    [
        ("/edits", {"image": base64.b64encode(b"not a picture").decode(), "class": 1}, None, 422, "image"),
        ("/edits", {"class": 1}, None, 422, "image"),
        ("/edits", {"image": "@@@", "class": 1}, None, 422, "image"),
        ("/edits", {"image": b64png(picture()), "mask": b64png(left_half((20, 20))), "class": 1}, None, 400, "mask"),
        (
            "/edits",
            {"image": b64png(picture()), "mask": b64png(np.zeros((56, 40), np.uint8)), "class": 1},
            None,
            400,
            "mask",
        ),
        (
            "/edits",
            {"image": b64png(picture()), "mask": b64png(np.full((56, 40), 255, np.uint8)), "class": 1},
            None,
            400,
            "mask",
        ),
        ("/edits", {"image": b64png(picture()), "class": 1, "strength": 0}, None, 422, "strength"),
        ("/edits", {"image": b64png(picture()), "class": 1, "strength": 1.5}, None, 422, "strength"),
        ("/edits", {"image": b64png(picture()), "class": 1, "steps": 10, "strength": 0.05}, None, 422, "strength"),
        ("/edits", {"image": b64png(picture()), "class": 1, "resamplings": 3}, None, 422, "resamplings"),
        ("/interpolations", {"seeds": [1], "class": 1}, None, 422, "seeds"),
        ("/interpolations", {"class": 1}, None, 422, "seeds"),
        ("/interpolations", {"seeds": [1, 2], "class": 1, "sampler": "ddpm"}, None, 422, "sampler"),
    ],
)
def test_bad_input_is_refused_naming_the_field(
    app_client: TestClient, error_of: Callable, path: str, body: dict, files: Any, status: int, param: str
) -> None:
    err = error_of(app_client.post(path, json=body), status)
    assert err["param"] == param, err
    assert err["message"] and err["code"], err


def test_a_picture_over_the_pixel_limit_is_refused_before_decoding(
    make_settings: Callable[..., Settings], error_of: Callable
) -> None:
    with TestClient(create_app(make_settings(edit_max_pixels=1000))) as c:
        err = error_of(c.post("/edits", json={"image": b64png(picture((40, 40))), "class": 1}), 413)
        assert err["param"] == "image" and err["code"] == "too_many_pixels"
