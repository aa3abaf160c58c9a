"""The step-level engine: every active job shares every network evaluation, whatever its parameters.

One worker thread owns the device and serves one or more models. Each *tick* is one network
evaluation per model that has active jobs (under ``narrow-first`` the models take turns:
``app.generation.lane.turns``), over the rows of all of that model's jobs, whatever their
sampler, step count, guidance, class or progress (``model.samplers.Denoiser.rows``), and then every
job advances one step of its own sampler (``model.samplers.step``). An autoguided model's guide
network is evaluated in the same tick, over the guided rows of the jobs that ask for autoguidance.
A job that arrives joins at the next tick, a finished job leaves at once, a cancelled one at the
next tick. Each model has its own *lane* (``app.generation.lane``): its queue, its running jobs, its
row budget, and the scheduling policy (which job enters, which jobs a tick evaluates) with its
forecast. docs/architecture.md explains the policies and why the budget is per model; docs/speed.md
measures them.

Each image keeps its own ``torch.Generator`` and each network runs on fixed-size chunks of rows
(``app.generation.device.FixedRows``), so an image's bytes depend only on its model, seed and
parameters, never on which jobs shared its ticks or when it joined.

Threading: ``submit``, ``cancel`` and ``drain`` are called on the event loop and only take a
lock; ticks run on the worker thread; whatever a tick produces, and every report for the metrics, is
handed to the output thread (``app.generation.output``), the one caller of the ``Observer``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from app.generation.device import Runtime
from app.generation.editing import edit_evaluations, start_edit
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
from app.generation.lane import DEFAULT_POLICY, Lane, plan_tick, policy_named
from app.generation.metrics import Evaluation, Observer
from app.generation.output import Output
from model.samplers import SamplerState, generators_from_seeds, start, step, to_uint8

log = logging.getLogger("app")


@dataclass
class Running:
    """An admitted job and its trajectories."""

    job: Job
    state: SamplerState
    labels: torch.Tensor  # (n,)

    @property
    def steps_left(self) -> int:
        return self.state.total - self.state.index


class Engine:
    """Owns the device through one worker thread; see the module docstring. ``runtimes`` names the
    models it serves, in order: a job that names no model (``JobSpec.model`` None) goes to the first."""

    def __init__(
        self,
        runtimes: Mapping[str, Runtime],
        observer: Observer,
        *,
        queue_size: int = 64,
        max_rows: int = 128,
        policy: str = DEFAULT_POLICY,
        tick_rows: int | None = None,
        background_rows: int | None = None,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if not runtimes:
            raise ValueError("the engine needs at least one model")
        self.runtimes = dict(runtimes)
        self.queue_size = queue_size  # per model
        self.max_rows = max_rows  # per model and evaluation
        self.policy = policy_named(policy)
        self._lanes: dict[str, Lane[Running]] = {
            name: Lane(name, runtime.rows, max_rows, queue_size, self.policy, tick_rows, background_rows)
            for name, runtime in self.runtimes.items()
        }
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
        if spec.edit is not None:  # its work, counted once, for the lane's deadlines and forecasts
            schedule = self.runtimes[lane.name].denoiser.schedule
            work = edit_evaluations(spec.edit, spec.sampler, spec.steps, schedule)
            spec = replace(spec, edit=replace(spec.edit, work=work))
        if spec.rows > self.max_rows:
            raise JobTooLarge(spec.rows, self.max_rows, spec.n)
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._closing or self._thread is None or self._drain_deadline is not None:
                raise EngineClosed("the server is shutting down" if self._thread else "the engine is not running")
            if record and not spec.background and lane.full:
                self._output.rejected("queue_full")
                raise QueueFull(len(lane.pending), lane.retry_after(self._tick_s))
            job = Job(spec, loop, on_event, preview_every, record)
            lane.add(job)
            self._report_depth_locked()
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> bool:
        """Ask a job to stop; True if it had not finished. A queued job leaves the queue at once,
        a running one at the next tick, and neither gets any more events."""
        with self._cond:
            if job.state == "queued":
                self._lane(job.model).withdraw(job)
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

    async def reported(self) -> None:
        """Wait until the output thread has handled everything handed to it so far: a refusal's count,
        say, which a client that has its 429 may read from /metrics right away."""
        await self._output.barrier()

    async def run(self, spec: JobSpec, **kwargs: Any) -> JobResult:
        """Submit and wait; cancels the job if the waiting task is cancelled."""
        job = self.submit(spec, **kwargs)
        try:
            return await job.future
        finally:
            if not job.future.done():
                self.cancel(job)

    def drain(self, seconds: float) -> None:
        """Refuse new jobs, keep running the admitted and queued interactive ones, and fail whatever has
        not finished ``seconds`` from now with EngineClosed. Background work stops at once (its owner
        resumes it after a restart: ``app.jobs``)."""
        with self._cond:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + seconds
                for lane in self._lanes.values():
                    for job in [*lane.background_pending, *(r.job for r in lane.background)]:
                        job.state = "failed"
                        self._output.failed(job, EngineClosed("the server is shutting down"))
                    lane.background_pending.clear()
                    lane.background.clear()
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

    def _lane(self, model: str | None) -> Lane[Running]:
        if model is None:
            return next(iter(self._lanes.values()))
        try:
            return self._lanes[model]
        except KeyError:
            raise ValueError(f"unknown model {model!r}; this engine serves {', '.join(self._lanes)}") from None

    def _report_depth_locked(self) -> None:
        active = sum(len(lane.active) for lane in self._lanes.values())
        self._output.depth(self.queue_depth, active)

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
                admitted, batches = plan_tick(self._lanes.values(), time.monotonic(), self._begin_locked)
                for lane in self._lanes.values():
                    self._tell_waiting_locked(lane)
                if admitted:
                    self._report_depth_locked()
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
            for job in [*lane.waiting, *(r.job for r in lane.active)]:
                job.state = "failed"
                self._output.failed(job, error)
            lane.clear()
        self._output.depth(0, 0)

    def _release_cancelled_locked(self, lane: Lane[Running]) -> None:
        released = [r for r in lane.active if r.job.cancel_requested]
        for r in released:
            lane.drop(r)
            r.job.state = "cancelled"
            self._output.failed(r.job, JobCancelled(f"job {r.job.id} cancelled while sampling"), "running")
        if released:  # the active count changed, whether or not anything is admitted next
            self._report_depth_locked()

    def _begin_locked(self, lane: Lane[Running], job: Job) -> Running:
        """An admitted job's trajectories: x_T from each image's seed, on the model's device."""
        spec, runtime = job.spec, self.runtimes[lane.name]
        gens = generators_from_seeds(spec.seeds)
        schedule, device = runtime.denoiser.schedule, runtime.device
        if spec.edit is None:
            state = start(spec.sampler, schedule, spec.steps, gens, device=device, sigma_min=spec.sigma_min)
        else:
            state = start_edit(spec.edit, spec.sampler, schedule, spec.steps, gens, device, spec.sigma_min)
        labels = torch.full((spec.n,), spec.label, dtype=torch.long, device=device)
        job.state, job.admitted = "running", time.monotonic()
        self._output.admitted(job)
        return Running(job, state, labels)

    def _tell_waiting_locked(self, lane: Lane[Running]) -> None:
        """Tell the jobs still waiting where they stand, when their place changed."""
        if not lane.pending:
            return
        _, starts = lane.forecast(self._tick_s)
        for position, (job, eta) in enumerate(zip(lane.pending, starts, strict=True), 1):
            if job.position != position:
                job.position = position
                self._output.queued(job, Queued(position, eta))

    def _tick(self, batches: list[tuple[Lane[Running], list[Running]]]) -> None:
        """One network evaluation per model over the rows of the jobs its lane selected, then one step of each."""
        t0 = time.monotonic()
        evaluations: list[Evaluation] = []
        finished: list[tuple[Lane[Running], Running, np.ndarray]] = []
        for lane, batch in batches:
            started = time.monotonic()
            try:
                rows, done = self._evaluate(self.runtimes[lane.name], batch)
            except Exception as err:  # never let the worker die with jobs waiting on it; other models go on
                log.exception("a tick of %d jobs of %s failed", len(batch), lane.name)
                with self._cond:
                    for r in batch:
                        if lane.drop(r):
                            r.job.state = "failed"
                            self._output.failed(r.job, err)
                continue
            with self._cond:
                lane.observe(time.monotonic() - started, rows)
            finished.extend((lane, r, images) for r, images in done)
            if any(r.job.record for r in batch):
                background = sum(r.job.spec.rows for r in batch if r.job.spec.background)
                evaluations.append(Evaluation(lane.name, rows, len(batch), background))
        elapsed = time.monotonic() - t0
        self._tick_s = elapsed if self._tick_s == 0 else 0.8 * self._tick_s + 0.2 * elapsed
        if evaluations:
            self._output.tick(tuple(evaluations), elapsed)
        if finished:
            now = time.monotonic()
            with self._cond:
                for lane, r, images in finished:
                    if not lane.drop(r):  # stop() gave up on the worker and failed it already
                        continue
                    if r.job.state == "running":
                        r.job.state = "done"
                        self._output.result(r.job, images, now)
                self._report_depth_locked()

    def _evaluate(self, runtime: Runtime, batch: list[Running]) -> tuple[int, list[tuple[Running, np.ndarray]]]:
        """One evaluation of one model's network over its jobs' rows, then one step of each job: the
        rows evaluated (images plus reference rows: null-class rows, and the guide network's for autoguided
        jobs, evaluated in the same tick), and the jobs that took their last step with
        their images (uint8 (n, 28, 28); copied here, where a device error still fails only this model)."""
        den = runtime.denoiser
        x = torch.cat([r.state.x for r in batch])  # (rows, C, H, W)
        y = torch.cat([r.labels for r in batch])
        ts = [r.state.t for r in batch for _ in range(r.job.spec.n)]
        ws = [r.job.spec.guidance for r in batch for _ in range(r.job.spec.n)]
        autos = [r.job.spec.autoguide for r in batch for _ in range(r.job.spec.n)]
        with torch.inference_mode(), runtime.autocast():
            eps, x0 = den.rows(x, ts, y, ws, autos)
        images = len(x)
        rows = images + sum(r.job.spec.n for r in batch if den.needs_null_row(r.state.t, r.job.spec.guidance))
        finished: list[tuple[Running, np.ndarray]] = []
        offset = 0
        for r in batch:
            n, job, before = r.job.spec.n, r.job, r.state
            e, p = eps[offset : offset + n], x0[offset : offset + n]
            offset += n
            r.state = step(before, den.schedule, e, p)
            job.peak_images, job.peak_jobs = max(job.peak_images, images), max(job.peak_jobs, len(batch))
            preview = job.on_event is not None and job.previews_at(before.index, before.total)
            x0_u8 = to_uint8(p.float()) if preview else None
            xt_u8 = to_uint8(before.x.float()) if preview else None
            if job.on_event is not None or before.index == 0:  # events, or the first step's timing
                first = time.monotonic() - job.submitted if before.index == 0 else 0.0
                self._output.stepped(job, before.index, before.total, before.t, x0_u8, xt_u8, first)
            if r.state.done:  # an inversion ends on its latents (float32 (n, 1, 28, 28)), every other job on images
                inverted = job.spec.edit is not None and job.spec.edit.kind == "invert"
                finished.append((r, r.state.x.float().cpu().numpy() if inverted else to_uint8(r.state.x.float())))
        return rows, finished
