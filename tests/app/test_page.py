"""The web page (GET /), GET /schedule and the API key on GET streams: the page in headless Chromium
(Debian's package) driven by Playwright, against the real app under uvicorn on a loopback port."""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.settings import Settings

pytestmark = pytest.mark.timeout(240)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = os.environ.get("FASHION_SCREENSHOTS")  # a directory: save each state's screenshot there
KEY = "s3cret-key-for-the-page"


@pytest.fixture(scope="module")
def live(app_weights: Path, serve_in_thread: Callable) -> Iterator[str]:
    with serve_in_thread(Settings(weights=app_weights, device="cpu", api_key=None), log_level="info") as url:
        yield url


@pytest.fixture(scope="module")
def two_models(app_weights: Path, student_weights: Path, serve_in_thread: Callable) -> Iterator[str]:
    """The tiny teacher (the default) and the tiny distilled student."""
    settings = Settings(models=[app_weights, student_weights], device="cpu", api_key=None)
    with serve_in_thread(settings) as url:
        yield url


@pytest.fixture(scope="module")
def guided_and_plain(guided_weights: Path, app_weights: Path, serve_in_thread: Callable) -> Iterator[str]:
    """A tiny teacher with a guide (autoguided by default) beside the tiny teacher without one."""
    settings = Settings(models=[guided_weights, app_weights], device="cpu", api_key=None)
    with serve_in_thread(settings) as url:
        yield url


@pytest.fixture(scope="module")
def keyed(app_weights: Path, serve_in_thread: Callable) -> Iterator[str]:
    with serve_in_thread(Settings(weights=app_weights, device="cpu", api_key=KEY), log_level="info") as url:
        yield url


def test_the_page_and_its_files_are_served(live: str) -> None:
    page = httpx.get(f"{live}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for src in ("/static/app.js", "/static/edit.js", "/static/style.css"):
        assert src in page.text
        assert httpx.get(live + src).status_code == 200
    assert "https://" not in page.text and "http://" not in page.text  # nothing from elsewhere: works offline


def test_the_pages_samplers_are_model_samplers() -> None:
    from model.samplers import SAMPLERS

    html = (Path(__file__).resolve().parents[2] / "app/static/index.html").read_text()
    select = re.search(r'<select name="sampler">(.*?)</select>', html)
    assert select is not None
    assert sorted(re.findall(r"<option>([^<]+)</option>", select.group(1))) == sorted(SAMPLERS)


def test_schedule_is_the_weights_schedule(live: str) -> None:
    from model.diffusion import Schedule

    body = httpx.get(f"{live}/schedule").json()
    expected = Schedule.named("cosine", 1000)
    assert (body["name"], body["T"]) == ("cosine", 1000)
    np.testing.assert_allclose(body["alpha_bar"], expected.alpha_bar, rtol=1e-12)
    np.testing.assert_allclose(body["sigma"], expected.noise_level(), rtol=1e-12)
    assert body["log_snr"][0] > 0 > body["log_snr"][-1]


def test_a_get_stream_takes_the_key_in_the_query_and_no_log_or_error_holds_it(
    keyed: str, caplog: pytest.LogCaptureFixture, metric: Callable
) -> None:
    query = {"class": 1, "n": 1, "steps": 2}
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        ok = httpx.get(f"{keyed}/generate/stream", params={**query, "api_key": KEY}, timeout=60)
        wrong = httpx.get(f"{keyed}/generate/stream", params={**query, "api_key": KEY + "x"}, timeout=60)
        bad = httpx.get(f"{keyed}/generate/stream", params={**query, "n": 999, "api_key": KEY}, timeout=60)
        posted = httpx.post(f"{keyed}/generate/stream?api_key={KEY}", json=query, timeout=60)
    assert ok.status_code == 200 and "event: done" in ok.text
    assert wrong.status_code == 401 and KEY not in wrong.text
    assert bad.status_code == 422 and KEY not in bad.text  # the validation error does not echo it
    assert posted.status_code == 401  # the query key is for GET streams only
    access = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert any("/generate/stream?" in line and " 200" in line for line in access), access
    assert not any(KEY in line for line in access), access
    metrics = httpx.get(f"{keyed}/metrics").text
    assert KEY not in metrics and metric(metrics, "fashion_http_requests_total", status="401") >= 2


# --- in a real browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None:
        pytest.skip("Chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[*args, "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 390, "height": 1400})  # a phone's width
    page = context.new_page()
    page.errors = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    yield page
    context.close()


def shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / f"page_{name}.png"), full_page=True)


def decode(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))


pytest_browser = pytest.mark.browser


