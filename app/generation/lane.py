"""One model's share of the engine: its queue, its running jobs, and the policy that schedules them.

A policy decides which waiting job enters the row budget next (admission), which running jobs a tick
evaluates (selection), and which models' lanes a tick evaluates (``turns``). ``plan_tick`` is the one
place a tick is planned from them: the engine calls it under its lock, and ``bench.simulate`` calls it
on a simulated clock. The forecast that queue positions, estimated starts and Retry-After come from
replays admission and selection, so it stays an honest estimate whatever the policy (it cannot know
about jobs that have not arrived yet). docs/architecture.md explains the policies and why the row
budget is per model; docs/speed.md measures them.

Background jobs (``JobSpec.background``: a long job's images) wait in their own queue, first come first
served, and run in the rows a tick leaves idle: the padding of the interactive jobs' last fixed-row
chunk, or a whole tick's rows when no interactive job of any model is running. They never add a chunk to
a tick that has interactive work, never hold rows of the interactive budget, and a lane with only
background work does not take a tick while another lane has interactive work.

The lane knows a job by what scheduling uses: its rows in one evaluation, its evaluations, its arrival
and its deadline (``Job``), and a running job by its steps left (``Active``). How a running job samples
is the engine's business.
"""

from __future__ import annotations

import bisect
import heapq
import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Protocol, TypeVar

from app.generation.jobs import Job

DEFAULT_TICK_S = 0.1  # the tick time assumed for estimates before the first tick is measured


class Active(Protocol):
    """A running job as the lane sees it."""

    @property
    def job(self) -> Job: ...

    @property
    def steps_left(self) -> int: ...


R = TypeVar("R", bound=Active)


def admission_ticks(active: list[tuple[int, int]], queued: list[tuple[int, int]], max_rows: int) -> list[int]:
    """Ticks from now until each queued job is admitted, first come first served.

    ``active``: (rows, steps left) of each running job; ``queued``: (rows, steps) of each waiting
    job in order. A job enters once the rows in use plus its own fit ``max_rows``; it cannot enter
    before the job ahead of it."""
    finishing = [(left, rows) for rows, left in active]
    heapq.heapify(finishing)
    used = sum(rows for rows, _ in active)
    now, out = 0, []
    for rows, steps in queued:
        while used + rows > max_rows and finishing:
            end, freed = heapq.heappop(finishing)
            now, used = max(now, end), used - freed
        out.append(now)
        heapq.heappush(finishing, (now + steps, rows))
        used += rows
    return out


def select(rows: Sequence[int], tick_rows: int) -> list[int]:
    """Which jobs one tick evaluates, given their rows in priority order: the first always, then every
    later one that still fits within ``tick_rows`` rows in all. A first job larger than that takes
    ``tick_rows`` of others beside it: its turn slows them instead of stopping them (a short job that
    waited out a large one's whole run would pay many times its own time)."""
    limit = tick_rows if not rows or rows[0] <= tick_rows else rows[0] + tick_rows
    taken: list[int] = []
    used = 0
    for i, r in enumerate(rows):
        if not taken or used + r <= limit:
            taken.append(i)
            used += r
    return taken


def deadline_ticks(
    active: list[tuple[int, int, float]], queued: list[tuple[int, int, float]], max_rows: int, tick_rows: int
) -> tuple[list[int], list[int]]:
    """Ticks from now until each queued job is admitted, and until it first steps, when jobs go in
    deadline order (``NarrowFirst``).

    ``active``: (rows, steps left, deadline) of each running job; ``queued``: (rows, steps, deadline) of
    each waiting job, earliest first. Event by event: the selected jobs (``select`` in deadline order)
    all step until the first of them finishes, which frees its rows; the head of the queue then enters
    if it fits. An admitted job steps only once a tick selects it, which may be later than it entered:
    admission frees a place in the queue (Retry-After), the first step is when the job starts."""
    running: list[list[float]] = sorted(([d, r, left, -1] for r, left, d in active), key=lambda j: j[0])
    used = sum(r for r, _, _ in active)
    now = 0
    admitted: list[int] = [0] * len(queued)
    started: list[int | None] = [None] * len(queued)
    waiting = deque(enumerate(queued))
    while waiting or None in started:
        while waiting and (used + waiting[0][1][0] <= max_rows or not running):
            i, (rows, steps, d) = waiting.popleft()
            admitted[i] = now
            bisect.insort(running, [d, rows, steps, i], key=lambda j: j[0])
            used += rows
        chosen = [running[i] for i in select([int(j[1]) for j in running], tick_rows)]
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


