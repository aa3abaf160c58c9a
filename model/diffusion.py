"""Noise schedules, the forward process q(x_t | x_0), and the training loss.

Schedules are computed in float64 and cast at the end (openai/improved-diffusion).
A named schedule never changes once weights were trained with it: the card stores
its name and T, and ``Schedule.named`` rebuilds the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")
NOISE_LEVELS = ("uniform", "lognormal")  # how training draws its noise levels: see draw_timesteps


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al. 2020, sec. 4: betas rising linearly from 1e-4 to 0.02 over T = 1000 steps."""
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)."""

    def f(t):
        return np.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    t = np.arange(T + 1, dtype=np.float64)
    alpha_bar = f(t) / f(0)
    return np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0, max_beta)


@dataclass(frozen=True)
class Schedule:
    """A discrete-time variance-preserving schedule over timesteps 0..T-1.

    ``alpha_bar[t]`` is the signal fraction of x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps.
    All arrays are float64 numpy; ``tensor`` casts what a caller needs.
    """

    name: str
    betas: np.ndarray

    @classmethod
    def named(cls, name: str, T: int = 1000) -> Schedule:
        if name == "linear":
            return cls(name, linear_betas(T))
        if name == "cosine":
            return cls(name, cosine_betas(T))
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> np.ndarray:
        return 1.0 - self.betas

    @property
    def alpha_bar(self) -> np.ndarray:
        return np.cumprod(self.alphas)

    def log_snr(self) -> np.ndarray:
        """lambda_t = log(alpha_bar / (1 - alpha_bar)), decreasing in t."""
        ab = self.alpha_bar
        return np.log(ab) - np.log1p(-ab)

    def noise_level(self) -> np.ndarray:
        """sigma_t = sqrt((1 - alpha_bar) / alpha_bar), the noise scale of x_t / sqrt(alpha_bar) = x_0 + sigma eps
        in the variance-exploding view (Karras et al. 2022, table 1), increasing in t."""
        ab = self.alpha_bar
        return np.sqrt((1 - ab) / ab)

    def to_dict(self) -> dict:
        return {"name": self.name, "T": self.T}


def _log_sigma(schedule: Schedule, device: torch.device | str) -> torch.Tensor:
    """ln sigma_t of every timestep (float64, increasing in t): the grid fractional timesteps live on."""
    return torch.from_numpy(np.log(schedule.noise_level())).to(device)


def alpha_bar_at(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar at timesteps ``t`` (B,), float64 on t's device.

    Integer timesteps read the schedule's table. Fractional ones (EDM's continuous noise levels,
    ``draw_timesteps``) interpolate log sigma linearly between the two neighbouring timesteps, so
    t = 3.0 and t = 3 give the same number up to rounding and sigma rises monotonically in t."""
    if not t.is_floating_point():
        return torch.from_numpy(schedule.alpha_bar).to(t.device)[t.long()]
    log_sigma = _log_sigma(schedule, t.device)
    t = t.double().clamp(0, schedule.T - 1)
    lo = t.floor().long().clamp(max=schedule.T - 2)
    frac = t - lo
    sigma = torch.exp(torch.lerp(log_sigma[lo], log_sigma[lo + 1], frac))
    return 1 / (1 + sigma**2)


def _gather(schedule: Schedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar[t] as a (B, 1, 1, 1) tensor of like's dtype and device."""
    ab = alpha_bar_at(schedule, t)
    return ab.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def draw_timesteps(
    schedule: Schedule,
    n: int,
    noise_levels: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    p_mean: float = -1.2,
    p_std: float = 1.2,
) -> torch.Tensor:
    """The timesteps of ``n`` training examples.

    "uniform": integer timesteps uniform in [0, T) (Ho et al. 2020, alg. 1).
    "lognormal": ln sigma ~ N(p_mean, p_std^2) in the variance-exploding view, as fractional
    timesteps of this schedule (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
    Generative Models", sec. 5 and table 1: P_mean = -1.2, P_std = 1.2). It spends the training on the
    middle noise levels (median sigma 0.30), where the loss can still be reduced, instead of on the
    ends, where it cannot."""
    if noise_levels == "uniform":
        return torch.randint(0, schedule.T, (n,), device=device, generator=generator)
    if noise_levels != "lognormal":
        raise ValueError(f"unknown noise_levels {noise_levels!r}; allowed: {', '.join(NOISE_LEVELS)}")
    if p_std <= 0:
        raise ValueError(f"p_std must be positive, got {p_std}")
    log_sigma = p_mean + p_std * torch.randn(n, device=device, generator=generator, dtype=torch.float64)
    grid = _log_sigma(schedule, device)
    # The fractional t whose interpolated log sigma (alpha_bar_at) is the drawn one, clamped to the schedule.
    hi = torch.searchsorted(grid, log_sigma).clamp(1, schedule.T - 1)
    frac = ((log_sigma - grid[hi - 1]) / (grid[hi] - grid[hi - 1])).clamp(0, 1)
    return (hi - 1).double() + frac


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Ho et al. 2020, eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    ab = _gather(schedule, t, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def v_target(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Salimans & Ho 2022, sec. 4: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0."""
    ab = _gather(schedule, t, x0)
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")


def split_prediction(
    prediction: str, schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the network's output into (eps, x0_pred) whatever it was trained to predict."""
    ab = _gather(schedule, t, x_t)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    if prediction == "eps":
        eps = out
        x0 = (x_t - s * eps) / a
    elif prediction == "v":
        # From x_t = a x0 + s eps and v = a eps - s x0, with a^2 + s^2 = 1.
        x0 = a * x_t - s * out
        eps = s * x_t + a * out
    else:
        raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
    return eps, x0


def loss_weight(schedule: Schedule, t: torch.Tensor, prediction: str, min_snr_gamma: float | None) -> torch.Tensor:
    """Per-sample weights of the MSE loss.

    With ``min_snr_gamma`` (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting"), the x0-space weight is min(SNR, gamma); expressed for the eps target this is
    min(SNR, gamma) / SNR, and for the v target min(SNR, gamma) / (SNR + 1).
    """
    _check_prediction(prediction)
    if min_snr_gamma is None:
        return torch.ones(len(t), device=t.device)
    ab = alpha_bar_at(schedule, t)
    snr = ab / (1 - ab)
    clipped = snr.clamp(max=min_snr_gamma)
    w = clipped / snr if prediction == "eps" else clipped / (snr + 1)
    return w.float()


def training_loss(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: Schedule,
    x0: torch.Tensor,
    y: torch.Tensor,
    prediction: str = "v",
    min_snr_gamma: float | None = 5.0,
    generator: torch.Generator | None = None,
    *,
    t: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The simple diffusion loss (Ho et al. 2020, alg. 1) for eps or v targets, mean over the batch.

    The timesteps ``t`` (B,; integer, or fractional from ``draw_timesteps``) and noise ``eps`` (like
    ``x0``) are drawn from ``generator`` unless given:
    distributed training draws them for the whole global batch and hands each rank its rows."""
    _check_prediction(prediction)
    b = len(x0)
    if t is None:
        t = draw_timesteps(schedule, b, "uniform", generator, x0.device)
    if eps is None:
        eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
    x_t = q_sample(schedule, x0, t, eps)
    target = eps if prediction == "eps" else v_target(schedule, x0, t, eps)
    out = model(x_t, t, y)
    per_sample = (out.float() - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return (loss_weight(schedule, t, prediction, min_snr_gamma) * per_sample).mean()
