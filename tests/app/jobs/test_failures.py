"""What can go wrong on disk fails the job with its reason, never with a silent partial result, and never
takes the service down: a full disk (ENOSPC), a job directory that vanishes, a chunk that is corrupt when
the result is exported. The faults are injected into the real chunk store of a real app."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.datasets.store import Chunk, ChunkStore
from app.main import create_app
from testkit.jobs import ended

pytestmark = pytest.mark.timeout(120)
BODY = {"counts": [4, 4, 4, 4, 0, 0, 0, 0, 0, 0], "seed": 2}  # two chunks of 8


@pytest.fixture
def client(job_settings: Callable, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(job_settings(tmp_path / "jobs", warmup=False))) as c:
        yield c


def after_first_chunk(monkeypatch: pytest.MonkeyPatch, fault: Callable[[ChunkStore, Chunk], None]) -> None:
    """Commit chunk 0 as usual, then call ``fault`` in place of every later commit (or after it)."""
    write = ChunkStore.write

    def faulty(store: ChunkStore, chunk: Chunk) -> str:
        if chunk.index == 0:
            return write(store, chunk)
        fault(store, chunk)
        return write(store, chunk)

    monkeypatch.setattr(ChunkStore, "write", faulty)


def full_disk(store: ChunkStore, chunk: Chunk) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def vanish(store: ChunkStore, chunk: Chunk) -> None:
    shutil.rmtree(store.root.parent)  # the whole job directory


def corrupt_first(store: ChunkStore, chunk: Chunk) -> None:
    data = bytearray(store.path(0).read_bytes())
    data[-20] ^= 0xFF
    store.path(0).write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("fault", "code", "says"),
    [
        (full_disk, "disk_full", "ENOSPC"),
        (vanish, "job_dir_missing", "vanished"),
        (corrupt_first, "chunk_corrupt", "corrupt"),
    ],
)
def test_a_fault_on_disk_fails_the_job_with_its_reason_and_the_service_goes_on(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, fault: Callable, code: str, says: str, error_of: Callable
) -> None:
    after_first_chunk(monkeypatch, fault)
    job = client.post("/jobs", json=BODY).json()
    status = ended(client, job["id"])
    assert status["state"] == "failed" and status["error"]["code"] == code and says in status["error"]["message"]
    assert status["result"] is None  # never a result that is not the whole dataset
    assert error_of(client.get(f"{job['url']}/result"), 409)["code"] == "no_result"

    monkeypatch.undo()
    assert client.get("/healthz").status_code == 200
    follow = client.post("/jobs", json={**BODY, "seed": 3}).json()  # the runner went on
    assert ended(client, follow["id"])["state"] == "succeeded"
    assert client.post("/generate", json={"class": 1, "n": 1}).status_code == 200


def test_a_result_file_that_went_missing_is_410(client: TestClient, tmp_path: Path, error_of: Callable) -> None:
    job = client.post("/jobs", json=BODY).json()
    status = ended(client, job["id"])
    (tmp_path / "jobs" / job["id"] / "export" / status["result"]["file"]).unlink()
    assert error_of(client.get(status["result"]["url"]), 410)["code"] == "result_gone"