def draw(page, cls: str, seed: int, n: int) -> list[str]:  # type: ignore[no-untyped-def]
    """Fill in what to draw, press Generate and wait for every run's finals; the runs' titles then."""
    page.select_option("#class", cls)
    page.fill("#seed", str(seed))
    page.fill("#n", str(n))
    page.click("#go")
    return finished_titles(page, n * page.locator(".run-spec").count())


def finished_titles(page, finals: int, timeout: int = 120_000) -> list[str]:  # type: ignore[no-untyped-def]
    """Wait until the page shows ``finals`` final images; the runs' titles then."""
    page.wait_for_function(f"document.querySelectorAll('.finals img.final').length === {finals}", timeout=timeout)
    return page.eval_on_selector_all(".run-title", "hs => hs.map(h => h.textContent)")


@pytest_browser
def test_a_shared_link_streams_its_steps_then_shows_the_final_images(live: str, page) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{live}/?class=dress&n=3&seed=7&sampler=ddim&steps=6&guidance=1.5")
    page.wait_for_selector(".finals img.final >> nth=2", timeout=60_000)
    finals = page.eval_on_selector_all(".finals img.final", "imgs => imgs.map(i => i.src)")
    assert len(finals) == 3
    assert all(decode(src).shape == (28, 28) for src in finals)
    assert page.inner_text(".finals").count("seed") == 3 and "seed 7" in page.inner_text(".finals")
    # Every step's frames arrived: the timeline scrubs back through all six.
    slider = page.locator(".timeline input")
    assert slider.get_attribute("max") == "5"
    slider.fill("0")
    assert page.inner_text(".timeline output").startswith("1/6")
    assert "dress" in page.url and "seed=7" in page.url
    # The same seed through the API gives the same first image.
    body = {"class": 3, "n": 1, "seed": 7, "sampler": "ddim", "steps": 6, "guidance": 1.5}
    api = httpx.post(f"{live}/generate", json=body, timeout=60).json()
    assert finals[0].split(",", 1)[1] == api["images"][0]["png"]
    shot(page, "done")
    assert page.errors == []


@pytest_browser
def test_cancel_stops_the_job_on_the_server(live: str, page, metric: Callable) -> None:  # type: ignore[no-untyped-def]
    before = metric(httpx.get(f"{live}/metrics", timeout=30).text, "fashion_jobs_cancelled_total", stage="running")
    page.goto(f"{live}/?class=bag&n=2&seed=1&sampler=ddim&steps=1000&guidance=1.35&preview_every=50")
    page.wait_for_function("document.querySelector('.step-text')?.textContent.startsWith('step')", timeout=60_000)
    shot(page, "running")
    page.keyboard.press("Escape")  # the keyboard alone: Escape cancels
    deadline = time.monotonic() + 30
    while (
        metric(httpx.get(f"{live}/metrics", timeout=30).text, "fashion_jobs_cancelled_total", stage="running") == before
    ):
        assert time.monotonic() < deadline, "the server did not cancel the job"
        time.sleep(0.05)
    assert "cancelled" in page.inner_text("#status")
    assert page.errors == []


@pytest_browser
def test_a_comparison_streams_three_runs_side_by_side(live: str, page) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{live}/")
    page.click("#add-run")
    page.click("#add-run")
    rows = page.locator(".run-spec")
    for i, (sampler, steps, guidance) in enumerate(
        [("ddim", "8", "1.35"), ("dpm++", "4", "1.35"), ("dpm++", "4", "3")]
    ):
        rows.nth(i).locator("[name=sampler]").select_option(sampler)
        rows.nth(i).locator("[name=steps]").fill(steps)
        rows.nth(i).locator("[name=guidance]").fill(guidance)
    assert draw(page, "sneaker", 3, 2) == [
        "Run 1: ddim, 8 steps, guidance 1.35",
        "Run 2: dpm++, 4 steps, guidance 1.35",
        "Run 3: dpm++, 4 steps, guidance 3",
    ]
    assert "sampler=ddim%2Cdpm%2B%2B%2Cdpm%2B%2B" in page.url and "guidance=1.35%2C1.35%2C3" in page.url  # a link
    shot(page, "compare")
    assert page.errors == []


