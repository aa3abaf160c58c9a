"""What the engine works on: a job's spec, its events and result, and the hand-off to the event loop.

A ``Job`` is created on the event loop by ``Engine.submit``. The engine's threads never touch
asyncio objects directly: events and the result reach the loop through
``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.generation.editing import Edit
from model.samplers import evaluations


class QueueFull(Exception):
    """The queue holds ``queue_size`` jobs already; try again in ``retry_after`` seconds."""

    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(f"the queue is full ({depth} jobs waiting); retry in {retry_after} s")
        self.depth = depth
        self.retry_after = retry_after


class JobTooLarge(ValueError):
    """The job needs more rows in one network evaluation than the engine's row budget."""

    def __init__(self, rows: int, budget: int, n: int) -> None:
        per_image = rows // n
        why = " (each image also needs a null-class row for guidance)" if per_image == 2 else ""
        super().__init__(
            f"n: {n} images need {rows} rows in one network evaluation{why}, and this server evaluates at most "
            f"{budget} (FASHION_MAX_ROWS); allowed: n <= {budget // per_image}"
        )
        self.rows, self.budget = rows, budget


class EngineClosed(Exception):
    """The engine is stopped or draining; no new job can run, or a job could not finish in time."""


class JobCancelled(Exception):
    """The job was cancelled (its client went away) before it finished."""


@dataclass(frozen=True)
class JobSpec:
    """What to sample: ``len(seeds)`` images of class ``label`` with model ``model``; image i is drawn
    from ``seeds[i]``."""

    label: int
    seeds: tuple[int, ...]
    sampler: str
    steps: int
    guidance: float
    model: str | None = None  # a model the engine serves; None: its first (Engine.submit fills it in)
    autoguide: bool = False  # guided rows take their reference from the model's guide network, not the null class
    sigma_min: float | None = None  # heun only: its lowest noise level (None: the schedule's lowest)
    # Background work (a long job's images): it takes only the rows that interactive jobs leave idle in a tick
    # (``app.generation.lane``), waits in its own queue, and never counts toward the interactive queue's limit.
    background: bool = False
    edit: Edit | None = None  # an image-to-image job: what it starts from (app.generation.editing)

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def evaluations(self) -> int:
        """The network evaluations it takes, a tick each: its steps, Heun's two per step; an edit's, as the
        engine counted them when it took the job (``app.generation.editing.edit_evaluations``)."""
        return self.edit.work if self.edit is not None else evaluations(self.sampler, self.steps)

    @property
    def rows(self) -> int:
        """Most rows the job brings to one network evaluation: a reference row per image when it guides (a
        null-class row, or one of the guide network's, which counts the same)."""
        return self.n * (1 if self.guidance == 1.0 else 2)


@dataclass(frozen=True)
class Queued:
    """A job still waiting for room in the row budget."""

    position: int  # 1 = next to be admitted
    estimated_start_s: float  # from now, at the measured tick time


@dataclass(frozen=True)
class Progress:
    """One sampler step of one job."""

    index: int  # 0-based step
    total: int
    t: int  # timestep the network was evaluated at
    x0_png: bytes | None  # grid of the job's x0 predictions, on preview steps only
    xt_png: bytes | None  # grid of the job's x_t, on preview steps only
    x0: np.ndarray | None = None  # uint8 (n, H, W): the x0 predictions themselves, on preview steps only


Event = Queued | Progress
EventCallback = Callable[[Event], Any]


@dataclass(frozen=True)
class JobResult:
    images: np.ndarray  # uint8 (n, 28, 28); the answer encodes the PNGs it uses (an inversion: its float latents)
    queued_s: float  # from submit to admission
    sampling_s: float  # from admission to the last step
    batch_images: int  # most images that shared one network evaluation with this job
    batch_jobs: int  # most jobs that shared one network evaluation with it


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
    """A submitted request: its spec, a future for the result, a cancel flag, and optional events."""

    def __init__(
        self,
        spec: JobSpec,
        loop: asyncio.AbstractEventLoop,
        on_event: EventCallback | None = None,
        preview_every: int = 0,
        record: bool = True,
    ) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.spec = spec
        self.future: asyncio.Future[JobResult] = loop.create_future()
        # A job whose client left may end in JobCancelled that nobody awaits any more; mark such
        # exceptions as seen so asyncio does not log them. Waiters still receive them.
        self.future.add_done_callback(_mark_retrieved)
        self.on_event = on_event  # called on the event loop
        self.preview_every = preview_every  # attach previews every k steps; 0: never
        self.record = record  # False for the warm-up job: it stays out of the metrics
        self.submitted = time.monotonic()
        self.admitted: float | None = None
        self.deadline = 0.0  # monotonic seconds; its lane sets it under the deadline policy
        # queued -> running -> done | cancelled | failed, guarded by the engine's lock
        self.state = "queued"
        self.position = 0  # the last queue position its events reported
        self.peak_images = 0  # most images in one of its ticks
        self.peak_jobs = 0
        self._cancel = threading.Event()
        self._loop = loop

    @property
    def model(self) -> str:
        """The model sampling it (``Engine.submit`` names it in the spec)."""
        assert self.spec.model is not None, "Engine.submit names the model"
        return self.spec.model

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def request_cancel(self) -> None:
        self._cancel.set()

    def previews_at(self, index: int, total: int) -> bool:
        k = self.preview_every
        return bool(k) and ((index + 1) % k == 0 or index + 1 == total)

    def _call_on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(fn, *args)

    def finish(self, result: JobResult | None = None, error: BaseException | None = None) -> None:
        self._call_on_loop(_settle, self.future, result, error)

    def emit(self, event: Event) -> None:
        if self.on_event is not None:
            self._call_on_loop(self.on_event, event)
