"""A long job in the idle rows: what it costs interactive traffic, and how fast it goes alone.

    taskset -c 1 python -m bench.jobs                       # the shipped models, 70% load, a 10,000-image job
    python -m bench.jobs --tiny --duration 10 --job-images 200   # a tiny random network: checks the script

It starts this checkout's service (``bench.servers.serve``, the default scheduler) on a free loopback port,
then, on that one server:

1. the engine alone: ``/generate`` of the teacher's full row budget, repeated (images per second);
2. a job alone: ``POST /jobs`` of the teacher with the same sampler, its images per second from its own
   status once its first chunks are committed; then it is deleted;
3. each kind of ``bench.workload``'s mix alone (idle latencies), and the capacity of the mix
   (``bench.load.capacity``) unless ``--capacity`` gives it;
4. open-loop Poisson arrivals at ``--fraction`` of that capacity (``bench.load.open_loop``), without a job;
5. the same arrivals (same seed) beside a running ``--job-images`` job, and the images the job committed
   meanwhile.

It prints the ratio of small requests' (n <= 4) P99 slowdown with the job to without, the job's idle
images per second over the engine's, and the job's progress under load, with the machine. Never part of
the test suite; run it pinned to one core (``taskset``) with nothing else running, and say so."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from app.generation.lane import DEFAULT_POLICY
from bench.load import capacity, idle_latencies, open_loop
from bench.servers import Engine, machine_line, serve
from bench.workload import DEFAULT_MIX, describe_mix, summarize

REPO = Path(__file__).resolve().parents[1]


async def engine_rate(url: str, n: int, seconds: float) -> float:
    """Images per second of back-to-back ``/generate`` requests of ``n`` teacher images."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await http.post("/generate", json={"class": 3, "n": n, "seed": 0})  # warm
        done, t0, seed = 0, time.perf_counter(), 1
        while time.perf_counter() - t0 < seconds:
            r = await http.post("/generate", json={"class": 3, "n": n, "seed": seed})
            r.raise_for_status()
            done, seed = done + n, seed + n
        return done / (time.perf_counter() - t0)


async def start_job(http: httpx.AsyncClient, images: int) -> str:
    r = await http.post("/jobs", json={"counts": [images // 10] * 10, "seed": 0, "format": "npz"})
    r.raise_for_status()
    return str(r.json()["id"])


async def images_done(http: httpx.AsyncClient, job: str) -> int:
    return int((await http.get(f"/jobs/{job}")).json()["images_done"])


async def job_rate(url: str, images: int, seconds: float) -> float:
    """Images per second a job commits on the idle server, between its first committed chunk and
    ``seconds`` later."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        job = await start_job(http, images)
        while (first := await images_done(http, job)) == 0:
            await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        rate = (await images_done(http, job) - first) / (time.perf_counter() - t0)
        await http.delete(f"/jobs/{job}")
        return rate


async def loaded(url: str, args: argparse.Namespace, rate: float, with_job: bool) -> tuple[list, int, float]:
    """The open-loop run at ``rate``; with a job, the images it committed during it."""
    serves = {k.name for k in DEFAULT_MIX}
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        job = await start_job(http, args.job_images) if with_job else None
        if job is not None:
            while await images_done(http, job) == 0:  # running, and past its first chunk
                await asyncio.sleep(0.2)
            before = await images_done(http, job)
        t0 = time.perf_counter()
        outcomes = await open_loop(url, DEFAULT_MIX, rate, args.duration, args.seed, serves)
        seconds = time.perf_counter() - t0
        made = await images_done(http, job) - before if job is not None else 0
        if job is not None:
            await http.delete(f"/jobs/{job}")
        return outcomes, made, seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fraction", type=float, default=0.7, help="interactive load, of the mix's capacity")
    p.add_argument("--duration", type=float, default=150.0, help="seconds of arrivals per run")
    p.add_argument("--job-images", type=int, default=10_000)
    p.add_argument("--alone-seconds", type=float, default=60.0, help="how long the engine and the job run alone")
    p.add_argument("--capacity", type=float, default=None, help="requests/s of the mix (skip measuring it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--background-rows", type=int, default=None, help="FASHION_BACKGROUND_ROWS (default: the server's)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    mix = DEFAULT_MIX
    with tempfile.TemporaryDirectory() as tmp:
        # Chunks of 64 images: progress is read from committed chunks, so smaller ones measure finer.
        settings = {"job_dir": str(Path(tmp) / "jobs"), "job_chunk_images": "64"}
        if args.background_rows:
            settings["background_rows"] = str(args.background_rows)
        engine = Engine(DEFAULT_POLICY, REPO, settings, multi_model=True)
        with serve(engine, Path(tmp), args.threads, tiny=args.tiny) as url:
            budget = 64  # the teacher's 128-row budget, guided: the engine's widest batch
            engine_ips = asyncio.run(engine_rate(url, budget, args.alone_seconds))
            job_ips = asyncio.run(job_rate(url, args.job_images, args.alone_seconds))
            idle, rows_of = asyncio.run(idle_latencies(url, mix, 2))
            cap = args.capacity or asyncio.run(capacity(url, mix, rows_of, 12, 24.0, args.seed))[0]
            rate = args.fraction * cap
            without, _, _ = asyncio.run(loaded(url, args, rate, with_job=False))
            beside, made, seconds = asyncio.run(loaded(url, args, rate, with_job=True))
    small = {k.name for k in mix if k.small}
    p99 = {
        name: summarize([o for o in outcomes if o.kind in small], idle, args.duration).slowdown_p99
        for name, outcomes in (("without", without), ("with", beside))
    }
    lines = [
        f"# python -m bench.jobs: {args.duration:g} s of arrivals at {args.fraction:.0%} of {cap:.3f} req/s, seed "
        f"{args.seed}, a {args.job_images}-image teacher job, server threads {args.threads}, background rows "
        f"{args.background_rows or 'the default'}",
        f"# machine: {machine_line()}",
        f"# mix: {describe_mix(mix)}",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| P99 slowdown of n<=4 requests, without a job | {p99['without']:.2f} |",
        f"| P99 slowdown of n<=4 requests, beside the job | {p99['with']:.2f} |",
        f"| ratio, with / without (target <= 1.2) | {p99['with'] / p99['without']:.2f} |",
        f"| requests answered without / with | {sum(o.ok for o in without)} / {sum(o.ok for o in beside)} |",
        f"| the engine alone, /generate n={budget}, images/s | {engine_ips:.2f} |",
        f"| the job alone, images/s | {job_ips:.2f} |",
        f"| ratio, job / engine (target >= 0.8) | {job_ips / engine_ips:.2f} |",
        f"| the job under load: images committed in {seconds:.0f} s | {made} ({made / seconds:.2f}/s) |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
    sys.exit(0)
