"""A dataset's images on disk, in chunks that are each complete before anything says so.

A chunk is one ``.npz`` file (``x`` uint8 (k, 28, 28), ``y`` int64 labels, ``seed`` int64 seeds) of
images ``index * size .. (index + 1) * size - 1``. It is written to a temporary name, flushed to disk
and renamed; only then is a line with its sha256 appended to ``chunks.jsonl`` (and flushed), and only
then does progress count it. A process killed at any point leaves at most an unlisted file, which the
next run discards and draws again; since an image depends only on the spec and its index, the resumed
dataset has the bytes of an uninterrupted run. A listed chunk whose file is gone or whose bytes do not
match its sha256 is a ``ChunkError``: never a silent partial result.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.datasets.spec import DatasetSpec

MANIFEST = "chunks.jsonl"
SPEC = "spec.json"


class ChunkError(RuntimeError):
    """A chunk on disk is missing or corrupt, or the directory belongs to another spec."""


def fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file, flushed to disk, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Chunk:
    index: int
    images: np.ndarray  # uint8 (k, 28, 28)
    labels: np.ndarray  # int64 (k,)
    seeds: np.ndarray  # int64 (k,)


class ChunkStore:
    """The chunks of one spec in ``root``; ``size`` images a chunk (the last may hold fewer)."""

    def __init__(self, root: str | os.PathLike, spec: DatasetSpec, size: int = 256) -> None:
        if size < 1:
            raise ValueError(f"chunk size must be >= 1, got {size}")
        self.root = Path(root)
        self.spec = spec
        self.size = size
        self.root.mkdir(parents=True, exist_ok=True)
        spec_path = self.root / SPEC
        mine = {"spec": spec.to_json(), "chunk_size": size}
        if spec_path.exists():
            theirs = json.loads(spec_path.read_text())
            if theirs != mine:
                raise ChunkError(f"{self.root} holds another dataset ({theirs}); use a new directory")
        else:
            fsync_write(spec_path, (json.dumps(mine, indent=2) + "\n").encode())

    @property
    def count(self) -> int:
        """Chunks the spec needs."""
        return -(-self.spec.total // self.size)

    def bounds(self, index: int) -> tuple[int, int]:
        """The image indices chunk ``index`` holds: lo..hi-1."""
        if not 0 <= index < self.count:
            raise IndexError(f"chunk {index} of {self.count}")
        lo = index * self.size
        return lo, min(lo + self.size, self.spec.total)

    def path(self, index: int) -> Path:
        return self.root / f"chunk-{index:06d}.npz"

    def committed(self) -> dict[int, str]:
        """The listed chunks and their sha256, from the manifest (a torn last line was never committed)."""
        out: dict[int, str] = {}
        manifest = self.root / MANIFEST
        if not manifest.exists():
            return out
        for line in manifest.read_text().splitlines():
            try:
                entry = json.loads(line)
                out[int(entry["index"])] = str(entry["sha256"])
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def missing(self) -> list[int]:
        done = self.committed()
        return [i for i in range(self.count) if i not in done]

    def images_done(self) -> int:
        return sum(hi - lo for lo, hi in map(self.bounds, self.committed()))

    def write(self, chunk: Chunk) -> str:
        """Commit one chunk: its file, flushed and renamed, then its manifest line. Returns its sha256."""
        lo, hi = self.bounds(chunk.index)
        if chunk.images.shape != (hi - lo, 28, 28) or chunk.images.dtype != np.uint8:
            raise ValueError(f"chunk {chunk.index} must be uint8 ({hi - lo}, 28, 28), got {chunk.images.shape}")
        buf = io.BytesIO()
        np.savez(buf, x=chunk.images, y=chunk.labels, seed=chunk.seeds)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        fsync_write(self.path(chunk.index), data)
        manifest = self.root / MANIFEST
        torn = manifest.exists() and manifest.stat().st_size > 0 and not manifest.read_bytes().endswith(b"\n")
        with open(manifest, "a") as f:
            # A run killed mid-line left a torn last line: end it, so this line stands on its own.
            f.write(("\n" if torn else "") + json.dumps({"index": chunk.index, "sha256": digest}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return digest

    def read(self, index: int, sha256: str | None = None) -> Chunk:
        """One committed chunk, checked against its sha256."""
        expected = sha256 or self.committed().get(index)
        if expected is None:
            raise ChunkError(f"chunk {index} of {self.root} is not committed")
        try:
            data = self.path(index).read_bytes()
        except OSError as err:
            raise ChunkError(f"chunk {index} of {self.root} is unreadable: {err}") from err
        if hashlib.sha256(data).hexdigest() != expected:
            raise ChunkError(f"chunk {index} of {self.root} is corrupt: its sha256 does not match the manifest")
        with np.load(io.BytesIO(data)) as z:
            return Chunk(index, z["x"], z["y"], z["seed"])

    def chunks(self) -> Iterator[Chunk]:
        """Every chunk in order, checked; the dataset must be complete."""
        done = self.committed()
        if len(done) < self.count:
            raise ChunkError(f"{self.root} has {len(done)} of {self.count} chunks; the dataset is not complete")
        for i in range(self.count):
            yield self.read(i, done[i])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole dataset: uint8 (N, 28, 28) images and int64 (N,) labels."""
        parts = list(self.chunks())
        return np.concatenate([c.images for c in parts]), np.concatenate([c.labels for c in parts])
