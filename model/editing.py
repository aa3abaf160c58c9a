"""Image-to-image editing on the sampler state: variations (SDEdit), inpainting (RePaint's merge and
resampling, consistency models' zero-shot editing), and interpolation (slerp of x_T, DDIM inversion, class
embeddings).

Every method is a ``SamplerState`` built here and advanced by ``model.samplers.step`` alone, so an engine
that evaluates ``state.t`` for a job's rows and calls ``step`` runs it in its shared ticks unchanged, and
counts ``len(state.timesteps)`` network evaluations: jumps back up are not evaluations. Every random draw
comes from the image's own generator, so an image depends only on its seed and its inputs.

Images come in as (B, C, H, W) floats in [-1, 1]; a uint8 image u is u / 127.5 - 1, which ``to_uint8`` maps
back to u exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from model.diffusion import Schedule
from model.samplers import (
    INVERSION,
    SamplerState,
    evaluations,
    initial_noise,
    start_at,
    timesteps_for,
)
from model.unet import UNet

SLERP_DOT_THRESHOLD = 0.9995  # |cos theta| above which slerp is a lerp: near-parallel, sin theta ~ 0


def check_image(image: torch.Tensor, generators: Sequence[torch.Generator]) -> None:
    """Refuse an input image that is not (B, C, H, W) floats in [-1, 1], one per generator."""
    if image.ndim != 4 or len(image) != len(generators):
        raise ValueError(
            f"image must be (B, C, H, W) with one generator per image: got {tuple(image.shape)}, "
            f"{len(generators)} generators"
        )
    if not image.is_floating_point():
        raise ValueError(f"image must be floats in [-1, 1] (a uint8 image u as u / 127.5 - 1), got {image.dtype}")
    if not bool(torch.isfinite(image).all()) or image.min() < -1 or image.max() > 1:
        raise ValueError(f"image must be in [-1, 1], got {image.min().item():.4g}..{image.max().item():.4g}")


def check_mask(mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``mask`` as a bool tensor on the image's device: (B, 1, H, W) of 0 and 1 only (1: generate, 0: keep)."""
    b, _, h, w = image.shape
    if tuple(mask.shape) != (b, 1, h, w):
        raise ValueError(f"mask must be (B, 1, H, W) = {(b, 1, h, w)} like the image, got {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 (keep the input) and 1 (generate); a soft mask is not supported")
    return mask.to(image.device).bool()


# --- variations (SDEdit) -------------------------------------------------------------------------


def start_from_image(
    sampler: str,
    schedule: Schedule,
    steps: int,
    generators: Sequence[torch.Generator],
    x0_image: torch.Tensor,
    strength: float = 1.0,
    *,
    eta: float = 0.0,
    sigma_min: float | None = None,
) -> SamplerState:
    """SDEdit (Meng et al. 2022, sec. 3): the image noised to the level ``strength`` picks, then the sampler's
    last steps from there. Of the sampler's timesteps for ``steps`` steps it keeps the last int(steps * strength)
    steps (diffusers' img2img rounding, ``samplers.kept_steps``), so the network evaluations scale with strength
    (``samplers.evaluations(sampler, steps, strength)``) and a strength below 1/steps is refused. Heun keeps whole
    levels and starts with the Euler step from the first (2k - 1 evaluations for k levels: no jump from pure
    noise); DPM-Solver++ starts with an empty multistep memory; consistency sampling re-noises from that level
    (Song et al. 2023, alg. 1).

    x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps at the first kept timestep t (Ho et al. 2020, eq. 4), eps drawn
    from each image's generator as x_T is (``initial_noise``, on the CPU)."""
    check_image(x0_image, generators)
    t = timesteps_for(sampler, schedule, steps, strength, sigma_min)[0]
    eps = initial_noise(generators, tuple(x0_image.shape[1:]), x0_image.device)  # (B, C, H, W)
    ab = float(schedule.alpha_bar[t])
    x_t = np.sqrt(ab) * x0_image + np.sqrt(1 - ab) * eps  # (B, C, H, W)
    return start_at(sampler, schedule, steps, generators, x_t, strength, eta, sigma_min)


