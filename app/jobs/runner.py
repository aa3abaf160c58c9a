"""One job at a time, first come first served, drawn in the engine's idle rows and committed chunk by chunk.

A chunk's images go to the engine as *background* engine jobs (``JobSpec(..., background=True)``): a
tick takes the interactive jobs first and gives background work only the rows they leave idle
(``app.generation.lane``), so a job never slows ``/generate``. An engine job has one class, so a chunk
is split where its class changes, and into pieces of at most ``job_piece_images`` images (fewer when one
tick's rows cannot hold them), small enough to ride in the padding of an interactive tick's last chunk;
up to ``job_inflight_rows`` rows of pieces are submitted at once, enough to fill a tick when nothing
interactive runs. Each image keeps its own seed (``spec.seed + index``) and each network runs on
fixed-row chunks (``FixedRows``), so an image's bytes are those that ``app.datasets.draw`` gives it in
one process, whichever pieces shared its ticks.

A chunk is assembled in index order and committed (``ChunkStore.write``: file fsynced, manifest line)
before SQLite's ``images_done`` moves; chunks are committed in order, so what a job made is always a
prefix. When the engine closes (SIGTERM's drain, or shutdown), the runner stops and leaves the job
``running`` in SQLite: the next start resumes it from its last committed chunk. A full disk, a job
directory that vanished, a corrupt chunk or a failed sampling fails the job with its reason, and the
runner goes on with the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio
import numpy as np

from app.datasets.store import Chunk, ChunkError, ChunkStore
from app.generation.jobs import EngineClosed, Job, JobCancelled, JobSpec
from app.generation.serving import Serving
from app.jobs.db import JobDB, JobRow
from app.jobs.results import write_result
from app.jobs.store import JobStore
from app.metrics import Metrics
from app.settings import Settings

log = logging.getLogger("app")
CHUNKS = "chunks"
CANCEL_WAIT_S = 120.0  # a cancel waits this long for the running job to stop (it stops within a tick)


class JobFailed(Exception):
    """A job cannot go on: ``code`` and a message for its status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def failure(err: BaseException, job_dir: Path) -> tuple[str, str]:
    """The (code, message) a job fails with for ``err``."""
    if isinstance(err, JobFailed):
        return err.code, err.message
    if isinstance(err, ChunkError):
        return "chunk_corrupt", f"a chunk on disk is missing or corrupt: {err}"
    if isinstance(err, OSError):
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return "disk_full", f"the disk is full ({errno.errorcode[err.errno]}) under {job_dir}: {err}"
        if isinstance(err, FileNotFoundError) or not job_dir.is_dir():
            return "job_dir_missing", f"the job's directory {job_dir} vanished while it ran ({err})"
        return "io_error", f"writing under {job_dir} failed: {err}"
    return "internal_error", f"{type(err).__name__}: {err}"


def pieces(labels: np.ndarray, size: int) -> list[tuple[int, int]]:
    """(start, stop) offsets that split ``labels`` where the class changes, into runs of at most ``size``."""
    out: list[tuple[int, int]] = []
    start = 0
    for stop in range(1, len(labels) + 1):
        if stop == len(labels) or labels[stop] != labels[start] or stop - start == size:
            out.append((start, stop))
            start = stop
    return out


@dataclass
class Run:
    """The job being drawn now."""

    id: str
    cancel: bool = False
    pieces: dict[Job, tuple[int, int]] = field(default_factory=dict)  # engine job -> its offsets in the chunk


