"""``rerank`` on ``POST /generate`` and the stream: sample K candidates, score them, keep the best n.

Everything that can refuse a rerank (too few candidates, a scorer whose model is missing or
still loading) is checked by ``plan`` before anything is sampled. The candidates are one engine
job with seeds ``seed .. seed + K - 1``, so a kept image is reproduced by a plain ``/generate``
with its own seed; ``rank`` scores them on a worker thread, within the scorer's limiter.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import anyio
import numpy as np

from app.errors import ApiError
from app.generation.jobs import JobResult
from app.generation.schemas import RerankBase, RerankMethod
from app.generation.scorers import Scorer, ScorerUnavailable
from app.metrics import Metrics
from app.settings import Settings
from app.threads import on_fresh_thread

DEFAULT_FACTOR = 4  # candidates per kept image when the request does not say


@dataclass(frozen=True)
class RerankPlan:
    by: RerankMethod
    scorer: Scorer
    n: int  # images to keep
    candidates: int  # images to sample and score


@dataclass(frozen=True)
class Ranked:
    by: RerankMethod
    measure: str  # what the score is, in words
    order: np.ndarray  # (n,) candidate indices, best first
    scores: np.ndarray  # (K,) every candidate's score, candidate i drawn with seed + i
    scoring_s: float


def unavailable(err: ScorerUnavailable) -> ApiError:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after else None
    return ApiError(503, err.message, code=err.code, param="rerank", headers=headers)


def plan(spec: RerankBase | None, n: int, scorers: Mapping[str, Scorer], settings: Settings) -> RerankPlan | None:
    """The rerank a request for ``n`` images asks for, checked; None without one. Raises ApiError 422 / 503."""
    if spec is None:
        return None
    limit = settings.max_candidates
    if spec.candidates is None:
        candidates = min(DEFAULT_FACTOR * n, limit)
        if candidates < n:
            raise ApiError(
                422,
                f"rerank: n ({n}) is more than the {limit} candidates this server samples at most; "
                f"allowed: n <= {limit} with rerank",
                code="too_many_for_rerank",
                param="n",
            )
    else:
        candidates = spec.candidates
        if candidates < n:
            raise ApiError(
                422,
                f"rerank.candidates: must be at least n ({n}); allowed: {n}..{limit}; got {candidates}",
                code="candidates_below_n",
                param="rerank.candidates",
            )
    scorer = scorers.get(spec.by)
    if scorer is None:  # the lifespan registers every method; a missing one is a configuration bug
        raise ApiError(503, f"rerank by {spec.by} is not available on this server", code="rerank_unavailable")
    try:
        scorer.check()
    except ScorerUnavailable as err:
        raise unavailable(err) from err
    return RerankPlan(spec.by, scorer, n, candidates)


async def rank(plan: RerankPlan, result: JobResult, label: int, metrics: Metrics) -> Ranked:
    """Score the candidates (uint8 (K, 28, 28)) against ``label`` and order them, best first."""
    labels = np.full(len(result.images), label, dtype=np.int64)  # (K,)
    start = time.perf_counter()
    try:
        limiter = plan.scorer.limiter or anyio.to_thread.current_default_thread_limiter()
        async with limiter:  # on a fresh thread: see app.threads.on_fresh_thread
            scores = await on_fresh_thread(plan.scorer.score, result.images, labels)
    except ScorerUnavailable as err:
        raise unavailable(err) from err
    elapsed = time.perf_counter() - start
    scores = np.asarray(scores, dtype=np.float64)  # (K,)
    order = np.argsort(-scores, kind="stable")[: plan.n]  # ties keep seed order
    metrics.rerank.labels(plan.by).inc()
    metrics.rerank_candidates.labels(plan.by).inc(len(scores))
    return Ranked(plan.by, plan.scorer.describe(), order, scores, elapsed)
