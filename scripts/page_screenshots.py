"""Screenshots of the page for the README, with the shipped weights: start ``python -m app`` on a free
loopback port, open the page in Debian's Chromium (Playwright), and save each state in ``docs/``: a
generation, an inpainting in the edit panel, an interpolation strip, a comparison, the forward process.

    python scripts/page_screenshots.py [--out docs] [--width 1200]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file, not a module: the test toolkit lives at the repository root

from testkit import servers  # noqa: E402

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def edit(page, path: Path) -> None:  # type: ignore[no-untyped-def]
    """The first dress into the edit panel with one click, its top redrawn (a box over the picture's rows 1-11)."""
    page.locator(".finals .edit-action").first.click()
    page.wait_for_function("!document.querySelector('#edit-go').disabled")
    page.check("input[name=mask-tool][value=box]")
    box = page.locator("#edit-mask").bounding_box()
    cell = box["width"] / 28  # the mask has the picture's 28x28 pixels, shown enlarged
    page.mouse.move(box["x"] + 3.5 * cell, box["y"] + 1.5 * cell)
    page.mouse.down()
    page.mouse.move(box["x"] + 24.5 * cell, box["y"] + 11.5 * cell, steps=8)
    page.mouse.up()
    page.fill("#edit-n", "4")
    page.fill("#edit-seed", "3")
    page.click("#edit-go")
    page.wait_for_selector("#edit-result .finals img.final >> nth=3", timeout=120_000)
    page.locator("#edit").screenshot(path=str(path))


def interpolate(page, path: Path) -> None:  # type: ignore[no-untyped-def]
    """Eight frames of sneakers between seeds 1 and 2."""
    page.fill("#interp-seed-a", "1")
    page.fill("#interp-seed-b", "2")
    page.select_option("#interp-class", "sneaker")
    page.fill("#interp-frames", "8")
    page.click("#interp-go")
    page.wait_for_function("!document.querySelector('#interp-result .interp-gif').hidden", timeout=120_000)
    page.locator("#interpolate").screenshot(path=str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--width", type=int, default=1200)
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("needs Debian's chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    settings = {"device": "cpu", "clip_enabled": "false"}  # the shipped weights; OMP_NUM_THREADS passes through
    env = servers.app_env(settings, keep=True)  # the shell's FASHION_* too (say, FASHION_MODELS)
    proc, url = servers.start_app({}, args=["-m", "app", "--log-level", "warning"], env=env, capture=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.goto(f"{url}/?class=dress&n=4&seed=7&sampler=ddim&steps=50&guidance=1.35&preview_every=1")
            page.wait_for_selector(".finals img.final >> nth=3", timeout=120_000)
            page.locator(".timeline input").fill("14")  # scrubbed back to step 15 of 50
            page.screenshot(path=str(args.out / "page_done.png"), full_page=True)
            edit(page, args.out / "page_edit.png")
            interpolate(page, args.out / "page_interpolate.png")
            link = "/?class=ankle%20boot&n=4&seed=3&sampler=ddpm,ddim,dpm%2B%2B&steps=1000,50,20"
            page.goto(f"{url}{link}&guidance=1.35,1.35,1.35&preview_every=10")
            page.wait_for_function("document.querySelectorAll('.finals img.final').length === 12", timeout=300_000)
            page.screenshot(path=str(args.out / "page_compare.png"), full_page=True)
            page.locator("#fwd-t").fill("400")
            page.locator("#forward").screenshot(path=str(args.out / "page_forward.png"))
            browser.close()
    finally:
        servers.stop(proc)
    print(f"wrote page_done.png, page_edit.png, page_interpolate.png, page_compare.png, page_forward.png in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
