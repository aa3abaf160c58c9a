"""The step-level engine: every active job shares every network evaluation, whatever its parameters.

One worker thread owns the device and serves one or more models (a teacher and its distilled
student, say). Each *tick* is one network evaluation per model that has active jobs, over the rows
of all of that model's jobs, whatever their sampler, step count, guidance, class or progress: each
row brings its own timestep, a job that guides at that step also brings a null-class row per image,
guidance is combined per job (``model.samplers.Denoiser.rows``), and then every job advances one
step of its own sampler (``model.samplers.step``). So every model with work advances at every tick,
none waits for another's jobs, and a model's rows are never batched with another's. This is the
iteration-level scheduling of LLM servers (Orca, OSDI 2022; vLLM's continuous batching) applied to
diffusion: a job that arrives joins at the next tick, a finished job leaves at once, a cancelled one
at the next tick, and no job waits for another to end.

Each model has its own *lane*: a queue, its running jobs and a row budget of ``max_rows`` rows per
evaluation (a job counts its peak rows, 2 per image when it guides). The budget is per model because
it bounds one network evaluation, and each model's evaluation is its own (its own memory peak, its
own fixed-row chunks); a shared budget would let one model's long jobs hold rows that the other
model's evaluation never uses, and a student's 4-step job would wait for teacher jobs to end. The
price is that a tick runs up to ``max_rows`` rows per model, so with both models busy it takes the
sum of their evaluations. The queue limit (``queue_size``) is per lane too, so a flood of requests
for one model never refuses another's.

Admission is first come, first served within a lane: the oldest waiting job of a model is always
the next of that model to enter, and a later job never overtakes it, even when it would fit, so a
large job gets in as soon as enough rows free up however many small jobs keep arriving, and small
jobs flow past a large *running* job because the budget is shared, not held for the length of a
batch. A job larger than the whole budget is refused at submission (``JobTooLarge``).

Each image keeps its own ``torch.Generator`` and each network runs on fixed-size chunks of rows
(``app.generation.device.FixedRows``), so an image's bytes depend only on its model, seed and parameters,
never on which jobs (of its own model or another) shared its ticks or when it joined.

Threading: ``submit``, ``cancel`` and ``drain`` are called on the event loop and only take a
lock; ticks run on the worker thread; encoding, metrics and delivery to the loop run on the
output thread (``app.generation.output``).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from app.generation.device import Runtime
from app.generation.jobs import (
    EngineClosed,
    EventCallback,
    Job,
    JobCancelled,
    JobResult,
    JobSpec,
    JobTooLarge,
    Queued,
    QueueFull,
)
from app.generation.output import Output
from app.metrics import Evaluation, Observer
from model.samplers import SamplerState, generators_from_seeds, start, step, to_uint8

log = logging.getLogger("app")

DEFAULT_TICK_S = 0.1  # the tick time assumed for estimates before the first tick is measured


@dataclass
class _Running:
    """An admitted job and its trajectories."""

    job: Job
    state: SamplerState
    labels: torch.Tensor  # (n,)


@dataclass
class _Lane:
    """One model's share of the engine: its network, its queue and its running jobs."""

    name: str
    runtime: Runtime
    pending: deque[Job] = field(default_factory=deque)
    running: list[_Running] = field(default_factory=list)


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


