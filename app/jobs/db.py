"""The jobs' state in SQLite: one connection on one writer thread, WAL, every change a transaction.

Everything the event loop asks goes through ``JobDB``'s thread (``await db.call(...)`` under the
methods below), so SQLite sees one writer and no lock waits, and a check-then-write (an idempotency
key, the queue limit, the disk quota, a conditional state change) is atomic without SQL locking games.
The chunk files are the truth about progress: ``images_done`` here is only ever moved after a chunk is
committed on disk (``app.datasets.store``), so after a kill it may lag the chunks, never lead them.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from app.datasets.spec import DatasetSpec

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order: the queue's and the list's
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    fingerprint TEXT NOT NULL,              -- the request as given, canonical: a reused key must match it
    spec TEXT NOT NULL,                     -- DatasetSpec.to_json()
    format TEXT NOT NULL,
    chunk_images INTEGER NOT NULL,
    state TEXT NOT NULL,
    images_done INTEGER NOT NULL DEFAULT 0,
    rate REAL,                              -- images per second in its current run
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error_code TEXT,
    error_message TEXT,
    result_file TEXT,
    result_bytes INTEGER,
    result_sha256 TEXT,
    result_images INTEGER,
    result_partial INTEGER,
    estimate_bytes INTEGER NOT NULL,        -- what it reserves of the disk quota
    webhook_url TEXT,
    webhook_state TEXT,                     -- pending | delivered | failed; null until it ends
    webhook_payload TEXT                    -- the body, the same for every attempt
);
CREATE TABLE IF NOT EXISTS webhook_attempts (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    event TEXT NOT NULL,
    at REAL NOT NULL,
    status_code INTEGER,
    error TEXT,
    PRIMARY KEY (job_id, attempt)
);
"""


@dataclass(frozen=True)
class JobRow:
    seq: int
    id: str
    idempotency_key: str | None
    fingerprint: str
    spec: DatasetSpec
    format: str
    chunk_images: int
    state: str
    images_done: int
    rate: float | None
    created: float
    started: float | None
    finished: float | None
    error_code: str | None
    error_message: str | None
    result_file: str | None
    result_bytes: int | None
    result_sha256: str | None
    result_images: int | None
    result_partial: bool
    estimate_bytes: int
    webhook_url: str | None
    webhook_state: str | None
    webhook_payload: str | None

    @classmethod
    def from_sql(cls, row: sqlite3.Row) -> JobRow:
        values = dict(row)
        values["spec"] = DatasetSpec.from_json(json.loads(values["spec"]))
        values["result_partial"] = bool(values["result_partial"])
        return cls(**values)


@dataclass(frozen=True)
class Attempt:
    attempt: int
    event: str
    at: float
    status_code: int | None
    error: str | None


@dataclass(frozen=True)
class NewJob:
    id: str
    idempotency_key: str | None
    fingerprint: str
    spec: DatasetSpec
    format: str
    chunk_images: int
    estimate_bytes: int
    webhook_url: str | None


@dataclass(frozen=True)
class Result:
    file: str  # relative to the job's directory
    bytes: int
    sha256: str
    images: int
    partial: bool


class KeyReused(Exception):
    """An idempotency key already names a job with another request."""

    def __init__(self, row: JobRow) -> None:
        self.row = row


class QueueFull(Exception):
    def __init__(self, queued: int, retry_after: int) -> None:
        self.queued, self.retry_after = queued, retry_after


class OverQuota(Exception):
    def __init__(self, reserved: int, needed: int) -> None:
        self.reserved, self.needed = reserved, needed