class Policy(ABC):
    """How the jobs of every lane share the network evaluations: one instance serves all of an engine's
    lanes. Admission is the same for every policy: the head of the queue enters once its rows fit, and
    nobody overtakes it; the queue's order is the policy's."""

    name: ClassVar[str]

    @abstractmethod
    def enqueue(self, lane: Lane, job: Job) -> None:
        """Put a new job in the lane's queue, in this policy's order."""

    @abstractmethod
    def tick_rows(self, lane: Lane) -> int:
        """Most rows one tick of this lane evaluates (a job larger than that still goes, see ``select``)."""

    @abstractmethod
    def selected(self, lane: Lane[R]) -> list[R]:
        """The running jobs of this lane that the next tick evaluates."""

    @abstractmethod
    def forecast_ticks(self, lane: Lane) -> tuple[list[int], list[int]]:
        """Ticks from now until each waiting job is admitted, and until its first step."""

    def turns(self, batches: Sequence[tuple[Lane[R], list[R]]], now: float) -> list[tuple[Lane[R], list[R]]]:
        """Which models' lanes one tick evaluates, given each lane and its selected jobs: by default all."""
        return list(batches)


class FirstComeFirstServed(Policy):
    """The oldest waiting job enters when its rows fit beside the running jobs', and every running job
    steps at every tick, every model's."""

    name = "fcfs"

    def enqueue(self, lane: Lane, job: Job) -> None:
        lane.pending.append(job)

    def tick_rows(self, lane: Lane) -> int:
        return lane.max_rows

    def selected(self, lane: Lane[R]) -> list[R]:
        return list(lane.running)

    def forecast_ticks(self, lane: Lane) -> tuple[list[int], list[int]]:
        active = [(r.job.spec.rows, r.steps_left) for r in lane.running]
        queued = [(job.spec.rows, job.spec.evaluations) for job in lane.pending]
        admitted = admission_ticks(active, queued, lane.max_rows)
        return admitted, admitted  # every running job steps at every tick: admitted is started


@dataclass(frozen=True)
class NarrowFirst(Policy):
    """Each job's deadline is its arrival plus ``slack`` times its time alone (its evaluations times the
    fixed-row chunks its rows fill, at the lane's measured seconds per chunk), and ``wide_slack`` for a
    job wider than one tick's rows (a teacher n=16, 32 rows, on the CPU's 16-row chunk): a narrow job
    rides in a chunk beside others at almost no cost to them, a wide one lengthens every tick it takes,
    so it waits longer, within the 10x bound that docs/speed.md measures.

    A tick evaluates a lane's running jobs in deadline order up to ``tick_rows`` rows (``select``), and
    the waiting job with the earliest deadline enters next. A small job's deadline is near, so its ticks
    stay short instead of carrying every large job's rows; a large job's deadline is fixed when it
    arrives, so however many small jobs keep coming, its turn comes. The models take turns: a tick
    evaluates the model whose selected jobs hold the earliest deadline, and another model only if one of
    its jobs is overdue. A job that skips a tick keeps its state; an image's bytes do not depend on which
    ticks it took (``app.generation.device.FixedRows``)."""

    name: ClassVar[str] = "narrow-first"
    slack: float = 3.0
    wide_slack: float = 7.0

    def enqueue(self, lane: Lane, job: Job) -> None:
        slack = self.wide_slack if job.spec.rows > self.tick_rows(lane) else self.slack
        job.deadline = job.submitted + slack * lane.work_s(job)
        keys = [j.deadline for j in lane.pending]
        lane.pending.insert(bisect.bisect_right(keys, job.deadline), job)

    def tick_rows(self, lane: Lane) -> int:
        """``lane.tick_rows`` where set, else one fixed-row chunk (16 rows on the CPU, where bench.load
        measured one chunk against two; on CUDA the chunk is the whole budget), never over ``max_rows``."""
        return min(lane.max_rows, lane.tick_rows or lane.chunk_rows or lane.max_rows)

    def selected(self, lane: Lane[R]) -> list[R]:
        if sum(r.job.spec.rows for r in lane.running) <= self.tick_rows(lane):
            return list(lane.running)
        ordered = sorted(lane.running, key=lambda r: r.job.deadline)
        return [ordered[i] for i in select([r.job.spec.rows for r in ordered], self.tick_rows(lane))]

    def forecast_ticks(self, lane: Lane) -> tuple[list[int], list[int]]:
        running = [(r.job.spec.rows, r.steps_left, r.job.deadline) for r in lane.running]
        waiting = [(job.spec.rows, job.spec.evaluations, job.deadline) for job in lane.pending]
        return deadline_ticks(running, waiting, lane.max_rows, self.tick_rows(lane))

    def turns(self, batches: Sequence[tuple[Lane[R], list[R]]], now: float) -> list[tuple[Lane[R], list[R]]]:
        """The lane holding the earliest deadline, and every other lane with an overdue job (its deadline
        at or before ``now``). A lane left out waits at most until its earliest deadline: then it is
        overdue and goes at every tick."""
        if len(batches) < 2:
            return list(batches)
        heads = [min(r.job.deadline for r in batch) for _, batch in batches]
        first = min(heads)
        return [b for b, head in zip(batches, heads, strict=True) if head == first or head <= now]


