"""A job's result: one file to download, made from its committed chunks.

A complete job is exported by ``app.datasets.formats.export`` (its files and ``card.json`` in
``<job>/export/``). A cancelled job's result is the prefix it made, images ``0 .. k-1`` (chunks are
committed in order, and images go class by class, so the prefix is a dataset of its own with the same
seed rule), written by the same format's exporter without a card. A format of one file is served as
that file; a format of several (idx: images and labels) as an uncompressed tar of them, written with
fixed headers so that equal images give equal bytes, like every exporter's output: the result of a job
that was killed and resumed is byte-identical to that of an uninterrupted one.

Everything here blocks (disk, hashing): the runner calls it on a worker thread.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np

from app.datasets.formats import FORMATS, export
from app.datasets.store import ChunkError, ChunkStore, fsync_write
from app.jobs.db import Result

EXPORT = "export"
MEDIA_TYPES = {".npz": "application/zip", ".parquet": "application/vnd.apache.parquet", ".tar": "application/x-tar"}

# Estimated disk bytes per image, for the quota: the chunk files (784 pixels, a label and a seed, npz
# overhead), and each format's export (a PNG per image in parquet; idx also keeps its tar beside it).
CHUNK_BYTES_PER_IMAGE = 850
EXPORT_BYTES_PER_IMAGE = {"npz": 850, "idx": 1700, "parquet": 1100}
FIXED_BYTES = 256 * 1024  # a job's spec, manifest, card and headers


def estimate_bytes(images: int, fmt: str) -> int:
    """The disk a job of ``images`` images in format ``fmt`` may use (generous: noise compresses badly)."""
    return FIXED_BYTES + images * (CHUNK_BYTES_PER_IMAGE + EXPORT_BYTES_PER_IMAGE.get(fmt, 2000))


def media_type(file: str) -> str:
    return MEDIA_TYPES.get(Path(file).suffix, "application/octet-stream")


def prefix(store: ChunkStore) -> tuple[np.ndarray, np.ndarray]:
    """The committed chunks from chunk 0 on, as long as they run without a gap, checked and joined."""
    committed = store.committed()
    parts = []
    for index in range(store.count):
        if index not in committed:
            break
        parts.append(store.read(index, committed[index]))
    if not parts:
        return np.empty((0, 28, 28), np.uint8), np.empty((0,), np.int64)
    return np.concatenate([c.images for c in parts]), np.concatenate([c.labels for c in parts])


def tar_bytes(files: dict[str, Path]) -> bytes:
    """An uncompressed tar of ``files`` (name -> path), in name order, with fixed headers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            data = files[name].read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_result(
    store: ChunkStore, job_dir: Path, fmt: str, weights: Path | None = None, runtime: dict[str, str] | None = None
) -> Result | None:
    """The result of the job whose chunks ``store`` holds, in ``job_dir``: the whole dataset when every
    chunk is committed, else the committed prefix (partial); None when not one image was made. ``weights``
    and ``runtime`` (the model's file, the runtime that drew it) go into a complete export's card. Raises
    ChunkError for a corrupt or missing chunk, OSError when the disk fails."""
    out = job_dir / EXPORT
    complete = not store.missing()
    if complete:
        card = export(store, out, (fmt,), weights=weights, drawn_on=[runtime] if runtime else None)
        names = list(card["files"])
        images = int(card["images"])
    else:
        x, y = prefix(store)
        if not len(x):
            return None
        out.mkdir(parents=True, exist_ok=True)
        written = FORMATS[fmt](x, y)
        for name, data in written.items():
            fsync_write(out / name, data)
        names, images = list(written), len(x)
    if not names:
        raise ChunkError(f"exporting {fmt} wrote no file")
    if len(names) == 1:
        path = out / names[0]
    else:
        path = job_dir / f"dataset-{fmt}.tar"
        fsync_write(path, tar_bytes({name: out / name for name in names}))
    return Result(str(path.relative_to(job_dir)), path.stat().st_size, sha256_file(path), images, not complete)
