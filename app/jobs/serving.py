"""From a request to a job, and everything a route asks of one: the status, the list, cancel, delete,
the result file and the event stream.

``Jobs`` is what the lifespan puts on ``app.state.jobs``. It opens its job store (``app.jobs.store``)
at startup when ``FASHION_JOB_DIR`` exists, else at the first ``POST /jobs``, so a service that never
gets a job writes nothing to disk. Its runner starts after the engine and stops before it.

A job is pinned to the replica that created it: its state is in that replica's SQLite, its files in
that replica's store. Another replica answers 409 ``job_on_other_replica`` naming the holder when the
job's store is under its own ``FASHION_JOB_DIR`` (replicas of one node), and 404 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import re
import secrets
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import anyio
from fastapi import Request
from fastapi.sse import ServerSentEvent

from app.datasets.spec import DatasetSpec
from app.datasets.spec import Sampling as SpecSampling
from app.errors import ApiError, not_ready
from app.fields import SEED_MAX
from app.generation.schemas import GenerateRequestBase
from app.generation.serving import Serving, resolve
from app.jobs import db as jobdb
from app.jobs.db import JobDB, JobRow, NewJob
from app.jobs.results import estimate_bytes
from app.jobs.runner import Runner
from app.jobs.schemas import (
    ACTIVE,
    Deleted,
    JobError,
    JobList,
    JobRequestBase,
    JobStatus,
    ResultOut,
    Sampling,
    WebhookAttempt,
    WebhookOut,
    WebhookPayload,
)
from app.jobs.store import JobStore, holder_of, store_of
from app.jobs.webhooks import EVENTS, Webhooks, check_url
from app.metrics import JOB_STATES, Metrics
from app.settings import Settings
from model.data import NUM_CLASSES

log = logging.getLogger("app")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
EVENTS_IDLE_S = 30.0  # an event stream re-reads the status at least this often


def _time(t: float | None) -> datetime | None:
    return datetime.fromtimestamp(t, UTC) if t is not None else None


def _not_found(job_id: str, where: str) -> ApiError:
    return ApiError(404, f"job_id: no job {job_id!r} {where}", code="job_not_found", param="job_id")


class Jobs:
    """The jobs of this replica (see the module docstring)."""

    def __init__(self, settings: Settings, serving: Serving, metrics: Metrics) -> None:
        self.settings, self.serving, self.metrics = settings, serving, metrics
        self.store: JobStore | None = None
        self.db: JobDB | None = None
        self.runner: Runner | None = None
        self.webhooks: Webhooks | None = None
        self._opening = asyncio.Lock()
        self._change = asyncio.Event()

    # --- life ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume the jobs of an existing job directory (nothing is created when there is none)."""
        if self.settings.job_dir.is_dir():
            try:
                await self._open()
            except ApiError as err:  # the service runs without its jobs; POST /jobs tries again and says why
                log.error("jobs: %s", err.message)

    async def _open(self) -> tuple[JobStore, JobDB, Runner]:
        async with self._opening:
            if self.store is None:
                try:
                    store = await anyio.to_thread.run_sync(JobStore.take, self.settings.job_dir, self.settings.replica)
                except (OSError, RuntimeError) as err:
                    raise not_ready(f"the job store under {self.settings.job_dir} cannot be opened: {err}") from err
                db = JobDB(store.db_path)
                try:
                    await db.counts()  # creates the schema
                except sqlite3.Error as err:
                    await anyio.to_thread.run_sync(db.close)
                    store.close()
                    raise not_ready(f"the job database {store.db_path} cannot be used: {err}") from err
                self.webhooks = Webhooks(db, self.settings, self.metrics, self.changed)
                self.runner = Runner(db, store, self.serving, self.settings, self.metrics, self._moved, self.changed)
                self.store, self.db = store, db
                for row in await db.pending_webhooks():  # what a stop left undelivered
                    await self._send(row)
                self.runner.start()
                await self._gauges()
                log.info("jobs: store %s at %s", store.id, store.root)
        assert self.store is not None and self.db is not None and self.runner is not None
        return self.store, self.db, self.runner

    async def stop(self) -> None:
        """Before the engine stops: the running job stays running in SQLite, webhooks stay pending."""
        if self.runner is not None:
            await self.runner.stop()
        if self.webhooks is not None:
            await self.webhooks.close()
        if self.db is not None:
            await anyio.to_thread.run_sync(self.db.close)
        if self.store is not None:
            self.store.close()

    def changed(self) -> None:
        """A job's status moved: wake the event streams."""
        self._change.set()
        self._change = asyncio.Event()

    async def _gauges(self) -> None:
        if self.db is not None:
            counts = await self.db.counts()
            for state in JOB_STATES:
                self.metrics.jobs_by_state.labels(state).set(counts.get(state, 0))

    async def _moved(self, row: JobRow) -> None:
        """A job started or ended: the gauges, the webhook of one that ended, the streams."""
        await self._gauges()
        if row.state not in ACTIVE:
            await self._send(row)
        self.changed()

    async def _send(self, row: JobRow) -> None:
        if self.db is None or self.webhooks is None or row.webhook_url is None:
            return
        if row.webhook_payload is None:  # fixed once, so every attempt sends the same message
            status = replace_webhook(await self._status(row), None)
            payload = WebhookPayload.model_validate(
                {"type": EVENTS[row.state], "timestamp": datetime.now(UTC), "data": status}
            )
            body = payload.model_dump_json()
            await self.db.set_payload(row.id, body)
            row = replace(row, webhook_payload=body)
        self.webhooks.send(row)

    # --- create ----------------------------------------------------------------------------------

    async def create(self, body: JobRequestBase, key: str | None, request: Request) -> tuple[JobStatus, bool]:
        """The new job (True), or the one ``key`` already names (False)."""
        if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
            raise ApiError(
                422,
                "Idempotency-Key: 1-255 visible ASCII characters (a UUID, say)",
                code="invalid_idempotency_key",
                param="Idempotency-Key",
            )
        if not self.serving.engine.running:
            raise not_ready()
        counts, count_param = self._counts(body)
        spec, fingerprint = self._spec(body, counts)
        if body.format == "parquet" and importlib.util.find_spec("pyarrow") is None:
            raise ApiError(
                422,
                "format: parquet needs pyarrow on the server (pip install 'fashion-diffusion[datasets]')",
                code="format_unavailable",
                param="format",
            )
        url = check_url(body.webhook_url, request, self.settings) if body.webhook_url is not None else None
        store, db, runner = await self._open()
        new = NewJob(
            store.new_id(),
            key,
            fingerprint,
            spec,
            body.format,
            self.settings.job_chunk_images,
            estimate_bytes(spec.total, body.format),
            url,
        )
        try:
            row, created = await db.create(new, self.settings.job_queue_size, self.settings.job_disk_quota_bytes)
        except (jobdb.KeyReused, jobdb.QueueFull, jobdb.OverQuota) as err:
            raise self._refused(err, key, spec, body.format, count_param) from None
        if created:
            runner.wake()
            await self._gauges()
            self.changed()
        return await self._status(row), created

    def _refused(self, err: Exception, key: str | None, spec: DatasetSpec, fmt: str, count_param: str) -> ApiError:
        """The answer to a job the store would not take (``JobDB.create``'s refusals)."""
        if isinstance(err, jobdb.KeyReused):
            return ApiError(
                409,
                f"Idempotency-Key: {key!r} already names job {err.row.id}, created with another request; send the "
                "same request again to get that job, or use a new key",
                code="idempotency_key_reused",
                param="Idempotency-Key",
            )
        if isinstance(err, jobdb.QueueFull):
            return ApiError(
                429,
                f"the job queue is full ({err.queued} jobs wait behind the running one; FASHION_JOB_QUEUE_SIZE="
                f"{self.settings.job_queue_size}); retry in {err.retry_after} s",
                code="job_queue_full",
                headers={"Retry-After": str(err.retry_after)},
            )
        assert isinstance(err, jobdb.OverQuota)
        quota = self.settings.job_disk_quota_bytes
        return ApiError(
            413,
            f"{count_param}: this job of {spec.total} images needs about {err.needed} bytes of disk (its chunks and "
            f"its {fmt} export), and FASHION_JOB_DISK_QUOTA_BYTES={quota} leaves {max(0, quota - err.reserved)} "
            f"({err.reserved} are reserved by the jobs kept now; DELETE /jobs/{{id}} frees a job's)",
            code="disk_quota",
            param=count_param,
        )

    def _counts(self, body: JobRequestBase) -> tuple[tuple[int, ...], str]:
        """Per-class counts from ``counts`` or ``class`` + ``n``, and the field that said how many."""
        one = body.class_ is not None or body.n is not None
        if body.counts is not None and one:
            raise ApiError(422, "counts: give counts, or class and n, not both", code="invalid_value", param="counts")
        if body.counts is not None:
            counts, param = tuple(body.counts), "counts"
        elif body.class_ is None or body.n is None:
            param = "n" if body.class_ is not None else "class" if body.n is not None else "counts"
            raise ApiError(
                422,
                f"{param}: required; give counts ({NUM_CLASSES} per-class numbers), or class and n",
                code="missing",
                param=param,
            )
        else:
            counts, param = tuple(body.n if c == body.class_ else 0 for c in range(NUM_CLASSES)), "n"
        total, most = sum(counts), self.settings.job_max_images
        if total < 1:
            raise ApiError(422, "counts: ask for at least one image", code="invalid_value", param=param)
        if total > most:
            raise ApiError(
                422,
                f"{param}: {total} images; a job may have at most {most} (FASHION_JOB_MAX_IMAGES)",
                code="too_many_images",
                param=param,
            )
        return counts, param

    def _spec(self, body: JobRequestBase, counts: tuple[int, ...]) -> tuple[DatasetSpec, str]:
        """The dataset spec, the model's defaults filled in by ``/generate``'s own resolve (its checks and
        its errors: a model not served, a student's distilled guidance, autoguidance without a guide, steps
        for the sampler), and the fingerprint an idempotency key is held to."""
        label = next(c for c, n in enumerate(counts) if n)
        probe = GenerateRequestBase.model_construct(
            model=body.model,
            class_=label,
            n=1,
            sampler=body.sampler,
            steps=body.steps,
            guidance=body.guidance,
            guidance_method=body.guidance_method,
            seed=0,
        )
        job, params = resolve(probe, self.serving, self.settings)
        sampling = SpecSampling(job.sampler, job.steps, job.guidance, params.guidance_method, job.sigma_min)
        seed = body.seed if body.seed is not None else secrets.randbelow(SEED_MAX + 1)
        spec = DatasetSpec(str(job.model), sampling, counts, seed)
        asked = {
            "spec": replace(spec, seed=0).to_json(),
            "seed": body.seed,
            "format": body.format,
            "webhook_url": body.webhook_url,
        }
        return spec, json.dumps(asked, sort_keys=True, separators=(",", ":"))

    # --- read ------------------------------------------------------------------------------------

    async def _row(self, job_id: str) -> JobRow:
        """The job, or 404; 409 naming the holder for a job of another replica's store beside ours."""
        store_id = store_of(job_id)
        if store_id is None:
            raise _not_found(job_id, "(a job id is 8 hex digits, a dash and 16 more)")
        me = self.settings.replica
        if self.store is None or self.db is None or store_id != self.store.id:
            holder = await anyio.to_thread.run_sync(holder_of, self.settings.job_dir, store_id)
            if holder is None:
                raise _not_found(
                    job_id,
                    f"on replica {me}: jobs are pinned to the replica that created them, and its store "
                    f"{store_id} is not here",
                )
            raise ApiError(
                409,
                f"job_id: job {job_id} is kept by replica {holder} (job store {store_id}); this is replica {me}. A job "
                "is pinned to the replica that created it: retry, and the proxy sends the request to another replica",
                code="job_on_other_replica",
                param="job_id",
                headers={"Retry-After": "1", "X-Job-Replica": holder},
            )
        assert self.db is not None
        row = await self.db.get(job_id)
        if row is None:
            raise _not_found(job_id, f"on replica {me} (deleted, or never created)")
        return row

    async def status(self, job_id: str) -> JobStatus:
        return await self._status(await self._row(job_id))

    async def _status(self, row: JobRow) -> JobStatus:
        assert self.db is not None
        position = max(1, await self.db.position(row)) if row.state == "queued" else None  # 0: just claimed
        attempts = await self.db.attempts(row.id) if row.webhook_url else []
        return status_of(row, self.settings.replica, position, attempts)

    async def page(self, limit: int, after: str | None) -> JobList:
        if self.db is None:
            return JobList(data=[], has_more=False)
        if after is not None:
            await self._row(after)
        rows, more = await self.db.page(limit, after)
        data = [await self._status(row) for row in rows]
        return JobList(data=data, has_more=more, last_id=data[-1].id if data else None)

    # --- cancel, delete --------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> JobStatus:
        """Stop a queued or running job; it keeps what it made (see docs/api.md). 409 for one that ended
        otherwise (a cancel that comes while the last chunk is exported lets it succeed); a cancelled job
        answers as it is."""
        row = await self._stop(await self._row(job_id))
        if row.state in ("succeeded", "failed"):
            raise ApiError(
                409,
                f"job {job_id} has {row.state}; only a queued or running job can be cancelled",
                code="job_finished",
                param="job_id",
            )
        return await self._status(row)

    async def _stop(self, row: JobRow) -> JobRow:
        """Cancel a queued or running job and wait until it has stopped; the job as it is then."""
        job_id = row.id
        assert self.db is not None and self.runner is not None
        if row.state == "queued":
            ended = await self.db.finish(job_id, "cancelled", only_from=("queued",))
            if ended is not None:
                await self._moved(ended)
            row = await self._row(job_id)
        if row.state == "running":
            try:
                stopped = await self.runner.cancel(job_id)
            except TimeoutError:
                raise ApiError(503, f"job {job_id} did not stop in time; try again", code="cancel_timeout") from None
            if not stopped:  # no runner (the engine closed): nothing runs it, so end it here
                ended = await self.db.finish(job_id, "cancelled")
                if ended is not None:
                    await self._moved(ended)
            row = await self._row(job_id)
        return row

    async def delete(self, job_id: str) -> Deleted:
        """Remove a job's row and files; a queued or running job is cancelled first."""
        await self._stop(await self._row(job_id))
        assert self.db is not None and self.store is not None
        await self.db.delete(job_id)
        job_dir = self.store.job_dir(job_id)
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(job_dir, ignore_errors=True))
        await self._gauges()
        self.changed()
        return Deleted(id=job_id)

    # --- result, events --------------------------------------------------------------------------

    async def result(self, job_id: str) -> tuple[Path, JobRow]:
        """The result file of a job that has one; 409 while it has none, 410 when it went missing."""
        row = await self._row(job_id)
        if row.result_file is None:
            if row.state in ACTIVE:
                why = f"it is {row.state} ({row.images_done} of {row.spec.total} images); it has a result once it ends"
            elif row.state == "failed":
                why = f"it failed ({row.error_code}: {row.error_message})"
            else:
                why = "it was cancelled before it committed an image" + (
                    f" ({row.error_message})" if row.error_message else ""
                )
            headers = {"Retry-After": "5"} if row.state in ACTIVE else {}
            raise ApiError(409, f"job {job_id} has no result: {why}", code="no_result", param="job_id", headers=headers)
        assert self.store is not None
        path = self.store.job_dir(job_id) / row.result_file
        if not path.is_file():
            raise ApiError(410, f"job {job_id}: its result file {path} is gone from the disk", code="result_gone")
        return path, row

    async def events(self, job_id: str) -> AsyncIterator[ServerSentEvent]:
        """The job's status as ``status`` events, one per change (a chunk committed, a state, a webhook
        attempt), until the job has ended; ``deleted`` if it is deleted meanwhile."""
        seq, last = 0, None
        while True:
            change = self._change
            try:
                status = await self.status(job_id)
            except ApiError:
                yield ServerSentEvent(event="deleted", id=str(seq), data={"id": job_id})
                return
            if status != last:
                yield ServerSentEvent(event="status", id=str(seq), data=status.model_dump(mode="json"))
                seq, last = seq + 1, status
            if status.state not in ACTIVE:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(change.wait(), EVENTS_IDLE_S)


