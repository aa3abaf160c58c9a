"""The engine's output thread: PNG previews, metrics, and delivery to the event loop.

The device thread only schedules and steps; whatever a job produces (a step's previews as uint8
arrays, its final images, an error) and whatever the metrics should count is handed here and handled
in order on one thread, so a job's events always arrive before its result, a slow PNG encoder never
delays a tick, and this is the one place that calls the ``Observer`` (``app.metrics``). A job's
result carries its images as arrays: the answer encodes what it uses (one PNG per image, or one grid).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from app.generation.jobs import Job, JobResult, Progress, Queued
from app.generation.metrics import Evaluation, Observer
from model.images import grid_png


class Output:
    """One worker thread that turns the device thread's raw outputs into what clients and metrics receive."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fashion-output")

    def close(self) -> None:
        """Deliver everything handed over so far, then stop."""
        self._pool.shutdown(wait=True)

    def _call(self, fn: Callable[..., object], *args: object) -> Future[object] | None:
        """Run ``fn(*args)`` on the output thread, in order with everything handed over before it."""
        with contextlib.suppress(RuntimeError):  # closed: a worker that outlived stop() has nobody to tell
            return self._pool.submit(fn, *args)
        return None

    async def barrier(self) -> None:
        """Return once everything handed over before this call has been handled (at once when closed)."""
        done = self._call(lambda: None)
        if done is not None:
            await asyncio.wrap_future(done)

    # --- handed over by the engine (any thread) ---------------------------------------------------

    def rejected(self, reason: str) -> None:
        self._call(self.observer.rejected, reason)

    def depth(self, queued: int, active: int) -> None:
        self._call(self.observer.depth, queued, active)

    def admitted(self, job: Job) -> None:
        if job.record and job.admitted is not None:
            self._call(self.observer.admitted, job.admitted - job.submitted)

    def tick(self, evaluations: Sequence[Evaluation], seconds: float) -> None:
        """A tick: one evaluation per model with active jobs, ``seconds`` of wall time for all of them."""
        self._call(self.observer.tick, evaluations, seconds)

    def queued(self, job: Job, event: Queued) -> None:
        self._call(self._event, job, event)

    def stepped(
        self, job: Job, index: int, total: int, t: int, x0: np.ndarray | None, xt: np.ndarray | None, first: float
    ) -> None:
        """A step of a job; ``x0`` and ``xt`` are uint8 (n, H, W) on preview steps; ``first`` is the time
        from submission to the end of the job's first step (0 after it)."""
        self._call(self._step, job, index, total, t, x0, xt, first)

    def result(self, job: Job, images: np.ndarray, finished: float) -> None:
        self._call(self._result, job, images, finished)

    def failed(self, job: Job, error: BaseException, stage: str | None = None) -> None:
        """Settle the job with ``error``; ``stage`` ("queued", "running") marks a cancellation."""
        self._call(self._failed, job, error, stage)

    # --- on the output thread --------------------------------------------------------------------

    def _event(self, job: Job, event: Queued | Progress) -> None:
        if not job.cancel_requested:  # a cancelled job gets no more events
            job.emit(event)

    def _step(
        self, job: Job, index: int, total: int, t: int, x0: np.ndarray | None, xt: np.ndarray | None, first: float
    ) -> None:
        if first and job.record:
            self.observer.first_step(first)
        if job.on_event is not None:
            x0_png = grid_png(x0) if x0 is not None else None
            xt_png = grid_png(xt) if xt is not None else None
            self._event(job, Progress(index, total, t, x0_png, xt_png, x0))

    def _result(self, job: Job, images: np.ndarray, finished: float) -> None:
        admitted = job.admitted if job.admitted is not None else finished
        result = JobResult(images, admitted - job.submitted, finished - admitted, job.peak_images, job.peak_jobs)
        if job.record:  # before the future settles, so a client that has its answer sees the metrics moved
            self.observer.done(job)
        job.finish(result)

    def _failed(self, job: Job, error: BaseException, stage: str | None) -> None:
        if job.record:
            if stage is not None:
                self.observer.cancelled(stage)
            else:
                self.observer.failed(error)
        job.finish(error=error)