@pytest_browser
def test_the_forward_process_slider_noises_the_image(live: str, page) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{live}/?class=trouser&n=1&seed=2&sampler=dpm%2B%2B&steps=3&guidance=1.35")
    page.wait_for_selector(".finals img.final", timeout=60_000)
    pixels = "() => Array.from(document.querySelector('#fwd-xt').getContext('2d').getImageData(0, 0, 112, 112).data)"

    def at(t: int) -> np.ndarray:
        page.locator("#fwd-t").fill(str(t))
        return np.array(page.evaluate(pixels), dtype=float).reshape(112, 112, 4)[..., 0]

    clean, noisy = at(0), at(999)
    x0 = np.array(page.evaluate(pixels.replace("#fwd-xt", "#fwd-x0")), dtype=float).reshape(112, 112, 4)[..., 0]
    assert np.abs(clean - x0).mean() < 3  # t = 0 is (almost) the image itself
    assert np.abs(noisy - x0).mean() > 40  # t = 999 is (almost) pure noise
    assert "alpha_bar" in page.inner_text("#fwd-caption")
    at(400)
    shot(page, "forward")
    assert page.errors == []


@pytest_browser
def test_the_page_sends_the_key_it_keeps(keyed: str, page) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{keyed}/")
    page.wait_for_function("document.querySelector('#status').textContent.includes('API key')", timeout=30_000)
    page.errors.clear()  # the unauthenticated /schedule 401 above is logged by Chromium, as it should be
    page.click("#access summary")
    page.fill("#api-key", KEY)
    page.keyboard.press("Tab")  # the change event stores it
    page.goto(f"{keyed}/?class=coat&n=1&seed=5&sampler=ddim&steps=3&guidance=1.35")
    page.wait_for_selector(".finals img.final", timeout=60_000)
    assert KEY not in page.url
    assert page.errors == []


@pytest_browser
def test_the_model_selector_lists_the_models_and_a_chosen_student_draws(two_models: str, page) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{two_models}/")
    page.wait_for_function("document.querySelectorAll('.run-spec [name=model] option').length === 2", timeout=30_000)
    row = page.locator(".run-spec").nth(0)

    def shown(row) -> tuple[str, str, str, str, bool]:  # type: ignore[no-untyped-def]
        fields = [row.locator(f"[name={name}]") for name in ("model", "sampler", "steps", "guidance")]
        return (*(f.input_value() for f in fields), fields[-1].is_disabled())  # type: ignore[return-value]

    options = page.eval_on_selector_all(".run-spec [name=model] option", "os => os.map(o => o.value)")
    assert options == ["tiny-test", "tiny-student"]  # GET /models' order: the default first
    assert shown(row) == ("tiny-test", "dpm++", "3", "2", False)  # the teacher's card, not the page's HTML
    row.locator("[name=model]").select_option("tiny-student")
    assert shown(row) == ("tiny-student", "consistency", "4", "1", True)  # its card; guidance is distilled
    page.click("#add-run")
    second = page.locator(".run-spec").nth(1)
    assert shown(second)[:2] == ("tiny-student", "consistency")  # a new run starts as a copy of the last
    second.locator("[name=model]").select_option("tiny-test")
    assert shown(second) == ("tiny-test", "dpm++", "3", "2", False)
    titles = draw(page, "pullover", 11, 2)
    assert titles == [
        "Run 1: tiny-student: consistency, 4 steps, guidance 1",
        "Run 2: tiny-test: dpm++, 3 steps, guidance 2",
    ]
    assert page.locator(".timeline input").nth(0).get_attribute("max") == "3"  # the student's 4 steps, all previewed
    assert "model=tiny-student%2Ctiny-test" in page.url
    finals = page.eval_on_selector_all(".run:first-child .finals img.final", "imgs => imgs.map(i => i.src)")
    body = {"model": "tiny-student", "class": "pullover", "n": 2, "seed": 11}
    api = httpx.post(f"{two_models}/generate", json=body, timeout=60).json()
    assert [src.split(",", 1)[1] for src in finals] == [img["png"] for img in api["images"]]
    # The page's link reruns the same two runs on their models.
    page.goto(page.url)
    assert finished_titles(page, 4) == titles
    assert page.errors == []


