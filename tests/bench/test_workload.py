"""bench.workload: the mix, the seeded arrivals and the SLO arithmetic, on numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from bench.workload import (
    DEFAULT_MIX,
    Kind,
    Outcome,
    arrivals,
    describe_mix,
    percentile,
    refusal_waits,
    summarize,
    teacher_only,
)

MIX = (Kind("a", 3.0, 1), Kind("b", 1.0, 16, model="fashion-student"))


def test_arrivals_are_seeded_sorted_and_inside_the_run() -> None:
    first = arrivals(MIX, 2.0, 50.0, seed=7)
    assert first == arrivals(MIX, 2.0, 50.0, seed=7)
    assert first != arrivals(MIX, 2.0, 50.0, seed=8)
    times = [a.at for a in first]
    assert times == sorted(times)
    assert times[0] > 0 and times[-1] < 50.0


def test_arrivals_come_at_the_rate_and_in_the_mix_shares() -> None:
    # 2 per second for 2,000 s: 4,000 expected, standard deviation 63; kind a is 3/4 of them.
    many = arrivals(MIX, 2.0, 2000.0, seed=1)
    assert 3700 < len(many) < 4300
    share = sum(a.kind == 0 for a in many) / len(many)
    assert 0.72 < share < 0.78


def test_thinning_keeps_the_other_kinds_arrivals() -> None:
    """A one-model server gets exactly the teacher's arrivals of the full schedule."""
    assert teacher_only(MIX) == (MIX[0],)
    every = arrivals(MIX, 1.0, 100.0, seed=3)
    served = {k.name for k in teacher_only(MIX)}
    kept = [a for a in every if MIX[a.kind].name in served]
    assert 0 < len(kept) < len(every)
    assert all(a.kind == 0 for a in kept)


@pytest.mark.parametrize("rate, duration", [(0.0, 10.0), (1.0, 0.0), (-1.0, 5.0)])
def test_arrivals_refuse_a_rate_or_duration_that_is_not_positive(rate: float, duration: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        arrivals(MIX, rate, duration, seed=0)


def test_percentile_interpolates_between_order_statistics() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 100) == 4.0
    assert percentile(values, 99) == pytest.approx(3.97)  # 1 + 3 * 0.99 = position 2.97
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="0..100"):
        percentile(values, 101)


def test_summarize_counts_refusals_as_misses() -> None:
    idle = {"a": 2.0}
    outcomes = [
        Outcome("a", 0.0, 200, latency=2.0),  # slowdown 1
        Outcome("a", 1.0, 200, latency=4.0),  # 2
        Outcome("a", 2.0, 200, latency=8.0),  # 4
        Outcome("a", 3.0, 429, retry_after=2.0),
    ]
    s = summarize(outcomes, idle, duration=4.0)
    assert (s.requests, s.ok, s.refused) == (4, 3, 1)
    assert s.attainment == {1.5: 0.25, 2.0: 0.5, 3.0: 0.5, 5.0: 0.75}
    assert s.goodput == 0.5  # two requests within 3x over 4 s
    assert s.slowdown_max == 4.0
    assert s.slowdown_p50 == 2.0
    assert s.p50 == 4.0


def test_summarize_reads_the_first_step_of_streams_only() -> None:
    outcomes = [Outcome("a", 0.0, 200, latency=1.0, first_step=0.25), Outcome("a", 0.5, 200, latency=1.0)]
    s = summarize(outcomes, {"a": 1.0}, duration=1.0)
    assert s.first_step_p50 == 0.25


def test_refusal_waits_until_the_same_models_next_accepted_request() -> None:
    lane_of = {"a": "teacher", "b": "student"}
    outcomes = [
        Outcome("a", 1.0, 429, retry_after=3.0),
        Outcome("b", 1.5, 200, latency=1.0),  # another model: does not free the teacher's queue
        Outcome("a", 2.0, 429, retry_after=2.0),
        Outcome("a", 4.5, 200, latency=1.0),
        Outcome("b", 5.0, 429, retry_after=1.0),
    ]
    waits = refusal_waits(outcomes, lane_of)
    assert waits[:2] == [(3.0, 3.5), (2.0, 2.5)]
    assert waits[2][0] == 1.0 and math.isnan(waits[2][1])


def test_a_kind_sends_only_what_it_sets() -> None:
    assert Kind("x", 1.0, 4).body(9) == {"class": 3, "n": 4, "seed": 9}
    stream = Kind("s", 1.0, 1, model="fashion-student", sampler="ddim", steps=50, stream=True, preview_every=5)
    assert stream.body(1) == {
        "class": 3,
        "n": 1,
        "seed": 1,
        "model": "fashion-student",
        "sampler": "ddim",
        "steps": 50,
        "preview_every": 5,
    }


def test_the_default_mix_has_small_and_large_jobs_of_both_models() -> None:
    assert {k.small for k in DEFAULT_MIX} == {True, False}
    assert {k.model for k in DEFAULT_MIX} == {None, "fashion-student"}
    assert any(k.stream for k in DEFAULT_MIX)
    line = describe_mix(MIX)
    assert line == "a 75%, b 25%"
