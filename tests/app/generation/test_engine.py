"""The step-level engine on a real tiny network: shared ticks, seeds, joining, cancel, admission, drain."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.generation.device import FixedRows, Runtime, prepare
from app.generation.engine import Engine
from app.generation.jobs import EngineClosed, JobCancelled, JobResult, JobSpec, JobTooLarge, Progress, Queued, QueueFull
from app.generation.lane import admission_ticks
from app.generation.metrics import EngineMetrics, Evaluation
from app.metrics import Metrics
from model.io import load_weights

pytestmark = pytest.mark.timeout(120)


class Recorder(EngineMetrics):
    """The Prometheus observer, also keeping every tick's evaluations."""

    def __init__(self) -> None:
        super().__init__(Metrics())
        self.evaluations: list[tuple[Evaluation, ...]] = []

    def tick(self, evaluations: Sequence[Evaluation], seconds: float) -> None:
        super().tick(evaluations, seconds)
        self.evaluations.append(tuple(evaluations))

    @property
    def ticks(self) -> list[tuple[int, int]]:
        """(rows, jobs) of every evaluation, for the tests of one model."""
        return [(e.rows, e.jobs) for tick in self.evaluations for e in tick]

    def value(self, name: str, **labels: str) -> float:
        return self.m.registry.get_sample_value(name, labels or None) or 0.0


@pytest.fixture(scope="module")
def runtime(app_weights: Path) -> Runtime:
    return prepare(load_weights(app_weights, "cpu"), torch.device("cpu"))


@pytest.fixture(scope="module")
def student_runtime(student_weights: Path) -> Runtime:
    return prepare(load_weights(student_weights, "cpu"), torch.device("cpu"))


def spec(
    label: int,
    seeds: range | tuple[int, ...],
    steps: int = 3,
    guidance: float = 2.0,
    sampler: str = "dpm++",
    model: str | None = None,
) -> JobSpec:
    return JobSpec(label, tuple(seeds), sampler, steps, guidance, model)


def scenario(
    runtime: Runtime | dict[str, Runtime], body: Any, recorder: Recorder | None = None, **engine_kwargs: Any
) -> Recorder:
    """Run ``body(engine)`` on a started engine (of one model, or of several by name), then stop it;
    the observer (``recorder``, for a body that reads it too) for assertions."""
    recorder = recorder or Recorder()
    runtimes = runtime if isinstance(runtime, dict) else {"tiny": runtime}

    async def main() -> None:
        engine = Engine(runtimes, recorder, **engine_kwargs)
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


def test_the_served_network_is_stored_in_its_autocast_dtype_and_computes_the_same_bytes(app_weights: Path) -> None:
    loaded = load_weights(app_weights, "cpu")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    runtime = prepare(loaded, torch.device("cpu"), precision="bfloat16", fixed_rows=0)
    served = runtime.denoiser.model
    assert served.stem.weight.dtype == torch.bfloat16 and served.time_mlp[0].weight.dtype == torch.bfloat16
    assert served.out_norm.weight.dtype == torch.float32 and served.class_emb.weight.dtype == torch.float32
    assert served.stem.weight.is_contiguous(memory_format=torch.channels_last)
    after = loaded.model.state_dict()  # prepare worked on a copy: the loaded weights are as they were
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items())
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(5, 1, 28, 28, generator=g), torch.tensor([999.0, 700, 400, 100, 0]), torch.arange(5)
    unlaid = prepare(loaded, torch.device("cpu"), precision="bfloat16", fixed_rows=0, channels_last=False)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        cast_per_call = loaded.model(x, t, y)
        assert torch.equal(unlaid.denoiser.model(x, t, y), cast_per_call)  # the same rounding, once
        assert torch.allclose(served(x, t, y).float(), cast_per_call.float(), atol=0.05)  # another kernel order
    fp32 = prepare(loaded, torch.device("cpu"), precision="float32", fixed_rows=0).denoiser.model
    assert fp32.stem.weight.dtype == torch.float32


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
        assert np.array_equal(shared.images, alone.images)  # byte for byte
    assert len({r.images.tobytes() for r in together}) == 3  # and they are different images