# --- inpainting ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RePaint:
    """RePaint's resampling (Lugmayr et al. 2022, sec. 4.2): after every ``jump_length`` levels of the grid,
    jump back up ``jump_length`` levels and denoise them again, until each stretch has been denoised
    ``resamplings`` times; the paper uses 10 and 10 on a 250-step grid."""

    jump_length: int = 10  # j: grid levels each jump goes back up
    resamplings: int = 10  # r: how many times each stretch of j levels is denoised (1: no resampling)

    def __post_init__(self):
        if self.jump_length < 1 or self.resamplings < 1:
            raise ValueError(
                f"jump_length and resamplings must be integers >= 1, got {self.jump_length} and {self.resamplings}"
            )


def repaint_schedule(levels: int, jump_length: int, resamplings: int) -> list[int]:
    """RePaint's time schedule over grid indices levels - 1 (the top) .. 0, and -1 for the clean image: each
    entry one index down (a denoising step) or up (a jump back). Going down, each arrival at a multiple j of
    ``jump_length`` below levels - jump_length jumps back up to j + jump_length, the first resamplings - 1 times.
    The official ``get_schedule_jump`` (github.com/andreas128/RePaint, guided_diffusion/scheduler.py) with
    n_sample = 1 and the second and third jump levels unused, as in the paper."""
    if not 1 <= jump_length < levels:
        raise ValueError(f"jump_length must be in 1..{levels - 1} for a grid of {levels} steps, got {jump_length}")
    jumps = {j: resamplings - 1 for j in range(0, levels - jump_length, jump_length)}
    t, times = levels, []
    while t >= 1:
        t -= 1
        times.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                times.append(t)
    times.append(-1)
    return times