@pytest_browser
def test_runs_compare_autoguidance_with_classifier_free_guidance(guided_and_plain: str, page) -> None:  # type: ignore[no-untyped-def]
    url = guided_and_plain
    page.goto(f"{url}/")
    page.wait_for_function("document.querySelectorAll('.run-spec [name=model] option').length === 2", timeout=30_000)
    row = page.locator(".run-spec").nth(0)
    method = row.locator("[name=guidance_method]")
    autoguidance = method.locator("option[value=autoguidance]")
    assert method.input_value() == "autoguidance" and not autoguidance.is_disabled()  # the guided card's default
    row.locator("[name=model]").select_option("tiny-test")  # no guide: only classifier-free can be chosen
    assert method.input_value() == "classifier-free" and autoguidance.is_disabled()
    row.locator("[name=model]").select_option("tiny-guided")
    assert method.input_value() == "autoguidance"
    page.click("#add-run")
    page.locator(".run-spec").nth(1).locator("[name=guidance_method]").select_option("classifier-free")
    titles = draw(page, "coat", 4, 2)
    assert titles == [
        "Run 1: tiny-guided: dpm++, 3 steps, guidance 2 (autoguidance)",
        "Run 2: tiny-guided: dpm++, 3 steps, guidance 2",
    ]
    assert "guidance_method=autoguidance%2Cclassifier-free" in page.url
    for i, chosen in enumerate(("autoguidance", "classifier-free")):
        finals = page.eval_on_selector_all(f".run:nth-child({i + 1}) .finals img.final", "imgs => imgs.map(i => i.src)")
        body = {"model": "tiny-guided", "class": "coat", "n": 2, "seed": 4, "guidance_method": chosen}
        api = httpx.post(f"{url}/generate", json=body, timeout=60).json()
        assert [src.split(",", 1)[1] for src in finals] == [img["png"] for img in api["images"]]
    page.goto(page.url)  # the link keeps each run's method
    assert finished_titles(page, 4) == titles
    assert page.errors == []


# --- the edit panel and the interpolation strip -----------------------------------------------------


def png_array(text: str) -> np.ndarray:
    """A base64 PNG (or a data URL of one) as a uint8 array."""
    return decode(text if text.startswith("data:") else "data:image/png;base64," + text)


def drag(page, selector: str, start: tuple[float, float], end: tuple[float, float]) -> None:  # type: ignore[no-untyped-def]
    """Drag the mouse over a canvas between two points given in its own pixels (the picture's)."""
    box = page.locator(selector).bounding_box()
    size = page.eval_on_selector(selector, "c => [c.width, c.height]")
    at = [(box["x"] + x * box["width"] / size[0], box["y"] + y * box["height"] / size[1]) for x, y in (start, end)]
    page.mouse.move(*at[0])
    page.mouse.down()
    page.mouse.move(*at[1], steps=5)
    page.mouse.up()


@pytest_browser
def test_one_click_edits_a_generated_image_and_inpainting_keeps_what_is_not_painted(live: str, page) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{live}/?class=dress&n=1&seed=7&sampler=ddim&steps=3&guidance=1.35")
    page.wait_for_selector(".finals img.final", timeout=60_000)
    picture_src = page.get_attribute(".finals img.final", "src")
    page.click(".finals .edit-action")  # one click: the image is the panel's picture
    page.wait_for_function("!document.querySelector('#edit-go').disabled", timeout=30_000)
    assert page.eval_on_selector("#edit-picture", "c => [c.width, c.height]") == [28, 28]
    assert page.eval_on_selector("#edit-mask", "c => [c.width, c.height]") == [28, 28]  # the picture's own size
    assert page.input_value("#edit-class") == "dress"  # the picture's class, as it came from the page
    assert "Variation" in page.inner_text("#edit-mode")  # nothing painted yet
    page.check("input[name=mask-tool][value=box]")
    drag(page, "#edit-mask", (14.5, 4.5), (22.5, 19.5))  # columns 14-22, rows 4-19
    assert "Inpainting" in page.inner_text("#edit-mode")
    assert page.input_value("#edit-strength") == "1"  # a mask's default strength
    page.fill("#edit-n", "1")
    page.fill("#edit-seed", "5")
    with page.expect_request("**/edits/stream") as sent:
        page.click("#edit-go")
    body = sent.value.post_data_json
    page.wait_for_selector("#edit-result .finals img.final", timeout=60_000)
    # What went out: the picture itself, and a mask PNG of its size, white exactly on the dragged box.
    assert body["image"] == picture_src.split(",", 1)[1] and body["class"] == "dress" and body["invert"] == "no"
    mask = png_array(body["mask"])
    assert mask.shape[:2] == (28, 28)
    painted = np.zeros((28, 28), dtype=bool)
    painted[4:20, 14:23] = True
    np.testing.assert_array_equal(mask.reshape(28, 28, -1)[..., 0] >= 128, painted)
    # What came back: the mask as applied, the input as mapped, and an image equal to the picture outside it.
    applied = png_array(page.get_attribute("#edit-result .mask-png", "src")) >= 128
    np.testing.assert_array_equal(applied, painted)
    picture = decode(picture_src)
    np.testing.assert_array_equal(png_array(page.get_attribute("#edit-result .input-png", "src")), picture)
    final = decode(page.get_attribute("#edit-result .finals img.final", "src"))
    np.testing.assert_array_equal(final[~painted], picture[~painted])
    assert (final[painted] != picture[painted]).any()  # the box was redrawn
    # Every step streamed, x_t showing the kept region: the timeline scrubs through all three.
    assert page.get_attribute("#edit-result .timeline input", "max") == "2"
    assert page.get_attribute("#edit-result img.xt", "src").startswith("data:image/png;base64,")
    assert "Inpainting: dress" in page.inner_text("#edit-result .run-title")
    shot(page, "edit")
    assert page.errors == []


