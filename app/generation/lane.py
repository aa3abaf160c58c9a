"""One model's share of the engine: its queue, its running jobs, and the policy that schedules them.

A policy decides, here: which waiting job enters the row budget next (admission), which running jobs
a tick evaluates (selection), and which models' lanes a tick evaluates (``turns``). The forecast
that queue positions, estimated starts and Retry-After come from replays admission and selection,
so it stays an honest estimate whatever the policy (it cannot know about jobs that have not arrived
yet). The engine calls a lane under its lock only; docs/architecture.md explains the policies and
why the budget is per model.

``fcfs``, first come, first served: the oldest waiting job enters when its rows fit beside the
running jobs', nobody overtakes it, and every running job steps at every tick.

``deadline``: each job gets a deadline, its arrival plus ``DEADLINE_SLACK`` times
the time it would take alone (its steps times the fixed-row chunks its rows fill, at the lane's
measured seconds per chunk); a tick evaluates the running jobs in deadline order up to
``tick_rows`` rows (the first always, then every one that still fits; beside a first job larger
than ``tick_rows``, up to ``tick_rows`` more), and the waiting job with
the earliest deadline is the next to enter, nobody overtaking it. A small job's deadline is near,
so it steps at every tick and its ticks stay short instead of carrying every large job's rows; a
large job's deadline is fixed when it arrives, so however many small jobs keep coming, its turn
comes (aging). A job that skips a tick keeps its state; an image's bytes do not depend on which
ticks it took (``app.generation.device.FixedRows``).

``least-work``: the same, but a job's time alone is counted in its share of the rows rather than in
whole chunks: its steps times its rows, at the lane's measured seconds per row. A 1-image job fills
2 of a chunk's 16 rows, so its key is an eighth of what ``deadline`` gives it, and small jobs go
first until a large job has waited ``DEADLINE_SLACK`` times its own work: least work first, aged
by arrival.

``narrow-first`` (the default): ``deadline``'s keys, but a job wider than one tick's cap (more rows than
a tick evaluates: a teacher n=16, 32 rows, on the CPU's 16-row chunk) gets ``WIDE_SLACK`` instead of
``DEADLINE_SLACK``. A narrow job rides in a chunk beside others at almost no cost to them; a wide one
lengthens every tick it takes (``select``), so it waits longer, within the 10x bound that
docs/speed.md measures. And the models take turns (``turns``): a tick evaluates the model whose
selected jobs hold the earliest deadline, and another model only if one of its jobs is overdue, so a
student's 4-step job is not slowed by the teacher's chunk on every one of its ticks while the teacher's
jobs still have time.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from app.generation.device import Runtime
from app.generation.jobs import Job
from model.samplers import SamplerState

Policy = Literal["fcfs", "deadline", "least-work", "narrow-first"]
POLICIES: tuple[Policy, ...] = ("fcfs", "deadline", "least-work", "narrow-first")
DEFAULT_POLICY: Policy = "narrow-first"  # measured best under load (docs/speed.md)
DEFAULT_TICK_S = 0.1  # the tick time assumed for estimates before the first tick is measured
DEADLINE_SLACK = 3.0  # a job's deadline: arrival + this many times its time alone
WIDE_SLACK = 7.0  # narrow-first: the slack of a job wider than a tick's cap


@dataclass
class Running:
    """An admitted job and its trajectories."""

    job: Job
    state: SamplerState
    labels: torch.Tensor  # (n,)

    @property
    def steps_left(self) -> int:
        return self.state.total - self.state.index


def admission_ticks(active: list[tuple[int, int]], queued: list[tuple[int, int]], budget: int) -> list[int]:
    """Ticks from now until each queued job is admitted, first come first served.

    ``active``: (rows, steps left) of each running job; ``queued``: (rows, steps) of each waiting
    job in order. A job enters once the rows in use plus its own fit the budget; it cannot enter
    before the job ahead of it."""
    finishing = [(left, rows) for rows, left in active]
    heapq.heapify(finishing)
    used = sum(rows for rows, _ in active)
    now, out = 0, []
    for rows, steps in queued:
        while used + rows > budget and finishing:
            end, freed = heapq.heappop(finishing)
            now, used = max(now, end), used - freed
        out.append(now)
        heapq.heappush(finishing, (now + steps, rows))
        used += rows
    return out


def select(rows: Sequence[int], cap: int) -> list[int]:
    """Which jobs one tick evaluates, given their rows in priority order: the first always, then every
    later one that still fits within ``cap`` rows in all. A first job larger than the cap takes the
    cap's worth of others beside it: its turn slows them instead of stopping them (a short job that
    waited out a large one's whole run would pay many times its own time)."""
    limit = cap if not rows or rows[0] <= cap else rows[0] + cap
    taken: list[int] = []
    used = 0
    for i, r in enumerate(rows):
        if not taken or used + r <= limit:
            taken.append(i)
            used += r
    return taken