class JobDB:
    """The database of one job store, on its own thread (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fashion-jobs-db")
        self._conn: sqlite3.Connection | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` on the writer thread."""
        return await asyncio.wrap_future(self._pool.submit(self._run, fn, *args))

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None)  # autocommit; transactions are explicit
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a state that went out in an answer survives power loss too
            conn.executescript(SCHEMA)
            self._conn = conn
        return fn(self._conn, *args)

    def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._pool.submit(shut).result()
        self._pool.shutdown(wait=True)

    # --- reads ---------------------------------------------------------------------------------

    async def get(self, job_id: str) -> JobRow | None:
        return await self.call(_get, job_id)

    async def page(self, limit: int, after: str | None) -> tuple[list[JobRow], bool]:
        return await self.call(_page, limit, after)

    async def position(self, row: JobRow) -> int:
        """A queued job's place: 1 is next (a running job, resumed first, is not counted)."""
        return await self.call(_position, row.seq)

    async def attempts(self, job_id: str) -> list[Attempt]:
        return await self.call(_attempts, job_id)

    async def counts(self) -> dict[str, int]:
        return await self.call(_counts)

    async def pending_webhooks(self) -> list[JobRow]:
        return await self.call(_pending_webhooks)

    # --- writes --------------------------------------------------------------------------------

    async def create(self, job: NewJob, queue_size: int, quota: int) -> tuple[JobRow, bool]:
        """The new job (True), or the one its idempotency key already names (False). Raises KeyReused,
        QueueFull or OverQuota, all checked in the one transaction that inserts it."""
        return await self.call(_create, job, queue_size, quota, time.time())

    async def claim(self) -> JobRow | None:
        """The job to run next, marked running: a running one first (interrupted), else the oldest queued."""
        return await self.call(_claim, time.time())

    async def progress(self, job_id: str, images_done: int, rate: float | None) -> None:
        await self.call(_progress, job_id, images_done, rate)

    async def finish(
        self,
        job_id: str,
        state: str,
        *,
        error: tuple[str, str] | None = None,
        result: Result | None = None,
        only_from: tuple[str, ...] = ("queued", "running"),
    ) -> JobRow | None:
        """Move a job in one of the states ``only_from`` to ``state``; None when it was in none (or is gone)."""
        return await self.call(_finish, job_id, state, error, result, only_from, time.time())

    async def set_payload(self, job_id: str, payload: str) -> None:
        await self.call(_set_payload, job_id, payload)

    async def attempt(self, job_id: str, attempt: Attempt, state: str) -> None:
        await self.call(_attempt, job_id, attempt, state)

    async def delete(self, job_id: str) -> None:
        await self.call(_delete, job_id)


# --- on the writer thread ----------------------------------------------------------------------

FINISHED = ("succeeded", "failed", "cancelled")


def _one(conn: sqlite3.Connection, sql: str, *args: Any) -> JobRow | None:
    row = conn.execute(sql, args).fetchone()
    return JobRow.from_sql(row) if row is not None else None


def _get(conn: sqlite3.Connection, job_id: str) -> JobRow | None:
    return _one(conn, "SELECT * FROM jobs WHERE id = ?", job_id)


def _page(conn: sqlite3.Connection, limit: int, after: str | None) -> tuple[list[JobRow], bool]:
    below = conn.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone() if after else None
    top = below["seq"] if below is not None else 2**62
    rows = conn.execute("SELECT * FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?", (top, limit + 1)).fetchall()
    return [JobRow.from_sql(r) for r in rows[:limit]], len(rows) > limit


def _position(conn: sqlite3.Connection, seq: int) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq <= ?", (seq,)).fetchone()[0])


def _attempts(conn: sqlite3.Connection, job_id: str) -> list[Attempt]:
    rows = conn.execute(
        "SELECT attempt, event, at, status_code, error FROM webhook_attempts WHERE job_id = ? ORDER BY attempt",
        (job_id,),
    ).fetchall()
    return [Attempt(**dict(r)) for r in rows]


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {r["state"]: r["n"] for r in conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}


def _pending_webhooks(conn: sqlite3.Connection) -> list[JobRow]:
    rows = conn.execute("SELECT * FROM jobs WHERE webhook_state = 'pending' ORDER BY seq").fetchall()
    return [JobRow.from_sql(r) for r in rows]


def _retry_after(conn: sqlite3.Connection) -> int:
    """Seconds until the running job ends at its measured rate (which frees a place in the queue)."""
    running = _one(conn, "SELECT * FROM jobs WHERE state = 'running' ORDER BY seq LIMIT 1")
    if running is None or not running.rate:
        return 60
    return max(1, min(3600, round((running.spec.total - running.images_done) / running.rate)))


