"""Image-to-image kinds sharing the engine's ticks: their time one by one against their time together.

    taskset -c 1 python -m bench.edits            # the shipped models
    python -m bench.edits --tiny                  # a tiny random network: checks the script

It starts this checkout's service (``bench.servers.serve``) on a free loopback port and sends one request of
each kind (a generation, a variation, an inpainting, RePaint, an interpolation between seeds, a student
inpainting), first one after another (each alone on the device), then all at once, ``--repeats`` times,
and prints the median of each: the engine evaluates every kind's rows in shared ticks, so together they
should finish in well under their one-by-one time. Never part of the test suite."""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.generation.lane import DEFAULT_POLICY
from bench.servers import Engine, machine_line, serve
from model.images import png_bytes

REPO = Path(__file__).resolve().parents[1]


def requests() -> list[tuple[str, str, dict[str, Any]]]:
    """(name, path, body) of each kind, on a 40x56 light garment with its top half masked."""
    img = np.zeros((56, 40), np.uint8)
    img[10:46, 10:30] = 200
    mask = np.zeros((56, 40), np.uint8)
    mask[:28] = 255
    image, masked = (base64.b64encode(png_bytes(a)).decode() for a in (img, mask))
    return [
        ("generation n=4", "/generate", {"class": 3, "n": 4, "seed": 1}),
        ("variation n=4, strength 0.6", "/edits", {"image": image, "class": 3, "n": 4, "seed": 2, "strength": 0.6}),
        ("inpainting n=4", "/edits", {"image": image, "mask": masked, "class": 3, "n": 4, "seed": 3}),
        (
            "RePaint n=2, ddim 20, r=3 j=2",
            "/edits",
            {
                "image": image,
                "mask": masked,
                "class": 3,
                "n": 2,
                "seed": 4,
                "sampler": "ddim",
                "steps": 20,
                "resamplings": 3,
                "jump_length": 2,
            },
        ),  # fmt: skip
        ("interpolation, 6 frames", "/interpolations", {"seeds": [1, 2], "class": 3, "frames": 6}),
        (
            "student inpainting n=4",
            "/edits",
            {"image": image, "mask": masked, "class": 3, "n": 4, "seed": 5, "model": "fashion-student"},
        ),
    ]


async def timed(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    r = await http.post(path, json=body)
    r.raise_for_status()
    return time.perf_counter() - t0


async def measure(url: str, repeats: int) -> tuple[dict[str, float], float, float]:
    """Each kind's median time alone, the median of their sum, and the median time of all at once."""
    kinds = requests()
    alone: dict[str, list[float]] = {name: [] for name, _, _ in kinds}
    sums, together = [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for _, path, body in kinds:  # warm every route and model once
            await timed(http, path, body)
        for _ in range(repeats):
            total = 0.0
            for name, path, body in kinds:
                seconds = await timed(http, path, body)
                alone[name].append(seconds)
                total += seconds
            sums.append(total)
            t0 = time.perf_counter()
            await asyncio.gather(*(timed(http, path, body) for _, path, body in kinds))
            together.append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in alone.items()}, statistics.median(sums), statistics.median(together)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    engine = Engine(DEFAULT_POLICY, REPO, {}, multi_model=True)
    with tempfile.TemporaryDirectory() as tmp, serve(engine, Path(tmp), args.threads, tiny=args.tiny) as url:
        alone, one_by_one, together = asyncio.run(measure(url, args.repeats))
    lines = [
        f"# python -m bench.edits: one request of each kind, alone then all at once, median of {args.repeats}; "
        f"server threads {args.threads}",
        f"# machine: {machine_line()}",
        "",
        "| kind | alone, s |",
        "|---|---:|",
        *(f"| {name} | {seconds:.2f} |" for name, seconds in alone.items()),
        f"| **one by one, in all** | **{one_by_one:.2f}** |",
        f"| **all at once** | **{together:.2f}** |",
        f"| together / one by one (target <= 0.5) | {together / one_by_one:.2f} |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
