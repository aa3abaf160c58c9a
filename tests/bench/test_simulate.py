"""bench/simulate.py: the engine's lanes on a simulated clock, on a case worked out by hand."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from app.generation.jobs import JobSpec
from bench.simulate import REPO, TEACHER, simulate
from bench.workload import STUDENT

# A teacher job of 16 guided images (32 rows: two 16-row chunks, 20 steps) at 0 s, and a student job of
# one image (one chunk, 4 steps) at 0.05 s, while the first tick (the teacher's alone, 0.2 s) runs.
LARGE = JobSpec(3, tuple(range(16)), "dpm++", 20, 1.35, TEACHER)
SHORT = JobSpec(3, (0,), "consistency", 4, 1.0, STUDENT)
COST = {TEACHER: 0.1, STUDENT: 0.1}


def latencies(policy: str) -> dict[str, float]:
    loop = asyncio.new_event_loop()
    try:
        outcomes = simulate([(0.0, "large", LARGE), (0.05, "short", SHORT)], policy, COST, loop)  # type: ignore[arg-type]
    finally:
        loop.close()
    return {o.kind: o.latency for o in outcomes}


def test_first_come_first_served_makes_the_short_job_share_the_large_ones_ticks() -> None:
    # The short job joins at 0.2 s; its 4 ticks carry both models (0.3 s each): done at 1.4 s.
    # The large job: 0.2 s + 4 x 0.3 s + 15 x 0.2 s = 4.4 s.
    assert latencies("fcfs") == pytest.approx({"short": 1.35, "large": 4.4})


def test_under_narrow_first_the_short_job_takes_its_ticks_alone() -> None:
    # Deadlines: the large job 0 + 7 x 20 x 0.2 s = 28 s (wider than a tick), the short one
    # 0.05 + 3 x 4 x 0.1 s = 1.25 s: the teacher, not overdue, waits out the student's 4 ticks of 0.1 s.
    assert latencies("narrow-first") == pytest.approx({"short": 0.55, "large": 4.4})


def test_the_script_prints_a_row_per_policy_and_load() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.simulate", "--engine", "narrow-first", "--seeds", "2", "--duration", "30"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cells = [[c.strip() for c in line.split("|")[1:3]] for line in out.splitlines() if line.startswith("| ")]
    assert [(policy, load) for policy, load in cells if load.endswith("%")] == [
        ("fcfs", "70%"),
        ("narrow-first", "70%"),
        ("fcfs", "100%"),
        ("narrow-first", "100%"),
    ]
