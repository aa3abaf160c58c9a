"""OpenAI's edits and variations, spoken to by the official ``openai`` SDK over real HTTP (``python -m app`` on
a loopback port with a tiny teacher and student and an API key): multipart as the SDK sends it, the mask's
transparency convention, every response format, a stream with partial images, and errors as the SDK's
exceptions."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from model.images import to_model_image
from testkit.servers import Spawner

pytestmark = pytest.mark.timeout(240)
KEY = "test-key"


@pytest.fixture(scope="module")
def url(spawn_app_for_module: Spawner, app_weights: Path, student_weights: Path, tiny_classifier: Path) -> str:
    _, url = spawn_app_for_module(
        models=json.dumps([str(app_weights), str(student_weights)]),
        api_key=KEY,
        classifier_weights=str(tiny_classifier),
    )
    return url


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def garment(size: tuple[int, int] = (64, 48)) -> np.ndarray:
    h, w = size
    img = np.zeros((h, w), dtype=np.uint8)
    img[h // 5 : 4 * h // 5, w // 4 : 3 * w // 4] = 210
    img[h // 3 : h // 2, w // 3 : 2 * w // 3] = 120
    return img


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def transparent_top(size: tuple[int, int] = (64, 48)) -> bytes:
    """OpenAI's convention: an RGBA PNG, transparent (alpha 0) where the image is edited: the top half."""
    rgba = np.zeros((*size, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[: size[0] // 2, :, 3] = 0
    return png(Image.fromarray(rgba, mode="RGBA"))


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("L"), dtype=np.uint8)


def test_an_edit_with_a_mask_keeps_the_opaque_region_byte_for_byte(client: openai.OpenAI) -> None:
    source = png(Image.fromarray(garment(), mode="L"))
    out = client.images.edit(
        image=("g.png", source, "image/png"),
        mask=("m.png", transparent_top(), "image/png"),
        prompt="a pullover",
        n=2,
        extra_body={"seed": 3, "steps": 4},
    )
    assert len(out.data) == 2 and out.data[0].revised_prompt == "pullover"  # type: ignore[attr-defined]
    mapped, _ = to_model_image(garment())
    for image in out.data:
        got = decode(image.b64_json or "")
        assert np.array_equal(got[16:], mapped[16:])  # the opaque bottom half (past the padding's rounding)
        assert not np.array_equal(got[:12], mapped[:12])  # the transparent top was redrawn
    again = client.images.edit(
        image=("g.png", source, "image/png"), mask=("m.png", transparent_top(), "image/png"), prompt="pullover",
        n=2, extra_body={"seed": 3, "steps": 4},
    )  # fmt: skip
    assert [d.b64_json for d in again.data] == [d.b64_json for d in out.data]  # bytes per seed


def test_an_edit_without_a_mask_is_a_variation_in_every_output_format(client: openai.OpenAI) -> None:
    source = png(Image.fromarray(garment(), mode="L"))
    for fmt, pil in (("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")):
        out = client.images.edit(
            image=("g.png", source, "image/png"), prompt="dress", output_format=fmt, size="256x256",  # type: ignore[arg-type]
            extra_body={"seed": 1, "steps": 4, "strength": 0.5},
        )  # fmt: skip
        image = Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json or "")))
        assert image.format == pil and image.size == (256, 256)
        assert out.output_format == fmt  # type: ignore[attr-defined]


def test_an_edit_streams_partial_images_then_the_image(client: openai.OpenAI) -> None:
    source = png(Image.fromarray(garment(), mode="L"))
    events = list(
        client.images.edit(
            image=("g.png", source, "image/png"),
            mask=("m.png", transparent_top(), "image/png"),
            prompt="coat",
            stream=True,
            partial_images=2,
            extra_body={"seed": 5, "steps": 6},
        )  # fmt: skip
    )
    kinds = [e.type for e in events]
    assert kinds == ["image_edit.partial_image"] * 2 + ["image_edit.completed"], kinds


def test_a_variation_reads_the_class_with_the_classifier(client: openai.OpenAI) -> None:
    source = png(Image.fromarray(garment(), mode="L"))
    out = client.images.create_variation(image=("g.png", source, "image/png"), n=2, extra_body={"seed": 2, "steps": 4})
    assert len(out.data) == 2
    assert all(decode(d.b64_json or "").shape == (28, 28) for d in out.data)


def test_errors_are_the_sdks_exceptions_naming_the_field(client: openai.OpenAI, url: str) -> None:
    source = png(Image.fromarray(garment(), mode="L"))
    cases = [
        ({"image": ("g.png", b"not a picture", "image/png"), "prompt": "dress"}, "image"),
        ({"image": ("g.png", source, "image/png"), "prompt": "a hat"}, "prompt"),
        (
            {
                "image": ("g.png", source, "image/png"),
                "mask": ("m.png", transparent_top((20, 20)), "image/png"),
                "prompt": "dress",
            },
            "mask",
        ),
        ({"image": [("a.png", source, "image/png"), ("b.png", source, "image/png")], "prompt": "dress"}, "image"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.images.edit(**kwargs)  # type: ignore[arg-type]
        assert err.value.body["param"] == param, err.value.body  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(image=("g.png", source, "image/png"), prompt="dress", extra_body={"strength": 0})
    assert err.value.body["param"] == "strength"  # type: ignore[index]
    r = httpx.post(f"{url}/v1/images/edits", data={"prompt": "dress"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