@pytest.mark.timeout(300)  # inductor compiles for minutes on a loaded 2-core machine (CI ran past 120 s)
def test_a_compiled_network_keeps_solo_bytes_in_shared_ticks_and_draws_what_eager_draws(app_weights: Path) -> None:
    """FASHION_COMPILE=1 on the CPU: inductor compiles the fixed-row chunk's one shape."""
    loaded = load_weights(app_weights, "cpu")
    compiled = prepare(loaded, torch.device("cpu"), precision="float32", compile=True)
    eager = prepare(loaded, torch.device("cpu"), precision="float32")
    results: dict[str, list] = {"solo": [], "together": [], "eager": []}

    async def body(engine: Engine) -> None:
        for s in MIXED:
            results["solo"].append(await engine.run(replace(s, model="compiled")))
            results["eager"].append(await engine.run(replace(s, model="eager")))
        jobs = [engine.submit(replace(s, model="compiled")) for s in MIXED]
        results["together"].extend(await asyncio.gather(*(job.future for job in jobs)))

    scenario({"compiled": compiled, "eager": eager}, body)
    for alone, shared, plain in zip(results["solo"], results["together"], results["eager"], strict=True):
        assert np.array_equal(shared.images, alone.images)  # byte for byte
        apart = np.abs(alone.images.astype(np.int16) - plain.images.astype(np.int16))
        assert apart.mean() < 0.5 and apart.max() <= 8, (apart.mean(), apart.max())  # fused kernels round apart


def test_jobs_taking_turns_under_narrow_first_keep_their_solo_bytes(runtime: Runtime) -> None:
    """A tick of at most 6 rows cannot carry all three (4 + 1 + 6 rows): they step in turns, by deadline."""
    solo: list = []
    together: list = []

    async def body(engine: Engine) -> None:
        for s in MIXED:
            solo.append(await engine.run(s))
        jobs = [engine.submit(s) for s in MIXED]
        together.extend(await asyncio.gather(*(job.future for job in jobs)))

    recorder = scenario(runtime, body, policy="narrow-first", tick_rows=6)
    assert max(rows for rows, _ in recorder.ticks) <= 6 and (11, 3) not in recorder.ticks
    for alone, shared in zip(solo, together, strict=True):
        assert np.array_equal(shared.images, alone.images)  # byte for byte


def test_under_narrow_first_a_small_job_skips_a_large_ones_ticks(runtime: Runtime) -> None:
    """Beside a 4-row job of 400 steps, a 1-row job of 4 steps has the nearer deadline: with ticks of 4
    rows it takes every tick alone until it is done, instead of sharing all of them."""

    async def body(engine: Engine) -> None:
        small_spec = spec(4, (9,), steps=4, guidance=1.0)
        small_solo = await engine.run(small_spec)
        events: list = []
        large = engine.submit(spec(0, (5, 6, 7, 8), steps=400, guidance=1.0, sampler="ddim"), on_event=events.append)
        await first_step(events)
        small = await engine.run(small_spec)
        assert not large.future.done()  # it waited, and has steps left
        assert small.batch_jobs == 1  # never in a tick with the large job
        assert np.array_equal(small.images, small_solo.images)
        engine.cancel(large)
        await asyncio.gather(large.future, return_exceptions=True)

    scenario(runtime, body, policy="narrow-first", tick_rows=4)


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
        assert np.array_equal(short.images, short_solo.images) and short.batch_jobs == 2
        assert np.array_equal((await long.future).images, long_solo.images)

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
        assert len(result.images) == 2
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

    scenario(runtime, body, max_rows=4, policy="fcfs")
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
        assert len((await queued.future).images) == 1

    recorder = scenario(runtime, body, queue_size=1, max_rows=2)
    assert recorder.value("fashion_jobs_rejected_total", reason="queue_full") == 1


