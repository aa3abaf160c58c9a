"""The extension point for reranking generated candidates (issue 4).

A scorer rates uint8 images against the class they were asked for; higher is better.
The lifespan puts the available ones in ``Serving.scorers`` by name (e.g. ``"clip"`` from
``model/clip.py``, ``"classifier"``), and ``POST /generate`` with a ``rerank`` field will
sample ``k * n`` candidates through the engine, score them on a worker thread, and keep
the best ``n``. Nothing here imports torch or a scorer: the service starts without them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Scorer(Protocol):
    """Rates images; must be safe to call from a worker thread (not the event loop)."""

    name: str

    def score(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """uint8 (N, 28, 28) images and int (N,) class indices -> float (N,) scores, higher is better."""
        ...
