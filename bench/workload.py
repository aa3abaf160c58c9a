"""The pure half of ``bench.load``: the workload mix, seeded Poisson arrivals, and the arithmetic
that turns request outcomes into percentiles, slowdowns, SLO attainment and goodput.

Nothing here talks HTTP or starts a process, so tests check it on numbers worked out by hand.

Definitions, as the diffusion-serving papers use them (TetriServe, arXiv 2510.01565):

* a request's *slowdown* is its latency over the idle latency of its kind (the same request
  alone on the idle server, measured in the same run);
* *SLO attainment* at a scale s is the share of the requests that arrived whose slowdown was at
  most s; a refused request (429) or a failed one never attains;
* *goodput* is the requests per second of the run that attained the 3x SLO.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

SLO_SCALES = (1.5, 2.0, 3.0, 5.0)  # slowdowns at which attainment is reported
GOODPUT_SLO = 3.0  # a request counts towards goodput when its slowdown is at most this
STUDENT = "fashion-student"


@dataclass(frozen=True)
class Kind:
    """One kind of request of the mix: a body for ``/generate`` (or the stream), and its share."""

    name: str
    weight: float  # share of the arrivals (the mix's weights need not sum to 1)
    n: int
    model: str | None = None  # None: the server's default model (the teacher), and no ``model`` field
    sampler: str | None = None  # None: the model's card default
    steps: int | None = None
    stream: bool = False  # POST /generate/stream with previews; its time to the first step is recorded
    preview_every: int | None = None

    def body(self, seed: int) -> dict[str, Any]:
        """The JSON body for this kind (class 3, the given seed); fields left out take the server's defaults."""
        body: dict[str, Any] = {"class": 3, "n": self.n, "seed": seed}
        for key in ("model", "sampler", "steps", "preview_every"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        return body

    @property
    def small(self) -> bool:
        """n <= 4: the requests the scheduler's target protects."""
        return self.n <= 4


# The default mix: mostly small teacher requests, some large ones, the distilled student, a stream
# with previews, and two other samplers. The shares are arrivals, not work: an n=16 teacher job is
# about as much work as sixteen n=1 ones.
DEFAULT_MIX: tuple[Kind, ...] = (
    Kind("teacher n=1", 0.30, 1),
    Kind("teacher n=4", 0.15, 4),
    Kind("teacher n=16", 0.08, 16),
    Kind("student n=1", 0.15, 1, model=STUDENT),
    Kind("student n=16", 0.05, 16, model=STUDENT),
    Kind("stream n=1", 0.10, 1, stream=True, preview_every=5),
    Kind("ddim-50 n=4", 0.07, 4, sampler="ddim", steps=50),
    Kind("dpm++-10 n=4", 0.10, 4, sampler="dpm++", steps=10),
)


def describe_mix(mix: Sequence[Kind]) -> str:
    """One line naming every kind and its share of the arrivals, for the bench's output."""
    total = sum(k.weight for k in mix)
    return ", ".join(f"{k.name} {k.weight / total:.0%}" for k in mix)


def teacher_only(mix: Sequence[Kind]) -> tuple[Kind, ...]:
    """The kinds a one-model server (the previous engine) can serve: those for the default model."""
    return tuple(k for k in mix if k.model is None)


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds from the start of the run
    kind: int  # index into the mix
    seed: int


def arrivals(mix: Sequence[Kind], rate: float, duration: float, seed: int) -> list[Arrival]:
    """Poisson arrivals at ``rate`` requests per second for ``duration`` seconds, each of a kind drawn
    from the mix by weight; the same seed gives the same list.

    Dropping the arrivals of some kinds (``teacher_only``) leaves a Poisson process of the others
    at their own rates (thinning), so two engines that serve different kinds see the same arrivals
    of the kinds they share."""
    if rate <= 0 or duration <= 0:
        raise ValueError(f"rate and duration must be > 0, got rate={rate}, duration={duration}")
    if not mix or any(k.weight < 0 for k in mix) or sum(k.weight for k in mix) <= 0:
        raise ValueError("the mix needs at least one kind and positive weights")
    rng = random.Random(seed)
    weights = [k.weight for k in mix]
    out, t = [], rng.expovariate(rate)
    while t < duration:
        kind = rng.choices(range(len(mix)), weights)[0]
        out.append(Arrival(t, kind, rng.randrange(2**31)))
        t += rng.expovariate(rate)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's
    default); NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in 0..100, got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Outcome:
    """What happened to one request."""

    kind: str
    sent: float  # seconds from the start of the run
    status: int  # HTTP status; 0 for a transport error
    latency: float = math.nan  # seconds from sending to the whole answer (the stream's done event)
    first_step: float = math.nan  # streams: seconds to the first step event
    retry_after: float = math.nan  # 429: the Retry-After it carried
    queue_s: float = math.nan  # seconds the server says it waited for rows (timings.queue_ms)
    estimated_start: float = math.nan  # streams: the first queued event's estimated_start_s, if queued
    waited: float = math.nan  # streams: from that queued event to the first step

    @property
    def ok(self) -> bool:
        return self.status == 200 and not math.isnan(self.latency)


