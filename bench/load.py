"""Open-loop load: latency, slowdown, SLO attainment and goodput of the service under Poisson traffic.

    taskset -c 1 python -m bench.load                                # this checkout, FCFS and the default policy
    taskset -c 1 python -m bench.load --engine fcfs --engine narrow-first --engine old=/tmp/previous-engine
    python -m bench.load --tiny --duration 5 --fractions 0.5 1.0     # a tiny random network: checks the script

For each engine it starts the real service (``python -m app`` of this checkout, or of another
checkout for ``old=DIR``) on a free loopback port, then

1. measures each kind of request of the mix alone on the idle server (its *idle latency*, the
   median of ``--idle-repeats``);
2. once, on the first engine, measures the *capacity*: requests of the mix per second (and images
   per second) that ``--capacity-clients`` closed-loop clients get through at saturation;
3. drives it open-loop: Poisson arrivals at each fraction of that capacity, for ``--duration``
   seconds each, from the mix (``bench.workload.DEFAULT_MIX``), and waits for every answer.

The arrivals are seeded, so every engine sees the same requests at the same times; a one-model
server (the previous engine, batch to completion) gets the teacher's kinds of them only. It prints
per engine and rate: P50/P90/P99 latency, slowdown against idle, SLO attainment at 1.5x/2x/3x/5x,
goodput (requests per second within 3x), the time to a stream's first step, refusals (429) with
their Retry-After against the real wait, and a picture of attainment and P99 slowdown against the
offered load, one line per engine. Never part of the test suite; run it pinned to one core
(``taskset``) on a shared machine, and say so beside its numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx

from app.generation.lane import DEFAULT_POLICY, POLICIES
from bench.servers import Engine, machine_line, serve
from bench.workload import (
    DEFAULT_MIX,
    GOODPUT_SLO,
    SLO_SCALES,
    Kind,
    Outcome,
    Summary,
    arrivals,
    describe_mix,
    refusal_waits,
    summarize,
    teacher_only,
)
from testkit.metrics import metric

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FRACTIONS = (0.2, 0.4, 0.7, 0.85, 1.0, 1.2)


def parse_engine(text: str) -> Engine:
    """``POLICY``: one of ``app.generation.lane.POLICIES`` (this checkout with that FASHION_SCHEDULER);
    ``POLICY@DIR`` (another checkout of this engine), ``old=DIR`` (another checkout that serves one model
    and schedules its own way: the previous engine); ``POLICY:ROWS`` also sets FASHION_TICK_ROWS."""
    if text.startswith("old="):
        return Engine("previous engine (390f4af)", Path(text[4:]).resolve(), {}, multi_model=False)
    name, _, where = text.partition("@")
    policy, _, rows = name.partition(":")
    settings = {"scheduler": policy, **({"tick_rows": rows} if rows else {})}
    if not where:
        return Engine(name, REPO, settings, multi_model=True)
    repo = Path(where).resolve()
    return Engine(f"{name}@{repo.name}", repo, settings, multi_model=True)  # apart from this checkout's


@dataclass
class Point:
    """One engine at one offered load."""

    engine: str
    fraction: float
    rate: float  # requests per second offered (of the whole mix; a one-model server gets its share)
    duration: float
    outcomes: list[Outcome] = field(default_factory=list)


# --- talking to the server --------------------------------------------------------------------------


async def send(http: httpx.AsyncClient, kind: Kind, seed: int, t0: float) -> Outcome:
    """One request of ``kind``; its outcome, times from ``t0``."""
    sent = time.perf_counter()
    out = Outcome(kind.name, sent - t0, 0)
    try:
        if kind.stream:
            await _stream(http, kind, seed, sent, out)
        else:
            r = await http.post("/generate", json=kind.body(seed))
            out.status = r.status_code
            if r.status_code == 200:
                out.latency = time.perf_counter() - sent
                out.queue_s = r.json()["timings"]["queue_ms"] / 1000
            elif r.status_code == 429:
                out.retry_after = float(r.headers.get("retry-after", "nan"))
    except httpx.HTTPError:
        out.status = 0
    return out


async def _stream(http: httpx.AsyncClient, kind: Kind, seed: int, sent: float, out: Outcome) -> None:
    from httpx_sse import aconnect_sse

    queued_at = math.nan
    async with aconnect_sse(http, "POST", "/generate/stream", json=kind.body(seed)) as source:
        out.status = source.response.status_code
        if out.status != 200:
            out.retry_after = float(source.response.headers.get("retry-after", "nan"))
            return
        async for event in source.aiter_sse():
            now = time.perf_counter()
            if event.event == "queued" and math.isnan(queued_at):
                queued_at = now
                out.estimated_start = float(json.loads(event.data)["estimated_start_s"])
            elif event.event == "step" and math.isnan(out.first_step):
                out.first_step = now - sent
                if not math.isnan(queued_at):
                    out.waited = now - queued_at
            elif event.event == "done":
                out.latency = now - sent
                return
            elif event.event == "error":
                out.status = 500
                return


async def rows_evaluated(http: httpx.AsyncClient) -> float:
    """Network rows the server has evaluated so far, every model's (its tick_rows histogram's sum)."""
    return metric((await http.get("/metrics")).text, "fashion_tick_rows_sum", default=0.0)


async def idle_latencies(url: str, mix: Sequence[Kind], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Each kind alone on the idle server: the median latency of ``repeats``, and the network rows one
    request of it costs (from /metrics; 0 where the server has no such metric). One n=1 request of
    each model first, so that first-call costs stay out."""
    latency, rows = {}, {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for model in dict.fromkeys(k.model for k in mix):
            await send(http, Kind("warm-up", 1.0, 1, model=model), 0, 0.0)
        for kind in mix:
            runs = []
            before = await rows_evaluated(http)
            for r in range(repeats):
                o = await send(http, kind, 1 + r, 0.0)
                if not o.ok:
                    raise SystemExit(f"{kind.name} failed on the idle server with status {o.status}")
                runs.append(o.latency)
            latency[kind.name] = statistics.median(runs)
            rows[kind.name] = (await rows_evaluated(http) - before) / repeats
    return latency, rows


async def capacity(
    url: str, mix: Sequence[Kind], rows_of: dict[str, float], clients: int, seconds: float, seed: int
) -> tuple[float, float, float]:
    """(requests/s, images/s, rows/s) of the mix at saturation. ``clients`` closed-loop clients each send
    a kind drawn from the mix as soon as their last answer came; the rows the server evaluated over the
    last 3/4 of ``seconds`` (its own count, so jobs half done count by half) over the rows one request
    of the mix costs on average."""
    import random

    rng = random.Random(seed)
    weights = [k.weight for k in mix]
    stop = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop:
            kind = mix[rng.choices(range(len(mix)), weights)[0]]
            await send(http, kind, rng.randrange(2**31), 0.0)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=None)) as http:
        clients_done = asyncio.gather(*(client(http) for _ in range(clients)))
        await asyncio.sleep(seconds / 4)
        rows0, t0 = await rows_evaluated(http), time.perf_counter()
        await asyncio.sleep(stop - time.perf_counter())
        rows1, t1 = await rows_evaluated(http), time.perf_counter()
        await clients_done
    total = sum(weights)
    mean_rows = sum(k.weight * rows_of[k.name] for k in mix) / total
    mean_images = sum(k.weight * k.n for k in mix) / total
    rows_per_s = (rows1 - rows0) / (t1 - t0)
    return rows_per_s / mean_rows, rows_per_s / mean_rows * mean_images, rows_per_s


