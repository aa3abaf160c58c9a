"""The job store a process holds: a directory with ``jobs.sqlite3`` and one directory per job.

A process takes ``FASHION_JOB_DIR`` itself when no other process holds it (an exclusive ``flock`` on its
``lock`` file, held for the process's life and released by the kernel when it dies, SIGKILL included),
else the first free ``replica-<k>`` inside it. So one ``python -m app`` has the plain layout, several
replicas that share a directory (Ray Serve on one node) each keep their own store, and a replica that
restarts takes a free store back and resumes its jobs. A job id starts with its store's id, so a
replica asked about another store's job can say that it is pinned elsewhere, and name the replica that
holds that store when the store is under its own ``FASHION_JOB_DIR``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from app.datasets.store import fsync_write

DB = "jobs.sqlite3"
LOCK = "lock"
IDENTITY = "store.json"  # {"id": ...}: written once
HOLDER = "holder.json"  # {"replica", "pid", "since"}: rewritten by each process that takes the store
MAX_STORES = 64
JOB_ID = re.compile(r"^([0-9a-f]{8})-[0-9a-f]{16}$")


def store_of(job_id: str) -> str | None:
    """The store id a job id starts with; None for a string that is no job id."""
    match = JOB_ID.fullmatch(job_id)
    return match.group(1) if match else None


@dataclass
class JobStore:
    """A held store: its directory, its id and the lock that holds it."""

    base: Path  # FASHION_JOB_DIR
    root: Path  # base itself, or base / replica-<k>
    id: str
    replica: str
    _fd: int

    @classmethod
    def take(cls, base: Path, replica: str) -> JobStore:
        """The first store under ``base`` that no process holds, created if needed. OSError when the
        directory cannot be made; RuntimeError when ``MAX_STORES`` are all held."""
        for k in range(MAX_STORES):
            root = base if k == 0 else base / f"replica-{k}"
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            identity = root / IDENTITY
            if not identity.exists():
                fsync_write(identity, json.dumps({"id": secrets.token_hex(4)}).encode())
            store_id = str(json.loads(identity.read_text())["id"])
            holder = {"replica": replica, "pid": os.getpid(), "since": time.time()}
            fsync_write(root / HOLDER, json.dumps(holder).encode())
            return cls(base, root, store_id, replica, fd)
        raise RuntimeError(f"all {MAX_STORES} job stores under {base} are held by running processes")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)

    @property
    def db_path(self) -> Path:
        return self.root / DB

    def new_id(self) -> str:
        return f"{self.id}-{secrets.token_hex(8)}"

    def job_dir(self, job_id: str) -> Path:
        """Where a job's files go (``job_id`` must be a job id: it names a directory)."""
        assert JOB_ID.fullmatch(job_id), job_id
        return self.root / job_id


def holder_of(base: Path, store_id: str) -> str | None:
    """The replica that holds (or last held) store ``store_id`` under ``base``; None when no store there has
    that id (another node's, say). A replica that holds no store itself can answer it too."""
    for root in [base, *sorted(base.glob("replica-*"))]:
        try:
            if json.loads((root / IDENTITY).read_text())["id"] == store_id:
                return str(json.loads((root / HOLDER).read_text())["replica"])
        except (OSError, ValueError, KeyError):
            continue
    return None