@dataclass
class Summary:
    """The figures of one kind (or a group of kinds) at one rate."""

    requests: int
    ok: int
    refused: int
    p50: float
    p90: float
    p99: float
    slowdown_p50: float
    slowdown_p99: float
    slowdown_max: float
    attainment: dict[float, float] = field(default_factory=dict)  # SLO scale -> share of requests
    goodput: float = 0.0  # requests per second that met GOODPUT_SLO
    first_step_p50: float = math.nan
    first_step_p99: float = math.nan


def summarize(outcomes: Iterable[Outcome], idle: dict[str, float], duration: float) -> Summary:
    """Percentiles of latency and slowdown, SLO attainment and goodput over ``outcomes``, with
    ``idle`` the idle latency of each kind and ``duration`` the seconds over which they arrived."""
    outcomes = list(outcomes)
    done = [o for o in outcomes if o.ok]
    latencies = [o.latency for o in done]
    slowdowns = [o.latency / idle[o.kind] for o in done]
    attainment = {s: sum(x <= s for x in slowdowns) / len(outcomes) if outcomes else math.nan for s in SLO_SCALES}
    met = sum(x <= GOODPUT_SLO for x in slowdowns)
    firsts = [o.first_step for o in done if not math.isnan(o.first_step)]
    return Summary(
        requests=len(outcomes),
        ok=len(done),
        refused=sum(o.status == 429 for o in outcomes),
        p50=percentile(latencies, 50),
        p90=percentile(latencies, 90),
        p99=percentile(latencies, 99),
        slowdown_p50=percentile(slowdowns, 50),
        slowdown_p99=percentile(slowdowns, 99),
        slowdown_max=max(slowdowns, default=math.nan),
        attainment=attainment,
        goodput=met / duration,
        first_step_p50=percentile(firsts, 50),
        first_step_p99=percentile(firsts, 99),
    )


def refusal_waits(outcomes: Sequence[Outcome], lane_of: dict[str, str]) -> list[tuple[float, float]]:
    """(Retry-After, real wait) of every refused request: the real wait is the time from the refusal
    to the next request of the same model that the server accepted, the moment a place in that
    model's queue had become free (NaN when none came after it). ``lane_of`` maps a kind to its model."""
    accepted = sorted((o.sent, lane_of[o.kind]) for o in outcomes if o.status not in (0, 429))
    out = []
    for o in outcomes:
        if o.status != 429:
            continue
        later = [t for t, lane in accepted if t > o.sent and lane == lane_of[o.kind]]
        out.append((o.retry_after, later[0] - o.sent if later else math.nan))
    return out
