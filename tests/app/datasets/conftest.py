"""A tiny dataset for the dataset tests: the session's tiny network (``app_weights``) loaded as the
service loads it, a spec of 2 images a class from its card's defaults, and that spec drawn once in
chunks of 6 (the last holds 2), as the reference every other way of drawing it must equal byte for byte.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from app.datasets.draw import fill, load_model, resolve_sampling
from app.datasets.formats import export
from app.datasets.spec import DatasetSpec, per_class
from app.datasets.store import ChunkStore
from app.generation.models import ServedModel

PER_CLASS = 2
CHUNK = 6
SEED = 100


@pytest.fixture(scope="session")
def model(app_weights: Path) -> ServedModel:
    return load_model(app_weights, "cpu", "float32")


@pytest.fixture(scope="session")
def spec(model: ServedModel) -> DatasetSpec:
    return DatasetSpec(model.name, resolve_sampling(model), per_class(PER_CLASS), SEED)


@pytest.fixture(scope="session")
def drawn(tmp_path_factory: pytest.TempPathFactory, model: ServedModel, spec: DatasetSpec) -> ChunkStore:
    """The spec drawn in one uninterrupted ``fill``; tests copy it (``copy_store``) before changing anything."""
    store = ChunkStore(tmp_path_factory.mktemp("drawn"), spec, CHUNK)
    fill(store, model, progress=False)
    return store


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, drawn: ChunkStore, app_weights: Path) -> tuple[Path, dict]:
    """The reference dataset exported in every format (the model's files in its card): (directory, card)."""
    out = tmp_path_factory.mktemp("exported")
    return out, export(drawn, out, weights=app_weights)


@pytest.fixture
def copy_store(tmp_path: Path):
    """``copy_store(store)``: the same chunks in a fresh directory of this test's."""

    def copy(store: ChunkStore) -> ChunkStore:
        root = shutil.copytree(store.root, tmp_path / f"copy-{store.root.name}")
        return ChunkStore(root, store.spec, store.size)

    return copy


def _chunk_bytes(store: ChunkStore) -> list[bytes]:
    return [store.path(i).read_bytes() for i in range(store.count)]


@pytest.fixture
def chunk_bytes():
    """``chunk_bytes(store)``: every chunk file's bytes, in order."""
    return _chunk_bytes
