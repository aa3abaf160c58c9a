"""CLIP in the service: loaded once on a background thread, then shared read-only by ``POST /clip/score``
and ``rerank: "clip"``.

Loading never delays readiness: the lifespan starts it after the main model is warm, and until it
ends CLIP is ``loading`` (routes answer 503 with Retry-After). It ends ``ready``, or ``unavailable``
with ``model.clip.ClipUnavailable``'s message and ``HOWTO``, which say how to provide weights; generation works
either way. Scoring runs on threads of its own under one ``anyio.CapacityLimiter`` (``clip_concurrency``
threads); the scoring route refuses with 429 once ``clip_queue_size`` calls already wait for one.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar

import anyio
import numpy as np

from app.generation.scorers import ScorerUnavailable
from app.metrics import Metrics
from app.settings import Settings
from app.threads import on_fresh_thread
from model.clip import Clip, ClipSpec, ClipUnavailable, clip_score, load_clip

HOWTO = (
    "Provide CLIP weights in one of two ways: FASHION_CLIP_MODEL (an open_clip architecture, e.g. ViT-B-32) "
    "with FASHION_CLIP_PRETRAINED (a pretrained tag, e.g. laion2b_s34b_b79k), downloaded once into "
    "FASHION_CLIP_CACHE_DIR on a host with internet access (or copied there from one, e.g. with "
    "`python -m model.clip fetch --cache-dir DIR`); or FASHION_CLIP_CHECKPOINT, a local .safetensors/.pt state "
    "dict for the architecture named by FASHION_CLIP_MODEL. On a host without internet, FASHION_CLIP_DOWNLOAD=false "
    "fails fast instead of retrying. CLIP needs the clip extra: pip install 'fashion-diffusion[clip]'."
)

log = logging.getLogger("app")

T = TypeVar("T")
ClipStatus = Literal["loading", "ready", "unavailable"]
LOADING_RETRY_S = 5
DISABLED = f"CLIP is unavailable: it is turned off (FASHION_CLIP_ENABLED=false); set it to true. {HOWTO}"


def clip_spec(settings: Settings, device: str = "cpu") -> ClipSpec:
    """The FASHION_CLIP_* settings as a ``ClipSpec``."""
    return ClipSpec(
        model=settings.clip_model,
        pretrained=settings.clip_pretrained,
        checkpoint=settings.clip_checkpoint,
        cache_dir=settings.clip_cache_dir,
        download=settings.clip_download,
        random_init=settings.clip_random_init,
        device=device,
        templates=tuple(settings.clip_templates),
    )


class Overloaded(Exception):
    """Every scoring thread is busy and the waiting room is full; retry in ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"CLIP scoring is busy; retry in {retry_after} s")
        self.retry_after = retry_after