def test_a_job_over_the_row_budget_is_refused_naming_the_limit(runtime: Runtime) -> None:
    async def body(engine: Engine) -> None:
        with pytest.raises(JobTooLarge, match=r"n: 3 images need 6 rows .* at most 4 .*allowed: n <= 2"):
            engine.submit(spec(0, (1, 2, 3), guidance=2.0))
        assert len((await engine.run(spec(0, (1, 2, 3), guidance=1.0))).images) == 3  # unguided: 3 rows fit

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
        assert len((await engine.run(spec(4, (9,), steps=2))).images) == 1  # the worker is free again

    recorder = scenario(runtime, body, max_rows=2)
    assert recorder.value("fashion_jobs_cancelled_total", stage="queued") == 1
    assert recorder.value("fashion_jobs_cancelled_total", stage="running") == 1


def test_a_cancelled_running_job_leaves_the_active_gauge_at_its_release(runtime: Runtime) -> None:
    # Nothing else changes the queue after the cancel, so only the release itself can lower the gauge.
    recorder = Recorder()

    async def body(engine: Engine) -> None:
        seen: list = []
        long = engine.submit(spec(0, (1,), steps=1000, sampler="ddim"), on_event=seen.append)
        await first_step(seen)
        assert recorder.value("fashion_jobs_active") == 1  # reported on admission, before the first step
        engine.cancel(long)
        with pytest.raises(JobCancelled):
            await long.future
        deadline = time.monotonic() + 30
        while recorder.value("fashion_jobs_active") != 0:
            assert time.monotonic() < deadline, "fashion_jobs_active stayed 1 after its job was cancelled"
            await asyncio.sleep(0.01)

    scenario(runtime, body, recorder)
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
        assert len((await running.future).images) == 2
        assert len((await queued.future).images) == 2

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

    scenario(runtime, body, max_rows=2, policy="fcfs")  # the deadline policy would let the short job go first


def test_stop_fails_queued_and_running_jobs_and_refuses_new_ones(runtime: Runtime) -> None:
    async def main() -> None:
        engine = Engine({"tiny": runtime}, Recorder(), max_rows=2)
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


# --- several models: a teacher and its student on one engine ------------------------------------------


class Counting(torch.nn.Module):
    """The network, appending its model's name to ``calls`` at every evaluation; raises when ``broken``."""

    def __init__(self, net: torch.nn.Module, name: str, calls: list[str], broken: bool = False) -> None:
        super().__init__()
        self.net, self.name, self.calls, self.broken = net, name, calls, broken

    def forward(self, x, t, y):  # type: ignore[no-untyped-def]
        self.calls.append(self.name)
        if self.broken:
            raise RuntimeError(f"{self.name} is broken")
        return self.net(x, t, y)


def counted(runtime: Runtime, name: str, calls: list[str], broken: bool = False) -> Runtime:
    return replace(
        runtime, denoiser=replace(runtime.denoiser, model=Counting(runtime.denoiser.model, name, calls, broken))
    )


def student_spec(seeds: tuple[int, ...] = (7, 8), steps: int = 4) -> JobSpec:
    return spec(2, seeds, steps=steps, guidance=1.0, sampler="consistency", model="student")


