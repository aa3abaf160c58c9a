"""Drawing a dataset's images in this process, as the engine draws them: the served model's network on
fixed-row chunks (``app.generation.device``), the same sampler state and step, the same autocast, so
image i has the bytes that the service would give for its seed and parameters."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from app.datasets.spec import DatasetSpec, Sampling
from app.datasets.store import Chunk, ChunkStore
from app.generation.device import resolve_device
from app.generation.models import ServedModel, load_models
from app.settings import Settings
from model.samplers import generators_from_seeds, sample, sampler_named, to_uint8


def load_model(weights: str | Path, device: str = "auto", precision: str = "auto") -> ServedModel:
    """One model prepared exactly as the service prepares it (its card checked, its guide beside it)."""
    settings = Settings(models=(Path(weights),), device=device, precision=precision)  # type: ignore[arg-type]
    (model,) = load_models(settings, resolve_device(settings.device))
    return model


def resolve_sampling(model: ServedModel, **given: object) -> Sampling:
    """The model's card defaults under whatever ``given`` names (sampler, steps, guidance, guidance_method),
    checked as the service checks a request."""
    d = model.defaults
    sampler = str(given.get("sampler") or d.sampler)
    entry = sampler_named(sampler)
    steps = entry.steps_for(given.get("steps"), d.steps, model.T)  # type: ignore[arg-type]
    guidance = float(given["guidance"] if given.get("guidance") is not None else d.guidance)  # type: ignore[arg-type]
    method = str(given.get("guidance_method") or d.guidance_method)
    entry.check_steps(steps, model.T)
    if method == "autoguidance" and model.guide is None:
        raise ValueError(f"guidance_method: {model.name} has no guide network; allowed: classifier-free")
    if model.distilled_guidance not in (None, 1.0) and guidance != 1.0:
        raise ValueError(f"guidance: guidance is distilled into {model.name}; allowed: 1.0")
    return Sampling(sampler, steps, guidance, method, d.sigma_min if entry.takes_sigma_min else None)


def draw(model: ServedModel, spec: DatasetSpec, lo: int, hi: int) -> np.ndarray:
    """uint8 (hi - lo, 28, 28): images lo..hi-1 of the spec."""
    s, runtime = spec.sampling, model.runtime
    labels = torch.from_numpy(spec.labels(lo, hi)).to(runtime.device)
    gens = generators_from_seeds(spec.seeds(lo, hi).tolist())
    with torch.inference_mode(), runtime.autocast():
        x = sample(
            runtime.denoiser,
            labels,
            gens,
            s.sampler,
            s.steps,
            s.guidance,
            sigma_min=s.sigma_min,
            autoguide=s.guidance_method == "autoguidance",
        )
    return to_uint8(x.float())


def fill(
    store: ChunkStore,
    model: ServedModel,
    progress: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
) -> None:
    """Draw and commit every chunk the store is missing, in order. ``on_chunk(done, total)`` after each."""
    spec = store.spec
    bar = tqdm(total=spec.total, initial=store.images_done(), unit="img", disable=not progress)
    for index in store.missing():
        lo, hi = store.bounds(index)
        t0 = time.perf_counter()
        images = draw(model, spec, lo, hi)
        store.write(Chunk(index, images, spec.labels(lo, hi), spec.seeds(lo, hi)))
        bar.update(hi - lo)
        bar.set_postfix(img_s=f"{(hi - lo) / (time.perf_counter() - t0):.1f}", refresh=False)
        if on_chunk is not None:
            on_chunk(store.images_done(), spec.total)
    bar.close()
