"""The chunk store and the drawing: a killed run resumes to the bytes of an uninterrupted one, a bad chunk
or another dataset is an error, and ``draw`` draws what the service's engine draws."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from app.datasets.draw import draw, fill
from app.datasets.spec import DatasetSpec
from app.datasets.store import MANIFEST, ChunkError, ChunkStore
from app.generation.engine import Engine
from app.generation.jobs import JobSpec
from app.generation.metrics import EngineMetrics
from app.metrics import Metrics

pytestmark = pytest.mark.timeout(120)


class Killed(Exception):
    """Stands for the process dying after a chunk was committed."""


def interrupted(store: ChunkStore, model, chunks: int) -> None:
    """``fill`` killed once ``chunks`` chunks are committed."""

    def die(done: int, total: int) -> None:
        if done >= chunks * store.size:
            raise Killed

    with pytest.raises(Killed):
        fill(store, model, progress=False, on_chunk=die)


def test_a_run_killed_after_a_chunk_and_before_listing_the_next_resumes_to_the_uninterrupted_bytes(
    tmp_path, model, spec, drawn, chunk_bytes
):
    store = ChunkStore(tmp_path / "ds", spec, drawn.size)
    interrupted(store, model, chunks=1)
    assert store.missing() == [1, 2, 3]
    # Killed after chunk 1's rename but before its manifest line, and in the middle of chunk 2's write.
    store.path(1).write_bytes(b"an unlisted chunk: never trusted")
    (store.root / ".chunk-000002.npz.tmp").write_bytes(b"half a chunk")

    fill(ChunkStore(tmp_path / "ds", spec, drawn.size), model, progress=False)
    assert chunk_bytes(store) == chunk_bytes(drawn)
    assert store.committed() == drawn.committed()
    for resumed, whole in zip(store.arrays(), drawn.arrays(), strict=True):
        assert np.array_equal(resumed, whole)


def test_a_run_killed_in_the_middle_of_a_manifest_line_resumes_to_the_uninterrupted_bytes(
    tmp_path, model, spec, drawn, chunk_bytes
):
    store = ChunkStore(tmp_path / "ds", spec, drawn.size)
    interrupted(store, model, chunks=2)
    manifest = store.root / MANIFEST
    with open(manifest, "a") as f:  # chunk 2's line, torn: the process died while appending it
        f.write('{"index": 2, "sha2')
    assert store.missing() == [2, 3]

    fill(ChunkStore(tmp_path / "ds", spec, drawn.size), model, progress=False)
    assert store.missing() == []
    assert chunk_bytes(store) == chunk_bytes(drawn)
    assert np.array_equal(store.arrays()[0], drawn.arrays()[0])


def test_a_corrupt_or_missing_chunk_is_a_chunk_error(drawn, copy_store):
    store = copy_store(drawn)
    data = bytearray(store.path(1).read_bytes())
    data[-40] ^= 0xFF
    store.path(1).write_bytes(bytes(data))
    with pytest.raises(ChunkError, match="chunk 1 .* corrupt"):
        store.read(1)
    with pytest.raises(ChunkError, match="corrupt"):
        store.arrays()
    store.path(2).unlink()
    with pytest.raises(ChunkError, match="chunk 2 .* unreadable"):
        store.read(2)


def test_another_spec_or_chunk_size_in_the_same_directory_is_a_chunk_error(drawn, copy_store):
    store = copy_store(drawn)
    other_seed = DatasetSpec(drawn.spec.model, drawn.spec.sampling, drawn.spec.counts, drawn.spec.seed + 1)
    with pytest.raises(ChunkError, match="holds another dataset"):
        ChunkStore(store.root, other_seed, store.size)
    with pytest.raises(ChunkError, match="holds another dataset"):
        ChunkStore(store.root, store.spec, store.size + 1)
    assert json.loads((store.root / "spec.json").read_text())["spec"] == drawn.spec.to_json()  # left as it was


def test_draw_gives_the_bytes_the_engine_serves_for_the_same_seeds(model, spec):
    s = spec.sampling
    lo, hi = 3, 9  # a slice across three classes, off the chunk boundaries
    labels, seeds = spec.labels(lo, hi), spec.seeds(lo, hi)

    async def serve() -> list[np.ndarray]:
        engine = Engine({model.name: model.runtime}, EngineMetrics(Metrics()))
        engine.start()
        try:
            results = []
            for label in np.unique(labels).tolist():  # a request per class, its images' seeds
                job = JobSpec(label, tuple(seeds[labels == label].tolist()), s.sampler, s.steps, s.guidance, model.name)
                results.append((await engine.run(job)).images)
            return results
        finally:
            await asyncio.to_thread(engine.stop)

    served = np.concatenate(asyncio.run(serve()))
    drawn = draw(model, spec, lo, hi)
    assert drawn.dtype == np.uint8 and drawn.shape == (hi - lo, 28, 28)
    assert np.array_equal(drawn, served)
    assert len({image.tobytes() for image in drawn}) == hi - lo  # distinct images, not one repeated