class Engine:
    """Owns the device through one worker thread; see the module docstring. ``runtimes`` names the
    models it serves, in order: a job that names no model (``JobSpec.model`` None) goes to the first."""

    def __init__(
        self, runtimes: Mapping[str, Runtime], observer: Observer, *, queue_size: int = 64, max_rows: int = 128
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if not runtimes:
            raise ValueError("the engine needs at least one model")
        self.runtimes = dict(runtimes)
        self.observer = observer
        self.queue_size = queue_size  # per model
        self.max_rows = max_rows  # per model and evaluation
        self._lanes = {name: _Lane(name, runtime) for name, runtime in self.runtimes.items()}
        self._cond = threading.Condition()
        self._closing = False
        self._drain_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._output = Output(observer)
        self._tick_s = 0.0  # moving average of the tick's wall time (every model's part), for estimates

    # --- event-loop side ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._work, name="fashion-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """Accepting jobs: started, and neither draining nor stopped."""
        alive = self._thread is not None and self._thread.is_alive()
        return alive and not self._closing and self._drain_deadline is None

    @property
    def queue_depth(self) -> int:
        """Jobs waiting, every model's."""
        return sum(len(lane.pending) for lane in self._lanes.values())

    def queue_depth_of(self, model: str) -> int:
        """Jobs waiting for room in this model's row budget."""
        return len(self._lane(model).pending)

    def submit(
        self,
        spec: JobSpec,
        *,
        on_event: EventCallback | None = None,
        preview_every: int = 0,
        record: bool = True,
    ) -> Job:
        """Queue a job (on the event loop). Raises JobTooLarge for a job over the row budget,
        QueueFull at once when ``queue_size`` jobs of its model wait, EngineClosed when stopping or
        draining, and ValueError for a model the engine does not serve."""
        lane = self._lane(spec.model)
        spec = replace(spec, model=lane.name)
        if spec.rows > self.max_rows:
            raise JobTooLarge(spec.rows, self.max_rows, spec.n)
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._closing or self._thread is None or self._drain_deadline is not None:
                raise EngineClosed("the server is shutting down" if self._thread else "the engine is not running")
            if record and len(lane.pending) >= self.queue_size:
                self._output.call(self.observer.rejected, "queue_full")
                raise QueueFull(len(lane.pending), self._retry_after_locked(lane))
            job = Job(spec, loop, on_event, preview_every, record)
            lane.pending.append(job)
            self._report_depth_locked()
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> bool:
        """Ask a job to stop; True if it had not finished. A queued job leaves the queue at once,
        a running one at the next tick, and neither gets any more events."""
        with self._cond:
            if job.state == "queued":
                self._lane(job.model).pending.remove(job)
                job.state = "cancelled"
                job.request_cancel()
                self._output.failed(job, JobCancelled(f"job {job.id} cancelled while queued"), "queued")
                self._report_depth_locked()
                self._cond.notify_all()
                return True
            if job.state == "running":
                job.request_cancel()  # the worker lets it go at the next tick
                return True
            return False

    async def run(self, spec: JobSpec, **kwargs: Any) -> JobResult:
        """Submit and wait; cancels the job if the waiting task is cancelled."""
        job = self.submit(spec, **kwargs)
        try:
            return await job.future
        finally:
            if not job.future.done():
                self.cancel(job)

    def drain(self, seconds: float) -> None:
        """Refuse new jobs, keep running the admitted and queued ones, and fail whatever has not
        finished ``seconds`` from now with EngineClosed."""
        with self._cond:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + seconds
                running = sum(len(lane.running) for lane in self._lanes.values())
                log.info("draining: %d running, %d queued, %.0f s to finish", running, self.queue_depth, seconds)
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, fail the queued and running ones at the next tick, join the worker, and
        deliver everything still on its way."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._cond:  # the worker is gone (or stuck): nothing may stay waiting
            self._fail_all_locked(EngineClosed("the server is shutting down"))
        self._output.close()

    def _lane(self, model: str | None) -> _Lane:
        if model is None:
            return next(iter(self._lanes.values()))
        try:
            return self._lanes[model]
        except KeyError:
            raise ValueError(f"unknown model {model!r}; this engine serves {', '.join(self._lanes)}") from None

    def _estimates_locked(self, lane: _Lane) -> list[float]:
        """Seconds from now until each job queued for this model is admitted, at the measured tick time."""
        active = [(r.job.spec.rows, r.state.total - r.state.index) for r in lane.running]
        queued = [(job.spec.rows, job.spec.steps) for job in lane.pending]
        tick = self._tick_s or DEFAULT_TICK_S
        return [ticks * tick for ticks in admission_ticks(active, queued, self.max_rows)]

    def _retry_after_locked(self, lane: _Lane) -> int:
        """Until the model's oldest waiting job is admitted, which frees a place in its queue."""
        estimates = self._estimates_locked(lane)
        return max(1, math.ceil(estimates[0] if estimates else self._tick_s))

    def _report_depth_locked(self) -> None:
        active = sum(len(lane.running) for lane in self._lanes.values())
        self._output.call(self.observer.depth, self.queue_depth, active)

    # --- worker side ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                if self._closing:
                    self._fail_all_locked(EngineClosed("the server is shutting down"))
                    return
                if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                    self._fail_all_locked(EngineClosed("the server is shutting down: the job did not finish in time"))
                for lane in self._lanes.values():
                    self._release_cancelled_locked(lane)
                    self._admit_locked(lane)
                batches = [(lane, list(lane.running)) for lane in self._lanes.values() if lane.running]
                if not batches:
                    self._cond.wait(timeout=self._idle_wait_locked())
                    continue
            self._tick(batches)

    def _idle_wait_locked(self) -> float | None:
        if self._drain_deadline is not None and self.queue_depth:
            return max(0.0, self._drain_deadline - time.monotonic())
        return None

    def _fail_all_locked(self, error: EngineClosed) -> None:
        for lane in self._lanes.values():
            for job in [*lane.pending, *(r.job for r in lane.running)]:
                job.state = "failed"
                self._output.failed(job, error)
            lane.pending.clear()
            lane.running.clear()
        self._output.call(self.observer.depth, 0, 0)

    def _release_cancelled_locked(self, lane: _Lane) -> None:
        for r in [r for r in lane.running if r.job.cancel_requested]:
            lane.running.remove(r)
            r.job.state = "cancelled"
            self._output.failed(r.job, JobCancelled(f"job {r.job.id} cancelled while sampling"), "running")

    def _admit_locked(self, lane: _Lane) -> None:
        """First come, first served: the model's oldest waiting job enters when its rows fit; nobody overtakes it."""
        used = sum(r.job.spec.rows for r in lane.running)
        now = time.monotonic()
        changed = False
        while lane.pending and used + lane.pending[0].spec.rows <= self.max_rows:
            job = lane.pending.popleft()
            spec = job.spec
            schedule, device = lane.runtime.denoiser.schedule, lane.runtime.device
            state = start(spec.sampler, schedule, spec.steps, generators_from_seeds(spec.seeds), device=device)
            labels = torch.full((spec.n,), spec.label, dtype=torch.long, device=device)
            lane.running.append(_Running(job, state, labels))
            job.state, job.admitted = "running", now
            used += spec.rows
            changed = True
            if job.record:
                self._output.call(self.observer.admitted, now - job.submitted)
        if lane.pending:  # tell the ones still waiting where they stand, when that changed
            for position, (job, eta) in enumerate(zip(lane.pending, self._estimates_locked(lane), strict=True), 1):
                if job.position != position:
                    job.position = position
                    self._output.queued(job, Queued(position, eta))
        if changed:
            self._report_depth_locked()

    def _tick(self, batches: list[tuple[_Lane, list[_Running]]]) -> None:
        """One network evaluation per model over the rows of its active jobs, then one step of each job."""
        t0 = time.monotonic()
        evaluations: list[Evaluation] = []
        finished: list[tuple[_Lane, _Running, np.ndarray]] = []
        for lane, batch in batches:
            try:
                rows, done = self._evaluate(lane.runtime, batch)
            except Exception as err:  # never let the worker die with jobs waiting on it; other models go on
                log.exception("a tick of %d jobs of %s failed", len(batch), lane.name)
                with self._cond:
                    for r in batch:
                        if r in lane.running:
                            lane.running.remove(r)
                            r.job.state = "failed"
                            self._output.failed(r.job, err)
                continue
            finished.extend((lane, r, images) for r, images in done)
            if any(r.job.record for r in batch):
                evaluations.append(Evaluation(lane.name, rows, len(batch)))
        elapsed = time.monotonic() - t0
        self._tick_s = elapsed if self._tick_s == 0 else 0.8 * self._tick_s + 0.2 * elapsed
        if evaluations:
            self._output.call(self.observer.tick, tuple(evaluations), elapsed)
        if finished:
            now = time.monotonic()
            with self._cond:
                for lane, r, images in finished:
                    if r not in lane.running:  # stop() gave up on the worker and failed it already
                        continue
                    lane.running.remove(r)
                    if r.job.state == "running":
                        r.job.state = "done"
                        self._output.result(r.job, images, now)
                self._report_depth_locked()

    def _evaluate(self, runtime: Runtime, batch: list[_Running]) -> tuple[int, list[tuple[_Running, np.ndarray]]]:
        """One evaluation of one model's network over its jobs' rows, then one step of each job: the
        rows evaluated (images plus null-class rows), and the jobs that took their last step with
        their images (uint8 (n, 28, 28); copied here, where a device error still fails only this model)."""
        den = runtime.denoiser
        x = torch.cat([r.state.x for r in batch])  # (rows, C, H, W)
        y = torch.cat([r.labels for r in batch])
        ts = [r.state.t for r in batch for _ in range(r.job.spec.n)]
        ws = [r.job.spec.guidance for r in batch for _ in range(r.job.spec.n)]
        with torch.inference_mode(), runtime.autocast():
            eps, x0 = den.rows(x, ts, y, ws)
        images = len(x)
        rows = images + sum(r.job.spec.n for r in batch if den.needs_null_row(r.state.t, r.job.spec.guidance))
        finished: list[tuple[_Running, np.ndarray]] = []
        offset = 0
        for r in batch:
            n, job, before = r.job.spec.n, r.job, r.state
            e, p = eps[offset : offset + n], x0[offset : offset + n]
            offset += n
            r.state = step(before, den.schedule, e, p)
            job.peak_images, job.peak_jobs = max(job.peak_images, images), max(job.peak_jobs, len(batch))
            if job.on_event is not None:
                preview = job.previews_at(before.index, before.total)
                x0_u8 = to_uint8(p.float()) if preview else None
                xt_u8 = to_uint8(before.x.float()) if preview else None
                first = time.monotonic() - job.submitted if before.index == 0 else 0.0
                self._output.step(job, before.index, before.total, before.t, x0_u8, xt_u8, first)
            elif before.index == 0 and job.record:
                self._output.call(self.observer.first_step, time.monotonic() - job.submitted)
            if r.state.done:
                finished.append((r, to_uint8(r.state.x.float())))
        return rows, finished
