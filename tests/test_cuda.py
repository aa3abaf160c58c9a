"""The CUDA path, on a machine with a GPU: float16 autocast, channels-last, torch.compile with CUDA
graphs, the step-level engine, the student, and a training step. Skipped where CUDA is absent (CI
has no GPU); ``scripts/gpu-check.sh`` runs this module with the bench and the service on one.

Against the CPU's float32 images from the same seeds: CUDA draws x_T and every later noise on the
CPU (model.samplers.initial_noise), so only the arithmetic differs, and 20 float16 steps stay
within a few grey levels of float32.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.generation.device import prepare
from app.generation.engine import Engine
from app.generation.jobs import JobSpec
from app.generation.metrics import EngineMetrics
from app.metrics import Metrics
from model.io import load_weights
from model.machine import autocast
from model.samplers import generators_from_seeds, sample, to_uint8
from model.train import train

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
CUDA = torch.device("cuda")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu-check.sh)"),
]


def draw(denoiser, sampler: str, steps: int, guidance: float, dtype: torch.dtype, device: torch.device) -> np.ndarray:
    """uint8 images of classes 0..7, seeds 0..7, the network under autocast to ``dtype``."""
    labels = torch.arange(8, device=device)
    with torch.inference_mode(), autocast(device.type, dtype):
        return to_uint8(sample(denoiser, labels, generators_from_seeds(range(8)), sampler, steps, guidance))


def cpu_reference(name: str, sampler: str, steps: int, guidance: float) -> np.ndarray:
    return draw(
        load_weights(WEIGHTS / name, "cpu").denoiser, sampler, steps, guidance, torch.float32, torch.device("cpu")
    )


def grey_levels_apart(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), int(d.max())


@pytest.mark.parametrize(
    ("name", "sampler", "steps", "guidance"),
    [("fashion-unet.safetensors", "dpm++", 20, 1.35), ("fashion-student.safetensors", "consistency", 4, 1.0)],
)
def test_the_served_network_in_float16_and_channels_last_draws_the_cpu_images(name, sampler, steps, guidance):
    runtime = prepare(load_weights(WEIGHTS / name, CUDA), CUDA)  # auto: float16, channels-last, max-batch rows
    assert runtime.dtype == torch.float16 and runtime.precision == "float16"
    served = draw(runtime.denoiser, sampler, steps, guidance, runtime.dtype, CUDA)
    mean, _ = grey_levels_apart(served, cpu_reference(name, sampler, steps, guidance))
    assert mean < 2.0, f"float16 on CUDA is {mean:.2f} grey levels from float32 on the CPU on average"


def test_compiled_with_cuda_graphs_it_draws_what_eager_draws_whatever_the_batch():
    loaded = load_weights(WEIGHTS / "fashion-unet.safetensors", CUDA)
    eager = prepare(loaded, CUDA)
    compiled = prepare(loaded, CUDA, compile=True)  # reduce-overhead: CUDA graphs over one fixed shape
    a = draw(eager.denoiser, "dpm++", 10, 1.35, torch.float16, CUDA)
    b = draw(compiled.denoiser, "dpm++", 10, 1.35, torch.float16, CUDA)
    mean, _ = grey_levels_apart(a, b)
    assert mean < 1.0, f"compiled is {mean:.2f} grey levels from eager"
    # A replayed graph reuses its output buffer: an image must not change when others share its batch.
    labels = torch.tensor([3], device=CUDA)
    with torch.inference_mode(), autocast("cuda", torch.float16):
        alone = to_uint8(sample(compiled.denoiser, labels, generators_from_seeds([3]), "dpm++", 10, 1.35))
    assert np.array_equal(alone[0], b[3])


def test_the_engine_on_cuda_gives_a_job_its_solo_bytes_when_it_shares_ticks():
    runtime = prepare(load_weights(WEIGHTS / "fashion-unet.safetensors", CUDA), CUDA)
    specs = [
        JobSpec(3, (100, 101), "dpm++", 20, 2.0, None),
        JobSpec(1, (7,), "ddim", 25, 1.0, None),
        JobSpec(9, (40, 41, 42), "ddim", 30, 3.5, None),
    ]
    solo, together = [], []

    async def main() -> None:
        engine = Engine({"fashion-unet": runtime}, EngineMetrics(Metrics()))
        engine.start()
        try:
            for s in specs:
                solo.append(await engine.run(s))
            together.extend(await asyncio.gather(*(engine.submit(s).future for s in specs)))
        finally:
            await asyncio.to_thread(engine.stop)

    asyncio.run(main())
    assert max(r.batch_jobs for r in together) == 3
    for alone, shared in zip(solo, together, strict=True):
        assert np.array_equal(shared.images, alone.images)


def test_training_on_cuda_in_bfloat16_channels_last_lowers_the_loss_and_names_the_gpu(tiny_train_config, tmp_path):
    cfg = tiny_train_config(tmp_path, device="cuda", precision="auto", channels_last=True)  # auto: bfloat16 on CUDA
    card_path = train(cfg, progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    epochs = [r for r in map(json.loads, lines) if r["kind"] == "epoch"]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]
    record = json.loads(card_path.read_text())["training"]
    assert torch.cuda.get_device_name(0) in record["hardware"]
