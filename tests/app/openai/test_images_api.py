"""The OpenAI Images API, spoken to by the official ``openai`` SDK over real HTTP: ``python -m app`` on a
loopback port with a tiny teacher and a tiny student and an API key, as a user would point
``OpenAI(base_url=".../v1")`` at it. Every image is decoded with Pillow."""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from testkit import metrics
from testkit.servers import Spawner, wait_for

pytestmark = pytest.mark.timeout(240)

KEY = "test-key"
TEACHER, STUDENT = "tiny-test", "tiny-student"
MAX_IMAGES = 8


@pytest.fixture(scope="module")
def url(spawn_app_for_module: Spawner, app_weights: Path, student_weights: Path) -> str:
    _, url = spawn_app_for_module(
        models=json.dumps([str(app_weights), str(student_weights)]), api_key=KEY, max_images=str(MAX_IMAGES)
    )
    return url


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    # No retries: a test that sees a 429 must see it, not the SDK's second try.
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture
def http(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def picture(data: bytes | str, fmt: str = "PNG") -> Image.Image:
    """Decode a file (or its base64), asserting its format."""
    raw = base64.b64decode(data) if isinstance(data, str) else data
    image = Image.open(io.BytesIO(raw))
    image.load()
    assert image.format == fmt
    return image


def pixels(image: Image.Image, lossless: bool = True) -> np.ndarray:
    """Grayscale pixels; a lossless WebP (WebP has no grayscale mode) must hold equal R, G and B."""
    if image.mode == "L":
        return np.asarray(image)
    array = np.asarray(image)
    assert image.mode == "RGB" and not (lossless and (array != array[..., :1]).any())
    return np.asarray(image.convert("L"))


def generate_pngs(http: httpx.Client, **body: Any) -> list[bytes]:
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return [base64.b64decode(image["png"]) for image in r.json()["images"]]


def exposition(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


def metric(url: str, name: str, **labels: str) -> float:
    return metrics.metric(exposition(url), name, **labels)


# --- GET /v1/models ----------------------------------------------------------------------------


def test_models_list_and_retrieve_are_get_models(client: openai.OpenAI, http: httpx.Client) -> None:
    listed = client.models.list()
    assert [m.id for m in listed.data] == [TEACHER, STUDENT]
    assert [m.to_dict() for m in listed.data] == http.get("/models").json()["data"]
    assert client.models.retrieve(STUDENT).kind == "student"  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("dall-e-3")
    assert (caught.value.code, caught.value.param) == ("model_not_found", "model")


# --- POST /v1/images/generations -----------------------------------------------------------------


def test_the_default_model_draws_the_class_the_prompt_names(client: openai.OpenAI, http: httpx.Client) -> None:
    answer = client.images.generate(prompt="Ankle boots", extra_body={"seed": 4})
    assert answer.model == TEACHER and answer.output_format == "png" and answer.size == "28x28"  # type: ignore[attr-defined]
    assert answer.background == "opaque" and answer.quality == "high" and answer.created > 0
    [image] = answer.data or []
    assert image.revised_prompt == "ankle boot" and image.url is None
    assert picture(image.b64_json or "").size == (28, 28)
    assert base64.b64decode(image.b64_json or "") == generate_pngs(http, **{"class": 9, "n": 1, "seed": 4})[0]


def test_quality_low_picks_the_student_and_matches_naming_it(client: openai.OpenAI, http: httpx.Client) -> None:
    low = client.images.generate(prompt="a pullover", quality="low", n=2, extra_body={"seed": 21})
    named = client.images.generate(prompt="2", model=STUDENT, n=2, extra_body={"seed": 21})
    assert low.model == named.model == STUDENT and low.quality == named.quality == "low"  # type: ignore[attr-defined]
    files = [base64.b64decode(d.b64_json or "") for d in low.data or []]
    assert files == [base64.b64decode(d.b64_json or "") for d in named.data or []]
    assert files == generate_pngs(http, **{"class": 2, "n": 2, "seed": 21, "model": STUDENT})
    assert [d.seed for d in low.data or []] == [21, 22]  # type: ignore[attr-defined]
    assert client.images.generate(prompt="dress", quality="high").model == TEACHER  # type: ignore[attr-defined]


def test_extra_body_parameters_give_the_bytes_of_post_generate(client: openai.OpenAI, http: httpx.Client) -> None:
    params = {"seed": 11, "sampler": "ddim", "steps": 2, "guidance": 1.5}
    answer = client.images.generate(prompt="a dress", n=3, extra_body=params)
    files = [base64.b64decode(d.b64_json or "") for d in answer.data or []]
    assert files == generate_pngs(http, **{"class": 3, "n": 3, **params})
    assert len(set(files)) == 3  # seeds 11, 12, 13 draw three images


@pytest.mark.parametrize(
    ("output_format", "compression", "mode"),
    [("png", None, "L"), ("jpeg", None, "L"), ("jpeg", 40, "L"), ("webp", None, "RGB"), ("webp", 60, "RGB")],
)
def test_every_output_format_at_a_larger_size(
    client: openai.OpenAI, http: httpx.Client, output_format: str, compression: int | None, mode: str
) -> None:
    extra: dict[str, Any] = {} if compression is None else {"output_compression": compression}
    answer = client.images.generate(
        prompt="sneakers", n=2, size="280x280", output_format=output_format, extra_body={"seed": 5}, **extra
    )  # type: ignore[call-overload]
    assert answer.output_format == output_format and answer.size == "280x280"
    small = [pixels(picture(f)) for f in generate_pngs(http, **{"class": 7, "n": 2, "seed": 5})]
    lossless = output_format == "png" or (output_format == "webp" and compression is None)
    for image, original in zip(answer.data or [], small, strict=True):
        decoded = picture(image.b64_json or "", output_format.upper())
        assert decoded.size == (280, 280) and decoded.mode == mode
        every_tenth = pixels(decoded, lossless)[5::10, 5::10]  # the centre of each 10x10 block of a nearest upscale
        if lossless:
            assert (every_tenth == original).all()
        else:
            assert np.abs(every_tenth.astype(int) - original).mean() < 40


def test_the_largest_size(client: openai.OpenAI) -> None:
    [image] = client.images.generate(prompt="bag", size="1024x1024").data or []
    assert picture(image.b64_json or "").size == (1024, 1024)


def test_jpeg_compression_trades_bytes_for_fidelity(client: openai.OpenAI) -> None:
    def size(compression: int) -> int:
        answer = client.images.generate(
            prompt="coat", size="256x256", output_format="jpeg", output_compression=compression, extra_body={"seed": 2}
        )
        return len(base64.b64decode((answer.data or [])[0].b64_json or ""))

    assert size(10) < size(100)


# --- response_format: url ------------------------------------------------------------------------


def test_url_answers_are_fetched_without_a_key_and_hold_the_same_bytes(client: openai.OpenAI, url: str) -> None:
    common: dict[str, Any] = {"prompt": "a trouser", "n": 2, "size": "56x56", "output_format": "webp"}
    urls = client.images.generate(response_format="url", extra_body={"seed": 8}, **common)
    inline = client.images.generate(extra_body={"seed": 8}, **common)
    links = [d.url or "" for d in urls.data or []]
    assert all(link.startswith(f"{url}/v1/images/files/") for link in links)
    for link, image in zip(links, inline.data or [], strict=True):
        r = httpx.get(link, timeout=120)  # a browser's fetch: no Authorization header
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/webp"
        assert r.content == base64.b64decode(image.b64_json or "")
        assert picture(r.content, "WEBP").size == (56, 56)

    # The signature covers the whole recipe: another seed or class, or no sig, draws nothing.
    parts = urlsplit(links[0])
    query = dict(parse_qsl(parts.query))
    forged = f"{url}/v1/images/files/9.webp?{parts.query}"
    other_class = f"{url}{parts.path}?{urlencode(query | {'class': '4'})}"
    unsigned = f"{url}{parts.path}?{urlencode({k: v for k, v in query.items() if k != 'sig'})}"
    for link, code in [
        (forged, "invalid_signature"),
        (other_class, "invalid_signature"),
        (unsigned, "missing_signature"),
    ]:
        r = httpx.get(link, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == code, r.text


# --- stream: true ----------------------------------------------------------------------------------


def test_stream_sends_partial_images_then_completed_for_each_image(client: openai.OpenAI) -> None:
    # The tiny teacher's 3 steps leave room for 2 previews before the last step.
    events = list(client.images.generate(prompt="dress", n=2, stream=True, partial_images=2, extra_body={"seed": 30}))
    per_image: dict[int, list[tuple[str, int | None]]] = {0: [], 1: []}
    for event in events:
        per_image[event.image_index].append((event.type, getattr(event, "partial_image_index", None)))  # type: ignore[union-attr]
        assert picture(event.b64_json).size == (28, 28)
    partial, completed = "image_generation.partial_image", "image_generation.completed"
    assert per_image == {i: [(partial, 0), (partial, 1), (completed, None)] for i in (0, 1)}
    assert [e.type for e in events[-2:]] == [completed, completed]  # every preview comes before the images

    plain = client.images.generate(prompt="dress", n=2, extra_body={"seed": 30})
    assert [e.b64_json for e in events if e.type == completed] == [d.b64_json for d in plain.data or []]
    assert {e.b64_json for e in events if e.type == partial}.isdisjoint(d.b64_json for d in plain.data or [])


def test_stream_partial_images_follow_size_and_format_and_zero_sends_only_the_image(client: openai.OpenAI) -> None:
    stream = client.images.generate(
        prompt="sandal", model=STUDENT, stream=True, partial_images=3, size="84x84", output_format="jpeg"
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:3]] == [0, 1, 2]  # type: ignore[union-attr]
    for event in events:
        assert event.size == "84x84" and event.output_format == "jpeg" and event.quality == "low"
        assert picture(event.b64_json, "JPEG").size == (84, 84)
    only = list(client.images.generate(prompt="sandal", stream=True, partial_images=0))
    assert [e.type for e in only] == ["image_generation.completed"]


def test_hanging_up_a_stream_cancels_its_job(client: openai.OpenAI, url: str) -> None:
    cancelled = metric(url, "fashion_jobs_cancelled_total", stage="running")
    steps = metric(url, "fashion_sampler_steps_total")
    params = {"sampler": "ddim", "steps": 400}
    with client.images.generate(prompt="shirt", stream=True, partial_images=3, extra_body=params) as stream:
        first = next(iter(stream))  # the first partial image comes after 100 of the 400 steps
        assert first.type == "image_generation.partial_image"
    wait_for(lambda: metric(url, "fashion_jobs_cancelled_total", stage="running") > cancelled, "not cancelled")
    # The output thread counts a job's ticks before its cancellation, so its step count is final now.
    assert 100 <= metric(url, "fashion_sampler_steps_total") - steps < 400
    wait_for(lambda: metric(url, "fashion_jobs_active") == 0, "the cancelled job still counts as active")


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "code", "says"),
    [
        ({"prompt": "a hat"}, "prompt", "class_value", "t-shirt/top, trouser, pullover"),
        ({"prompt": "a dress and a coat"}, "prompt", "class_value", "names 2 classes (dress, coat)"),
        ({"prompt": "dress", "size": "1536x1024"}, "size", "size_value", "28 <= N <= 1024"),
        ({"prompt": "dress", "n": MAX_IMAGES + 1}, "n", "less_than_equal", f"1..{MAX_IMAGES}"),
        ({"prompt": "dress", "output_format": "gif"}, "output_format", "literal_error", "png, jpeg, webp"),
        ({"prompt": "dress", "background": "transparent"}, "background", "literal_error", "opaque"),
        ({"prompt": "dress", "output_compression": 50}, "output_compression", "compression_for_png", "jpeg and webp"),
        ({"prompt": "dress", "model": STUDENT, "extra_body": {"guidance": 3}}, "guidance", "guidance_distilled", "1.0"),
        ({"prompt": "dress", "extra_body": {"rerank": "clip"}}, "rerank", "extra_forbidden", "known fields"),
        ({"prompt": "dress", "stream": True, "response_format": "url"}, "response_format", "url_with_stream", "b64"),
    ],
)
def test_invalid_requests_are_the_sdks_bad_request_error(
    client: openai.OpenAI, fields: dict[str, Any], param: str, code: str, says: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(**fields)
    err = caught.value
    assert (err.status_code, err.param, err.code, err.type) == (400, param, code, "invalid_request_error")
    assert says in err.message


def test_unknown_model_and_wrong_key_are_the_sdks_own_errors(client: openai.OpenAI, url: str) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(prompt="dress", model="dall-e-3")
    assert (missing.value.param, missing.value.code) == ("model", "model_not_found")
    stranger = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    for call in (lambda: stranger.images.generate(prompt="dress"), stranger.models.list):
        with pytest.raises(openai.AuthenticationError) as denied:
            call()
        assert denied.value.code == "invalid_api_key"


def test_requests_are_counted_by_route(client: openai.OpenAI, url: str) -> None:
    before = exposition(url)
    client.images.generate(prompt="bag", quality="low", n=3)
    after = exposition(url)
    assert (
        metrics.moved(before, after, "fashion_http_requests_total", route="/v1/images/generations", status="200") == 1
    )
    assert metrics.moved(before, after, "fashion_images_generated_total", model=STUDENT) == 3


def test_a_full_queue_is_a_rate_limit_error_and_the_drain_ends_a_stream_with_an_error(spawn_app: Spawner) -> None:
    # A row budget of 2: one guided image takes all of it, so the next job queues and the one after is refused.
    proc, url = spawn_app(queue_size="1", max_rows="2", max_images="1", drain_seconds="0.5")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    stream_ended: list[BaseException] = []

    def long_stream() -> None:
        # The answer's 200 has gone out when generate returns, so what goes wrong later is an error event.
        stream = client.images.generate(
            prompt="coat", stream=True, partial_images=3, extra_body={"sampler": "ddim", "steps": 1000}
        )
        try:
            for _ in stream:
                pass
        except openai.APIError as err:
            stream_ended.append(err)

    busy = threading.Thread(target=long_stream)
    busy.start()
    wait_for(lambda: metric(url, "fashion_jobs_active") == 1, "the stream did not start")
    queued = threading.Thread(target=lambda: httpx.post(f"{url}/generate", json={"class": 1}, timeout=120))
    queued.start()
    wait_for(lambda: metric(url, "fashion_queue_depth") == 1, "the second job did not queue")
    with pytest.raises(openai.RateLimitError) as refused:
        client.images.generate(prompt="dress")
    assert refused.value.code == "queue_full" and int(refused.value.response.headers["retry-after"]) >= 1

    proc.send_signal(signal.SIGTERM)  # the 1000 steps cannot finish within the 0.5 s drain
    busy.join(60)
    queued.join(60)
    [err] = stream_ended
    assert type(err) is openai.APIError and err.code == "not_ready" and "did not finish in time" in err.message
    assert proc.wait(60) == 0
