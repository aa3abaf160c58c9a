"""The engine's scheduling replayed on a simulated clock, over many seeds in seconds.

    python -m bench.simulate --engine fcfs --engine narrow-first --seeds 40

``bench.load`` measures the real server, one seeded run of arrivals at a time: at 70% of capacity a
200 s point holds about 80 small requests, so their P99 slowdown is close to their maximum and
moves by a whole 1x between identical runs (docs/speed.md). This replays the same scheduling on
many seeds of the same workload, so a policy is chosen on the spread, not on one draw, before
``bench.load`` confirms it on the real server.

What is real: the lanes (``app.generation.lane``: a job's key, admission, the rows a tick selects,
the models' turns), the engine's loop around them (arrivals join at the next tick, every selected job
takes one step per tick), ``bench.workload``'s mix, arrivals and arithmetic, and the models' default
samplers from their cards. What is modelled: a network evaluation costs its fixed-row chunks times a
constant per model (``--chunk-ms``, by default the float32 costs that ``bench.load``'s idle latencies
give on an AMD EPYC without AVX-512, one thread); no HTTP, no sampler arithmetic, no preview
encoding, and no noise. The slowdowns are against each kind's simulated time alone.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from app.generation.device import CPU_ROWS
from app.generation.jobs import Job, JobSpec
from app.generation.lane import DEFAULT_POLICY, POLICIES, Lane, plan_tick, policy_named
from bench.workload import DEFAULT_MIX, GOODPUT_SLO, STUDENT, Kind, Outcome, arrivals, describe_mix, summarize
from model.io import CardSampling, card_sampling, read_card

REPO = Path(__file__).resolve().parent.parent
TEACHER = "fashion-unet"
CHUNK_MS = {TEACHER: 135.0, STUDENT: 123.0}  # bench.load's idle latencies over their ticks, AVX2 EPYC, float32
# What a policy must reach to be worth choosing over fcfs (the table counts the seeds that reach it): small
# requests' P99 slowdown at most TARGET times fcfs's, and no request slower than BOUND times its idle latency.
TARGET = 0.5
BOUND = 10.0


@dataclass
class Steps:
    """A running job's progress, where the engine keeps its trajectories."""

    job: Job
    steps_left: int


def card_defaults(weights: Path) -> dict[str, CardSampling]:
    """Each model's sampling defaults, from its card in ``weights``."""
    return {model: card_sampling(read_card(weights / f"{model}.safetensors")) for model in (TEACHER, STUDENT)}


def spec_of(kind: Kind, seed: int, cards: dict[str, CardSampling]) -> JobSpec:
    """The job a request of this kind becomes: its model's card defaults, with the kind's own sampler
    and steps where it names them (what ``/generate`` does with a body that leaves them out)."""
    model = kind.model or TEACHER
    card = cards[model]
    steps = kind.steps or card.steps
    return JobSpec(3, tuple(range(seed, seed + kind.n)), kind.sampler or card.sampler, steps, card.guidance, model)


def simulate(
    requests: Sequence[tuple[float, str, JobSpec]],
    policy: str,
    chunk_s: dict[str, float],
    loop: asyncio.AbstractEventLoop,
    budget: int = 128,
) -> list[Outcome]:
    """Each request's outcome when ``requests`` ((arrival s, kind, spec), in arrival order) meet the
    engine's loop under ``policy``: arrivals join at the next tick, a tick evaluates the jobs its lanes
    select (``turns`` between the models: ``plan_tick``, as the engine), costing each model's chunks times
    ``chunk_s``."""
    lanes: dict[str, Lane[Steps]] = {
        model: Lane(model, CPU_ROWS, budget, len(requests) + 1, policy_named(policy)) for model in chunk_s
    }
    for model, lane in lanes.items():
        lane.chunk_s = chunk_s[model]  # the server's measured cost, as after its warm-up
    kinds: dict[Job, str] = {}
    outcomes: list[Outcome] = []
    now, i = 0.0, 0
    while i < len(requests) or any(lane.pending or lane.running for lane in lanes.values()):
        while i < len(requests) and requests[i][0] <= now:
            at, kind, spec = requests[i]
            job = Job(spec, loop)
            job.submitted = at
            kinds[job] = kind
            lanes[cast(str, spec.model)].add(job)
            i += 1
        _, batches = plan_tick(lanes.values(), now, lambda lane, job: Steps(job, job.spec.evaluations))
        if not batches:
            now = requests[i][0]
            continue
        for lane, batch in batches:
            rows = sum(r.job.spec.rows for r in batch)
            now += lane.chunks(rows) * chunk_s[lane.name]
        for lane, batch in batches:
            for r in batch:
                r.steps_left -= 1
                if r.steps_left == 0:
                    lane.running.remove(r)
                    outcomes.append(Outcome(kinds[r.job], r.job.submitted, 200, now - r.job.submitted))
    return outcomes


@dataclass(frozen=True)
class Point:
    """One policy at one load on one seed."""

    small_p99: float  # P99 slowdown of the n <= 4 requests
    max_slowdown: float
    goodput: float  # requests per second within GOODPUT_SLO


