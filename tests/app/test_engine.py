"""The batching engine on a real tiny network: merging, fixed-shape determinism, queue limit, cancel."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from app.device import FixedRows, Runtime, prepare
from app.engine import Engine, JobCancelled, JobSpec, Progress, QueueFull
from app.metrics import Metrics
from model.io import load_weights

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def runtime(app_weights: Path) -> Runtime:
    return prepare(load_weights(app_weights, "cpu"), torch.device("cpu"))


def spec(
    label: int, seeds: range | tuple[int, ...], steps: int = 3, guidance: float = 2.0, sampler: str = "dpm++"
) -> JobSpec:
    return JobSpec(label, tuple(seeds), sampler, steps, guidance)


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_fixed_rows_makes_each_row_independent_of_its_batch(app_weights: Path) -> None:
    net = load_weights(app_weights, "cpu").model
    fixed = FixedRows(net, rows=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 1, 28, 28, generator=g)
    t = torch.full((11,), 500.0)
    y = torch.arange(11) % 10
    with torch.inference_mode():
        full = fixed(x, t, y)
        assert full.shape == (11, 1, 28, 28)
        for rows in ([3], [0, 5], [10, 2, 7], list(range(11))[::-1]):
            out = fixed(x[rows], t[rows], y[rows])
            assert torch.equal(out, full[rows]), rows  # bitwise, not approximately


def test_same_seed_gives_identical_pngs_in_any_batch_mix(runtime: Runtime) -> None:
    async def scenario() -> None:
        engine = Engine(runtime, Metrics(), batch_wait_s=0.3)
        engine.start()
        try:
            a = spec(3, (100, 101))
            solo = await engine.run(a)
            assert solo.batch_jobs == 1
            # The same job between two others, at a different position of a bigger batch.
            mixes = [
                [spec(1, range(5, 8)), a, spec(9, range(1, 6))],
                [a, spec(0, range(200, 213))],
                [spec(7, range(40, 41)), spec(3, range(50, 53)), spec(4, range(60, 69)), a],
            ]
            for mix in mixes:
                jobs = [engine.submit(s) for s in mix]
                results = await asyncio.gather(*(job.future for job in jobs))
                mine = results[mix.index(a)]
                assert mine.batch_jobs == len(mix)  # they really shared one batch
                assert mine.pngs == solo.pngs
            # Image i depends on seed + i only, not on n.
            single = await engine.run(spec(3, (101,)))
            assert single.pngs[0] == solo.pngs[1]
            other = await engine.run(spec(3, (102, 103)))
            assert other.pngs != solo.pngs  # seeds matter
        finally:
            engine.stop()

    asyncio.run(scenario())


def test_compatible_jobs_merge_up_to_max_batch_and_others_wait(runtime: Runtime) -> None:
    async def scenario() -> None:
        metrics = Metrics()
        engine = Engine(runtime, metrics, batch_wait_s=0.3, max_batch=4)
        engine.start()
        try:
            jobs = [
                engine.submit(spec(0, (1, 2))),
                engine.submit(spec(1, (3,), steps=2)),  # different steps: its own batch
                engine.submit(spec(2, (4, 5))),
                engine.submit(spec(3, (6, 7))),  # would make 6 > max_batch: next batch
            ]
            results = await asyncio.gather(*(job.future for job in jobs))
            assert [r.batch_jobs for r in results] == [2, 1, 2, 1]
            assert [r.batch_images for r in results] == [4, 1, 4, 2]
            assert counter(metrics, "fashion_batch_size_jobs_count") == 3
            assert counter(metrics, "fashion_batch_size_images_sum") == 7
            assert counter(metrics, "fashion_images_generated_total", sampler="dpm++") == 7
            assert counter(metrics, "fashion_sampler_steps_total") == 3 + 2 + 3
        finally:
            engine.stop()

    asyncio.run(scenario())


def test_full_queue_is_refused_at_once_and_cancel_stops_within_a_step(runtime: Runtime) -> None:
    async def scenario() -> None:
        metrics = Metrics()
        engine = Engine(runtime, metrics, queue_size=1, batch_wait_s=0.0)
        engine.start()
        seen: list[Progress] = []
        try:
            long = engine.submit(spec(0, (1,), steps=1000, sampler="ddim"), on_progress=seen.append)
            while not seen:
                await asyncio.sleep(0.005)
            queued = engine.submit(spec(1, (2,), steps=2))
            t0 = time.monotonic()
            with pytest.raises(QueueFull) as refused:
                engine.submit(spec(2, (3,), steps=2))
            assert time.monotonic() - t0 < 0.05  # refused at once, not after waiting
            assert refused.value.retry_after >= 1
            assert counter(metrics, "fashion_jobs_rejected_total", reason="queue_full") == 1

            assert engine.cancel(queued)  # a queued job leaves the queue at once
            with pytest.raises(JobCancelled):
                await queued.future
            assert engine.queue_depth == 0

            steps_at_cancel = counter(metrics, "fashion_sampler_steps_total")
            assert engine.cancel(long)
            with pytest.raises(JobCancelled):
                await long.future
            steps_after = counter(metrics, "fashion_sampler_steps_total")
            assert steps_after - steps_at_cancel <= 2  # the step in flight, then the flag is seen
            assert steps_after < 1000
            assert counter(metrics, "fashion_jobs_cancelled_total", stage="queued") == 1
            assert counter(metrics, "fashion_jobs_cancelled_total", stage="running") == 1
            n_events = len(seen)
            await asyncio.sleep(0.1)
            assert len(seen) == n_events  # a cancelled job gets no more events
            # The worker is free again.
            done = await engine.run(spec(4, (9,), steps=2))
            assert len(done.pngs) == 1
        finally:
            engine.stop()

    asyncio.run(scenario())


def test_cancelled_job_in_a_shared_batch_leaves_the_others_running(runtime: Runtime) -> None:
    async def scenario() -> None:
        metrics = Metrics()
        engine = Engine(runtime, metrics, batch_wait_s=0.3)
        engine.start()
        try:
            seen: list[Progress] = []
            keep = engine.submit(spec(0, (1, 2), steps=40, sampler="ddim"))
            drop = engine.submit(spec(1, (3,), steps=40, sampler="ddim"), on_progress=seen.append)
            while not seen:
                await asyncio.sleep(0.005)
            engine.cancel(drop)
            result = await keep.future
            assert result.batch_jobs == 2 and len(result.pngs) == 2
            with pytest.raises(JobCancelled):
                await drop.future
            assert len(seen) < 40
            assert counter(metrics, "fashion_sampler_steps_total") == 40  # the batch ran to the end
        finally:
            engine.stop()

    asyncio.run(scenario())


def test_progress_events_are_ordered_with_previews_every_k(runtime: Runtime) -> None:
    async def scenario() -> list[Progress]:
        engine = Engine(runtime, Metrics(), batch_wait_s=0.0)
        engine.start()
        seen: list[Progress] = []
        try:
            await engine.run(spec(5, (1, 2, 3), steps=5, sampler="ddim"), on_progress=seen.append, preview_every=2)
        finally:
            engine.stop()
        return seen

    seen = asyncio.run(scenario())
    assert [p.index for p in seen] == [0, 1, 2, 3, 4]
    assert all(p.total == 5 for p in seen)
    assert [p.x0_png is not None for p in seen] == [False, True, False, True, True]
    ts = [p.t for p in seen]
    assert ts == sorted(ts, reverse=True) and ts[0] == 999


def test_stop_fails_queued_jobs_and_refuses_new_ones(runtime: Runtime) -> None:
    async def scenario() -> None:
        engine = Engine(runtime, Metrics(), batch_wait_s=0.0)
        engine.start()
        seen: list[Progress] = []
        running = engine.submit(spec(0, (1,), steps=1000, sampler="ddim"), on_progress=seen.append)
        while not seen:
            await asyncio.sleep(0.005)
        queued = engine.submit(spec(1, (2,), steps=2))
        await asyncio.to_thread(engine.stop)
        from app.engine import EngineClosed

        for job in (running, queued):
            with pytest.raises(EngineClosed):
                await job.future
        assert len(seen) < 1000
        with pytest.raises(EngineClosed):
            engine.submit(spec(2, (3,), steps=2))

    asyncio.run(scenario())