class ClipService:
    """The CLIP model's state (loading / ready / unavailable), its loader thread, and its thread limiter.

    Build it inside the running event loop (the limiter belongs to it); ``start`` begins loading.
    """

    def __init__(self, settings: Settings, metrics: Metrics, device: str = "cpu") -> None:
        self.spec = clip_spec(settings, device)
        self.metrics = metrics
        self.limiter = anyio.CapacityLimiter(settings.clip_concurrency)
        self.concurrency = settings.clip_concurrency
        self.queue_size = settings.clip_queue_size
        self._admitted = 0  # scoring requests in progress (running or waiting); touched on the event loop only
        self._call_s = 0.0  # moving average of one scoring call, for Retry-After
        self._lock = threading.Lock()
        self._status: ClipStatus = "loading"
        self._clip: Clip | None = None
        self._message: str | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        metrics.clip_model.info({"model": self.spec.describe(), "templates": " | ".join(self.spec.templates)})
        metrics.clip_status.state("loading")
        if not settings.clip_enabled:
            self._fail(DISABLED, logging.INFO)

    @property
    def status(self) -> ClipStatus:
        return self._status

    @property
    def message(self) -> str | None:
        """Why CLIP is unavailable (with how to provide weights); None otherwise."""
        return self._message

    def describe(self) -> str:
        return self.spec.describe()

    def start(self) -> None:
        """Load on a daemon thread (it cannot be interrupted; a result that arrives after ``close`` is dropped)."""
        if self._status != "loading" or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._load, name="fashion-clip-loader", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def _load(self) -> None:
        start = time.monotonic()
        try:
            clip = load_clip(self.spec)
        except ClipUnavailable as err:
            self._fail(f"{err} {HOWTO}")
            return
        except Exception as err:  # anything else is a bug or a broken install: report it, keep serving
            log.exception("loading CLIP failed")
            problem = f"loading {self.spec.describe()} failed ({type(err).__name__}: {err})"
            self._fail(f"CLIP is unavailable: {problem}. {HOWTO}")
            return
        with self._lock:
            if self._closed:
                return
            self._clip = clip
            self._status = "ready"
        self.metrics.clip_status.state("ready")
        log.info(
            "CLIP ready: %s (%d parameters, %d px inputs) in %.1f s",
            self.spec.describe(),
            clip.num_parameters,
            clip.image_size,
            time.monotonic() - start,
        )

    def _fail(self, message: str, level: int = logging.WARNING) -> None:
        with self._lock:
            self._status = "unavailable"
            self._message = message
        self.metrics.clip_status.state("unavailable")
        log.log(level, "%s", message)

    # --- use ------------------------------------------------------------------------------------

    def require(self) -> Clip:
        """The loaded model, or ScorerUnavailable (code clip_loading with a retry time, or clip_unavailable)."""
        clip = self._clip
        if clip is not None:
            return clip
        if self._status == "loading":
            raise ScorerUnavailable(
                f"CLIP ({self.spec.describe()}) is still loading; retry in a few seconds",
                code="clip_loading",
                retry_after=LOADING_RETRY_S,
            )
        raise ScorerUnavailable(self._message or DISABLED, code="clip_unavailable")

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Admit one scoring request (on the event loop), or raise Overloaded when ``concurrency``
        requests run and ``queue_size`` more wait: the waiting room is bounded, never a growing queue."""
        if self._admitted >= self.concurrency + self.queue_size:
            waves = 1 + self._admitted / self.concurrency
            raise Overloaded(max(1, math.ceil(max(self._call_s, 0.1) * waves)))
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on its own thread within the limiter (waiting for a free slot if need be); a fresh
        thread, so that no OpenMP team outlives it beside the engine's (``app.threads.on_fresh_thread``)."""
        async with self.limiter:
            return await on_fresh_thread(fn)

    def timed(self, use: str, n_images: int, fn: Callable[[], T]) -> Callable[[], T]:
        """``fn``, recording its duration and ``n_images`` images scored under ``use`` when it succeeds."""

        def run() -> T:
            start = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - start
            self._call_s = elapsed if self._call_s == 0 else 0.8 * self._call_s + 0.2 * elapsed
            self.metrics.clip_duration.labels(use).observe(elapsed)
            self.metrics.clip_images.labels(use).inc(n_images)
            return out

        return run


@dataclass(frozen=True)
class Similarities:
    similarity: np.ndarray  # (N_images, N_texts) cosine
    clip_score: np.ndarray  # (N_images, N_texts) 100 * max(cos, 0)
    class_similarity: np.ndarray | None  # (N_images,) cosine with the class embedding (templates averaged)


def similarities(clip: Clip, images: list[np.ndarray], texts: list[str], class_index: int | None) -> Similarities:
    """Cosine of every image with every text (blocking: call it on a worker thread)."""
    image_emb = clip.encode_images(images)  # (N, D) unit vectors
    text_emb = clip.encode_texts(texts)  # (T, D) unit vectors
    cos = (image_emb @ text_emb.T).numpy().astype(np.float64)  # (N, T)
    per_class = None
    if class_index is not None:
        per_class = clip.class_cosine(image_emb, class_index).numpy().astype(np.float64)  # (N,)
    return Similarities(cos, clip_score(cos), per_class)


class ClipScorer:
    """``rerank: "clip"``: cosine of each image with its class's prompt embedding (templates averaged)."""

    name = "clip"

    def __init__(self, service: ClipService) -> None:
        self.service = service

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        return self.service.limiter

    def check(self) -> None:
        self.service.require()

    def describe(self) -> str:
        templates = " | ".join(self.service.spec.templates)
        return f"cosine similarity to the class prompt ({templates}) under CLIP {self.service.describe()}"

    def score(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        clip = self.service.require()

        def run() -> np.ndarray:
            return clip.class_cosine(clip.encode_images(images), labels).numpy().astype(np.float64)  # (N,)

        return self.service.timed("rerank", len(images), run)()
