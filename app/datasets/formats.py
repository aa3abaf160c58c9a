"""A complete dataset in the formats other tools read without this code, and the card that says what
made it.

    idx      train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz: Fashion-MNIST's own files and names,
             so any Fashion-MNIST loader takes the directory in place of the real one
    npz      dataset.npz: ``x`` uint8 (N, 28, 28), ``y`` int64 (N,)
    parquet  dataset.parquet: an ``image`` column ({bytes: PNG, path: null}) and a ``label`` column, with
             Hugging Face ``datasets`` features (Image, ClassLabel) in the schema metadata, as it writes them
    card.json  the spec, the model's files and their sha256, each exported file's sha256 and size

Every exported file depends only on the images and labels: gzip without a time or a file name, PNGs
with fixed settings, Parquet in fixed row groups, so two exports of one dataset are byte-identical (the
card differs in its ``created`` time). Each file is written to a temporary name, flushed and renamed;
the card comes last, so a card on disk means its files are complete.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import json
import struct
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.datasets.store import ChunkStore, fsync_write
from model.data import CLASS_NAMES, EXPECTED, FILES, IMAGE_SIZE
from model.images import png_bytes
from model.io import card_guide_path, model_name, read_card

CARD = "card.json"
NPZ = "dataset.npz"
PARQUET = "dataset.parquet"
PARQUET_ROW_GROUP = 1000  # rows per row group: fixed, so the file does not depend on the chunk size
SEED_RULE = "image i, counting class by class from class 0, is drawn from seed + i"


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """The uncompressed IDX encoding of uint8 labels (N,) (magic 2049) or images (N, 28, 28) (magic 2051):
    a big-endian header of the magic number and each dimension, then the bytes."""
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def gzip_bytes(raw: bytes) -> bytes:
    """gzip without a modification time or a file name in its header, so equal input gives equal bytes."""
    return gzip.compress(raw, compresslevel=9, mtime=0)


def to_idx(images: np.ndarray, labels: np.ndarray) -> dict[str, bytes]:
    return {
        FILES["train_images"]: gzip_bytes(idx_bytes(images, EXPECTED["train_images"][0])),
        FILES["train_labels"]: gzip_bytes(idx_bytes(labels.astype(np.uint8), EXPECTED["train_labels"][0])),
    }


def to_npz(images: np.ndarray, labels: np.ndarray) -> dict[str, bytes]:
    buf = io.BytesIO()
    np.savez(buf, x=images, y=labels.astype(np.int64))  # zip members dated 1980-01-01: no clock in the bytes
    return {NPZ: buf.getvalue()}


def hf_features() -> dict[str, Any]:
    """The columns as Hugging Face ``datasets`` features (``Features.to_dict()``): what ``load_dataset``
    reads from the schema metadata's ``huggingface`` key to decode ``image`` and name ``label``."""
    return {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": list(CLASS_NAMES)}}


def to_parquet(images: np.ndarray, labels: np.ndarray) -> dict[str, bytes]:
    import pyarrow as pa  # the datasets extra: only this format needs it
    import pyarrow.parquet as pq

    # Image's storage type in datasets: struct<bytes: binary, path: string>; ClassLabel's: int64.
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    metadata = {"huggingface": json.dumps({"info": {"features": hf_features()}})}
    schema = pa.schema([("image", image_type), ("label", pa.int64())], metadata=metadata)
    column = [{"bytes": png_bytes(image), "path": None} for image in images]
    table = pa.table({"image": pa.array(column, image_type), "label": pa.array(labels, pa.int64())}, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=PARQUET_ROW_GROUP, compression="snappy")
    return {PARQUET: sink.getvalue().to_pybytes()}


# name -> (images, labels) -> {file name: bytes}
FORMATS: dict[str, Callable[[np.ndarray, np.ndarray], dict[str, bytes]]] = {
    "idx": to_idx,
    "npz": to_npz,
    "parquet": to_parquet,
}


def file_facts(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def model_facts(weights: str | Path) -> dict[str, Any]:
    """The model's card name, and the sha256 of its weights and card (and its guide's, when it names one)."""
    path = Path(weights)
    card = read_card(path)
    facts: dict[str, Any] = {
        "name": model_name(card, path),
        "weights": file_facts(path),
        "card": file_facts(path.with_suffix(".json")),
    }
    guide = card_guide_path(path, card)
    if guide is not None:
        facts["guide"] = model_facts(guide)
    return facts


def code_version() -> str | None:
    """``git describe`` of the checkout this code runs from; None outside one (an installed wheel)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--tags", "--always", "--dirty"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def export(
    store: ChunkStore,
    out_dir: str | Path,
    formats: Sequence[str] = tuple(FORMATS),
    *,
    weights: str | Path | None = None,
    drawn_on: Sequence[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Write the complete dataset of ``store`` into ``out_dir`` in each of ``formats``, then its card;
    returns the card. ``weights`` (the model's .safetensors) adds its files' sha256 to the card,
    ``drawn_on`` the runtimes (``Runtime.describe()``) that drew it. Raises ChunkError when the dataset is
    incomplete or a chunk is corrupt."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be one or more of {', '.join(FORMATS)}; got {list(formats)}")
    images, labels = store.arrays()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(formats):  # each once, in the order asked
        for filename, data in FORMATS[name](images, labels).items():
            fsync_write(out / filename, data)
            files[filename] = {"format": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    spec = store.spec
    card = {
        "images": len(images),
        "image_shape": [IMAGE_SIZE, IMAGE_SIZE],
        "classes": list(CLASS_NAMES),
        "counts": dict(zip(CLASS_NAMES, spec.counts, strict=True)),
        "spec": spec.to_json(),
        "seed_rule": SEED_RULE,
        "model": model_facts(weights) if weights is not None else {"name": spec.model},
        "drawn_on": list(drawn_on) if drawn_on is not None else None,
        "files": files,
        "code_version": code_version(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    fsync_write(out / CARD, (json.dumps(card, indent=2) + "\n").encode())
    return card
