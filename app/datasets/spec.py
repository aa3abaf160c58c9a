"""What a synthetic dataset is: a model, its sampling parameters, how many images of each class, and a
base seed. Image ``i`` (counting class by class, class 0 first) is drawn from seed ``seed + i``, so an
image depends only on the spec and its index: any slice of the dataset can be drawn anywhere, in any
order, and the bytes are those of one uninterrupted run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import numpy as np

from model.data import NUM_CLASSES


@dataclass(frozen=True)
class Sampling:
    """Explicit sampling parameters: nothing is left to a card's defaults once a dataset is planned."""

    sampler: str
    steps: int
    guidance: float
    guidance_method: str = "classifier-free"  # or "autoguidance" (the model's guide network)
    sigma_min: float | None = None  # heun only: its lowest noise level


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: ``counts[c]`` images of class c from ``model`` (a served model's name), drawn with
    ``sampling``; image i from seed ``seed + i``."""

    model: str
    sampling: Sampling
    counts: tuple[int, ...]  # one per class
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.counts) != NUM_CLASSES or any(c < 0 for c in self.counts):
            raise ValueError(f"counts must be {NUM_CLASSES} numbers >= 0 (one per class), got {list(self.counts)}")
        if self.total < 1:
            raise ValueError("counts must ask for at least one image")
        if not self.seed >= 0 or self.seed + self.total > 2**63 - 1:
            raise ValueError(f"seed must be >= 0 and leave room for {self.total} seeds, got {self.seed}")

    @property
    def total(self) -> int:
        return sum(self.counts)

    def labels(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """int64 labels of images lo..hi-1: class by class, class 0 first."""
        all_labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int64), self.counts)
        return all_labels[lo : self.total if hi is None else hi]

    def seeds(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        return np.arange(self.seed + lo, self.seed + (self.total if hi is None else hi), dtype=np.int64)

    def to_json(self) -> dict:
        return asdict(self) | {"counts": list(self.counts)}

    @classmethod
    def from_json(cls, data: dict) -> DatasetSpec:
        known = {f.name for f in fields(Sampling)}
        sampling = Sampling(**{k: v for k, v in data["sampling"].items() if k in known})
        return cls(data["model"], sampling, tuple(int(c) for c in data["counts"]), int(data.get("seed", 0)))

    def key(self) -> str:
        """The spec as canonical JSON: two specs with one key draw the same bytes."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))


def per_class(n: int) -> tuple[int, ...]:
    """``n`` images of every class."""
    return (n,) * NUM_CLASSES
