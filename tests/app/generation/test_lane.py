"""app/generation/lane.py: the scheduling policies' rules and forecasts, on numbers worked out by hand."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import pytest

from app.generation.jobs import Job, JobSpec
from app.generation.lane import (
    Lane,
    NarrowFirst,
    admission_ticks,
    deadline_ticks,
    plan_tick,
    policy_named,
    select,
)

NARROW, WIDE = NarrowFirst.slack, NarrowFirst.wide_slack  # 3 and 7 times a job's time alone


def test_a_tick_takes_the_first_job_and_every_later_one_that_still_fits() -> None:
    assert select([2, 32, 8, 8, 20], tick_rows=32) == [0, 2, 3]  # 2 + 8 + 8; 32 and 20 would not fit
    assert select([40, 2, 32, 30], tick_rows=32) == [0, 1, 3]  # larger than the cap: the cap's worth beside it
    assert select([], tick_rows=32) == []


def test_the_deadline_forecast_with_no_cap_is_first_come_first_served() -> None:
    # The case worked out in test_engine's FCFS forecast, with deadlines in arrival order.
    running = [(4, 10, 0.0), (2, 3, 1.0)]
    queued = [(4, 5, 2.0), (2, 1, 3.0), (8, 1, 4.0)]
    assert deadline_ticks(running, queued, max_rows=8, tick_rows=8) == ([3, 8, 10], [3, 8, 10])  # all step at once
    assert admission_ticks([(4, 10), (2, 3)], [(4, 5), (2, 1), (8, 1)], 8) == [3, 8, 10]


def test_the_deadline_forecast_steps_only_what_a_tick_takes() -> None:
    # Budget 128, a tick of 32 rows. Running: a 32-row job with 20 steps left (deadline 10) and a
    # 2-row one with 5 (deadline 1); waiting: 100 rows. The 2-row job goes first and the 32-row one
    # does not fit beside it, so it waits 5 ticks, then runs alone for 20: the queued job enters at
    # 25, where first come first served, every job stepping at every tick, would say 20.
    assert deadline_ticks([(32, 20, 10.0), (2, 5, 1.0)], [(100, 4, 20.0)], max_rows=128, tick_rows=32) == ([25], [25])
    assert admission_ticks([(32, 20), (2, 5)], [(100, 4)], 128) == [20]
    assert deadline_ticks([], [(2, 5, 0.0), (2, 5, 1.0)], max_rows=128, tick_rows=32) == ([0, 0], [0, 0])


def test_a_job_that_enters_starts_only_when_a_tick_selects_it() -> None:
    # Budget 128, a tick of 16 rows. Running: 16 rows, 10 steps left, key 1. Waiting: 16 rows, 4 steps,
    # key 5, then 2 rows, 3 steps, key 6. Both fit the budget and enter at once, freeing their places;
    # the running job fills every tick until it ends at 10, then the 16-row job steps alone for 4
    # ticks, and the 2-row one (it does not fit beside it) starts at 14.
    running, queued = [(16, 10, 1.0)], [(16, 4, 5.0), (2, 3, 6.0)]
    assert deadline_ticks(running, queued, max_rows=128, tick_rows=16) == ([0, 0], [10, 14])
    assert admission_ticks([(16, 10)], [(16, 4), (2, 3)], 128) == [0, 0]  # fcfs: every job steps at once


def _lane(policy: str) -> Lane:
    # a 16-row chunk: 2 rows fill one chunk, 32 rows two
    return Lane("tiny", chunk_rows=16, max_rows=128, queue_size=8, policy=policy_named(policy))


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
    that arrive soon after it, never by those that come later (no starvation); fcfs keeps arrival order."""
    loop = asyncio.new_event_loop()
    try:
        big = _job(loop, 16, 20, submitted=0.0)  # 32 rows: 2 chunks x 20 steps x 0.1 s = 4 s alone, wide
        early = _job(loop, 1, 20, submitted=1.0)  # 2 rows: 1 chunk x 20 steps x 0.1 s = 2 s alone
        late = _job(loop, 1, 20, submitted=4.0 * WIDE)
        assert _queued("narrow-first", big, early, late) == [early, big, late]
        assert big.deadline == pytest.approx(4.0 * WIDE)
        assert early.deadline == pytest.approx(1.0 + 2.0 * NARROW)
        assert _queued("fcfs", big, early, late) == [big, early, late]
    finally:
        loop.close()