async def open_loop(url: str, mix: Sequence[Kind], rate: float, duration: float, seed: int, serves: set[str]) -> list:
    """Send the seeded Poisson arrivals of the mix at ``rate`` (those of kinds in ``serves``) at their
    times, whether or not earlier ones have answered; wait for every answer."""
    schedule = [a for a in arrivals(mix, rate, duration, seed) if mix[a.kind].name in serves]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        tasks = []
        for a in schedule:
            delay = t0 + a.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send(http, mix[a.kind], a.seed, t0)))
        return list(await asyncio.gather(*tasks))


# --- reporting --------------------------------------------------------------------------------------


def fmt(x: float, digits: int = 2) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def summary_table(points: Sequence[Point], idle: dict[str, dict[str, float]], mix: Sequence[Kind]) -> list[str]:
    """One row per engine and rate: every kind together, and the small (n<=4) and large ones apart."""
    scales = "/".join(f"{s:g}x" for s in SLO_SCALES)
    lines = [
        f"| engine | load | req/s | SLO attainment {scales} | goodput req/s | P99 slowdown n<=4 | "
        "P99 slowdown n=16 | max slowdown | P99 first step s | refused |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    small = {k.name for k in mix if k.small}
    for p in points:
        every = summarize(p.outcomes, idle[p.engine], p.duration)
        few = summarize([o for o in p.outcomes if o.kind in small], idle[p.engine], p.duration)
        many = summarize([o for o in p.outcomes if o.kind not in small], idle[p.engine], p.duration)
        att = "/".join(f"{every.attainment[s]:.2f}" for s in SLO_SCALES)
        lines.append(
            f"| {p.engine} | {p.fraction:.0%} | {p.rate:.2f} | {att} | {every.goodput:.2f} | "
            f"{fmt(few.slowdown_p99, 1)} | {fmt(many.slowdown_p99, 1)} | {fmt(every.slowdown_max, 1)} | "
            f"{fmt(every.first_step_p99)} | {every.refused} |"
        )
    return lines


def kind_table(points: Sequence[Point], idle: dict[str, dict[str, float]], mix: Sequence[Kind]) -> list[str]:
    """One row per engine, rate and kind."""
    lines = [
        "| engine | load | kind | requests | idle s | P50 s | P90 s | P99 s | slowdown P50 | slowdown P99 | "
        f"within {GOODPUT_SLO:g}x | first step P50 s | refused |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        for kind in mix:
            mine = [o for o in p.outcomes if o.kind == kind.name]
            if not mine:
                continue
            s: Summary = summarize(mine, idle[p.engine], p.duration)
            lines.append(
                f"| {p.engine} | {p.fraction:.0%} | {kind.name} | {s.requests} | {idle[p.engine][kind.name]:.3f} | "
                f"{fmt(s.p50)} | {fmt(s.p90)} | {fmt(s.p99)} | {fmt(s.slowdown_p50, 1)} | {fmt(s.slowdown_p99, 1)} | "
                f"{s.attainment[GOODPUT_SLO]:.2f} | {fmt(s.first_step_p50)} | {s.refused} |"
            )
    return lines


def estimate_lines(points: Sequence[Point], mix: Sequence[Kind]) -> list[str]:
    """How honest the waiting estimates were: Retry-After against the real wait, and a stream's first
    queued event's estimated start against the real one."""
    lane_of = {k.name: k.model or "default" for k in mix}
    lines = []
    for p in points:
        refused = refusal_waits(p.outcomes, lane_of)
        queued = [(o.estimated_start, o.waited) for o in p.outcomes if not math.isnan(o.waited)]
        parts = []
        if refused:
            ra = statistics.median(r for r, _ in refused)
            real = [w for _, w in refused if not math.isnan(w)]
            parts.append(f"{len(refused)} refused, median Retry-After {ra:.0f} s, real wait {fmt(_median(real))} s")
        if queued:
            estimated = statistics.median(e for e, _ in queued)
            waited = statistics.median(w for _, w in queued)
            parts.append(f"{len(queued)} streams queued, median estimated start {estimated:.2f} s, real {waited:.2f} s")
        if parts:
            lines.append(f"- {p.engine} at {p.fraction:.0%}: " + "; ".join(parts))
    return lines


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def plot(points: Sequence[Point], idle: dict[str, dict[str, float]], mix: Sequence[Kind], path: Path) -> None:
    """SLO attainment (3x) and the P99 slowdown of small requests against offered load, one line per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    small = {k.name for k in mix if k.small}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for engine in dict.fromkeys(p.engine for p in points):
        mine = [p for p in points if p.engine == engine]
        x = [100 * p.fraction for p in mine]
        every = [summarize(p.outcomes, idle[engine], p.duration) for p in mine]
        few = [summarize([o for o in p.outcomes if o.kind in small], idle[engine], p.duration) for p in mine]
        left.plot(x, [s.attainment[GOODPUT_SLO] for s in every], marker="o", label=engine)
        right.plot(x, [s.slowdown_p99 for s in few], marker="o", label=engine)
    left.set(xlabel="offered load, % of capacity", ylabel=f"share within {GOODPUT_SLO:g}x idle latency", ylim=(0, 1.02))
    left.set_title("SLO attainment (all requests)")
    right.set(xlabel="offered load, % of capacity", ylabel="P99 latency / idle latency", yscale="log")
    right.set_title("P99 slowdown of n<=4 requests")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- the run ----------------------------------------------------------------------------------------


async def sweep(
    url: str, engine: Engine, mix: Sequence[Kind], args: argparse.Namespace, idle: dict[str, float], rate_of: dict
) -> list[Point]:
    """The open-loop sweep at the rates already fixed."""
    serves = set(idle)
    points = []
    for i, fraction in enumerate(args.fractions):
        rate = rate_of[fraction]
        outcomes = await open_loop(url, mix, rate, args.duration, args.seed + i, serves)
        point = Point(engine.label, fraction, rate, args.duration, outcomes)
        points.append(point)
        s = summarize(outcomes, idle, args.duration)
        print(
            f"#   {engine.label} {fraction:.0%} ({rate:.2f} req/s): {s.requests} requests, "
            f"{s.attainment[GOODPUT_SLO]:.2f} within {GOODPUT_SLO:g}x, P99 slowdown {fmt(s.slowdown_p99, 1)}",
            file=sys.stderr,
            flush=True,
        )
    return points


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--engine",
        action="append",
        dest="engines",
        help=f"{', '.join(POLICIES)} (this checkout's FASHION_SCHEDULER; POLICY:ROWS also sets FASHION_TICK_ROWS), "
        "POLICY@DIR (another checkout's), or old=DIR (the previous engine); repeatable",
    )
    p.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS), help="of the capacity")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate")
    p.add_argument("--idle-repeats", type=int, default=2)
    p.add_argument("--capacity-clients", type=int, default=12)
    p.add_argument("--capacity-seconds", type=float, default=24.0)
    p.add_argument("--capacity", type=float, default=None, help="requests/s of the mix at saturation (skip measuring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (FASHION_THREADS)")
    p.add_argument(
        "--queue-size",
        type=int,
        default=None,
        help="jobs waiting per model before 429 (FASHION_QUEUE_SIZE; small: to measure Retry-After)",
    )
    p.add_argument("--tiny", action="store_true", help="a tiny random teacher and student (checks the script)")
    p.add_argument("--out", type=Path, default=None, help="also write the tables here (e.g. docs/bench_load.txt)")
    p.add_argument("--plot", type=Path, default=None, help="write the picture here (e.g. docs/load.png)")
    p.add_argument("--json", type=Path, default=None, help="write every outcome here")
    args = p.parse_args(argv)
    engines = [parse_engine(e) for e in (args.engines or ["fcfs", DEFAULT_POLICY])]
    if args.queue_size is not None:
        engines = [replace(e, settings={**e.settings, "queue_size": str(args.queue_size)}) for e in engines]
    mix = DEFAULT_MIX
    with tempfile.TemporaryDirectory() as tmp:
        points: list[Point] = []
        idle: dict[str, dict[str, float]] = {}
        rate_of: dict[float, float] = {}
        capacity_line = ""
        for engine in engines:
            with serve(engine, Path(tmp), args.threads, tiny=args.tiny) as url:
                mine = mix if engine.multi_model else teacher_only(mix)
                idle[engine.label], rows_of = asyncio.run(idle_latencies(url, mine, args.idle_repeats))
                if not rate_of:
                    if args.capacity is None:
                        cap, images_per_s, rows_per_s = asyncio.run(
                            capacity(url, mix, rows_of, args.capacity_clients, args.capacity_seconds, args.seed)
                        )
                        capacity_line = (
                            f"{cap:.3f} requests/s of the mix at saturation ({images_per_s:.2f} images/s, "
                            f"{rows_per_s:.0f} network rows/s; rows per request: "
                            + ", ".join(f"{k} {r:.0f}" for k, r in rows_of.items())
                            + f"), measured on {engine.label}"
                        )
                    else:
                        cap, capacity_line = args.capacity, f"{args.capacity:.3f} requests/s of the mix (given)"
                    rate_of = {f: f * cap for f in args.fractions}
                    print(f"# capacity: {capacity_line}", file=sys.stderr, flush=True)
                points.extend(asyncio.run(sweep(url, engine, mix, args, idle[engine.label], rate_of)))

    lines = [
        "# python -m bench.load: open-loop Poisson arrivals, "
        f"{args.duration:g} s per rate, seed {args.seed}, server threads {args.threads}"
        + (f", queue size {args.queue_size}" if args.queue_size is not None else ""),
        f"# machine: {machine_line()}",
        f"# mix: {describe_mix(mix)}; the previous engine gets the teacher's kinds only",
        f"# capacity (100%): {capacity_line}",
        "# slowdown = latency / the kind's idle latency on the same server in the same run",
        "",
        *summary_table(points, idle, mix),
        "",
        *kind_table(points, idle, mix),
        "",
        "Estimates:",
        *(estimate_lines(points, mix) or ["- no request was refused or queued"]),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.plot:
        plot(points, idle, mix, args.plot)
    if args.json:
        args.json.write_text(json.dumps({"idle": idle, "points": [asdict(pt) for pt in points]}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