@pytest_browser
def test_an_upload_is_edited_at_its_own_size_with_the_class_read_by_the_server(live: str, page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    upload = tmp_path / "garment.png"
    pixels = np.full((56, 40), 255, dtype=np.uint8)  # a dark garment on white, 40 wide and 56 high
    pixels[12:44, 10:30] = 40
    Image.fromarray(pixels).save(upload)
    page.goto(f"{live}/")
    page.set_input_files("#edit-upload", str(upload))
    page.wait_for_function("!document.querySelector('#edit-go').disabled", timeout=30_000)
    assert page.eval_on_selector("#edit-mask", "c => [c.width, c.height]") == [40, 56]
    assert page.input_value("#edit-class") == "auto" and page.input_value("#edit-invert") == "auto"
    page.select_option("#mask-preset", "bottom")
    page.click("#mask-invert")  # the top half, then
    page.fill("#edit-n", "1")
    with page.expect_request("**/edits/stream") as sent:
        page.click("#edit-go")
    body = sent.value.post_data_json
    page.wait_for_selector("#edit-result .finals img.final", timeout=60_000)
    assert "class" not in body  # auto: the server's classifier reads it
    mask = png_array(body["mask"]).reshape(56, 40, -1)[..., 0] >= 128
    assert mask[:28].all() and not mask[28:].any()
    applied = png_array(page.get_attribute("#edit-result .mask-png", "src")) >= 128
    # 40x56 is padded to a square (the padding kept: columns 0-3 and 24-27 at 28x28); the top half is rows 0-13.
    assert applied.shape == (28, 28) and applied[:13, 5:23].all() and not applied[15:].any()
    assert not applied[:, :4].any() and not applied[:, 24:].any()
    assert "inverted" in page.inner_text("#edit-result .applied")  # dark on white became light on black
    assert page.errors == []


@pytest_browser
def test_an_interpolation_strip_between_two_seeds_shows_its_frames_in_order(live: str, page) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{live}/")
    page.fill("#interp-seed-a", "11")
    page.fill("#interp-seed-b", "12")
    page.select_option("#interp-class", "sneaker")
    page.fill("#interp-frames", "5")
    page.fill("#interp-steps", "3")
    page.click("#interp-go")
    page.wait_for_function(
        "document.querySelectorAll('#interp-result .interp-frames img.frame').length === 5"
        " && !document.querySelector('#interp-result .interp-gif').hidden",
        timeout=60_000,
    )
    frames = page.eval_on_selector_all("#interp-result img.frame", "imgs => imgs.map(i => i.src.split(',')[1])")
    body = {"seeds": [11, 12], "class": "sneaker", "frames": 5, "steps": 3, "sampler": "ddim"}
    api = httpx.post(f"{live}/interpolations", json=body, timeout=60).json()
    assert frames == [frame["png"] for frame in api["frames"]]  # the same frames, in order
    gif = Image.open(
        io.BytesIO(base64.b64decode(page.get_attribute("#interp-result .interp-gif img", "src").split(",")[1]))
    )
    assert gif.n_frames == 8  # there and back
    shot(page, "interpolate")
    assert page.errors == []


@pytest_browser
def test_two_picked_images_interpolate_through_their_inversion(live: str, page) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{live}/?class=bag&n=2&seed=3&sampler=ddim&steps=3&guidance=1.35")
    page.wait_for_selector(".finals img.final >> nth=1", timeout=60_000)
    page.locator(".finals .interpolate-action").nth(0).click()
    page.locator(".finals .interpolate-action").nth(1).click()
    assert page.is_checked("input[name=interp-kind][value=images]") and page.input_value("#interp-class") == "bag"
    page.fill("#interp-frames", "3")
    page.fill("#interp-steps", "3")
    with page.expect_request("**/interpolations/stream") as sent:
        page.click("#interp-go")
    finals = page.eval_on_selector_all(".finals img.final", "imgs => imgs.map(i => i.src.split(',')[1])")
    assert sent.value.post_data_json["images"] == finals
    page.wait_for_function("document.querySelectorAll('#interp-result img.frame').length === 3", timeout=60_000)
    assert page.inner_text("#interp-status") == "finished"
    assert page.errors == []
