"""Samplers: ancestral DDPM, DDIM and DPM-Solver++(2M), with classifier-free guidance.

Each sampler is a pure function of (denoiser, labels, generators, steps, callback):
nothing is shared between calls, so concurrent requests cannot disturb each other
(the per-call state that diffusers' schedulers keep is what makes them unsafe to share).

Every image draws all its randomness (x_T and any per-step noise) from its own
``torch.Generator``, so an image depends only on its seed and parameters, never on what
else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.diffusion import Schedule, split_prediction

SAMPLERS = ("ddpm", "ddim", "dpm++")


class SamplingStopped(Exception):
    """Raised when a step callback asks the sampler to stop."""


@dataclass(frozen=True)
class Step:
    """What a step callback sees after each network evaluation."""

    index: int  # 0-based step number
    total: int  # number of steps in this run
    t: int  # timestep the network was evaluated at
    x_t: torch.Tensor  # (B, C, H, W) the sample entering this step
    x0_pred: torch.Tensor  # (B, C, H, W) the (guided) prediction of the clean image


StepCallback = Callable[[Step], bool | None]  # return True to stop the run


def check_guidance_interval(lo: float, hi: float) -> None:
    if not (np.isfinite(lo) and 0 <= lo < hi):
        raise ValueError(f"guidance_interval must be (sigma_lo, sigma_hi) with 0 <= lo < hi, got {(lo, hi)}")


@dataclass(frozen=True)
class Denoiser:
    """A trained network with its schedule and target, evaluated with classifier-free guidance."""

    model: torch.nn.Module
    schedule: Schedule
    prediction: str  # "eps" or "v": what the network was trained to output
    null_class: int  # label of the unconditional branch
    # (sigma_lo, sigma_hi): guide only at noise levels sigma_lo < sigma_t <= sigma_hi (Schedule.noise_level)
    # and use the plain conditional model elsewhere; None guides every step.
    guidance_interval: tuple[float, float] | None = None

    def __post_init__(self):
        if self.guidance_interval is not None:
            check_guidance_interval(*self.guidance_interval)

    def guides_at(self, t: int) -> bool:
        """Whether guidance applies at timestep t (Kynkaanniemi et al. 2024: guidance at high noise
        collapses the variety of shapes, at low noise it only sharpens detail; the middle is what
        makes a sample look like its class)."""
        if self.guidance_interval is None:
            return True
        lo, hi = self.guidance_interval
        return lo < float(self.schedule.noise_level()[t]) <= hi

    @torch.no_grad()
    def __call__(
        self, x_t: torch.Tensor, t: int, y: torch.Tensor, guidance: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0_pred) at timestep t, guided with scale ``guidance``.

        Ho & Salimans 2022, eq. 6: out = out_uncond + w (out_cond - out_uncond); w = 1 is the plain
        conditional model, w = 0 the unconditional one. The output is linear in eps and v alike, so
        guiding the raw output is the same as guiding eps. Outside ``guidance_interval`` w is 1.
        """
        b = len(x_t)
        tt = torch.full((b,), t, device=x_t.device, dtype=torch.float32)
        if guidance == 1.0 or not self.guides_at(t):
            out = self.model(x_t, tt, y)
        else:
            null = torch.full_like(y, self.null_class)
            out_c, out_u = self.model(torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([y, null])).float().chunk(2)
            out = out_u + guidance * (out_c - out_u)
        ts = torch.full((b,), t, device=x_t.device, dtype=torch.long)
        return split_prediction(self.prediction, self.schedule, x_t, ts, out.float())


def initial_noise(
    generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device | str
) -> torch.Tensor:
    """x_T, one image per generator: (B, *shape). Drawn on the CPU so CPU and GPU give the same noise."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def _noise_like(x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x.device, x.dtype)


def spaced_timesteps(T: int, steps: int) -> list[int]:
    """``steps`` evaluation timesteps from T-1 downwards, evenly spaced ("trailing" spacing,
    Lin et al. 2024, table 2), so the first step always starts from pure noise."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    return [int(round(T - i * T / steps)) - 1 for i in range(steps)]


def _check(denoiser: Denoiser, labels: torch.Tensor, generators: Sequence[torch.Generator], guidance: float) -> None:
    null = denoiser.null_class
    if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"labels must be a 1-D integer tensor of class indices, got {labels.dtype} {tuple(labels.shape)}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() > null):
        raise ValueError(
            f"labels must be in 0..{null - 1} (or {null}, the null class, for unconditional samples), "
            f"got {labels.min().item()}..{labels.max().item()}"
        )
    if len(labels) != len(generators):
        raise ValueError(f"need one generator per image: {len(labels)} labels, {len(generators)} generators")
    if not np.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")


def _report(callback: StepCallback | None, step: Step) -> None:
    if callback is not None and callback(step):
        raise SamplingStopped(f"stopped by callback at step {step.index + 1}/{step.total}")