def _create(conn: sqlite3.Connection, job: NewJob, queue_size: int, quota: int, now: float) -> tuple[JobRow, bool]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        if job.idempotency_key is not None:
            same = _one(conn, "SELECT * FROM jobs WHERE idempotency_key = ?", job.idempotency_key)
            if same is not None:
                if same.fingerprint != job.fingerprint:
                    raise KeyReused(same)
                conn.execute("COMMIT")
                return same, False
        queued = int(conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0])
        if queued >= queue_size:
            raise QueueFull(queued, _retry_after(conn))
        reserved = int(conn.execute("SELECT COALESCE(SUM(estimate_bytes), 0) FROM jobs").fetchone()[0])
        if reserved + job.estimate_bytes > quota:
            raise OverQuota(reserved, job.estimate_bytes)
        conn.execute(
            "INSERT INTO jobs (id, idempotency_key, fingerprint, spec, format, chunk_images, state, created, "
            "estimate_bytes, webhook_url) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
            (
                job.id,
                job.idempotency_key,
                job.fingerprint,
                job.spec.key(),
                job.format,
                job.chunk_images,
                now,
                job.estimate_bytes,
                job.webhook_url,
            ),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    row = _get(conn, job.id)
    assert row is not None
    return row, True


def _claim(conn: sqlite3.Connection, now: float) -> JobRow | None:
    row = _one(conn, "SELECT * FROM jobs WHERE state = 'running' ORDER BY seq LIMIT 1")
    row = row or _one(conn, "SELECT * FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1")
    if row is None:
        return None
    conn.execute(
        "UPDATE jobs SET state = 'running', started = COALESCE(started, ?), rate = NULL WHERE id = ?", (now, row.id)
    )
    return _get(conn, row.id)


def _progress(conn: sqlite3.Connection, job_id: str, images_done: int, rate: float | None) -> None:
    conn.execute("UPDATE jobs SET images_done = ?, rate = ? WHERE id = ?", (images_done, rate, job_id))


def _finish(
    conn: sqlite3.Connection,
    job_id: str,
    state: str,
    error: tuple[str, str] | None,
    result: Result | None,
    only_from: tuple[str, ...],
    now: float,
) -> JobRow | None:
    code, message = error or (None, None)
    r = result
    states = ", ".join("?" * len(only_from))
    changed = conn.execute(
        "UPDATE jobs SET state = ?, finished = ?, rate = NULL, error_code = ?, error_message = ?, result_file = ?, "
        "result_bytes = ?, result_sha256 = ?, result_images = ?, result_partial = ?, "
        "webhook_state = CASE WHEN webhook_url IS NULL THEN NULL ELSE 'pending' END "
        f"WHERE id = ? AND state IN ({states})",
        (
            state,
            now,
            code,
            message,
            r and r.file,
            r and r.bytes,
            r and r.sha256,
            r and r.images,
            r and int(r.partial),
            job_id,
            *only_from,
        ),
    ).rowcount
    return _get(conn, job_id) if changed else None


def _set_payload(conn: sqlite3.Connection, job_id: str, payload: str) -> None:
    conn.execute("UPDATE jobs SET webhook_payload = ? WHERE id = ?", (payload, job_id))


def _attempt(conn: sqlite3.Connection, job_id: str, a: Attempt, state: str) -> None:
    conn.execute("BEGIN IMMEDIATE")
    if conn.execute("UPDATE jobs SET webhook_state = ? WHERE id = ?", (state, job_id)).rowcount:
        conn.execute(
            "INSERT OR REPLACE INTO webhook_attempts VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, a.attempt, a.event, a.at, a.status_code, a.error),
        )
    conn.execute("COMMIT")


def _delete(conn: sqlite3.Connection, job_id: str) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("DELETE FROM webhook_attempts WHERE job_id = ?", (job_id,))
    conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
    conn.execute("COMMIT")
