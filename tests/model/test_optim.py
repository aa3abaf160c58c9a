"""model/optim.py: the learning-rate schedule's pieces."""

from __future__ import annotations

import math

import pytest

from model.optim import cooldown, cosine, rsqrt, warmup


def test_the_learning_rate_pieces():
    assert [warmup(s, 4) for s in (0, 1, 3, 10)] == [0.25, 0.5, 1.0, 1.0]
    assert warmup(0, 0) == 1.0  # no warm-up
    assert cosine(0.0, 0.1) == 1.0 and cosine(0.5, 0.1) == pytest.approx(0.55) and cosine(2.0, 0.1) == 0.1
    assert rsqrt(99, 100) == 1.0 and rsqrt(399, 100) == pytest.approx(0.5)
    assert [cooldown(s, 100, 10) for s in (80, 90, 95, 100, 120)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert cooldown(99, 100, 0) == 1.0  # no cooldown
    assert math.isclose(cosine(1.0, 0.0), 0.0, abs_tol=1e-12)
