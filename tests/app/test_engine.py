"""The step-level engine on a real tiny network: shared ticks, seeds, joining, cancel, admission, drain."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from app.device import FixedRows, Runtime, prepare
from app.engine import Engine, admission_ticks
from app.jobs import EngineClosed, JobCancelled, JobSpec, JobTooLarge, Progress, Queued, QueueFull
from app.metrics import EngineMetrics, Metrics
from model.io import load_weights

pytestmark = pytest.mark.timeout(120)


class Recorder(EngineMetrics):
    """The Prometheus observer, also keeping every tick's (rows, jobs)."""

    def __init__(self) -> None:
        super().__init__(Metrics())
        self.ticks: list[tuple[int, int]] = []

    def tick(self, rows: int, jobs: int, seconds: float) -> None:
        super().tick(rows, jobs, seconds)
        self.ticks.append((rows, jobs))

    def value(self, name: str, **labels: str) -> float:
        return self.m.registry.get_sample_value(name, labels or None) or 0.0


@pytest.fixture(scope="module")
def runtime(app_weights: Path) -> Runtime:
    return prepare(load_weights(app_weights, "cpu"), torch.device("cpu"))


def spec(label: int, seeds: range | tuple[int, ...], steps: int = 3, guidance: float = 2.0, sampler: str = "dpm++"):
    return JobSpec(label, tuple(seeds), sampler, steps, guidance)


def scenario(runtime: Runtime, body, **engine_kwargs) -> Recorder:  # type: ignore[no-untyped-def]
    """Run ``body(engine)`` on a started engine, then stop it; the observer for assertions."""
    recorder = Recorder()

    async def main() -> None:
        engine = Engine(runtime, recorder, **engine_kwargs)
        engine.start()
        try:
            await body(engine)
        finally:
            await asyncio.to_thread(engine.stop)

    asyncio.run(main())
    return recorder


async def first_step(events: list) -> None:
    while not any(isinstance(e, Progress) for e in events):
        await asyncio.sleep(0.002)


MIXED = [
    spec(3, (100, 101), steps=20, guidance=2.0, sampler="dpm++"),  # 4 rows: guided
    spec(1, (7,), steps=25, guidance=1.0, sampler="ddim"),  # 1 row
    spec(9, (40, 41, 42), steps=30, guidance=3.5, sampler="ddim"),  # 6 rows
]


def test_auto_precision_is_bfloat16_on_a_cpu_that_computes_it_and_float32_elsewhere(app_weights, monkeypatch):
    from model import machine

    loaded = load_weights(app_weights, "cpu")
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(machine, "native_bfloat16", lambda native=native: native)
        runtime = prepare(loaded, torch.device("cpu"))
        assert runtime.dtype == expected and runtime.describe()["precision"] == str(expected).removeprefix("torch.")
    assert prepare(loaded, torch.device("cpu"), precision="float32").dtype == torch.float32  # asked for: kept
    monkeypatch.setattr(machine, "native_bfloat16", lambda: False)
    assert prepare(loaded, torch.device("cpu"), precision="bfloat16").dtype == torch.bfloat16


def test_fixed_rows_makes_each_row_independent_of_its_batch(app_weights: Path) -> None:
    net = load_weights(app_weights, "cpu").model
    fixed = FixedRows(net, rows=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 1, 28, 28, generator=g)
    t = torch.arange(11) * 90.0  # every row at its own timestep, as in a tick
    y = torch.arange(11) % 10
    with torch.inference_mode():
        full = fixed(x, t, y)
        assert full.shape == (11, 1, 28, 28)
        for rows in ([3], [0, 5], [10, 2, 7], list(range(11))[::-1]):
            out = fixed(x[rows], t[rows], y[rows])
            assert torch.equal(out, full[rows]), rows  # bitwise, not approximately


def test_jobs_with_different_parameters_share_ticks_and_keep_their_solo_bytes(runtime: Runtime) -> None:
    solo: list = []
    together: list = []

    async def body(engine: Engine) -> None:
        for s in MIXED:
            solo.append(await engine.run(s))
        jobs = [engine.submit(s) for s in MIXED]
        together.extend(await asyncio.gather(*(job.future for job in jobs)))

    recorder = scenario(runtime, body)
    # One network evaluation carried all three: 4 + 1 + 6 rows, each job at its own step and sampler.
    assert (11, 3) in recorder.ticks
    assert max(r.batch_jobs for r in together) == 3 and together[2].batch_images == 6
    for alone, shared in zip(solo, together, strict=True):
        assert alone.batch_jobs == 1
        assert shared.pngs == alone.pngs  # byte for byte
    assert len({r.pngs for r in together}) == 3  # and they are different images