def deadline_ticks(
    active: list[tuple[int, int, float]], queued: list[tuple[int, int, float]], budget: int, cap: int
) -> tuple[list[int], list[int]]:
    """Ticks from now until each queued job is admitted, and until it first steps, under the keyed
    policies (``deadline``, ``least-work``, ``narrow-first``).

    ``active``: (rows, steps left, key) of each running job; ``queued``: (rows, steps, key) of each
    waiting job, smallest key first. Event by event: the selected jobs (``select`` in key order) all
    step until the first of them finishes, which frees its rows; the head of the queue then enters if
    it fits. An admitted job steps only once a tick selects it, which may be later than it entered:
    admission frees a place in the queue (Retry-After), the first step is when the job starts."""
    running: list[list[float]] = sorted(([d, r, left, -1] for r, left, d in active), key=lambda j: j[0])
    used = sum(r for r, _, _ in active)
    now = 0
    admitted: list[int] = [0] * len(queued)
    started: list[int | None] = [None] * len(queued)
    waiting = deque(enumerate(queued))
    while waiting or None in started:
        while waiting and (used + waiting[0][1][0] <= budget or not running):
            i, (rows, steps, d) = waiting.popleft()
            admitted[i] = now
            bisect.insort(running, [d, rows, steps, i], key=lambda j: j[0])
            used += rows
        chosen = [running[i] for i in select([int(j[1]) for j in running], cap)]
        for j in chosen:
            if j[3] >= 0 and started[int(j[3])] is None:
                started[int(j[3])] = now
        if not waiting and None not in started:
            break
        k = int(min(j[2] for j in chosen))
        now += k
        for j in chosen:
            j[2] -= k
        used -= sum(int(j[1]) for j in running if j[2] == 0)
        running = [j for j in running if j[2] > 0]
    return admitted, [now if t is None else t for t in started]  # every one has started by now


def turns(batches: Sequence[tuple[Lane, list[Running]]], now: float) -> list[tuple[Lane, list[Running]]]:
    """Which models one tick evaluates, given each model's lane and its selected jobs: every one, except
    under ``narrow-first``, where the lane holding the earliest deadline goes, and another lane only if
    one of its selected jobs is overdue (its deadline at or before ``now``). A lane left out waits at
    most until its earliest deadline: then it is overdue and goes at every tick."""
    if len(batches) < 2 or batches[0][0].policy != "narrow-first":
        return list(batches)
    heads = [min(r.job.deadline for r in batch) for _, batch in batches]
    first = min(heads)
    return [b for b, head in zip(batches, heads, strict=True) if head == first or head <= now]


