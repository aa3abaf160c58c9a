"""app/generation/lane.py: the scheduling policies' rules and forecasts, on numbers worked out by hand."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from app.generation.jobs import Job, JobSpec
from app.generation.lane import (
    DEADLINE_SLACK,
    WIDE_SLACK,
    Lane,
    Running,
    admission_ticks,
    deadline_ticks,
    select,
    turns,
)


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


def _queued(policy: str, *jobs: Job) -> list[Job]:
    """The jobs in the order a lane of this policy queues them, at 0.1 s a chunk; each job keeps the
    deadline the last lane gave it."""
    lane = _lane(policy)
    lane.chunk_s = 0.1
    for job in jobs:
        lane.add(job)
    return list(lane.pending)


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
        orders = {policy: _queued(policy, big, later, too_late) for policy in ("deadline", "least-work")}
        assert big.deadline == pytest.approx(DEADLINE_SLACK * 4.0)
        assert later.deadline == pytest.approx(8.0 + DEADLINE_SLACK * 20 * 2 / 16 * 0.1)
        assert orders["deadline"] == [big, later, too_late]
        assert orders["least-work"] == [later, big, too_late]
    finally:
        loop.close()


def test_narrow_first_lets_a_job_wider_than_a_tick_wait_longer() -> None:
    """Under narrow-first a job wider than a tick's cap (32 rows against 16) may wait WIDE_SLACK times its
    time alone: a 1-image job that comes after deadline's aging would have put the large job first
    still goes ahead of it, and one that comes after the wide slack does not."""
    loop = asyncio.new_event_loop()
    try:
        big = _job(loop, 16, 20, submitted=0.0)  # 32 rows: 2 chunks x 20 steps x 0.1 s = 4 s alone
        later = _job(loop, 1, 20, submitted=12.0)  # 1 chunk x 20 steps x 0.1 s = 2 s alone
        too_late = _job(loop, 1, 20, submitted=4.0 * WIDE_SLACK)
        orders = {policy: _queued(policy, big, later, too_late) for policy in ("deadline", "narrow-first")}
        assert big.deadline == pytest.approx(4.0 * WIDE_SLACK)
        assert later.deadline == pytest.approx(12.0 + 2.0 * DEADLINE_SLACK)  # narrow: the usual slack
        assert orders["deadline"] == [big, later, too_late]  # 12 < 18
        assert orders["narrow-first"] == [later, big, too_late]  # 18 < 28
    finally:
        loop.close()


def _running(loop: asyncio.AbstractEventLoop, deadline: float) -> Running:
    job = _job(loop, 1, 4, submitted=0.0)
    job.deadline = deadline
    return Running(job, state=None, labels=None)  # type: ignore[arg-type]


def test_models_take_turns_under_narrow_first_until_one_is_overdue() -> None:
    """A tick evaluates the model that holds the earliest deadline, and another only once one of its
    jobs is overdue; every other policy evaluates every model at every tick."""
    loop = asyncio.new_event_loop()
    try:
        teacher, student = _lane("narrow-first"), _lane("narrow-first")
        busy = (teacher, [_running(loop, 10.0), _running(loop, 30.0)])
        short = (student, [_running(loop, 2.0)])
        assert turns([busy, short], now=1.0) == [short]  # the teacher's jobs still have time
        assert turns([busy, short], now=10.0) == [busy, short]  # its first deadline has come
        assert turns([busy], now=1.0) == [busy]
        for policy in ("fcfs", "deadline", "least-work"):
            lanes = [(_lane(policy), busy[1]), (_lane(policy), short[1])]
            assert turns(lanes, now=1.0) == lanes
    finally:
        loop.close()


def test_a_lane_refuses_a_policy_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="policy must be one of fcfs, deadline"):
        _lane("lifo")
