"""One model's share of the engine: its queue, its running jobs, and the rule that admits them.

The admission rule and the forecast that queue positions, estimated starts and Retry-After come
from are both here, side by side, so that a policy other than first come, first served is a change
to this module alone (docs/architecture.md explains the policy and why the budget is per model).
The engine calls a lane under its lock only.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import torch

from app.generation.device import Runtime
from app.generation.jobs import Job
from model.samplers import SamplerState

DEFAULT_TICK_S = 0.1  # the tick time assumed for estimates before the first tick is measured


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


@dataclass
class Lane:
    """A model's network, its waiting jobs (oldest first) and its running ones, within ``budget``
    rows per network evaluation and ``queue_size`` waiting jobs."""

    name: str
    runtime: Runtime
    budget: int
    queue_size: int
    pending: deque[Job] = field(default_factory=deque)
    running: list[Running] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.queue_size

    def admissible(self) -> list[Job]:
        """Take the waiting jobs that may enter now: first come, first served, the oldest enters when
        its rows fit beside the running jobs', and nobody overtakes it, even a job that would fit."""
        used = sum(r.job.spec.rows for r in self.running)
        taken: list[Job] = []
        while self.pending and used + self.pending[0].spec.rows <= self.budget:
            job = self.pending.popleft()
            used += job.spec.rows
            taken.append(job)
        return taken

    def forecast(self, tick_s: float) -> list[float]:
        """Seconds from now until each waiting job is admitted by the rule of ``admissible``, at
        ``tick_s`` per tick (the measured tick time; 0 before the first tick)."""
        active = [(r.job.spec.rows, r.steps_left) for r in self.running]
        queued = [(job.spec.rows, job.spec.steps) for job in self.pending]
        tick = tick_s or DEFAULT_TICK_S
        return [ticks * tick for ticks in admission_ticks(active, queued, self.budget)]

    def retry_after(self, tick_s: float) -> int:
        """Whole seconds until the oldest waiting job is admitted, which frees a place in the queue."""
        estimates = self.forecast(tick_s)
        return max(1, math.ceil(estimates[0] if estimates else tick_s))