class Runner:
    """Runs the store's jobs one at a time on the event loop; ``moved(row)`` is awaited when a job starts
    and when it ends (``ended`` tells which), ``changed()`` is called whenever its progress moved."""

    def __init__(
        self,
        db: JobDB,
        store: JobStore,
        serving: Serving,
        settings: Settings,
        metrics: Metrics,
        moved: Callable[[JobRow], Awaitable[None]],
        changed: Callable[[], None],
    ) -> None:
        self.db, self.store, self.serving, self.settings, self.metrics = db, store, serving, settings, metrics
        self.moved, self.changed = moved, changed
        self.current: Run | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cancels: dict[str, asyncio.Event] = {}  # job id -> set once its run has stopped

    # --- control ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="fashion-jobs-runner")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        """A job was queued."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop at once; the running job stays ``running`` in SQLite and resumes at the next start."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def cancel(self, job_id: str) -> bool:
        """Stop the running job ``job_id`` and wait until it has (it keeps the chunks it committed); False
        when the runner is not running (then nothing will run it until the next start)."""
        if not self.alive:
            return False
        stopped = self._cancels.setdefault(job_id, asyncio.Event())
        run = self.current
        if run is not None and run.id == job_id:
            self._stop_run(run)
        await asyncio.wait_for(stopped.wait(), CANCEL_WAIT_S)
        return True

    def _stop_run(self, run: Run) -> None:
        run.cancel = True
        for job in list(run.pieces):
            self.serving.engine.cancel(job)

    # --- the loop ----------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                row = await self.db.claim()
            except Exception:  # the database failed: tell the log, try again later, never take the service down
                log.exception("jobs: cannot read the job store")
                await asyncio.sleep(5)
                continue
            if row is None:
                await self._wake.wait()
                continue
            try:
                await self.moved(row)
                await self._run(row)
            except EngineClosed:
                log.info("jobs: the engine closed; job %s resumes at the next start", row.id)
                return
            except Exception:  # SQLite itself failed (a full disk, say): the job stays running; try again later
                log.exception("jobs: job %s could not be recorded", row.id)
                await asyncio.sleep(5)

    async def _run(self, row: JobRow) -> None:
        run = Run(row.id, cancel=row.id in self._cancels)
        self.current = run
        job_dir = self.store.job_dir(row.id)
        ended: JobRow | None = None
        try:
            store = await self._draw(run, row, job_dir)
            state = "cancelled" if run.cancel else "succeeded"
            try:
                model = self.serving.models[row.spec.model]
                facts = (model.path, model.runtime.describe())
                result = await anyio.to_thread.run_sync(write_result, store, job_dir, row.format, *facts)
            except Exception as err:
                if state == "succeeded":
                    raise
                code, message = failure(err, job_dir)  # a cancelled job without its partial result
                ended = await self.db.finish(row.id, state, error=(code, f"no partial result: {message}"))
            else:
                ended = await self.db.finish(row.id, state, result=result)
        except (EngineClosed, asyncio.CancelledError):
            raise
        except Exception as err:
            code, message = failure(err, job_dir)
            log.log(
                logging.ERROR if code == "internal_error" else logging.WARNING, "job %s failed: %s", row.id, message
            )
            ended = await self.db.finish(row.id, "failed", error=(code, message))
        finally:
            for job in list(run.pieces):
                self.serving.engine.cancel(job)
            self.current = None
            stopped = self._cancels.pop(row.id, None)
            if stopped is not None:
                stopped.set()
        if ended is not None:
            await self.moved(ended)

    # --- drawing -------------------------------------------------------------------------------

    async def _draw(self, run: Run, row: JobRow, job_dir: Path) -> ChunkStore:
        """Commit the job's missing chunks in order until it is complete or cancelled; its chunk store."""
        if row.spec.model not in self.serving.models:  # the server restarted with other FASHION_MODELS
            served = ", ".join(self.serving.models)
            raise JobFailed("model_not_served", f"this server no longer serves {row.spec.model} (it serves {served})")
        chunks_dir = job_dir / CHUNKS
        if row.images_done and not chunks_dir.is_dir():
            raise JobFailed("job_dir_missing", f"{row.images_done} images were committed in {chunks_dir}: it is gone")
        store = await anyio.to_thread.run_sync(ChunkStore, chunks_dir, row.spec, row.chunk_images)
        done = await anyio.to_thread.run_sync(store.images_done)
        if done < row.images_done:
            raise JobFailed(
                "job_dir_missing", f"{chunks_dir} lists {done} images, but {row.images_done} were committed there"
            )
        if done != row.images_done:  # killed between a chunk's commit and its progress
            await self.db.progress(row.id, done, None)
        started, first = time.monotonic(), done
        for index in await anyio.to_thread.run_sync(store.missing):
            chunk = None if run.cancel else await self._chunk(run, row, store, index)
            if chunk is None:
                break
            await anyio.to_thread.run_sync(store.write, chunk)
            done += len(chunk.seeds)
            self.metrics.job_images.labels(row.spec.model).inc(len(chunk.seeds))
            await self.db.progress(row.id, done, (done - first) / max(time.monotonic() - started, 1e-6))
            self.changed()
        return store

    def _template(self, row: JobRow) -> JobSpec:
        s = row.spec.sampling
        autoguide = s.guidance_method == "autoguidance"
        return JobSpec(0, (), s.sampler, s.steps, s.guidance, row.spec.model, autoguide, s.sigma_min, background=True)

    def _piece_images(self, template: JobSpec) -> int:
        """Images per piece: ``job_piece_images``, within one tick's rows (the background share of a tick
        under every policy: ``app.generation.lane``), at 2 rows per image when guided."""
        per_image = replace(template, seeds=(0,)).rows
        runtime = self.serving.models[str(template.model)].runtime
        s = self.settings
        tick = min(s.max_rows, s.tick_rows or runtime.rows or s.max_rows)
        return max(1, min(s.job_piece_images, tick // per_image))

    async def _chunk(self, run: Run, row: JobRow, store: ChunkStore, index: int) -> Chunk | None:
        """Chunk ``index`` drawn by the engine in pieces, in index order; None when the job was cancelled."""
        lo, hi = store.bounds(index)
        labels, seeds = row.spec.labels(lo, hi), row.spec.seeds(lo, hi)
        template = self._template(row)
        size = self._piece_images(template)
        rows_per_image = replace(template, seeds=(0,)).rows
        # Enough in flight to fill two ticks of background work, whatever the idle share (Settings.background_rows).
        limit = max(self.settings.job_inflight_rows, size * rows_per_image, 2 * self.settings.background_rows)
        todo = deque(pieces(labels, size))
        images = np.empty((hi - lo, 28, 28), np.uint8)
        while todo or run.pieces:
            in_flight = sum(b - a for a, b in run.pieces.values()) * rows_per_image
            while (
                todo
                and not run.cancel
                and (not run.pieces or in_flight + (todo[0][1] - todo[0][0]) * rows_per_image <= limit)
            ):
                a, b = todo.popleft()
                spec = replace(template, label=int(labels[a]), seeds=tuple(int(s) for s in seeds[a:b]))
                run.pieces[self.serving.engine.submit(spec)] = (a, b)
                in_flight += (b - a) * rows_per_image
            if not run.pieces:
                return None  # cancelled before the next piece
            await asyncio.wait([job.future for job in run.pieces], return_when=asyncio.FIRST_COMPLETED)
            for job in [job for job in run.pieces if job.future.done()]:
                a, b = run.pieces.pop(job)
                try:
                    images[a:b] = job.future.result().images
                except EngineClosed:
                    raise
                except JobCancelled:
                    if not run.cancel:
                        raise JobFailed("sampling_failed", "a piece of the job was cancelled in the engine") from None
                except Exception as err:
                    raise JobFailed("sampling_failed", f"sampling failed: {type(err).__name__}: {err}") from err
        return None if run.cancel else Chunk(index, images, labels, seeds)
