"""Helpers for tests/model: IDX files in the official format, written from arrays."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from model.data import FILES, NUM_CLASSES


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """The uncompressed IDX encoding of a uint8 array: labels (N,) -> 2049, images (N, H, W) -> 2051."""
    if magic is None:
        magic = 2049 if array.ndim == 1 else 2051
    header = struct.pack(">II", magic, len(array)) + b"".join(struct.pack(">I", d) for d in array.shape[1:])
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def gz(raw: bytes) -> bytes:
    return gzip.compress(raw, compresslevel=1, mtime=0)


def small_dataset(n_train: int = 40, n_test: int = 20) -> dict[str, np.ndarray]:
    """Tiny stand-ins for the four official arrays: every class present, every image distinct."""
    arrays = {}
    for part, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % NUM_CLASSES).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 4:24, 4:24] = (np.arange(n)[:, None, None] * 5 + 20) % 256  # a square whose shade is the index
        images[np.arange(n), 0, labels] = 255  # one bright pixel in the label's column
        arrays[f"{part}_images"], arrays[f"{part}_labels"] = images, labels
    return arrays


def write_dataset(root: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write arrays keyed like model.data.FILES as gzipped IDX files into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for key, name in FILES.items():
        (root / name).write_bytes(gz(idx_bytes(arrays[key])))
    return root


@pytest.fixture
def small_fashion_dir(tmp_path) -> Path:
    """A directory holding four small gzipped IDX files (40 train, 20 test images) in the official layout."""
    return write_dataset(tmp_path / "small-fashion", small_dataset())


@pytest.fixture(scope="session")
def idx_tools() -> SimpleNamespace:
    """The helpers above, for tests that build their own IDX files (conftest is not importable)."""
    return SimpleNamespace(idx_bytes=idx_bytes, gz=gz, small_dataset=small_dataset, write_dataset=write_dataset)
