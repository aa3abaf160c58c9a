"""Scorers rate generated images against the class they were asked for; ``rerank`` keeps the best.

The lifespan puts one scorer per method in ``Serving.scorers``: ``"classifier"`` (the project's
Fashion-MNIST classifier, its probability of the requested class) and ``"clip"`` (cosine
similarity to the class prompt, ``app.clip.service.ClipScorer``). A method whose model could
not be loaded is still there, as an ``UnavailableScorer`` whose ``check`` says why, so a
request for it is refused with 503 before anything is sampled.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import anyio
import numpy as np
import torch

from model.classifier import Classifier, load_classifier, predict
from model.data import to_model_range
from model.io import WeightsError

log = logging.getLogger("app")


class ScorerUnavailable(Exception):
    """This scorer cannot score now: ``code`` for the error body, ``retry_after`` seconds when it may later."""

    def __init__(self, message: str, *, code: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retry_after = retry_after


class Scorer(Protocol):
    """Rates images; ``score`` blocks and must be safe to call from a worker thread (not the event loop)."""

    @property
    def name(self) -> str:
        """The rerank method: "clip" or "classifier"."""
        ...

    @property
    def limiter(self) -> anyio.CapacityLimiter | None:
        """Bounds the worker threads scoring at once; None: anyio's default thread limit."""
        ...

    def check(self) -> None:
        """Raise ScorerUnavailable when this scorer cannot score (called before candidates are sampled)."""
        ...

    def describe(self) -> str:
        """What the score is, in words, for the response."""
        ...

    def score(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """uint8 (N, 28, 28) images and int (N,) class indices -> float (N,) scores, higher is better."""
        ...


class UnavailableScorer:
    """Stands in for a method whose model is missing; every use raises ScorerUnavailable with ``message``."""

    limiter: anyio.CapacityLimiter | None = None

    def __init__(self, name: str, message: str, code: str) -> None:
        self.name = name
        self.message = message
        self.code = code

    def check(self) -> None:
        raise ScorerUnavailable(self.message, code=self.code)

    def describe(self) -> str:
        return f"{self.name} (unavailable)"

    def score(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        self.check()
        raise AssertionError("unreachable")  # pragma: no cover


class ClassifierScorer:
    """The Fashion-MNIST classifier's softmax probability of each image's requested class."""

    name = "classifier"
    limiter: anyio.CapacityLimiter | None = None  # a small CNN on 28x28 images: anyio's thread pool bound is enough

    def __init__(self, model: Classifier, path: Path, device: torch.device) -> None:
        self.model = model
        self.path = path
        self.device = device

    def check(self) -> None:
        return None

    def describe(self) -> str:
        return f"probability of the requested class under the classifier {self.path.name}"

    def score(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        x = to_model_range(np.ascontiguousarray(images)).to(self.device)  # (N, 1, 28, 28) in [-1, 1]
        with torch.inference_mode():
            probs, _ = predict(self.model, x)  # (N, 10)
        return probs[np.arange(len(labels)), np.asarray(labels)].astype(np.float64)  # (N,)

    def classify(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, 28, 28) -> int (N,): the most probable class of each image."""
        x = to_model_range(np.ascontiguousarray(images)).to(self.device)  # (N, 1, 28, 28) in [-1, 1]
        with torch.inference_mode():
            probs, _ = predict(self.model, x)  # (N, 10)
        return probs.argmax(1)


CLASSIFIER_HOWTO = (
    "Set FASHION_CLASSIFIER_WEIGHTS to a classifier .safetensors file with its .json card beside it "
    "(the repository ships weights/classifier.safetensors; train one with `python -m model.classifier train`)."
)


def load_classifier_scorer(path: Path | None, device: torch.device) -> ClassifierScorer | UnavailableScorer:
    """The classifier scorer, or a stand-in saying why there is none (blocking: call it on a worker thread)."""
    if path is None:
        problem = "no classifier is configured (FASHION_CLASSIFIER_WEIGHTS is empty)"
    else:
        try:
            return ClassifierScorer(load_classifier(path, device), Path(path), device)
        except (WeightsError, OSError, RuntimeError, ValueError) as err:  # missing, corrupt, or another shape
            problem = str(err)
    log.warning("rerank by classifier is unavailable: %s", problem)
    message = f"the classifier is unavailable: {problem}. {CLASSIFIER_HOWTO}"
    return UnavailableScorer("classifier", message, "classifier_unavailable")