def point(outcomes: Sequence[Outcome], idle: dict[str, float], small: set[str], duration: float) -> Point:
    whole = summarize(outcomes, idle, duration)
    smalls = summarize([o for o in outcomes if o.kind in small], idle, duration)
    return Point(smalls.slowdown_p99, whole.slowdown_max, whole.goodput)


def capacity(mix: Sequence[Kind], specs: dict[str, JobSpec], chunk_s: dict[str, float]) -> float:
    """Requests per second of the mix if every chunk were full: the mean rows a request costs over the
    rows a second evaluates, model by model (the real server, measured by bench.load, packs less)."""
    total = sum(k.weight for k in mix)
    seconds = 0.0
    for k in mix:
        spec = specs[k.name]
        seconds += k.weight / total * spec.evaluations * spec.rows / CPU_ROWS * chunk_s[cast(str, spec.model)]
    return 1.0 / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", action="append", dest="engines", choices=POLICIES, help="a policy; repeatable")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.7, 1.0], help="of the capacity")
    p.add_argument("--capacity", type=float, default=0.842, help="requests/s of the mix (bench.load's, AVX2 EPYC)")
    p.add_argument("--duration", type=float, default=200.0, help="seconds of arrivals per seed")
    p.add_argument("--seeds", type=int, default=40)
    p.add_argument("--chunk-ms", action="append", default=[], metavar="MODEL=MS", help="one chunk's cost")
    p.add_argument("--weights", type=Path, default=REPO / "weights")
    args = p.parse_args()
    policies: list[str] = ["fcfs", *(p for p in args.engines or [DEFAULT_POLICY] if p != "fcfs")]
    chunk_ms = dict(CHUNK_MS)
    for item in args.chunk_ms:
        model, _, ms = item.partition("=")
        chunk_ms[model] = float(ms)
    chunk_s = {model: ms / 1000 for model, ms in chunk_ms.items()}
    mix = DEFAULT_MIX
    cards = card_defaults(args.weights)
    specs = {k.name: spec_of(k, 0, cards) for k in mix}
    small = {k.name for k in mix if k.small}
    loop = asyncio.new_event_loop()

    print(f"# python -m bench.simulate: {args.seeds} seeds x {args.duration:.0f} s of Poisson arrivals per rate")
    print(f"# chunk costs: {', '.join(f'{m} {ms:.0f} ms' for m, ms in chunk_ms.items())} ({CPU_ROWS} rows)")
    print(f"# mix: {describe_mix(mix)}")
    full = capacity(mix, specs, chunk_s)
    print(f"# capacity (100%): {args.capacity:.3f} requests/s (full chunks would give {full:.3f})")
    print("# the figures depend on the chunk costs above, not on the speed of the machine that simulates")
    print()
    print(
        "| policy | load | P99 slowdown n<=4, median (10%-90%) | of fcfs's, median | seeds at most "
        f"{TARGET} of fcfs | max slowdown, median | seeds within {BOUND:.0f}x | goodput of fcfs's, median |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    idle = {  # each kind's time alone, per policy: the same on every seed
        policy: {k.name: simulate([(0.0, k.name, specs[k.name])], policy, chunk_s, loop)[0].latency for k in mix}
        for policy in policies
    }
    for fraction in args.fractions:
        runs: dict[str, list[Point]] = {policy: [] for policy in policies}
        for seed in range(args.seeds):
            drawn = arrivals(mix, fraction * args.capacity, args.duration, seed)
            requests = [(a.at, mix[a.kind].name, spec_of(mix[a.kind], a.seed, cards)) for a in drawn]
            for policy in runs:
                outcomes = simulate(requests, policy, chunk_s, loop)
                runs[policy].append(point(outcomes, idle[policy], small, args.duration))
        for policy in policies:
            ours, fcfs = runs[policy], runs["fcfs"]
            p99s = sorted(x.small_p99 for x in ours)
            ratios = [x.small_p99 / f.small_p99 for x, f in zip(ours, fcfs, strict=True)]
            goodput = [x.goodput / f.goodput for x, f in zip(ours, fcfs, strict=True) if f.goodput > 0]
            decile = max(0, math.ceil(len(p99s) / 10) - 1)
            print(
                f"| {policy} | {fraction:.0%} | {statistics.median(p99s):.1f} "
                f"({p99s[decile]:.1f}-{p99s[-1 - decile]:.1f}) | {statistics.median(ratios):.2f} "
                f"| {sum(r <= TARGET for r in ratios) / len(ratios):.2f} "
                f"| {statistics.median(x.max_slowdown for x in ours):.1f} "
                f"| {sum(x.max_slowdown <= BOUND for x in ours) / len(ours):.2f} "
                f"| {statistics.median(goodput) if goodput else math.nan:.2f} |"
            )
    loop.close()
    print()
    print(f"goodput: requests per second within {GOODPUT_SLO:.0f}x of their idle latency; 'of fcfs's': seed by seed")


if __name__ == "__main__":
    main()