@dataclass
class Lane:
    """A model's network, its waiting jobs (in the order the policy admits them) and its running ones,
    within ``budget`` rows of running jobs, ``tick_rows`` rows per evaluation (``deadline``) and
    ``queue_size`` waiting jobs."""

    name: str
    runtime: Runtime
    budget: int
    queue_size: int
    policy: Policy = DEFAULT_POLICY
    tick_rows: int | None = None  # all but fcfs: most rows one tick evaluates; None: one fixed-row chunk
    pending: deque[Job] = field(default_factory=deque)
    running: list[Running] = field(default_factory=list)
    chunk_s: float = 0.0  # moving average of one fixed-row chunk's evaluation, for deadlines

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.tick_rows is not None and self.tick_rows < 1:
            raise ValueError(f"tick_rows must be >= 1, got {self.tick_rows}")

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.queue_size

    @property
    def cap(self) -> int:
        """Most rows one tick evaluates: ``tick_rows``, else one fixed-row chunk (16 rows on the CPU, where
        bench.load measured one chunk against two; on CUDA the chunk is the whole budget), never more
        than the budget."""
        if self.policy == "fcfs":
            return self.budget
        default = self.runtime.rows or self.budget
        return min(self.budget, self.tick_rows or default)

    def chunks(self, rows: int) -> int:
        """Fixed-row chunks that ``rows`` rows fill (rows themselves when chunking is off)."""
        return math.ceil(rows / self.runtime.rows) if self.runtime.rows else rows

    def add(self, job: Job) -> None:
        """Queue a job in the policy's order: by arrival (fcfs) or by deadline (arrival + slack x work)."""
        if self.policy == "fcfs":
            self.pending.append(job)
            return
        job.deadline = job.submitted + self.slack(job) * self.work_s(job)
        keys = [j.deadline for j in self.pending]
        self.pending.insert(bisect.bisect_right(keys, job.deadline), job)

    def slack(self, job: Job) -> float:
        """How many times its work a job may wait: ``WIDE_SLACK`` for a job wider than a tick's cap under
        ``narrow-first``, else ``DEADLINE_SLACK``."""
        wide = self.policy == "narrow-first" and job.spec.rows > self.cap
        return WIDE_SLACK if wide else DEADLINE_SLACK

    def work_s(self, job: Job) -> float:
        """The seconds that order a job under ``deadline`` and ``narrow-first`` (its time alone, in whole
        chunks) or ``least-work`` (its steps over its share of the chunks' rows)."""
        chunk = self.chunk_s or DEFAULT_TICK_S
        rows = job.spec.rows
        share = rows / self.runtime.rows if self.policy == "least-work" and self.runtime.rows else self.chunks(rows)
        return job.spec.evaluations * share * chunk

    def admissible(self) -> list[Job]:
        """Take the waiting jobs that may enter now: the head of the queue enters when its rows fit
        beside the running jobs', and nobody overtakes it, even a job that would fit."""
        used = sum(r.job.spec.rows for r in self.running)
        taken: list[Job] = []
        while self.pending and used + self.pending[0].spec.rows <= self.budget:
            job = self.pending.popleft()
            used += job.spec.rows
            taken.append(job)
        return taken

    def selected(self) -> list[Running]:
        """The running jobs this tick evaluates: all of them (fcfs), or by deadline up to ``tick_rows``."""
        if self.policy == "fcfs" or sum(r.job.spec.rows for r in self.running) <= self.cap:
            return list(self.running)
        ordered = sorted(self.running, key=lambda r: r.job.deadline)
        return [ordered[i] for i in select([r.job.spec.rows for r in ordered], self.cap)]

    def observe(self, seconds: float, rows: int) -> None:
        """One evaluation of this lane's network over ``rows`` rows took ``seconds``."""
        per_chunk = seconds / max(1, self.chunks(rows))
        self.chunk_s = per_chunk if self.chunk_s == 0 else 0.8 * self.chunk_s + 0.2 * per_chunk

    def forecast(self, tick_s: float) -> tuple[list[float], list[float]]:
        """Seconds from now until each waiting job is admitted by this lane's policy, and until its first
        step (its start), at ``tick_s`` per tick (the measured tick time; 0 before the first tick), if
        no other job arrived. Under ``fcfs`` every running job steps at every tick, so the two agree. It
        follows this lane alone: the ticks another model takes alone under ``narrow-first`` are in the
        measured tick time, not in the replay."""
        tick = tick_s or DEFAULT_TICK_S
        if self.policy == "fcfs":
            active = [(r.job.spec.rows, r.steps_left) for r in self.running]
            queued = [(job.spec.rows, job.spec.evaluations) for job in self.pending]
            admitted = started = admission_ticks(active, queued, self.budget)
        else:
            running = [(r.job.spec.rows, r.steps_left, r.job.deadline) for r in self.running]
            waiting = [(job.spec.rows, job.spec.evaluations, job.deadline) for job in self.pending]
            admitted, started = deadline_ticks(running, waiting, self.budget, self.cap)
        return [t * tick for t in admitted], [t * tick for t in started]

    def retry_after(self, tick_s: float) -> int:
        """Whole seconds until the head of the queue is admitted, which frees a place in the queue."""
        admitted, _ = self.forecast(tick_s)
        return max(1, math.ceil(admitted[0] if admitted else tick_s))
