"""model/diffusion.py against values worked out independently in float64 (plain Python math)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.diffusion import (
    Schedule,
    alpha_bar_at,
    draw_timesteps,
    loss_weight,
    q_sample,
    split_prediction,
    training_loss,
    v_target,
)


def linear_alpha_bar(t: int, T: int = 1000) -> float:
    """prod_{i<=t} (1 - beta_i), beta_i rising linearly from 1e-4 to 0.02 (Ho et al. 2020)."""
    return math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / (T - 1)) for i in range(t + 1))


def cosine_alpha_bar(t: int, T: int = 1000, s: float = 0.008) -> float:
    """Nichol & Dhariwal 2021, eq. 17: f(t) / f(0) with f(t) = cos^2((t/T + s)/(1 + s) * pi/2).

    The 0-based index t holds the paper's alpha_bar at time t + 1 (the state after t + 1 noising steps).
    """
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t + 1) / f(0)


# --- schedules -----------------------------------------------------------------------------------


def test_linear_schedule_runs_from_1e4_to_002_in_float64():
    s = Schedule.named("linear")
    assert s.T == 1000 and s.betas.dtype == np.float64 and s.alpha_bar.dtype == np.float64
    assert s.betas[0] == pytest.approx(1e-4, rel=1e-12) and s.betas[-1] == pytest.approx(0.02, rel=1e-12)
    np.testing.assert_allclose(np.diff(s.betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    for t in (0, 1, 99, 500, 998, 999):
        assert s.alpha_bar[t] == pytest.approx(linear_alpha_bar(t), rel=1e-10), t
    assert s.alpha_bar[-1] == pytest.approx(4.0358e-5, rel=1e-4)  # the often-quoted value at T = 1000


def test_cosine_schedule_follows_the_closed_form_until_the_clip():
    s = Schedule.named("cosine")
    assert s.betas.dtype == np.float64
    for t in (0, 1, 10, 250, 500, 900, 990, 998):
        assert s.alpha_bar[t] == pytest.approx(cosine_alpha_bar(t), rel=1e-9), t
    # f(T) = cos^2(pi/2) = 0 would make the last beta 1; it is clipped to 0.999 and nothing else is.
    assert s.betas[-1] == pytest.approx(0.999, abs=1e-15)
    assert (s.betas >= 0.999 - 1e-12).sum() == 1
    assert s.alpha_bar[-1] == pytest.approx(cosine_alpha_bar(998) * 0.001, rel=1e-9)
    assert np.all(np.diff(s.alpha_bar) < 0)


def test_schedules_take_other_lengths():
    s = Schedule.named("cosine", T=200)
    assert s.T == 200
    assert s.alpha_bar[99] == pytest.approx(cosine_alpha_bar(99, T=200), rel=1e-9)
    assert Schedule.named("linear", T=10).betas[-1] == pytest.approx(0.02)
    assert s.to_dict() == {"name": "cosine", "T": 200}


def test_unknown_schedule_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown schedule 'quadratic'; allowed: linear, cosine"):
        Schedule.named("quadratic")


def test_log_snr_is_log_of_alpha_bar_over_one_minus_alpha_bar():
    s = Schedule.named("linear")
    for t in (0, 300, 999):
        ab = linear_alpha_bar(t)
        assert s.log_snr()[t] == pytest.approx(math.log(ab / (1 - ab)), rel=1e-9)
    assert np.all(np.diff(s.log_snr()) < 0)


def test_noise_level_is_the_ve_sigma_of_x_t_over_sqrt_alpha_bar():
    s = Schedule.named("linear")
    for t in (0, 300, 999):
        ab = linear_alpha_bar(t)
        assert s.noise_level()[t] == pytest.approx(math.sqrt((1 - ab) / ab), rel=1e-9)
    assert np.all(np.diff(s.noise_level()) > 0)


# --- forward process -----------------------------------------------------------------------------


def test_q_sample_mixes_signal_and_noise_per_sample():
    s = Schedule.named("cosine")
    t = torch.tensor([0, 10, 500, 998])  # 998: the last step before the clip
    x0 = torch.rand(4, 1, 28, 28, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    x_t = q_sample(s, x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        ab = cosine_alpha_bar(ti)
        torch.testing.assert_close(x_t[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * eps[i], rtol=1e-12, atol=1e-12)


def test_q_sample_has_the_marginal_mean_and_variance_of_eq_4():
    s = Schedule.named("linear")
    g = torch.Generator().manual_seed(0)
    x0 = torch.linspace(-1, 1, 784).reshape(1, 1, 28, 28).expand(4000, 1, 28, 28)
    for t in (50, 400, 900):
        x_t = q_sample(s, x0, torch.full((4000,), t), torch.randn(x0.shape, generator=g))
        ab = linear_alpha_bar(t)
        torch.testing.assert_close(x_t.mean(0), math.sqrt(ab) * x0[0], atol=0.07, rtol=0)  # 4.5 standard errors
        assert x_t.var(0).mean().item() == pytest.approx(1 - ab, rel=0.02)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_v_eps_and_x0_convert_into_each_other(schedule):
    s = Schedule.named(schedule)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 1, 250, 750, 998, 999])
    x0 = torch.rand(6, 1, 28, 28, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(6, 1, 28, 28, generator=g, dtype=torch.float64)
    x_t = q_sample(s, x0, t, eps)
    v = v_target(s, x0, t, eps)
    for i, ti in enumerate(t.tolist()):  # Salimans & Ho 2022: v = sqrt(ab) eps - sqrt(1 - ab) x0
        ab = s.alpha_bar[ti]
        torch.testing.assert_close(v[i], math.sqrt(ab) * eps[i] - math.sqrt(1 - ab) * x0[i], rtol=1e-12, atol=1e-12)
    eps_v, x0_v = split_prediction("v", s, x_t, t, v)
    torch.testing.assert_close(eps_v, eps, rtol=0, atol=1e-9)
    torch.testing.assert_close(x0_v, x0, rtol=0, atol=1e-9)
    eps_e, x0_e = split_prediction("eps", s, x_t, t, eps)
    torch.testing.assert_close(eps_e, eps, rtol=0, atol=0)
    torch.testing.assert_close(x0_e[:-1], x0[:-1], rtol=0, atol=1e-9)  # t = 999 divides by sqrt(ab) ~ 5e-5 (cosine)
    torch.testing.assert_close(x0_e[-1], x0[-1], rtol=0, atol=1e-6)


def test_split_prediction_names_the_allowed_targets():
    s = Schedule.named("linear")
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"unknown prediction 'x0'; allowed: eps, v"):
        split_prediction("x0", s, x, torch.tensor([3]), x)


# --- loss ----------------------------------------------------------------------------------------


def test_min_snr_weights_match_hand_values():
    s = Schedule.named("cosine")
    t = torch.tensor([0, 100, 500, 900])
    snr = [cosine_alpha_bar(i) / (1 - cosine_alpha_bar(i)) for i in t.tolist()]
    assert snr[0] > 5 and snr[1] > 5 and snr[2] < 5 and snr[3] < 5  # both sides of the clip are exercised
    # Hang et al. 2023: x0-space weight min(SNR, gamma) -> eps: min(SNR, gamma) / SNR, v: min(SNR, gamma) / (SNR + 1).
    expected_eps = [min(r, 5.0) / r for r in snr]
    expected_v = [min(r, 5.0) / (r + 1) for r in snr]
    np.testing.assert_allclose(loss_weight(s, t, "eps", 5.0).numpy(), expected_eps, rtol=1e-6)
    np.testing.assert_allclose(loss_weight(s, t, "v", 5.0).numpy(), expected_v, rtol=1e-6)
    assert loss_weight(s, t, "eps", 5.0)[2].item() == 1.0
    assert loss_weight(s, t, "v", None).tolist() == [1.0] * 4


# --- EDM's noise levels (Karras et al. 2022) -------------------------------------------------------


def test_fractional_timesteps_interpolate_log_sigma_between_the_table_entries():
    s = Schedule.named("cosine")
    sigma = lambda i: math.sqrt((1 - cosine_alpha_bar(i)) / cosine_alpha_bar(i))  # noqa: E731
    ab = alpha_bar_at(s, torch.tensor([3.0, 3.25, 500.5, 998.0]))
    # Halfway in t is halfway in ln sigma: sigma = sqrt(sigma_500 sigma_501); a quarter: sigma_3^0.75 sigma_4^0.25.
    expected_sigma = [sigma(3), sigma(3) ** 0.75 * sigma(4) ** 0.25, math.sqrt(sigma(500) * sigma(501)), sigma(998)]
    np.testing.assert_allclose(ab.numpy(), [1 / (1 + e**2) for e in expected_sigma], rtol=1e-9)
    # Integer timesteps read the table itself.
    assert alpha_bar_at(s, torch.tensor([3])).item() == s.alpha_bar[3]


def test_lognormal_timesteps_have_edms_sigma_distribution():
    s = Schedule.named("cosine")
    g = torch.Generator().manual_seed(0)
    t = draw_timesteps(s, 20_000, "lognormal", g, p_mean=-1.2, p_std=1.2)
    assert t.is_floating_point() and t.min() >= 0 and t.max() <= s.T - 1
    ab = alpha_bar_at(s, t)
    log_sigma = 0.5 * torch.log((1 - ab) / ab)
    # ln sigma ~ N(-1.2, 1.2^2): within 4 standard errors; the clamp to the schedule's ends cuts < 0.1%.
    assert abs(log_sigma.mean().item() + 1.2) < 4 * 1.2 / math.sqrt(len(t))
    assert abs(log_sigma.std().item() - 1.2) < 0.03
    # Uniform stays integer timesteps, as every run before it drew them.
    u = draw_timesteps(s, 8, "uniform", torch.Generator().manual_seed(0))
    assert u.dtype == torch.long and torch.equal(
        u, torch.randint(0, s.T, (8,), generator=torch.Generator().manual_seed(0))
    )


def test_draw_timesteps_names_the_allowed_noise_levels():
    with pytest.raises(ValueError, match="uniform, lognormal"):
        draw_timesteps(Schedule.named("cosine"), 4, "edm")
    with pytest.raises(ValueError, match="p_std"):
        draw_timesteps(Schedule.named("cosine"), 4, "lognormal", p_std=0)


def test_the_loss_takes_fractional_timesteps():
    s = Schedule.named("cosine")
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([10.5, 200.25, 640.0, 998.9], dtype=torch.float64)
    exact = lambda x_t, tt, y: v_target(s, x0, tt, eps)  # noqa: E731  the perfect v-predictor
    assert training_loss(exact, s, x0, torch.zeros(4, dtype=torch.long), "v", 5.0, t=t, eps=eps).item() < 1e-10
    ab = alpha_bar_at(s, t).float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(q_sample(s, x0, t, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


def test_loss_weight_rejects_unknown_targets():
    with pytest.raises(ValueError, match="allowed: eps, v"):
        loss_weight(Schedule.named("linear"), torch.tensor([1]), "x0", 5.0)


class TargetOracle(torch.nn.Module):
    """Knows the clean batch x0, so it can return the exact eps or v target for any (x_t, t)."""

    def __init__(self, schedule: Schedule, x0: torch.Tensor, y: torch.Tensor, prediction: str):
        super().__init__()
        self.ab = torch.from_numpy(schedule.alpha_bar)
        self.x0, self.y, self.prediction = x0, y, prediction

    def forward(self, x_t, t, y):
        assert torch.equal(y, self.y)  # the labels reach the network unchanged
        ab = self.ab[t.long()].reshape(-1, 1, 1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        eps = (x_t - a * self.x0) / s
        return eps if self.prediction == "eps" else a * eps - s * self.x0


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_training_loss_is_zero_for_the_exact_target_and_one_for_zero_eps(prediction):
    s = Schedule.named("cosine")
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(64, 1, 28, 28, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.arange(64) % 10
    perfect = training_loss(TargetOracle(s, x0, y, prediction), s, x0, y, prediction, 5.0, generator=g)
    assert perfect.item() < 1e-10
    if prediction == "eps":
        # A network that always says 0 misses eps ~ N(0, 1) by 1 per pixel on average (no weighting).
        zero = training_loss(lambda x_t, t, y: torch.zeros_like(x_t), s, x0, y, "eps", None, generator=g)
        assert zero.item() == pytest.approx(1.0, abs=0.03)


def test_training_loss_rejects_unknown_targets():
    x0 = torch.zeros(2, 1, 28, 28)
    with pytest.raises(ValueError, match="allowed: eps, v"):
        training_loss(lambda x_t, t, y: x_t, Schedule.named("linear"), x0, torch.zeros(2, dtype=torch.long), "x0")