def replace_webhook(status: JobStatus, webhook: WebhookOut | None) -> JobStatus:
    return status.model_copy(update={"webhook": webhook})


def status_of(row: JobRow, replica: str, position: int | None, attempts: list[jobdb.Attempt]) -> JobStatus:
    """A job as the API shows it."""
    s, url = row.spec, f"/jobs/{row.id}"
    finish = None
    if row.state == "running" and row.rate:
        finish = datetime.fromtimestamp(time.time() + (s.total - row.images_done) / row.rate, UTC)
    result = None
    if row.result_file is not None:
        result = ResultOut(
            url=f"{url}/result",
            file=Path(row.result_file).name,
            format=row.format,
            bytes=row.result_bytes or 0,
            sha256=row.result_sha256 or "",
            images=row.result_images or 0,
            partial=row.result_partial,
        )
    webhook = None
    if row.webhook_url is not None:
        webhook = WebhookOut(
            url=row.webhook_url,
            state=row.webhook_state,  # type: ignore[arg-type]
            attempts=[
                WebhookAttempt(
                    attempt=a.attempt,
                    event=a.event,
                    at=datetime.fromtimestamp(a.at, UTC),
                    status_code=a.status_code,
                    error=a.error,
                )
                for a in attempts
            ],
        )
    return JobStatus(
        id=row.id,
        state=row.state,  # type: ignore[arg-type]
        model=s.model,
        sampling=Sampling.model_validate(s.sampling.__dict__),
        counts=list(s.counts),
        seed=s.seed,
        format=row.format,
        chunk_images=row.chunk_images,
        images_done=row.images_done,
        images_total=s.total,
        images_per_second=round(row.rate, 3) if row.rate else None,
        estimated_finish=finish,
        queue_position=position,
        created=_time(row.created),  # type: ignore[arg-type]
        started=_time(row.started),
        finished=_time(row.finished),
        error=JobError(code=row.error_code, message=row.error_message or "") if row.error_code else None,
        result=result,
        webhook=webhook,
        replica=replica,
        url=url,
        events_url=f"{url}/events",
    )


def check_range(header: str | None, size: int) -> None:
    """Refuse, in the one error shape, a ``Range`` that Starlette's ``FileResponse`` would refuse as plain
    text: another unit (400) or a first byte past the end (416, with ``Content-Range: bytes */size``).
    The ranges themselves (206, several ranges, If-Range) are ``FileResponse``'s."""
    if header is None:
        return
    unit, _, ranges = header.partition("=")
    if unit.strip().lower() != "bytes" or not ranges.strip():
        raise ApiError(400, f"Range: only bytes ranges, e.g. bytes=0-1023; got {header!r}", code="invalid_range")
    for part in ranges.split(","):
        first, dash, _ = part.strip().partition("-")
        if dash and first.strip().isdigit() and int(first) >= size:
            raise ApiError(
                416,
                f"Range: {header!r} starts at or past the end of the {size}-byte file",
                code="range_not_satisfiable",
                headers={"Content-Range": f"bytes */{size}"},
            )
