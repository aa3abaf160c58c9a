"""app/generation/lane.py: the scheduling policies' rules and forecasts, on numbers worked out by hand."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from app.generation.jobs import Job, JobSpec
from app.generation.lane import DEADLINE_SLACK, Lane, admission_ticks, deadline_ticks, select


def test_a_tick_takes_the_first_job_and_every_later_one_that_still_fits() -> None:
    assert select([2, 32, 8, 8, 20], cap=32) == [0, 2, 3]  # 2 + 8 + 8; 32 and 20 would not fit
    assert select([40, 2, 32, 30], cap=32) == [0, 1, 3]  # larger than the cap: the cap's worth beside it
    assert select([], cap=32) == []


def test_the_deadline_forecast_with_no_cap_is_first_come_first_served() -> None:
    # The case worked out in test_engine's FCFS forecast, with deadlines in arrival order.
    running = [(4, 10, 0.0), (2, 3, 1.0)]
    queued = [(4, 5, 2.0), (2, 1, 3.0), (8, 1, 4.0)]
    assert deadline_ticks(running, queued, budget=8, cap=8) == ([3, 8, 10], [3, 8, 10])  # all step at once
    assert admission_ticks([(4, 10), (2, 3)], [(4, 5), (2, 1), (8, 1)], 8) == [3, 8, 10]


def test_the_deadline_forecast_steps_only_what_a_tick_takes() -> None:
    # Budget 128, a tick of 32 rows. Running: a 32-row job with 20 steps left (deadline 10) and a
    # 2-row one with 5 (deadline 1); waiting: 100 rows. The 2-row job goes first and the 32-row one
    # does not fit beside it, so it waits 5 ticks, then runs alone for 20: the queued job enters at
    # 25, where first come first served, every job stepping at every tick, would say 20.
    assert deadline_ticks([(32, 20, 10.0), (2, 5, 1.0)], [(100, 4, 20.0)], budget=128, cap=32) == ([25], [25])
    assert admission_ticks([(32, 20), (2, 5)], [(100, 4)], 128) == [20]
    assert deadline_ticks([], [(2, 5, 0.0), (2, 5, 1.0)], budget=128, cap=32) == ([0, 0], [0, 0])


def test_a_job_that_enters_starts_only_when_a_tick_selects_it() -> None:
    # Budget 128, a tick of 16 rows. Running: 16 rows, 10 steps left, key 1. Waiting: 16 rows, 4 steps,
    # key 5, then 2 rows, 3 steps, key 6. Both fit the budget and enter at once, freeing their places;
    # the running job fills every tick until it ends at 10, then the 16-row job steps alone for 4
    # ticks, and the 2-row one (it does not fit beside it) starts at 14.
    running, queued = [(16, 10, 1.0)], [(16, 4, 5.0), (2, 3, 6.0)]
    assert deadline_ticks(running, queued, budget=128, cap=16) == ([0, 0], [10, 14])
    assert admission_ticks([(16, 10)], [(16, 4), (2, 3)], 128) == [0, 0]  # fcfs: every job steps at once


def _lane(policy: str) -> Lane:
    runtime = SimpleNamespace(rows=16)  # a 16-row chunk: 2 rows fill one chunk, 32 rows two
    return Lane("tiny", runtime, budget=128, queue_size=8, policy=policy)  # type: ignore[arg-type]


def _job(loop: asyncio.AbstractEventLoop, n: int, steps: int, submitted: float) -> Job:
    job = Job(JobSpec(3, tuple(range(n)), "dpm++", steps, 2.0), loop)
    job.submitted = submitted
    return job


def test_a_small_job_goes_ahead_of_a_large_one_only_if_it_comes_early_enough() -> None:
    """Deadlines are arrival + slack x time alone, and fixed: a large job is overtaken by small ones
    that arrive soon after it, never by those that come later (no starvation)."""
    loop = asyncio.new_event_loop()
    try:
        lane = _lane("deadline")
        lane.chunk_s = 0.1
        big = _job(loop, 16, 20, submitted=0.0)  # 32 rows: 2 chunks x 20 steps x 0.1 s alone
        early = _job(loop, 1, 20, submitted=1.0)  # 2 rows: 1 chunk x 20 steps x 0.1 s
        late = _job(loop, 1, 20, submitted=4.0 * DEADLINE_SLACK)
        for job in (big, early, late):
            lane.add(job)
        assert big.deadline == pytest.approx(DEADLINE_SLACK * 4.0)
        assert list(lane.pending) == [early, big, late]
        fcfs = _lane("fcfs")
        for job in (big, early, late):
            fcfs.add(job)
        assert list(fcfs.pending) == [big, early, late]
    finally:
        loop.close()


def test_least_work_counts_a_small_job_by_its_rows_and_still_ages_a_large_one() -> None:
    """Under least-work a 1-image job's key is its steps over its 2 of a chunk's 16 rows: it overtakes
    a large job that came well before it, where deadline would not, but not once the large job has
    waited the slack times its own work."""
    loop = asyncio.new_event_loop()
    try:
        big = _job(loop, 16, 20, submitted=0.0)  # 32 rows, 2 whole chunks: key 3 x 4 s under both
        later = _job(loop, 1, 20, submitted=8.0)  # deadline: 8 + 3 x 2 s; least-work: 8 + 3 x 0.25 s
        too_late = _job(loop, 1, 20, submitted=11.5)  # least-work: 11.5 + 0.75, past the large job's 12
        orders = {}
        for policy in ("deadline", "least-work"):
            lane = _lane(policy)
            lane.chunk_s = 0.1
            for job in (big, later, too_late):
                lane.add(job)
            orders[policy] = list(lane.pending)
        assert big.deadline == pytest.approx(DEADLINE_SLACK * 4.0)
        assert later.deadline == pytest.approx(8.0 + DEADLINE_SLACK * 20 * 2 / 16 * 0.1)
        assert orders["deadline"] == [big, later, too_late]
        assert orders["least-work"] == [later, big, too_late]
    finally:
        loop.close()


def test_a_lane_refuses_a_policy_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="policy must be one of fcfs, deadline"):
        _lane("lifo")