POLICIES: dict[str, Policy] = {p.name: p for p in (NarrowFirst(), FirstComeFirstServed())}
DEFAULT_POLICY = NarrowFirst.name  # measured best under load (docs/speed.md)


def policy_named(name: str) -> Policy:
    """The shipped policy called ``name``, or a ValueError naming them."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"scheduler must be one of {', '.join(POLICIES)}, got {name!r}") from None


@dataclass
class Lane(Generic[R]):
    """A model's waiting jobs (in the order its policy admits them) and its running ones, within
    ``max_rows`` rows of running jobs and ``queue_size`` waiting jobs. ``chunk_rows``: the fixed-row
    chunk its network runs on (0: none), which a tick's cost is counted in."""

    name: str
    chunk_rows: int
    max_rows: int
    queue_size: int
    policy: Policy = field(default_factory=lambda: POLICIES[DEFAULT_POLICY])
    tick_rows: int | None = None  # most rows one tick evaluates, where the policy bounds it; None: its default
    # Rows a tick gives background work while no interactive job runs (at least one tick's); None: one tick's.
    # More fills the device better when it is idle, and is what an interactive request arriving mid-tick waits for.
    idle_background_rows: int | None = None
    pending: deque[Job] = field(default_factory=deque)
    running: list[R] = field(default_factory=list)
    background_pending: deque[Job] = field(default_factory=deque)
    background: list[R] = field(default_factory=list)  # running background jobs, oldest first
    chunk_s: float = 0.0  # moving average of one fixed-row chunk's evaluation, for deadlines

    def __post_init__(self) -> None:
        if self.tick_rows is not None and self.tick_rows < 1:
            raise ValueError(f"tick_rows must be >= 1, got {self.tick_rows}")

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.queue_size

    @property
    def active(self) -> list[R]:
        """Every running job, interactive and background."""
        return [*self.running, *self.background]

    @property
    def waiting(self) -> list[Job]:
        """Every waiting job, interactive and background."""
        return [*self.pending, *self.background_pending]

    def withdraw(self, job: Job) -> None:
        """Take a waiting job out of its queue."""
        (self.background_pending if job.spec.background else self.pending).remove(job)

    def drop(self, r: R) -> bool:
        """Take a running job out of the lane; False if it was not there."""
        for group in (self.running, self.background):
            if r in group:
                group.remove(r)
                return True
        return False

    def clear(self) -> None:
        for group in (self.pending, self.background_pending, self.running, self.background):
            group.clear()

    def chunks(self, rows: int) -> int:
        """Fixed-row chunks that ``rows`` rows fill (rows themselves when chunking is off)."""
        return math.ceil(rows / self.chunk_rows) if self.chunk_rows else rows

    def add(self, job: Job) -> None:
        if job.spec.background:
            job.deadline = math.inf  # after every interactive job, in any policy's order
            self.background_pending.append(job)
        else:
            self.policy.enqueue(self, job)

    @property
    def background_rows(self) -> int:
        """Rows a tick gives background work when there is no interactive work: ``idle_background_rows`` or one
        tick's rows, whichever is more, never over ``max_rows``."""
        return min(self.max_rows, max(self.idle_background_rows or 0, self.policy.tick_rows(self)))

    def admit_background(self) -> list[Job]:
        """Take the waiting background jobs whose rows fit beside the running ones in ``background_rows``."""
        used = sum(r.job.spec.rows for r in self.background)
        taken: list[Job] = []
        while self.background_pending and used + self.background_pending[0].spec.rows <= self.background_rows:
            job = self.background_pending.popleft()
            used += job.spec.rows
            taken.append(job)
        return taken

    def idle_rows(self, rows: int) -> int:
        """Rows a tick of ``rows`` interactive rows leaves idle: its last chunk's padding (none without
        fixed-row chunks), or ``background_rows`` when it has none."""
        if rows == 0:
            return self.background_rows
        return self.chunks(rows) * self.chunk_rows - rows if self.chunk_rows else 0

    def fill(self, selected: list[R]) -> list[R]:
        """``selected`` and the running background jobs that fit in the rows it leaves idle, oldest first."""
        room = self.idle_rows(sum(r.job.spec.rows for r in selected))
        taken = list(selected)
        for r in self.background:
            if r.job.spec.rows <= room:
                taken.append(r)
                room -= r.job.spec.rows
        return taken

    def work_s(self, job: Job) -> float:
        """A job's time alone: its evaluations times the chunks its rows fill, at the measured chunk time."""
        return job.spec.evaluations * self.chunks(job.spec.rows) * (self.chunk_s or DEFAULT_TICK_S)

    def admissible(self) -> list[Job]:
        """Take the waiting jobs that may enter now: the head of the queue enters when its rows fit
        beside the running jobs', and nobody overtakes it, even a job that would fit."""
        used = sum(r.job.spec.rows for r in self.running)
        taken: list[Job] = []
        while self.pending and used + self.pending[0].spec.rows <= self.max_rows:
            job = self.pending.popleft()
            used += job.spec.rows
            taken.append(job)
        return taken

    def selected(self) -> list[R]:
        return self.policy.selected(self)

    def observe(self, seconds: float, rows: int) -> None:
        """One evaluation of this lane's network over ``rows`` rows took ``seconds``."""
        per_chunk = seconds / max(1, self.chunks(rows))
        self.chunk_s = per_chunk if self.chunk_s == 0 else 0.8 * self.chunk_s + 0.2 * per_chunk

    def forecast(self, tick_s: float) -> tuple[list[float], list[float]]:
        """Seconds from now until each waiting job is admitted by this lane's policy, and until its first
        step (its start), at ``tick_s`` per tick (the measured tick time; 0 before the first tick), if
        no other job arrived. It follows this lane alone: the ticks another model takes alone under
        ``narrow-first`` are in the measured tick time, not in the replay."""
        tick = tick_s or DEFAULT_TICK_S
        admitted, started = self.policy.forecast_ticks(self)
        return [t * tick for t in admitted], [t * tick for t in started]

    def retry_after(self, tick_s: float) -> int:
        """Whole seconds until the head of the queue is admitted, which frees a place in the queue."""
        admitted, _ = self.forecast(tick_s)
        return max(1, math.ceil(admitted[0] if admitted else tick_s))


def plan_tick(
    lanes: Iterable[Lane[R]], now: float, begin: Callable[[Lane[R], Job], R]
) -> tuple[list[tuple[Lane[R], Job]], list[tuple[Lane[R], list[R]]]]:
    """One tick's plan: every lane admits what its policy lets in (``begin`` turns an admitted job into a
    running one, which joins the lane), selects the running jobs the tick evaluates, and the policy's
    ``turns`` picks the models that go; then each lane that goes fills its idle rows with background work.
    A lane with background work alone goes only when no lane has interactive work. Returns the admitted
    jobs and the (lane, jobs) to evaluate."""
    lanes = list(lanes)
    admitted: list[tuple[Lane[R], Job]] = []
    for lane in lanes:
        for job in lane.admissible():
            lane.running.append(begin(lane, job))
            admitted.append((lane, job))
        for job in lane.admit_background():
            lane.background.append(begin(lane, job))
            admitted.append((lane, job))
    selected = [(lane, lane.selected()) for lane in lanes if lane.running]
    if selected:
        chosen = selected[0][0].policy.turns(selected, now)
    else:
        chosen = [(lane, []) for lane in lanes if lane.background]
    return admitted, [(lane, lane.fill(batch)) for lane, batch in chosen]