def test_under_fcfs_every_tick_evaluates_each_model_with_active_jobs_once(
    runtime: Runtime, student_runtime: Runtime
) -> None:
    calls: list[str] = []
    models = {"teacher": counted(runtime, "teacher", calls), "student": counted(student_runtime, "student", calls)}
    results: dict[str, Any] = {}

    async def body(engine: Engine) -> None:
        events: list = []
        teacher = engine.submit(spec(0, (1, 2), steps=40, sampler="ddim", model="teacher"), on_event=events.append)
        await first_step(events)
        results["student"] = await engine.run(student_spec())
        assert not teacher.future.done()  # the student did not wait for the teacher's job
        results["teacher"] = await teacher.future

    recorder = scenario(models, body, policy="fcfs")
    ticks = [tuple(e.model for e in tick) for tick in recorder.evaluations]
    # Each of the student's 4 steps shared its tick with a teacher step: one evaluation of each network.
    assert [tick for tick in ticks if "student" in tick] == [("teacher", "student")] * 4
    assert set(ticks) == {("teacher",), ("teacher", "student")}
    assert calls == [model for tick in ticks for model in tick]  # one network call per evaluation, no more
    # Rows of the two models are never batched together: each job saw only its own model's jobs.
    assert results["student"].batch_jobs == 1 and results["student"].batch_images == 2
    assert results["teacher"].batch_jobs == 1
    assert sum(e.rows for tick in recorder.evaluations for e in tick if e.model == "student") == 4 * 2  # unguided


def test_under_narrow_first_a_short_job_takes_ticks_alone_while_the_other_models_jobs_have_time(
    runtime: Runtime, student_runtime: Runtime
) -> None:
    """The teacher's 40-step job may wait 3x its time alone (at least 12 s at the estimate before the
    first measured tick); the student's 4-step job holds the earlier deadline, so its ticks leave the
    teacher's network out, and its images are the bytes it draws alone."""
    calls: list[str] = []
    models = {"teacher": counted(runtime, "teacher", calls), "student": counted(student_runtime, "student", calls)}
    results: dict[str, Any] = {}

    async def body(engine: Engine) -> None:
        results["solo"] = await engine.run(student_spec())
        events: list = []
        teacher = engine.submit(spec(0, (1, 2), steps=40, sampler="ddim", model="teacher"), on_event=events.append)
        await first_step(events)
        results["student"] = await engine.run(student_spec())
        assert not teacher.future.done()
        results["teacher"] = await teacher.future

    recorder = scenario(models, body, policy="narrow-first")
    ticks = [tuple(e.model for e in tick) for tick in recorder.evaluations]
    assert [tick for tick in ticks if "student" in tick] == [("student",)] * 8  # alone, then beside the teacher
    assert ticks.count(("teacher",)) == 40  # the teacher lost no step, it only waited 4 ticks
    assert calls == [model for tick in ticks for model in tick]
    assert np.array_equal(results["student"].images, results["solo"].images)


def test_a_job_of_one_model_never_waits_for_the_other_models_jobs(runtime: Runtime, student_runtime: Runtime) -> None:
    async def body(engine: Engine) -> None:
        events: list = []
        # The teacher's budget (2 rows) is full and its queue (1 job) too; the student's are its own.
        long = engine.submit(spec(0, (1,), steps=300, sampler="ddim", model="teacher"), on_event=events.append)
        await first_step(events)
        queued = engine.submit(spec(1, (2,), steps=2, model="teacher"))
        with pytest.raises(QueueFull):
            engine.submit(spec(3, (4,), steps=2, model="teacher"))
        assert (engine.queue_depth_of("teacher"), engine.queue_depth_of("student")) == (1, 0)
        student = await engine.run(student_spec())  # 2 rows: admitted at once, beside the full teacher
        assert student.queued_s < 0.5 and len(student.images) == 2
        assert not long.future.done() and queued.state == "queued"  # first come, first served within the teacher
        engine.cancel(long)
        await asyncio.gather(long.future, return_exceptions=True)
        assert len((await queued.future).images) == 1

    scenario({"teacher": runtime, "student": student_runtime}, body, max_rows=2, queue_size=1)