@torch.no_grad()
def ddpm(
    denoiser: Denoiser,
    labels: torch.Tensor,
    generators: Sequence[torch.Generator],
    guidance: float = 1.0,
    callback: StepCallback | None = None,
    shape: tuple[int, ...] = (1, 28, 28),
) -> torch.Tensor:
    """Ancestral sampling over all T steps (Ho et al. 2020, alg. 2), with the posterior
    q(x_{t-1} | x_t, x_0) of eq. 6-7: mean from x0_pred, variance beta_tilde_t."""
    _check(denoiser, labels, generators, guidance)
    s = denoiser.schedule
    ab = s.alpha_bar
    ab_prev = np.append(1.0, ab[:-1])
    x = initial_noise(generators, shape, labels.device)
    for i, t in enumerate(range(s.T - 1, -1, -1)):
        eps, x0 = denoiser(x, t, labels, guidance)
        _report(callback, Step(i, s.T, t, x, x0))
        # 1. Posterior mean, Ho et al. eq. 7.
        c_x0 = np.sqrt(ab_prev[t]) * s.betas[t] / (1 - ab[t])
        c_xt = np.sqrt(s.alphas[t]) * (1 - ab_prev[t]) / (1 - ab[t])
        mean = c_x0 * x0 + c_xt * x
        # 2. Posterior variance beta_tilde_t; no noise on the last step.
        if t > 0:
            var = s.betas[t] * (1 - ab_prev[t]) / (1 - ab[t])
            x = mean + float(np.sqrt(var)) * _noise_like(x, generators)
        else:
            x = mean
    return x


@torch.no_grad()
def ddim(
    denoiser: Denoiser,
    labels: torch.Tensor,
    generators: Sequence[torch.Generator],
    steps: int = 50,
    guidance: float = 1.0,
    eta: float = 0.0,
    callback: StepCallback | None = None,
    shape: tuple[int, ...] = (1, 28, 28),
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
    _check(denoiser, labels, generators, guidance)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    ab = denoiser.schedule.alpha_bar
    ts = spaced_timesteps(denoiser.schedule.T, steps)
    x = initial_noise(generators, shape, labels.device)
    for i, t in enumerate(ts):
        eps, x0 = denoiser(x, t, labels, guidance)
        _report(callback, Step(i, steps, t, x, x0))
        a_t = ab[t]
        a_prev = ab[ts[i + 1]] if i + 1 < steps else 1.0
        # 1. sigma_t of eq. 16, scaled by eta.
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(1 - a_t / a_prev)
        # 2. x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z.
        x = float(np.sqrt(a_prev)) * x0 + float(np.sqrt(max(1 - a_prev - sigma**2, 0.0))) * eps
        if sigma > 0:
            x = x + float(sigma) * _noise_like(x, generators)
    return x


@torch.no_grad()
def dpm_solver_pp(
    denoiser: Denoiser,
    labels: torch.Tensor,
    generators: Sequence[torch.Generator],
    steps: int = 20,
    guidance: float = 1.0,
    callback: StepCallback | None = None,
    shape: tuple[int, ...] = (1, 28, 28),
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2): second-order multistep in the data prediction,
    first order on the first step and on the final jump to the clean image."""
    _check(denoiser, labels, generators, guidance)
    ab = denoiser.schedule.alpha_bar
    ts = spaced_timesteps(denoiser.schedule.T, steps)
    alpha = np.sqrt(ab)  # alpha_t in the paper's notation
    sigma = np.sqrt(1 - ab)
    lam = np.log(alpha) - np.log(sigma)  # half log-SNR, decreasing in t
    x = initial_noise(generators, shape, labels.device)
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts):
        _, x0 = denoiser(x, t, labels, guidance)
        _report(callback, Step(i, steps, t, x, x0))
        if i + 1 == steps:
            x = x0  # sigma = 0 at the end: the solution is the data prediction itself
            break
        s = ts[i + 1]
        h = lam[s] - lam[t]
        # 1. First order (DPM-Solver++ 1 = DDIM) on the first step, else the 2M correction (eq. 10).
        if x0_prev is None:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        # 2. x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D.
        x = float(sigma[s] / sigma[t]) * x - float(alpha[s] * np.expm1(-h)) * d
        x0_prev, h_prev = x0, h
    return x


def sample(
    denoiser: Denoiser,
    labels: torch.Tensor,
    generators: Sequence[torch.Generator],
    sampler: str = "dpm++",
    steps: int = 20,
    guidance: float = 1.0,
    callback: StepCallback | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """Dispatch by name; ``ddpm`` always runs all T steps and requires steps == T."""
    if sampler == "ddpm":
        if steps != denoiser.schedule.T:
            raise ValueError(f"ddpm runs all {denoiser.schedule.T} steps; got steps={steps}")
        return ddpm(denoiser, labels, generators, guidance, callback)
    if sampler == "ddim":
        return ddim(denoiser, labels, generators, steps, guidance, eta, callback)
    if sampler == "dpm++":
        return dpm_solver_pp(denoiser, labels, generators, steps, guidance, callback)
    raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")


def generators_from_seeds(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 1, H, W) in [-1, 1] -> uint8 (B, H, W)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).cpu().numpy()