def test_narrow_first_lets_a_job_wider_than_a_tick_wait_longer() -> None:
    """Under narrow-first a job wider than a tick's rows (32 rows against 16) may wait the wide slack
    times its time alone: a 1-image job that comes after the narrow slack would have put the large job
    first still goes ahead of it, and one that comes after the wide slack does not."""
    loop = asyncio.new_event_loop()
    try:
        big = _job(loop, 16, 20, submitted=0.0)  # 32 rows: 2 chunks x 20 steps x 0.1 s = 4 s alone
        later = _job(loop, 1, 20, submitted=4.0 * NARROW)  # 1 chunk x 20 steps x 0.1 s = 2 s alone
        too_late = _job(loop, 1, 20, submitted=4.0 * WIDE)
        assert _queued("narrow-first", big, later, too_late) == [later, big, too_late]  # 18 < 28
        assert later.deadline == pytest.approx(4.0 * NARROW + 2.0 * NARROW)  # narrow: the usual slack
    finally:
        loop.close()


@dataclass
class _Running:
    job: Job
    steps_left: int = 4


def _running(loop: asyncio.AbstractEventLoop, deadline: float) -> _Running:
    job = _job(loop, 1, 4, submitted=0.0)
    job.deadline = deadline
    return _Running(job)


def test_models_take_turns_under_narrow_first_until_one_is_overdue() -> None:
    """A tick evaluates the model that holds the earliest deadline, and another only once one of its
    jobs is overdue; fcfs evaluates every model at every tick."""
    loop = asyncio.new_event_loop()
    try:
        policy = policy_named("narrow-first")
        teacher, student = _lane("narrow-first"), _lane("narrow-first")
        busy = (teacher, [_running(loop, 10.0), _running(loop, 30.0)])
        short = (student, [_running(loop, 2.0)])
        assert policy.turns([busy, short], now=1.0) == [short]  # the teacher's jobs still have time
        assert policy.turns([busy, short], now=10.0) == [busy, short]  # its first deadline has come
        assert policy.turns([busy], now=1.0) == [busy]
        lanes = [(_lane("fcfs"), busy[1]), (_lane("fcfs"), short[1])]
        assert policy_named("fcfs").turns(lanes, now=1.0) == lanes
    finally:
        loop.close()


def test_plan_tick_admits_with_begin_and_selects_in_deadline_order() -> None:
    """The one tick plan: admitted jobs become running ones through ``begin``; beyond a tick's rows the
    earliest deadlines go first; under narrow-first only the lane with the earliest deadline goes."""
    loop = asyncio.new_event_loop()
    try:
        teacher, student = _lane("narrow-first"), _lane("narrow-first")
        teacher.chunk_s = student.chunk_s = 0.1
        wide = _job(loop, 16, 20, submitted=0.0)  # 32 rows, deadline 28
        small = [_job(loop, 4, 20, submitted=0.0) for _ in range(3)]  # 8 rows each, deadline 6
        for job in (wide, *small):
            teacher.add(job)
        late = _job(loop, 1, 4, submitted=5.0)  # the student's, deadline 5 + 3 x 0.4
        student.add(late)
        begun: list[Job] = []

        def begin(lane: Lane, job: Job) -> _Running:
            begun.append(job)
            return _Running(job, job.spec.evaluations)

        admitted, batches = plan_tick([teacher, student], now=0.0, begin=begin)
        assert begun == [job for _, job in admitted] == [*small, wide, late]
        assert not teacher.pending and not student.pending
        ((lane, batch),) = batches  # the student's deadline (6.2) is later than the teacher's small jobs' (6)
        assert lane is teacher
        assert [r.job for r in batch] == small[:2]  # 16 rows: two of the 8-row jobs, the wide one waits
        _, batches = plan_tick([teacher, student], now=6.1, begin=begin)  # the teacher's jobs are overdue now
        assert [lane for lane, _ in batches] == [teacher]
        _, batches = plan_tick([teacher, student], now=6.2, begin=begin)
        assert [lane for lane, _ in batches] == [teacher, student]
    finally:
        loop.close()