def test_a_models_images_are_the_same_bytes_whether_or_not_the_other_model_is_busy(
    runtime: Runtime, student_runtime: Runtime
) -> None:
    mine = {
        "student": student_spec((30, 31, 32)),
        "teacher": spec(5, (30, 31), steps=6, sampler="ddim", model="teacher"),
    }
    alone: dict[str, JobResult] = {}
    busy: dict[str, JobResult] = {}

    async def body(engine: Engine) -> None:
        for name, s in mine.items():
            alone[name] = await engine.run(s)
        # Each beside a different load of the other model (and of its own), joining half way.
        events: list = []
        noise = [
            engine.submit(spec(9, (70, 71, 72), steps=25, sampler="ddim", model="teacher"), on_event=events.append),
            engine.submit(student_spec((80,), steps=3)),
        ]
        await first_step(events)
        busy.update(zip(mine, await asyncio.gather(*(engine.run(s) for s in mine.values())), strict=True))
        await asyncio.gather(*(job.future for job in noise))

    scenario({"teacher": runtime, "student": student_runtime}, body)
    for name in mine:
        assert np.array_equal(busy[name].images, alone[name].images), name  # byte for byte
    # A job runs on its own model's network: the teacher draws other images from the student's parameters.
    as_teacher = replace(mine["student"], model="teacher")

    async def teacher_body(engine: Engine) -> None:
        assert not np.array_equal((await engine.run(as_teacher)).images, alone["student"].images)

    scenario({"teacher": runtime, "student": student_runtime}, teacher_body)


def test_a_failing_model_fails_its_own_jobs_and_the_other_model_goes_on(
    runtime: Runtime, student_runtime: Runtime
) -> None:
    calls: list[str] = []
    models = {"teacher": runtime, "student": counted(student_runtime, "student", calls, broken=True)}

    async def body(engine: Engine) -> None:
        teacher = engine.submit(spec(0, (1,), steps=6, sampler="ddim", model="teacher"))
        student = engine.submit(student_spec())
        with pytest.raises(RuntimeError, match="student is broken"):
            await student.future
        assert len((await teacher.future).images) == 1
        with pytest.raises(ValueError, match="unknown model 'nobody'; this engine serves teacher, student"):
            engine.submit(spec(0, (1,), model="nobody"))
        assert engine.submit(spec(0, (1,), steps=1)).spec.model == "teacher"  # no model: the first

    recorder = scenario(models, body)
    assert calls == ["student"]
    assert recorder.value("fashion_jobs_failed_total", reason="RuntimeError") == 1


def test_background_work_runs_only_in_the_rows_interactive_jobs_leave_idle(runtime: Runtime) -> None:
    """A background job (a long job's images) steps in whole ticks while alone. Beside interactive jobs it
    rides only in the padding of their last 16-row chunk: beside a 16-row job it waits, beside a 2-row job
    it shares the chunk, so it never adds a chunk to an interactive tick. Every image keeps its solo bytes."""
    recorder = Recorder()
    wide, small = spec(4, range(20, 28), steps=5, guidance=2.0), spec(6, (9,), steps=5, guidance=2.0)  # 16, 2 rows
    background = replace(spec(0, range(10, 14), steps=80, guidance=1.0, sampler="ddim"), background=True)  # 4 rows
    results: dict[str, Any] = {}

    async def body(engine: Engine) -> None:
        results["wide solo"], results["small solo"] = await engine.run(wide), await engine.run(small)
        results["background solo"] = await engine.run(background)
        events: list = []
        job = engine.submit(background, on_event=events.append)
        await first_step(events)
        results["wide"] = await engine.run(wide)
        results["small"] = await engine.run(small)
        assert not job.future.done()  # still going: it had no row beside the wide job
        results["background"] = await job.future

    scenario(runtime, body, recorder)
    for name in ("wide", "small", "background"):
        assert np.array_equal(results[name].images, results[f"{name} solo"].images)  # byte for byte
    mixed = [e for tick in recorder.evaluations for e in tick if 0 < e.background_rows < e.rows]
    beside_wide = [e for tick in recorder.evaluations for e in tick if e.rows - e.background_rows == 16]
    assert mixed and all(e.rows - e.background_rows == 2 and e.rows <= 16 for e in mixed)  # in the padding only
    assert beside_wide and all(e.background_rows == 0 for e in beside_wide)  # no chunk added for it
    assert recorder.value("fashion_images_generated_total", sampler="ddim", model="tiny") == 2 * 4  # solo, beside