def test_a_job_joining_half_way_finishes_first_with_its_solo_bytes(runtime: Runtime) -> None:
    async def body(engine: Engine) -> None:
        long_spec, short_spec = spec(0, (5, 6), steps=60, sampler="ddim"), spec(4, (9,), steps=4, guidance=1.5)
        long_solo, short_solo = await engine.run(long_spec), await engine.run(short_spec)
        events: list = []
        long = engine.submit(long_spec, on_event=events.append)
        while sum(isinstance(e, Progress) for e in events) < 10:
            await asyncio.sleep(0.002)
        short = await engine.run(short_spec)
        assert not long.future.done()  # the short job did not wait for the long one
        assert short.pngs == short_solo.pngs and short.batch_jobs == 2
        assert (await long.future).pngs == long_solo.pngs

    scenario(runtime, body)


class Gate(torch.nn.Module):
    """The network, held inside its forward pass until the test lets it go."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def forward(self, x, t, y):  # type: ignore[no-untyped-def]
        self.entered.set()
        assert self.release.wait(30)
        return self.net(x, t, y)


def test_cancel_in_the_middle_of_a_tick_takes_effect_at_the_next(runtime: Runtime) -> None:
    gate = Gate(runtime.denoiser.model)
    gated = replace(runtime, denoiser=replace(runtime.denoiser, model=gate))

    async def body(engine: Engine) -> None:
        kept_events: list = []
        dropped_events: list = []
        keep = engine.submit(spec(0, (1, 2), steps=8, sampler="ddim"), on_event=kept_events.append)
        drop = engine.submit(spec(1, (3,), steps=8, sampler="ddim"), on_event=dropped_events.append)
        await first_step(dropped_events)
        gate.release.clear()
        gate.entered.clear()
        await asyncio.to_thread(gate.entered.wait, 30)  # a tick with both jobs is inside the network now
        assert engine.cancel(drop)
        seen = len(dropped_events)
        gate.release.set()
        with pytest.raises(JobCancelled):
            await drop.future
        result = await keep.future
        assert len(result.pngs) == 2
        await asyncio.sleep(0.05)
        assert len(dropped_events) == seen  # nothing after the cancel, not even the tick in flight
        assert len([e for e in kept_events if isinstance(e, Progress)]) == 8

    recorder = scenario(gated, body)
    assert recorder.value("fashion_jobs_cancelled_total", stage="running") == 1
    # The cancelled job left after the tick that was in flight: every later tick had one job.
    jobs_per_tick = [jobs for _, jobs in recorder.ticks]
    assert jobs_per_tick.count(2) <= 3 and jobs_per_tick[-1] == 1


def test_first_come_first_served_lets_a_large_job_in_while_small_ones_keep_coming(runtime: Runtime) -> None:
    admitted: dict[str, float] = {}

    async def body(engine: Engine) -> None:
        small = [engine.submit(spec(i, (i,), steps=12, guidance=1.0)) for i in range(2)]  # 2 of 4 rows
        big_events: list = []
        big = engine.submit(spec(8, (50, 51, 52, 53), steps=3, guidance=1.0), on_event=big_events.append)
        later = []
        for i in range(6):  # a steady flow of 1-row jobs that would each fit beside the running ones
            later.append(engine.submit(spec(i, (100 + i,), steps=12, guidance=1.0)))
            await asyncio.sleep(0.01)
        await asyncio.gather(*(j.future for j in [*small, big, *later]))
        admitted.update({"big": big.admitted or 0})
        admitted.update({f"later{i}": j.admitted or 0 for i, j in enumerate(later)})
        queued = [e for e in big_events if isinstance(e, Queued)]
        assert queued and queued[0].position == 1 and queued[0].estimated_start_s > 0
        assert isinstance(big_events[-1], Progress)

    scenario(runtime, body, max_rows=4)
    assert all(admitted["big"] <= admitted[f"later{i}"] for i in range(6))


def test_admission_forecast_counts_ticks_first_come_first_served() -> None:
    # Budget 8, 6 rows in use: running jobs of 4 rows (10 steps left) and 2 rows (3 left). Queued:
    # 4 rows for 5 steps, then 2 rows for 1, then 8 rows. The first enters when the 2-row job ends
    # (tick 3) and fills the budget; the second, 2 rows, then waits for the first to end (3 + 5 = 8);
    # the third needs all 8 rows: after the second (8 + 1) and the 4-row running job (10).
    assert admission_ticks([(4, 10), (2, 3)], [(4, 5), (2, 1), (8, 1)], 8) == [3, 8, 10]
    assert admission_ticks([], [(2, 5)], 8) == [0]


def test_a_full_queue_is_refused_at_once_with_an_estimate_from_the_tick_time(runtime: Runtime) -> None:
    async def body(engine: Engine) -> None:
        events: list = []
        long = engine.submit(spec(0, (1,), steps=400, sampler="ddim"), on_event=events.append)  # 2 rows: all
        await first_step(events)
        waiting: list = []
        queued = engine.submit(spec(1, (2,), steps=2), on_event=waiting.append)
        while not waiting:  # told where it stands at the next tick
            await asyncio.sleep(0.002)
        t0 = time.monotonic()
        with pytest.raises(QueueFull) as refused:
            engine.submit(spec(2, (3,), steps=2))
        assert time.monotonic() - t0 < 0.05  # refused at once, not after waiting
        # The queued job waits for the long one's remaining steps at the measured tick time; a place in
        # the queue frees up when it starts, which is what Retry-After says.
        (event,) = waiting
        assert isinstance(event, Queued) and event.position == 1
        steps_left = 400 - sum(isinstance(e, Progress) for e in events)
        assert 0 < event.estimated_start_s <= (steps_left + 2) * 1.0  # ticks of a tiny network: well under 1 s
        assert refused.value.retry_after >= max(1, int(event.estimated_start_s) - 1)
        engine.cancel(long)
        await asyncio.gather(long.future, return_exceptions=True)
        assert len((await queued.future).pngs) == 1

    recorder = scenario(runtime, body, queue_size=1, max_rows=2)
    assert recorder.value("fashion_jobs_rejected_total", reason="queue_full") == 1


def test_a_job_over_the_row_budget_is_refused_naming_the_limit(runtime: Runtime) -> None:
    async def body(engine: Engine) -> None:
        with pytest.raises(JobTooLarge, match=r"n: 3 images need 6 rows .* at most 4 .*allowed: n <= 2"):
            engine.submit(spec(0, (1, 2, 3), guidance=2.0))
        assert len((await engine.run(spec(0, (1, 2, 3), guidance=1.0))).pngs) == 3  # unguided: 3 rows fit

    scenario(runtime, body, max_rows=4)


def test_cancel_leaves_the_queue_at_once_and_stops_a_running_job_within_a_tick(runtime: Runtime) -> None:
    async def body(engine: Engine) -> None:
        seen: list = []
        long = engine.submit(spec(0, (1,), steps=1000, sampler="ddim"), on_event=seen.append)
        await first_step(seen)
        queued = engine.submit(spec(1, (2,), steps=2))
        assert engine.cancel(queued)
        with pytest.raises(JobCancelled):
            await queued.future
        assert engine.queue_depth == 0
        at_cancel = len(seen)
        assert engine.cancel(long)
        with pytest.raises(JobCancelled):
            await long.future
        assert len(seen) - at_cancel <= 1  # at most the tick in flight
        assert len(seen) < 1000
        assert len((await engine.run(spec(4, (9,), steps=2))).pngs) == 1  # the worker is free again

    recorder = scenario(runtime, body, max_rows=2)
    assert recorder.value("fashion_jobs_cancelled_total", stage="queued") == 1
    assert recorder.value("fashion_jobs_cancelled_total", stage="running") == 1


def test_progress_events_are_ordered_with_previews_every_k(runtime: Runtime) -> None:
    seen: list = []

    async def body(engine: Engine) -> None:
        await engine.run(spec(5, (1, 2, 3), steps=5, sampler="ddim"), on_event=seen.append, preview_every=2)

    scenario(runtime, body)
    steps = [e for e in seen if isinstance(e, Progress)]
    assert [p.index for p in steps] == [0, 1, 2, 3, 4]
    assert all(p.total == 5 for p in steps)
    assert [p.x0_png is not None for p in steps] == [False, True, False, True, True]
    ts = [p.t for p in steps]
    assert ts == sorted(ts, reverse=True) and ts[0] == 999


def test_drain_refuses_new_jobs_and_finishes_running_and_queued_ones(runtime: Runtime) -> None:
    async def body(engine: Engine) -> None:
        running = engine.submit(spec(0, (1, 2), steps=30, sampler="ddim"))
        queued = engine.submit(spec(1, (3, 4), steps=5))  # 4 rows: waits for the running job
        engine.drain(30.0)
        assert not engine.running
        with pytest.raises(EngineClosed):
            engine.submit(spec(2, (5,)))
        assert len((await running.future).pngs) == 2
        assert len((await queued.future).pngs) == 2

    scenario(runtime, body, max_rows=4)


def test_drain_fails_what_cannot_finish_in_time(runtime: Runtime) -> None:
    async def body(engine: Engine) -> None:
        events: list = []
        running = engine.submit(spec(0, (1,), steps=1000, sampler="ddim"), on_event=events.append)
        queued = engine.submit(spec(1, (3,), steps=5))
        await first_step(events)
        engine.drain(0.2)
        for job in (running, queued):
            with pytest.raises(EngineClosed, match="did not finish in time"):
                await job.future

    scenario(runtime, body, max_rows=2)


def test_stop_fails_queued_and_running_jobs_and_refuses_new_ones(runtime: Runtime) -> None:
    async def main() -> None:
        engine = Engine(runtime, Recorder(), max_rows=2)
        engine.start()
        seen: list = []
        running = engine.submit(spec(0, (1,), steps=1000, sampler="ddim"), on_event=seen.append)
        await first_step(seen)
        queued = engine.submit(spec(1, (2,), steps=2))
        await asyncio.to_thread(engine.stop)
        for job in (running, queued):
            with pytest.raises(EngineClosed):
                await job.future
        assert len(seen) < 1000
        with pytest.raises(EngineClosed):
            engine.submit(spec(2, (3,), steps=2))

    asyncio.run(main())