def test_an_engine_refuses_a_policy_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="scheduler must be one of narrow-first, fcfs, got 'lifo'"):
        policy_named("lifo")


def test_background_jobs_fill_only_the_idle_rows_of_a_tick() -> None:
    """Background work waits in its own queue, enters within one tick's rows, and a tick takes it only
    in the padding of the interactive rows' last chunk, or in a whole tick when nothing interactive runs;
    a lane with background work alone does not go while another lane has interactive work."""
    loop = asyncio.new_event_loop()
    try:
        teacher, student = _lane("narrow-first"), _lane("narrow-first")
        bg = [_job(loop, 2, 20, submitted=0.0) for _ in range(5)]  # 4 rows each
        for job in bg:
            job.spec = replace(job.spec, background=True)
            teacher.add(job)
        assert not teacher.pending and list(teacher.background_pending) == bg and not teacher.full
        assert teacher.idle_rows(0) == 16 and teacher.idle_rows(2) == 14 and teacher.idle_rows(16) == 0
        assert teacher.idle_rows(18) == 14  # two chunks: 32 rows, 18 used

        def begin(lane: Lane, job: Job) -> _Running:
            return _Running(job, job.spec.evaluations)

        admitted, batches = plan_tick([teacher, student], now=0.0, begin=begin)
        assert [job for _, job in admitted] == bg[:4]  # 16 rows of background at most
        assert batches == [(teacher, teacher.background)]  # nothing interactive anywhere: a whole tick
        student.add(_job(loop, 1, 4, submitted=0.0))  # 2 rows
        _, batches = plan_tick([teacher, student], now=0.0, begin=begin)
        assert [lane for lane, _ in batches] == [student]  # the teacher's background work waits
        teacher.add(_job(loop, 5, 20, submitted=0.0))  # 10 rows: 6 idle in its chunk, one background job fits
        _, batches = plan_tick([teacher, student], now=10.0, begin=begin)  # both lanes overdue: both go
        assert [lane for lane, _ in batches] == [teacher, student]
        assert [r.job for r in batches[0][1]][1:] == bg[:1] and len(batches[0][1]) == 2
    finally:
        loop.close()


def test_the_idle_background_share_is_a_setting_bounded_by_the_budget() -> None:
    """With nothing interactive, background work gets FASHION_BACKGROUND_ROWS rows, at least one tick's and
    never more than the row budget; beside interactive work it still gets only the padding."""
    policy = policy_named("narrow-first")
    default = Lane("tiny", chunk_rows=16, max_rows=128, queue_size=8, policy=policy)
    wide = Lane("tiny", chunk_rows=16, max_rows=128, queue_size=8, policy=policy, idle_background_rows=64)
    capped = Lane("tiny", chunk_rows=16, max_rows=48, queue_size=8, policy=policy, idle_background_rows=64)
    narrow = Lane("tiny", chunk_rows=16, max_rows=128, queue_size=8, policy=policy, idle_background_rows=4)
    assert (default.idle_rows(0), wide.idle_rows(0), capped.idle_rows(0), narrow.idle_rows(0)) == (16, 64, 48, 16)
    assert wide.idle_rows(2) == default.idle_rows(2) == 14