def repaint_timesteps(grid: Sequence[int], repaint: RePaint) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(timesteps, lands) of RePaint on a descending grid of timesteps: an evaluation at each entry of
    ``repaint_schedule`` that the next entry is below, landing at the next entry's level (-1: the clean image).
    A next evaluation above where a step landed is a jump back up, which ``samplers.step`` makes without
    evaluating, so len(timesteps) counts the network evaluations."""
    ascending = sorted(grid)  # grid index i -> timestep ascending[i], 0 the lowest

    def level(i: int) -> int:
        return ascending[i] if i >= 0 else -1

    times = repaint_schedule(len(grid), repaint.jump_length, repaint.resamplings)
    down = [(a, b) for a, b in zip(times, times[1:], strict=False) if b < a]
    return tuple(level(a) for a, _ in down), tuple(level(b) for _, b in down)


def start_inpainting(
    sampler: str,
    schedule: Schedule,
    steps: int,
    generators: Sequence[torch.Generator],
    image: torch.Tensor,
    mask: torch.Tensor,
    strength: float = 1.0,
    *,
    eta: float | None = None,
    sigma_min: float | None = None,
    repaint: RePaint | None = None,
) -> SamplerState:
    """Inpainting: generate where ``mask`` (B, 1, H, W) is 1, keep ``image`` (B, C, H, W, in [-1, 1]) where it
    is 0. The run starts as ``start_from_image`` (strength 1: from pure noise but for sqrt(ab_{T-1}) of the
    image). After every step ``samplers.step`` puts back the kept pixels, noised to the next timestep's level
    (RePaint's merge, Lugmayr et al. 2022, eq. 8) and the input itself after the last step, so they come out of
    ``to_uint8`` byte for byte; the consistency sampler puts them into its x0 prediction before re-noising
    instead (Song et al. 2023, alg. 4).

    ``repaint``: RePaint's resampling, on ddim at eta = 1 (``eta`` None or 1), which on a spaced grid is DDPM's
    ancestral sampler respaced (Nichol & Dhariwal 2021, sec. 4); the timesteps become ``repaint_timesteps``
    over ddim's for ``steps`` and ``strength``. ``eta`` None otherwise: 0."""
    mask_bool = check_mask(mask, image)
    if repaint is not None:
        if sampler != "ddim":
            raise ValueError(f"RePaint's resampling runs on ddim (at eta = 1); got sampler {sampler!r}")
        if eta not in (None, 1.0):
            raise ValueError(f"RePaint's resampling runs ddim at eta = 1 (ancestral); got eta={eta}")
    eta = (0.0 if repaint is None else 1.0) if eta is None else eta
    state = start_from_image(sampler, schedule, steps, generators, image, strength, eta=eta, sigma_min=sigma_min)
    if repaint is not None:
        timesteps, lands = repaint_timesteps(state.timesteps, repaint)
        state = replace(state, timesteps=timesteps, lands=lands)
    return replace(state, known=image, mask=mask_bool)


def inpainting_evaluations(sampler: str, steps: int, strength: float = 1.0, repaint: RePaint | None = None) -> int:
    """Network evaluations per image (before guidance's reference rows) of ``start_inpainting``'s run."""
    kept = evaluations(sampler, steps, strength)
    if repaint is None:
        return kept
    times = repaint_schedule(kept, repaint.jump_length, repaint.resamplings)
    return sum(b < a for a, b in zip(times, times[1:], strict=False))


# --- interpolation -------------------------------------------------------------------------------


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two tensors taken as vectors (Shoemake 1985; White 2016 for generative
    models' latents): sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b, theta the angle between
    them, computed in float64. Two x_T in 784 dimensions are nearly orthogonal with norm ~28; lerp's midpoint
    has norm ~20, off the shell the model saw in training, slerp's keeps it (exactly, for equal norms). Where
    |cos theta| > 0.9995 (near-parallel, or near-opposite: no unique arc) it is lerp, (1 - t) a + t b."""
    if a.shape != b.shape:
        raise ValueError(f"slerp needs two tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    u, v = a.double().flatten(), b.double().flatten()  # (D,)
    norms = float(u.norm() * v.norm())
    cos = float(u @ v) / norms if norms > 0 else 1.0
    if abs(cos) > SLERP_DOT_THRESHOLD:
        out = (1 - t) * u + t * v
    else:
        theta = np.arccos(cos)
        out = (np.sin((1 - t) * theta) * u + np.sin(t * theta) * v) / np.sin(theta)
    return out.reshape(a.shape).to(a.dtype)


def slerp_frames(a: torch.Tensor, b: torch.Tensor, frames: int) -> torch.Tensor:
    """``frames`` tensors from a to b (both included) by ``slerp`` at t = k / (frames - 1): (K, *a.shape)."""
    if frames < 2:
        raise ValueError(f"frames must be at least 2 (the two ends), got {frames}")
    return torch.stack([slerp(a, b, k / (frames - 1)) for k in range(frames)])


def seed_frames(
    generator_a: torch.Generator,
    generator_b: torch.Generator,
    frames: int,
    shape: tuple[int, ...] = (1, 28, 28),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """x_T of ``frames`` frames between two seeds (K, *shape): each seed's x_T drawn from its generator as
    ``initial_noise`` draws it, then ``slerp_frames``. Start them with ``samplers.start_at`` and a deterministic
    sampler (ddim at eta 0, dpm++, heun), so frame k depends on its x_T alone and the ends are the seeds' images."""
    ends = initial_noise([generator_a, generator_b], shape, "cpu")  # (2, *shape)
    return slerp_frames(ends[0], ends[1], frames).to(device)


def inversion_timesteps(schedule: Schedule, steps: int, strength: float = 1.0) -> tuple[list[int], list[int]]:
    """(timesteps, lands) of DDIM inversion up the levels that ``steps`` DDIM steps from ``strength`` run down
    (``timesteps_for("ddim", ...)``, k_0 > ... > k_{m-1}): from the image taken as x at timestep 0 (sigma 0.006
    on the cosine schedule, 0.01 on the linear) up through k_{m-1}, ..., k_0, each step evaluated at the level
    it starts from. That is m evaluations, one per DDIM step it mirrors (m - 1 where k_{m-1} is 0 itself)."""
    levels = sorted({0, *timesteps_for("ddim", schedule, steps, strength)})  # ascending
    return levels[:-1], levels[1:]


def start_inversion(
    schedule: Schedule,
    steps: int,
    x0_image: torch.Tensor,
    strength: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
) -> SamplerState:
    """DDIM inversion (Song et al. 2021, sec. 5.4) of ``x0_image`` (B, C, H, W) in [-1, 1]: a state of the
    "ddim-inversion" step (``samplers.INVERSION``) whose x at the end is the latent at the top level k_0
    (``inversion_timesteps``) from which ``start_at("ddim", schedule, steps, ..., strength)`` at eta 0 samples
    the image back. Evaluate it with the conditional model at guidance 1: guidance breaks the reversibility
    (Mokady et al. 2023). It draws no noise; ``generators`` (default: unseeded, unused) only fill the state."""
    gens = tuple(generators) if generators is not None else tuple(torch.Generator() for _ in range(len(x0_image)))
    check_image(x0_image, gens)
    timesteps, lands = inversion_timesteps(schedule, steps, strength)
    return SamplerState(INVERSION, tuple(timesteps), x0_image, gens, lands=tuple(lands))


def start_interpolation(
    schedule: Schedule, steps: int, latent_a: torch.Tensor, latent_b: torch.Tensor, frames: int, strength: float = 1.0
) -> SamplerState:
    """The DDIM state (eta 0) of ``frames`` frames between two latents (C, H, W) that ``start_inversion`` ended
    on with the same ``steps`` and ``strength``: their ``slerp_frames``, sampled down the levels the inversion
    went up. The ends give back the two inverted images. DDIM at eta 0 draws no noise: the frames' generators
    are unseeded and unused."""
    x = slerp_frames(latent_a, latent_b, frames)  # (K, C, H, W)
    gens = [torch.Generator() for _ in range(frames)]
    return start_at("ddim", schedule, steps, gens, x, strength, eta=0.0)


# --- classes -------------------------------------------------------------------------------------


def with_class_mixes(unet: UNet, mixes: Sequence[tuple[int, int, float]]) -> UNet:
    """The U-Net with a class-embedding row per mix (a, b, w): label num_classes + 1 + k embeds as
    (1 - w) E[a] + w E[b], E the class table. The class reaches the network only as that row added to the time
    embedding (``UNet.forward``: emb = time_mlp(t) + class_emb(y)), so a mix is a valid input, though training
    saw the 11 rows alone. A shallow copy: every other module and parameter is the original's, shared, and the
    original is left alone. Sample the mixed labels with ``samplers.run``: ``sample`` allows the real classes
    and the null class alone."""
    cfg = unet.config
    table = unet.class_emb.weight.detach()  # (num_classes + 1, 4C)
    for a, b, w in mixes:
        if not (0 <= a <= cfg.num_classes and 0 <= b <= cfg.num_classes and 0.0 <= w <= 1.0):
            raise ValueError(
                f"a class mix is (a, b, w) with a, b in 0..{cfg.num_classes} ({cfg.num_classes}: the null class) "
                f"and w in [0, 1]; got {(a, b, w)}"
            )
    rows = [(1 - w) * table[a].double() + w * table[b].double() for a, b, w in mixes]  # each (4C,)
    extended = torch.cat([table, torch.stack(rows).to(table.dtype)]) if rows else table  # (num_classes + 1 + K, 4C)
    mixed = copy.copy(unet)
    mixed._modules = dict(unet._modules)  # the copy's own table of submodules, so the original keeps its class_emb
    mixed._modules["class_emb"] = nn.Embedding.from_pretrained(extended, freeze=True)
    return mixed
