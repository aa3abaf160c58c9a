"""Fashion-MNIST in the official IDX format: reading, fetching, and the train/validation split.

    python -m model.data fetch --dest DIR      # download and verify the four official files
    python -m model.data info  --data-dir DIR  # print counts and pixel statistics

The directory is taken from ``--data-dir`` or the ``FASHION_MNIST_DIR`` environment variable.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import os
import re
import struct
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.atomic import atomic_path

CLASS_NAMES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def class_allowed(class_names: Sequence[str] = CLASS_NAMES) -> str:
    return f"an index 0..{len(class_names) - 1} or a class name ({', '.join(class_names)})"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _phrases(class_names: Sequence[str]) -> list[tuple[tuple[str, ...], int]]:
    """(words, class) for every way of naming a class, longest first: the name, each part of a name
    with a slash, each written as words ("t shirt") or run together ("tshirt"), and a multi-word name's
    last word when no other class uses it ("boot"; "shirt" stays class 6's)."""
    phrases: dict[tuple[str, ...], int] = {}
    for i, name in enumerate(class_names):
        for form in {name, *name.split("/")}:
            phrases.setdefault(tuple(_words(form)), i)
            phrases.setdefault((_key(form),), i)
    for i, name in enumerate(class_names):
        for form in name.split("/"):
            words = _words(form)
            if len(words) > 1:
                phrases.setdefault((words[-1],), i)
    return sorted(phrases.items(), key=lambda item: -len(item[0]))


def _singular(word: str, vocabulary: set[str]) -> str:
    """ "dresses" -> "dress", "boots" -> "boot" when the singular is a word of some class name."""
    if word in vocabulary:
        return word
    for suffix in ("es", "s"):
        if word.endswith(suffix) and word[: -len(suffix)] in vocabulary:
            return word[: -len(suffix)]
    return word


def classes_named(text: str, class_names: Sequence[str] = CLASS_NAMES) -> list[int]:
    """The classes a piece of text names, in the order they first appear, each once.

    Case, punctuation, plurals and any other words ("a", "photo of") are ignored: "Ankle boots",
    "a pullover", "two T-shirts" name one class each, "a dress and a coat" two, "a hat" none."""
    phrases = _phrases(class_names)
    vocabulary = {word for words, _ in phrases for word in words}
    words = [_singular(word, vocabulary) for word in _words(text)]
    found: list[int] = []
    i = 0
    while i < len(words):
        for phrase, label in phrases:
            if tuple(words[i : i + len(phrase)]) == phrase:
                if label not in found:
                    found.append(label)
                i += len(phrase)
                break
        else:
            i += 1
    return found


def parse_class(value: object, class_names: Sequence[str] = CLASS_NAMES) -> int:
    """A class index from an index (an int, or a string of digits as in a query string) or a text
    that names exactly one class (``classes_named``): "t-shirt/top", "T-Shirt Top", "tshirt", "top"
    and "a t-shirt" are all class 0, "Ankle Boot", "ankle_boot" and "ankle boots" class 9. Raises
    ValueError saying what is allowed."""
    index: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            index = int(text)
        else:
            named = classes_named(text, class_names)
            if len(named) == 1:
                return named[0]
            if len(named) > 1:
                listed = ", ".join(class_names[i] for i in named)
                raise ValueError(
                    f"names {len(named)} classes ({listed}) but must name one: {class_allowed(class_names)}; "
                    f"got {value!r}"
                )
    if index is None or not 0 <= index < len(class_names):
        raise ValueError(f"must be {class_allowed(class_names)}; got {value!r}")
    return index


IMAGE_SIZE = 28

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# What each official file must hold: (IDX magic number, item count).
EXPECTED = {
    "train_images": (2051, 60_000),
    "train_labels": (2049, 60_000),
    "test_images": (2051, 10_000),
    "test_labels": (2049, 10_000),
}
DEFAULT_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
ENV_DIR = "FASHION_MNIST_DIR"


class IDXError(ValueError):
    """An IDX file that is not what it claims to be."""


def parse_idx(raw: bytes, name: str, expected_magic: int | None = None) -> np.ndarray:
    """Decode an (uncompressed) IDX byte string into a uint8 array, checking header and length."""
    if len(raw) < 8:
        raise IDXError(f"{name}: truncated header ({len(raw)} bytes, need at least 8)")
    magic, count = struct.unpack(">II", raw[:8])
    if magic not in (2049, 2051) or (expected_magic is not None and magic != expected_magic):
        allowed = expected_magic if expected_magic is not None else "2049 (labels) or 2051 (images)"
        raise IDXError(f"{name}: wrong magic number {magic}, expected {allowed}")
    shape: tuple[int, ...] = (count,)
    offset = 8
    if magic == 2051:
        if len(raw) < 16:
            raise IDXError(f"{name}: truncated header ({len(raw)} bytes, need 16 for images)")
        rows, cols = struct.unpack(">II", raw[8:16])
        if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
            raise IDXError(f"{name}: images are {rows}x{cols}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
        shape, offset = (count, rows, cols), 16
    body = raw[offset:]
    need = int(np.prod(shape))
    if len(body) != need:
        raise IDXError(f"{name}: truncated or padded body ({len(body)} bytes, header promises {need})")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape).copy()  # writable, as torch expects


def read_idx(path: Path, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file, gzipped (``.gz``) or not."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise IDXError(f"{path.name}: cannot decompress ({err})") from err
    return parse_idx(raw, path.name, expected_magic)


def _check(key: str, array: np.ndarray, name: str) -> None:
    magic, count = EXPECTED[key]
    if len(array) != count:
        raise IDXError(f"{name}: holds {len(array)} items, expected {count}")
    if magic == 2049 and array.max(initial=0) >= NUM_CLASSES:
        raise IDXError(f"{name}: label {array.max()} out of range 0-{NUM_CLASSES - 1}")


def resolve_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data directory: the argument, else $FASHION_MNIST_DIR, else an error saying how to set it."""
    chosen = data_dir or os.environ.get(ENV_DIR)
    if not chosen:
        raise ValueError(f"no Fashion-MNIST directory: pass --data-dir or set {ENV_DIR}")
    path = Path(chosen)
    if not path.is_dir():
        raise ValueError(f"Fashion-MNIST directory {path} does not exist")
    return path


@dataclass(frozen=True)
class FashionMNIST:
    """All 70,000 images as uint8 (N, 28, 28) with int64 labels, in the official train/test split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @classmethod
    def load(cls, data_dir: str | os.PathLike | None = None, check_counts: bool = True) -> FashionMNIST:
        root = resolve_dir(data_dir)
        arrays = {}
        for key, name in FILES.items():
            path = root / name
            if not path.exists():
                raise IDXError(f"{name}: missing from {root} (run `python -m model.data fetch --dest {root}`)")
            arrays[key] = read_idx(path, EXPECTED[key][0])
            if check_counts:
                _check(key, arrays[key], name)
        arrays["train_labels"] = arrays["train_labels"].astype(np.int64)
        arrays["test_labels"] = arrays["test_labels"].astype(np.int64)
        return cls(**arrays)

    def split(
        self, val_size: int = 5_000, seed: int = 0
    ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """A seeded, class-stratified train/validation split of the training set.

        The shipped files are grouped by class, so the split shuffles; stratifying keeps
        each class's share equal in both parts.
        """
        n = len(self.train_labels)
        if not 0 < val_size < n:
            raise ValueError(f"val_size must be in 1..{n - 1}, got {val_size}")
        rng = np.random.default_rng(seed)
        val_idx = []
        for c in range(NUM_CLASSES):
            idx = np.flatnonzero(self.train_labels == c)
            take = round(val_size * len(idx) / n)
            val_idx.append(rng.choice(idx, size=take, replace=False))
        # Both parts are shuffled: the shipped files are grouped by class, so the first
        # k images of an unshuffled part would all be T-shirts.
        val = rng.permutation(np.concatenate(val_idx))
        train = rng.permutation(np.setdiff1d(np.arange(n), val))
        return (
            (self.train_images[train], self.train_labels[train]),
            (self.train_images[val], self.train_labels[val]),
        )


def to_model_range(images: np.ndarray):
    """uint8 (N, 28, 28) -> float32 tensor (N, 1, 28, 28) in [-1, 1]."""
    import torch

    return torch.from_numpy(images).float().div_(127.5).sub_(1.0).unsqueeze(1)


def fetch(dest: str | os.PathLike, base_url: str = DEFAULT_URL, timeout: float = 60.0) -> list[Path]:
    """Download the four official files into ``dest``, verifying each before it gets its final name.

    A file is written to a temporary name in ``dest`` and renamed only once it decoded
    with the right magic number, shape and count, so no half-written file is ever left
    under the final name.
    """
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for key, name in FILES.items():
        url = base_url.rstrip("/") + "/" + name
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                payload = response.read()
        except (OSError, http.client.HTTPException) as err:  # IncompleteRead: the connection closed early
            raise IDXError(f"{name}: download from {url} failed ({err})") from err
        try:
            array = parse_idx(gzip.decompress(payload), name, EXPECTED[key][0])
        except (OSError, EOFError, zlib.error) as err:
            raise IDXError(f"{name}: not a valid gzip file ({err})") from err
        _check(key, array, name)
        with atomic_path(root / name) as tmp:
            tmp.write_bytes(payload)
        written.append(root / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download and verify the official files")
    p_fetch.add_argument("--dest", required=True)
    p_fetch.add_argument("--url", default=os.environ.get("FASHION_MNIST_URL", DEFAULT_URL))
    p_info = sub.add_parser("info", help="print what a data directory holds")
    p_info.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            for path in fetch(args.dest, args.url):
                print(f"ok {path}")
        else:
            data = FashionMNIST.load(args.data_dir)
            (tr, _), (va, _) = data.split()
            print(f"train {len(tr)}  validation {len(va)}  test {len(data.test_images)}")
            print(f"mean pixel: train {data.train_images.mean() / 255:.4f}  test {data.test_images.mean() / 255:.4f}")
    except (IDXError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
