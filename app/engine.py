"""The batching engine: one worker thread owns the device; requests are jobs in a bounded queue.

Jobs that share sampler, steps and guidance are merged into one batch, up to ``max_batch``
images, waiting at most ``batch_wait_s`` after the oldest job arrived for company (the
dynamic batching of Triton's ``max_queue_delay`` and Ray Serve's ``batch_wait_timeout_s``).
Each image keeps its own ``torch.Generator`` and the network runs on fixed-size chunks
(``app.device.FixedRows``), so a job's images do not depend on its batch mates.

Threading: ``submit`` and ``cancel`` are called on the event loop and only take a lock;
sampling runs on the worker thread; results and progress go back to the loop through
``loop.call_soon_threadsafe``. Each job has a cancel flag that the sampler's step callback
checks at every step: a cancelled job gets no more events, and a batch whose jobs are all
cancelled stops within one step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.device import Runtime
from app.metrics import Metrics
from model.images import grid, png_bytes
from model.samplers import SamplingStopped, Step, generators_from_seeds, sample, to_uint8

log = logging.getLogger("app")


class QueueFull(Exception):
    """The queue holds ``queue_size`` jobs already; try again in ``retry_after`` seconds."""

    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(f"the queue is full ({depth} jobs waiting); retry in {retry_after} s")
        self.depth = depth
        self.retry_after = retry_after


class EngineClosed(Exception):
    """The engine is stopped or stopping; no job can run."""


class JobCancelled(Exception):
    """The job was cancelled (its client went away) before it finished."""


@dataclass(frozen=True)
class JobSpec:
    """What to sample: ``len(seeds)`` images of class ``label``; image i is drawn from ``seeds[i]``."""

    label: int
    seeds: tuple[int, ...]
    sampler: str
    steps: int
    guidance: float

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def key(self) -> tuple[str, int, float]:
        """Jobs with equal keys can share a batch: the sampler loop is the same for all their images."""
        return (self.sampler, self.steps, self.guidance)


@dataclass(frozen=True)
class Progress:
    """One sampler step of one job, as its progress callback sees it."""

    index: int  # 0-based step
    total: int
    t: int  # timestep the network was evaluated at
    x0_png: bytes | None  # grid of the job's x0 predictions, on preview steps only
    xt_png: bytes | None  # grid of the job's x_t, on preview steps only


@dataclass(frozen=True)
class JobResult:
    images: np.ndarray  # uint8 (n, 28, 28)
    pngs: tuple[bytes, ...]  # one PNG per image
    queued_s: float  # from submit to the start of its batch
    sampling_s: float  # the whole batch on the device, PNG encoding included
    batch_images: int
    batch_jobs: int


ProgressCallback = Callable[[Progress], Any]


def _settle(future: asyncio.Future[JobResult], result: JobResult | None, error: BaseException | None) -> None:
    if future.done():  # the awaiting request was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


def _mark_retrieved(future: asyncio.Future[JobResult]) -> None:
    if not future.cancelled():
        future.exception()


class Job:
    """A submitted request: its spec, a future for the result, a cancel flag, and optional progress."""

    def __init__(
        self,
        spec: JobSpec,
        loop: asyncio.AbstractEventLoop,
        on_progress: ProgressCallback | None = None,
        preview_every: int = 0,
        record: bool = True,
    ) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.spec = spec
        self.future: asyncio.Future[JobResult] = loop.create_future()
        # A job whose client left may end in JobCancelled that nobody awaits any more; mark such
        # exceptions as seen so asyncio does not log them. Waiters still receive them.
        self.future.add_done_callback(_mark_retrieved)
        self.on_progress = on_progress  # called on the event loop
        self.preview_every = preview_every  # attach previews every k steps; 0: never
        self.record = record  # False for the warm-up job: it stays out of the metrics
        self.submitted = time.monotonic()
        self.state = "queued"  # queued -> running -> done | cancelled | failed (guarded by the engine's lock)
        self._cancel = threading.Event()
        self._loop = loop

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def _call_on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(fn, *args)

    def _finish(self, result: JobResult | None = None, error: BaseException | None = None) -> None:
        self._call_on_loop(_settle, self.future, result, error)

    def _emit(self, progress: Progress) -> None:
        if self.on_progress is not None:
            self._call_on_loop(self.on_progress, progress)


class Engine:
    """Owns the device through one worker thread; see the module docstring."""

    def __init__(
        self,
        runtime: Runtime,
        metrics: Metrics,
        *,
        queue_size: int = 64,
        max_batch: int = 64,
        batch_wait_s: float = 0.005,
    ) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._batch_s = 0.0  # moving average of batch wall time, for Retry-After

    # --- event-loop side ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._work, name="fashion-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def submit(
        self,
        spec: JobSpec,
        *,
        on_progress: ProgressCallback | None = None,
        preview_every: int = 0,
        record: bool = True,
    ) -> Job:
        """Queue a job (on the event loop); raises QueueFull at once when ``queue_size`` jobs wait."""
        if spec.n > self.max_batch:
            raise ValueError(f"a job of {spec.n} images cannot fit a batch of at most {self.max_batch}")
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._closing or self._thread is None:
                raise EngineClosed("the engine is not running")
            if record and len(self._pending) >= self.queue_size:
                self.metrics.jobs_rejected.labels("queue_full").inc()
                raise QueueFull(len(self._pending), self._retry_after())
            job = Job(spec, loop, on_progress, preview_every, record)
            self._pending.append(job)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> bool:
        """Ask a job to stop; True if it had not finished. A queued job leaves the queue at once."""
        with self._cond:
            if job.state == "queued":
                self._pending.remove(job)
                job.state = "cancelled"
                self.metrics.queue_depth.set(len(self._pending))
                self.metrics.jobs_cancelled.labels("queued").inc()
                job._finish(error=JobCancelled(f"job {job.id} cancelled while queued"))
                self._cond.notify_all()
                return True
            if job.state == "running":
                job._cancel.set()  # the worker counts it when its step callback sees the flag
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

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, fail queued ones, stop the running batch at its next step, join the worker."""
        with self._cond:
            self._closing = True
            pending = list(self._pending)
            self._pending.clear()
            for job in pending:
                job.state = "failed"
                job._finish(error=EngineClosed("the server is shutting down"))
            self.metrics.queue_depth.set(0)
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _retry_after(self) -> int:
        queued_images = sum(job.spec.n for job in self._pending)
        estimate = max(self._batch_s, 0.1) * (1 + queued_images / self.max_batch)
        return max(1, math.ceil(estimate))

    # --- worker side ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._execute(batch)
            except BaseException as err:  # never let the worker die with jobs waiting on it
                log.exception("engine batch failed")
                for job in batch:
                    job._finish(error=err)

    def _next_batch(self) -> list[Job] | None:
        """Block for the oldest job, then gather compatible ones until the batch is full or the wait is over."""
        with self._cond:
            while True:
                if self._closing:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                first = self._pending[0]
                chosen: list[Job] = []
                size = 0
                for job in self._pending:
                    if job.spec.key == first.spec.key and size + job.spec.n <= self.max_batch:
                        chosen.append(job)
                        size += job.spec.n
                wait = first.submitted + self.batch_wait_s - time.monotonic()
                if size >= self.max_batch or wait <= 0:
                    for job in chosen:
                        self._pending.remove(job)
                        job.state = "running"
                    self.metrics.queue_depth.set(len(self._pending))
                    self.metrics.jobs_running.set(len(chosen))
                    return chosen
                self._cond.wait(wait)

    def _progress(self, step: Step, job: Job, offset: int) -> Progress:
        k = job.preview_every
        x0_png = xt_png = None
        if k and ((step.index + 1) % k == 0 or step.index + 1 == step.total):
            n = job.spec.n
            ncol = math.ceil(math.sqrt(n))
            x0_png = png_bytes(grid(to_uint8(step.x0_pred[offset : offset + n].float()), ncol))
            xt_png = png_bytes(grid(to_uint8(step.x_t[offset : offset + n].float()), ncol))
        return Progress(step.index, step.total, step.t, x0_png, xt_png)

    def _execute(self, batch: list[Job]) -> None:
        start = time.monotonic()
        record = any(job.record for job in batch)
        spec = batch[0].spec
        offsets = np.cumsum([0] + [job.spec.n for job in batch]).tolist()
        labels = torch.tensor([job.spec.label for job in batch for _ in job.spec.seeds], device=self.runtime.device)
        generators = generators_from_seeds([seed for job in batch for seed in job.spec.seeds])
        dropped: set[int] = set()
        last = start

        def on_step(step: Step) -> bool:
            nonlocal last
            now = time.monotonic()
            if record:
                self.metrics.steps.inc()
                self.metrics.step_duration.observe(now - last)
            last = now
            if self._closing:
                return True
            for k, job in enumerate(batch):
                if k in dropped:
                    continue
                if job.cancel_requested:
                    dropped.add(k)
                    self._drop(job)
                elif job.on_progress is not None:
                    job._emit(self._progress(step, job, offsets[k]))
            return len(dropped) == len(batch)

        images: np.ndarray | None = None
        error: BaseException | None = None
        try:
            with torch.inference_mode(), self.runtime.autocast():
                x = sample(self.runtime.denoiser, labels, generators, spec.sampler, spec.steps, spec.guidance, on_step)
            images = to_uint8(x.float())  # (B, 28, 28)
        except SamplingStopped:
            error = EngineClosed("the server is shutting down")
        except Exception as err:
            log.exception("sampling failed for a batch of %d jobs", len(batch))
            error = err
        live = [(k, job) for k, job in enumerate(batch) if k not in dropped]
        results: dict[int, JobResult] = {}
        if images is not None:
            for k, job in live:
                own = images[offsets[k] : offsets[k + 1]]
                pngs = tuple(png_bytes(img) for img in own)
                results[k] = JobResult(own, pngs, start - job.submitted, 0.0, int(offsets[-1]), len(batch))
        elapsed = time.monotonic() - start
        self._batch_s = elapsed if self._batch_s == 0 else 0.8 * self._batch_s + 0.2 * elapsed
        if record:  # before the futures settle, so a client that has its answer sees the metrics moved
            m = self.metrics
            m.batch_images.observe(offsets[-1])
            m.batch_jobs.observe(len(batch))
            m.batch_duration.observe(elapsed)
            for job in batch:
                m.queue_wait.observe(start - job.submitted)
            for k, job in live:
                if k in results:
                    m.images.labels(spec.sampler).inc(job.spec.n)
                else:
                    m.jobs_failed.labels(type(error).__name__).inc()
        with self._cond:
            self.metrics.jobs_running.set(0)
            for k, job in live:
                if k in results:
                    job.state = "done"
                    res = results[k]
                    job._finish(
                        JobResult(res.images, res.pngs, res.queued_s, elapsed, res.batch_images, res.batch_jobs)
                    )
                else:
                    job.state = "failed"
                    job._finish(error=error)

    def _drop(self, job: Job) -> None:
        """A running job's flag was seen: it gets no more events and its waiter hears JobCancelled."""
        with self._cond:
            job.state = "cancelled"
        if job.record:
            self.metrics.jobs_cancelled.labels("running").inc()
        job._finish(error=JobCancelled(f"job {job.id} cancelled while sampling"))
