"""Drawing a dataset on Ray Data: the chunks a store is missing go to a pool of actors, each holding the
model (loaded once, as the service loads it) on its own device, and come back to the driver, which
commits them to the same ``ChunkStore`` as a single-process ``draw.fill``.

    ray.data.from_items(missing chunks) -> map_batches(ChunkDrawer, concurrency=workers, num_gpus=...)
        -> the driver: store.write(chunk) as each chunk is complete

The actors return arrays and the driver alone writes, rather than each actor writing its own chunk
files: an image is 784 bytes, so a whole 60,000-image dataset is 47 MB through the object store,
nothing next to the sampling that made it; one writer keeps ``chunks.jsonl`` append-only with a single
appender, as ``ChunkStore`` assumes, and needs no filesystem shared by the nodes; and the chunk bytes
come from the one ``ChunkStore.write``, so they are those of ``draw.fill`` by construction (image i
depends only on the spec and i, ``app.datasets.spec``). Chunks are committed in the order they finish,
so a killed run resumes, on Ray or in one process, from whatever was committed.

The bytes are the same only where the runtime is: every actor must draw on the same kind of device at
the same precision. Give ``--device`` and ``--precision`` explicitly on a cluster whose nodes differ;
the runtimes that drew a dataset are returned (and go into its card), so a mixture is visible.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray.data
from tqdm import tqdm

from app.datasets.draw import draw, load_model
from app.datasets.spec import DatasetSpec
from app.datasets.store import Chunk, ChunkStore


class ChunkDrawer:
    """One Ray Data actor: the model loaded once, then whole chunks drawn with ``draw.draw``."""

    def __init__(self, weights: str, spec: DatasetSpec, device: str = "auto", precision: str = "auto") -> None:
        self.model = load_model(weights, device, precision)
        if self.model.name != spec.model:
            raise ValueError(f"weights {weights} are model {self.model.name}, but the dataset is of {spec.model}")
        self.spec = spec
        self.runtime = json.dumps(self.model.runtime.describe(), sort_keys=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Chunks (``chunk``, ``lo``, ``hi``) -> one row per image: its chunk, image, label, seed, and the
        runtime that drew it."""
        bounds = list(zip(batch["chunk"].tolist(), batch["lo"].tolist(), batch["hi"].tolist(), strict=True))
        n = sum(hi - lo for _, lo, hi in bounds)
        return {
            "chunk": np.concatenate([np.full(hi - lo, index, np.int64) for index, lo, hi in bounds]),
            "image": np.concatenate([draw(self.model, self.spec, lo, hi) for _, lo, hi in bounds]),
            "label": np.concatenate([self.spec.labels(lo, hi) for _, lo, hi in bounds]),
            "seed": np.concatenate([self.spec.seeds(lo, hi) for _, lo, hi in bounds]),
            "runtime": np.array([self.runtime] * n),
        }


def completed_chunks(store: ChunkStore, batches: Iterator[dict[str, np.ndarray]]) -> Iterator[Chunk]:
    """Rows of any chunks in any grouping and order -> each chunk once all its rows came, in image order."""
    parts: dict[int, list[dict[str, np.ndarray]]] = {}
    for batch in batches:
        for index in np.unique(batch["chunk"]).tolist():
            mine = batch["chunk"] == index
            parts.setdefault(index, []).append({k: batch[k][mine] for k in ("image", "label", "seed")})
            lo, hi = store.bounds(index)
            if sum(len(p["seed"]) for p in parts[index]) < hi - lo:
                continue
            done = parts.pop(index)
            rows = {k: np.concatenate([p[k] for p in done]) for k in ("image", "label", "seed")}
            order = np.argsort(rows["seed"], kind="stable")  # seeds rise with the image index
            yield Chunk(index, rows["image"][order], rows["label"][order], rows["seed"][order])
    if parts:
        raise RuntimeError(f"Ray Data returned chunks {sorted(parts)} incomplete")


def fill_on_ray(
    store: ChunkStore,
    weights: str | Path,
    *,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Draw and commit every chunk ``store`` is missing on ``workers`` Ray actors (``gpus_per_worker`` GPUs
    each; 0: CPU actors of one core), on the Ray cluster this process is connected to (``ray.init``, or
    one it starts). Returns the distinct runtimes that drew them."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if gpus_per_worker < 0:
        raise ValueError(f"gpus_per_worker must be >= 0, got {gpus_per_worker}")
    missing = store.missing()
    if not missing:
        return []
    items = [{"chunk": i, "lo": lo, "hi": hi} for i in missing for lo, hi in [store.bounds(i)]]
    resources: dict[str, Any] = {"num_gpus": gpus_per_worker} if gpus_per_worker else {"num_cpus": 1}
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ChunkDrawer,
        fn_constructor_kwargs={"weights": str(weights), "spec": store.spec, "device": device, "precision": precision},
        batch_size=1,  # a chunk at a time: each is committed as soon as it is drawn
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        **resources,
    )
    runtimes: set[str] = set()

    def batches() -> Generator[dict[str, np.ndarray]]:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            runtimes.update(batch["runtime"].tolist())
            yield batch

    bar = tqdm(total=store.spec.total, initial=store.images_done(), unit="img", disable=not progress)
    rows = batches()
    try:
        for chunk in completed_chunks(store, rows):
            store.write(chunk)
            bar.update(len(chunk.seeds))
    finally:
        rows.close()  # stops the dataset's execution now, not whenever the generator is collected
        bar.close()
    return [json.loads(r) for r in sorted(runtimes)]
