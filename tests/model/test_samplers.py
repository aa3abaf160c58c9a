"""model/samplers.py against oracle denoisers whose answers are known in closed form.

* ``DeltaOracle``: the data distribution is one known image per class, so the ideal network
  returns, for any x_t, the exact noise (or v) separating x_t from that image. Every sampler must
  then end on that image, and every intermediate x_t must be a draw from q(x_t | x_0) with the
  step-to-step noise correlation the sampler's math implies.
* ``GaussianOracle``: each class is N(mu_c, sigma0^2) per pixel, whose ideal denoiser and
  probability-flow ODE are known in closed form (float64), so deterministic samplers can be
  checked against the exact ODE solution and DDPM against the exact data distribution.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from model.diffusion import Schedule
from model.samplers import (
    Denoiser,
    SamplingStopped,
    Step,
    check_steps,
    evaluations,
    generators_from_seeds,
    karras_timesteps,
    sample,
    spaced_timesteps,
    to_uint8,
)

NULL = 10  # the null class of a 10-class model
RUNS = [
    ("ddpm", 1000, 0.0),
    ("ddim", 50, 0.0),
    ("ddim", 50, 1.0),
    ("dpm++", 10, 0.0),
    ("dpm++", 20, 0.0),
    ("heun", 10, 0.0),
    ("consistency", 4, 0.0),
]
RUN_IDS = ["ddpm-1000", "ddim-50-eta0", "ddim-50-eta1", "dpm++-10", "dpm++-20", "heun-10", "consistency-4"]


class _Oracle(torch.nn.Module):
    """Common plumbing: the ``model(x_t, t, y)`` signature, discrete t, and eps/v output."""

    def __init__(self, schedule: Schedule, prediction: str):
        super().__init__()
        self.ab = torch.from_numpy(schedule.alpha_bar)  # float64
        self.prediction = prediction
        self.calls: list[tuple[int, list[float], list[int]]] = []  # (batch, t, y) of each call

    def x0_hat(self, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert t.shape == y.shape == (len(x_t),) and torch.equal(t, t.round())
        self.calls.append((len(x_t), t.tolist(), y.tolist()))
        ab = self.ab[t.long()].reshape(-1, 1, 1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x = x_t.double()
        x0 = self.x0_hat(x, a, s, y)
        eps = (x - a * x0) / s
        out = eps if self.prediction == "eps" else a * eps - s * x0  # v (Salimans & Ho 2022)
        return out.to(x_t.dtype)


class DeltaOracle(_Oracle):
    def __init__(self, schedule: Schedule, prediction: str, images: torch.Tensor):
        super().__init__(schedule, prediction)
        self.images = images.double()  # (NULL + 1, 1, 28, 28): one image per label

    def x0_hat(self, x, a, s, y):
        return self.images[y]


class GaussianOracle(_Oracle):
    def __init__(self, schedule: Schedule, prediction: str, means: torch.Tensor, sigma0: float):
        super().__init__(schedule, prediction)
        self.means, self.sigma0 = means.double(), sigma0

    def x0_hat(self, x, a, s, y):
        # E[x0 | x_t] for x0 ~ N(mu, sigma0^2), x_t = a x0 + s eps.
        mu, var = self.means[y], self.sigma0**2
        return mu + a * var / (a * a * var + s * s) * (x - a * mu)


def class_images(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(NULL + 1, 1, 28, 28, generator=g) * 1.6 - 0.8  # (11, 1, 28, 28) in [-0.8, 0.8]


def run(
    den: Denoiser,
    labels: list[int],
    seeds: list[int],
    sampler: str,
    steps: int,
    eta: float = 0.0,
    guidance: float = 1.0,
) -> tuple[torch.Tensor, list[Step]]:
    steps_seen: list[Step] = []
    x = sample(
        den,
        torch.tensor(labels),
        generators_from_seeds(seeds),
        sampler,
        steps,
        guidance,
        callback=steps_seen.append,
        eta=eta,
    )
    return x, steps_seen


def implied_noise(schedule: Schedule, step: Step, x0: torch.Tensor) -> torch.Tensor:
    """The eps for which step.x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
    ab = schedule.alpha_bar[step.t]
    return (step.x_t.double() - math.sqrt(ab) * x0.double()) / math.sqrt(1 - ab)


# --- the delta oracle: every sampler recovers the image ------------------------------------------


@pytest.mark.parametrize(("sampler", "steps", "eta"), RUNS, ids=RUN_IDS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_every_sampler_recovers_the_oracles_image(sampler, steps, eta, prediction, schedule):
    sch = Schedule.named(schedule)
    images = class_images()
    den = Denoiser(DeltaOracle(sch, prediction, images), sch, prediction, NULL)
    labels = [0, 3, 3, 9, 5, 7, 1, 2]
    x, trace = run(den, labels, list(range(8)), sampler, steps, eta)
    x0 = images[labels].double()
    torch.testing.assert_close(x.double(), x0, rtol=0, atol=2e-5)

    # Along the way each x_t is sqrt(ab_t) x0 + sqrt(1 - ab_t) e_t with e_t ~ N(0, I) ...
    noise = [implied_noise(sch, st, x0) for st in trace]
    stds = np.array([e.std().item() for e in noise])
    assert np.abs(stds - 1).max() < 0.05, stds
    # ... and e_t carries over to the next step with the correlation the sampler implies:
    # 1 for the deterministic ones; sqrt(ab_t (1 - ab_s) / (ab_s (1 - ab_t))) from t to s for
    # DDPM and DDIM with eta = 1 (both draw from the posterior q(x_s | x_t, x0)); none for
    # consistency sampling, whose every step re-noises with the image's next fresh draw.
    ab = sch.alpha_bar
    if sampler == "consistency":
        gens = generators_from_seeds(list(range(8)))
        draws = [torch.stack([torch.randn((1, 28, 28), generator=g) for g in gens]) for _ in trace]
        for e, z in zip(noise, draws, strict=True):
            torch.testing.assert_close(e, z.double(), rtol=0, atol=2e-2)  # float32 x0 from eps at low noise
        return
    for prev, nxt, e0, e1 in zip(trace, trace[1:], noise, noise[1:], strict=False):
        if sampler == "ddpm" or eta == 1.0:
            a_t, a_s = ab[prev.t], ab[nxt.t]
            expected = math.sqrt(a_t * (1 - a_s) / (a_s * (1 - a_t)))
            corr = torch.corrcoef(torch.stack([e0.ravel(), e1.ravel()]))[0, 1].item()
            assert corr == pytest.approx(expected, abs=0.05), (prev.t, nxt.t)
        else:
            torch.testing.assert_close(e1, e0, rtol=0, atol=2e-3)


# --- the Gaussian oracle: the exact ODE solution and the exact distribution ----------------------


def exact_ode_solution(sch: Schedule, first: Step, means: torch.Tensor, sigma0: float) -> torch.Tensor:
    """Probability-flow ODE for N(mu, sigma0^2) data: (x_t - a mu) / sqrt(a^2 sigma0^2 + s^2) stays constant."""
    ab = sch.alpha_bar[first.t]
    z = (first.x_t.double() - math.sqrt(ab) * means) / math.sqrt(ab * sigma0**2 + 1 - ab)
    return means + sigma0 * z


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_deterministic_samplers_follow_the_exact_probability_flow(prediction):
    sch, sigma0, labels = Schedule.named("cosine"), 0.3, [0, 4, 8, 9]
    means = class_images(1)
    den = Denoiser(GaussianOracle(sch, prediction, means, sigma0), sch, prediction, NULL)
    errors = {}
    for sampler, steps in [("ddim", 1000), ("ddim", 20), ("dpm++", 20), ("heun", 20), ("heun", 40), ("ddim", 40)]:
        x, trace = run(den, labels, [5, 6, 7, 8], sampler, steps)
        exact = exact_ode_solution(sch, trace[0], means[labels].double(), sigma0)
        errors[sampler, steps] = (x.double() - exact).abs().max().item()
    assert errors["ddim", 1000] < 0.01  # a fine Euler discretisation sits on the exact solution
    assert errors["dpm++", 20] < 0.05  # second order: close with 20 steps ...
    assert errors["dpm++", 20] < 0.5 * errors["ddim", 20]  # ... and much closer than first-order DDIM
    # Heun is second order too: twice the steps cut its error about fourfold, DDIM's about twofold.
    assert errors["heun", 20] < 0.05 and errors["heun", 20] < errors["ddim", 40]
    assert errors["heun", 40] < 0.3 * errors["heun", 20]
    assert errors["ddim", 40] > 0.4 * errors["ddim", 20]


def test_ddpm_samples_the_exact_data_distribution():
    sch, sigma0 = Schedule.named("linear"), 0.3
    means = class_images(2)
    den = Denoiser(GaussianOracle(sch, "eps", means, sigma0), sch, "eps", NULL)
    labels = [i % 10 for i in range(16)]
    x, _ = run(den, labels, list(range(100, 116)), "ddpm", 1000)
    z = (x.double() - means[labels].double()) / sigma0  # should be N(0, 1): 12,544 values
    assert abs(z.mean().item()) < 0.03
    assert z.std().item() == pytest.approx(1.0, abs=0.04)


# --- guidance ------------------------------------------------------------------------------------


class ConstantPerLabel(torch.nn.Module):
    """Outputs the constant out[y] everywhere, so guided outputs can be worked out by hand."""

    def __init__(self, values: list[float]):
        super().__init__()
        self.values = torch.tensor(values)
        self.calls: list[tuple[int, list[int]]] = []

    def forward(self, x_t, t, y):
        self.calls.append((len(x_t), y.tolist()))
        return self.values[y].reshape(-1, 1, 1, 1).expand_as(x_t).clone()


VALUES = [0.1 * c for c in range(10)] + [-0.5]  # label c -> 0.1 c; the null class -> -0.5


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_guidance_arithmetic_matches_a_hand_computation(prediction, w):
    sch = Schedule.named("cosine")
    model = ConstantPerLabel(VALUES)
    den = Denoiser(model, sch, prediction, NULL)
    x_t = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    eps, x0 = den(x_t, 500, torch.tensor([2, 7]), w)

    f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ab = f(501) / f(0)
    a, s = math.sqrt(ab), math.sqrt(1 - ab)
    for i, c in enumerate([2, 7]):
        out = -0.5 + w * (0.1 * c - (-0.5))  # Ho & Salimans 2022, eq. 6
        if prediction == "eps":
            want_eps, want_x0 = out, (x_t[i].double() - s * out) / a
        else:
            want_eps, want_x0 = s * x_t[i].double() + a * out, a * x_t[i].double() - s * out
        want_eps = torch.as_tensor(want_eps, dtype=torch.float64).expand(1, 28, 28)
        torch.testing.assert_close(eps[i].double(), want_eps, atol=1e-5, rtol=0)
        torch.testing.assert_close(x0[i].double(), want_x0, atol=1e-5, rtol=0)
    # Guidance 1 is the conditional model alone: one pass, no unconditional half.
    assert model.calls == ([(2, [2, 7])] if w == 1.0 else [(4, [2, 7, NULL, NULL])])


def test_guided_sampler_output_matches_a_hand_computation():
    # One DDIM step from t = 999 jumps straight to the x0 prediction: a x_T - s v_guided (v target).
    sch = Schedule.named("cosine")
    den = Denoiser(ConstantPerLabel(VALUES), sch, "v", NULL)
    x = sample(den, torch.tensor([4]), generators_from_seeds([42]), "ddim", 1, guidance=2.5)
    x_T = torch.randn((1, 28, 28), generator=torch.Generator().manual_seed(42)).double()  # the seed's noise
    v = -0.5 + 2.5 * (0.4 + 0.5)
    ab = sch.alpha_bar[999]
    torch.testing.assert_close(x[0].double(), math.sqrt(ab) * x_T - math.sqrt(1 - ab) * v, atol=1e-6, rtol=0)


# --- autoguidance (Karras et al. 2024) -------------------------------------------------------------


GUIDE_VALUES = [0.05 * c for c in range(10)] + [9.0]  # the guide: label c -> 0.05 c (its null class unused)


@pytest.mark.parametrize("w", [1.0, 2.0])
def test_autoguidance_guides_from_the_guide_networks_conditional_output(w):
    main, guide = ConstantPerLabel(VALUES), ConstantPerLabel(GUIDE_VALUES)
    den = Denoiser(main, Schedule.named("cosine"), "eps", NULL, guide=guide)
    x_t = torch.zeros(2, 1, 28, 28)
    eps, _ = den(x_t, 500, torch.tensor([2, 7]), w)
    for i, c in enumerate([2, 7]):
        want = 0.05 * c + w * (0.1 * c - 0.05 * c)  # D_guide + w (D_main - D_guide)
        torch.testing.assert_close(eps[i], torch.full((1, 28, 28), want), atol=1e-6, rtol=0)
    # The main network sees the conditional rows alone (no null class); the guide its guided rows, if any.
    assert main.calls == [(2, [2, 7])]
    assert guide.calls == ([] if w == 1.0 else [(2, [2, 7])])


def test_rows_mix_autoguidance_classifier_free_guidance_and_none_in_one_evaluation():
    main, guide = ConstantPerLabel(VALUES), ConstantPerLabel(GUIDE_VALUES)
    den = Denoiser(main, Schedule.named("cosine"), "eps", NULL, guide=guide)
    y = torch.tensor([1, 2, 3, 4])
    eps, _ = den.rows(
        torch.zeros(4, 1, 28, 28), [500] * 4, y, [3.0, 3.0, 1.0, 2.0], autoguide=[True, False, True, True]
    )
    want = [
        0.05 + 3.0 * (0.1 - 0.05),  # autoguided
        -0.5 + 3.0 * (0.2 + 0.5),  # classifier-free: the null class is the reference
        0.3,  # guidance 1: the conditional model alone
        0.2 + 2.0 * (0.4 - 0.2),  # autoguided
    ]
    torch.testing.assert_close(eps[:, 0, 0, 0], torch.tensor(want), atol=1e-6, rtol=0)
    assert main.calls == [(5, [1, 2, 3, 4, NULL])]  # one pass: four conditional rows and one null row
    assert guide.calls == [(2, [1, 4])]  # one pass over the autoguided rows that guide


def test_combined_guidance_adds_the_guides_term_to_classifier_free_guidance():
    main, guide = ConstantPerLabel(VALUES), ConstantPerLabel(GUIDE_VALUES)
    den = Denoiser(main, Schedule.named("cosine"), "eps", NULL, guide=guide, guide_weight=1.5)
    y = torch.tensor([2, 7, 4])
    eps, _ = den.rows(torch.zeros(3, 1, 28, 28), [500] * 3, y, [2.0, 2.0, 1.0])
    want = [
        -0.5 + 2.0 * (0.1 * c + 0.5) + 0.5 * (0.1 * c - 0.05 * c)  # D_cfg + (w_a - 1)(D_cond - D_guide)
        for c in (2, 7)
    ] + [0.4]  # guidance 1: the conditional model alone, the guide not asked
    torch.testing.assert_close(eps[:, 0, 0, 0], torch.tensor(want), atol=1e-6, rtol=0)
    assert main.calls == [(5, [2, 7, 4, NULL, NULL])]
    assert guide.calls == [(2, [2, 7])]
    with pytest.raises(ValueError, match="guide_weight must be a finite number >= 0"):
        Denoiser(main, Schedule.named("cosine"), "eps", NULL, guide=guide, guide_weight=float("nan"))


def test_autoguidance_follows_the_guidance_interval():
    sch = Schedule.named("cosine")
    sigma = sch.noise_level()
    guide = ConstantPerLabel(GUIDE_VALUES)
    den = Denoiser(ConstantPerLabel(VALUES), sch, "eps", NULL, (float(sigma[200]), float(sigma[800])), guide)
    eps, _ = den.rows(torch.zeros(2, 1, 28, 28), [100, 500], torch.tensor([4, 4]), [2.0, 2.0])
    torch.testing.assert_close(eps[:, 0, 0, 0], torch.tensor([0.4, 0.2 + 2.0 * (0.4 - 0.2)]), atol=1e-6, rtol=0)
    assert guide.calls == [(1, [4])]  # only the row inside the interval


def test_autoguidance_without_a_guide_is_refused():
    den = Denoiser(ConstantPerLabel(VALUES), Schedule.named("cosine"), "eps", NULL)
    with pytest.raises(ValueError, match="autoguidance needs a guide network"):
        den.rows(torch.zeros(1, 1, 28, 28), [500], torch.tensor([1]), [2.0], autoguide=[True])
    with pytest.raises(ValueError, match="one autoguide flag per row"):
        den.rows(torch.zeros(2, 1, 28, 28), [500] * 2, torch.tensor([1, 2]), [2.0] * 2, autoguide=[False])


def test_guidance_applies_only_inside_the_interval():
    sch = Schedule.named("cosine")
    sigma = sch.noise_level()
    model = ConstantPerLabel(VALUES)
    den = Denoiser(model, sch, "v", NULL, guidance_interval=(float(sigma[200]), float(sigma[800])))
    x_t = torch.zeros(1, 1, 28, 28)
    y = torch.tensor([3])
    for t, guided in [(100, False), (200, False), (201, True), (500, True), (800, True), (801, False), (999, False)]:
        model.calls.clear()
        eps, _ = den(x_t, t, y, 3.0)
        v = -0.5 + 3.0 * (0.3 + 0.5) if guided else 0.3  # guided, or the plain conditional output
        a = math.sqrt(sch.alpha_bar[t])
        torch.testing.assert_close(eps, torch.full_like(eps, a * v), atol=1e-5, rtol=0)
        assert model.calls == ([(2, [3, NULL])] if guided else [(1, [3])]), t  # no wasted unconditional pass


def test_a_guidance_interval_changes_only_the_steps_outside_it():
    sch = Schedule.named("cosine")
    den = Denoiser(GaussianOracle(sch, "v", class_images(4), 0.3), sch, "v", NULL)
    everywhere, _ = run(den, [3], [7], "dpm++", 10, 0.0, guidance=3.0)
    wide = dataclasses.replace(den, guidance_interval=(0.0, math.inf))
    torch.testing.assert_close(run(wide, [3], [7], "dpm++", 10, 0.0, guidance=3.0)[0], everywhere, atol=0, rtol=0)
    narrow = dataclasses.replace(den, guidance_interval=(0.5, 5.0))
    assert not torch.allclose(run(narrow, [3], [7], "dpm++", 10, 0.0, guidance=3.0)[0], everywhere, atol=1e-4)


@pytest.mark.parametrize("interval", [(1.0, 1.0), (2.0, 1.0), (-0.1, 1.0), (math.nan, 1.0)])
def test_a_bad_guidance_interval_is_refused(interval):
    with pytest.raises(ValueError, match="guidance_interval must be"):
        Denoiser(ConstantPerLabel(VALUES), Schedule.named("cosine"), "v", NULL, guidance_interval=interval)


# --- seeds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "steps", "eta"), [("ddpm", 1000, 0.0), ("ddim", 20, 1.0), ("dpm++", 10, 0.0), ("heun", 5, 0.0)]
)
def test_an_image_depends_only_on_its_seed_with_an_exact_model(sampler, steps, eta):
    sch = Schedule.named("cosine")
    den = Denoiser(GaussianOracle(sch, "v", class_images(4), 0.3), sch, "v", NULL)
    alone, _ = run(den, [3], [7], sampler, steps, eta, guidance=2.0)
    batch, _ = run(den, [1, 3, 5], [11, 7, 13], sampler, steps, eta, guidance=2.0)
    assert torch.equal(batch[1], alone[0])  # bit for bit: noise is drawn per image from its own seed
    assert not torch.allclose(batch[0], batch[2])


@pytest.mark.parametrize(("sampler", "steps", "eta"), [("ddim", 10, 1.0), ("dpm++", 10, 0.0)])
def test_an_image_depends_only_on_its_seed_with_a_real_network(tiny_unet, sampler, steps, eta):
    sch = Schedule.named("cosine")
    den = Denoiser(tiny_unet, sch, "v", NULL)
    alone, _ = run(den, [3], [7], sampler, steps, eta, guidance=2.0)
    again, _ = run(den, [3], [7], sampler, steps, eta, guidance=2.0)
    batch, _ = run(den, [1, 3, 5, 3], [11, 7, 13, 8], sampler, steps, eta, guidance=2.0)
    assert torch.equal(alone, again)  # same call, same bits
    # CPU convolution and matmul kernels are not bit-for-bit batch-invariant (they block over the
    # batch), so within a batch an image may differ in the last float bits, never more.
    torch.testing.assert_close(batch[1], alone[0], atol=1e-4, rtol=0)
    assert np.abs(to_uint8(batch[1:2]).astype(int) - to_uint8(alone).astype(int)).max() <= 1
    assert (batch[3] - batch[1]).abs().max() > 0.1  # another seed, same class: another image


def test_sampling_leaves_the_global_rng_alone():
    sch = Schedule.named("cosine")
    den = Denoiser(GaussianOracle(sch, "v", class_images(), 0.3), sch, "v", NULL)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    run(den, [1, 2], [1, 2], "ddim", 10, eta=1.0)
    assert torch.equal(torch.rand(3), expected)


# --- callback ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "steps", "expected_t"),
    [
        ("ddpm", 1000, list(range(999, -1, -1))),
        ("ddim", 10, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        ("dpm++", 3, [999, 666, 332]),
        ("dpm++", 1, [999]),
        # the jump from pure noise to sigma 80, then at each level the correction ending there and the
        # Euler step from it
        ("heun", 3, [999, 991, 802, 802, 0, 0]),
        ("heun", 1, [999, 0]),
    ],
)
def test_callback_sees_every_step_in_order(sampler, steps, expected_t):
    sch = Schedule.named("cosine")
    images = class_images()
    oracle = DeltaOracle(sch, "eps", images)
    x, trace = run(Denoiser(oracle, sch, "eps", NULL), [2, 6], [0, 1], sampler, steps)
    assert [st.index for st in trace] == list(range(evaluations(sampler, steps)))
    assert {st.total for st in trace} == {evaluations(sampler, steps)}
    assert [st.t for st in trace] == expected_t
    assert [c[1][0] for c in oracle.calls] == expected_t  # the network ran at exactly these timesteps
    for st in trace:
        assert st.x_t.shape == st.x0_pred.shape == (2, 1, 28, 28)
        torch.testing.assert_close(st.x0_pred, images[[2, 6]], atol=1e-2, rtol=0)  # the oracle's x0
    seeds_noise = [torch.randn((1, 28, 28), generator=g) for g in generators_from_seeds([0, 1])]
    assert torch.equal(trace[0].x_t, torch.stack(seeds_noise))  # x_T is the seeds' first draw


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", 1000), ("ddim", 10), ("dpm++", 10)])
def test_callback_can_stop_the_run(sampler, steps):
    sch = Schedule.named("linear")
    oracle = DeltaOracle(sch, "v", class_images())
    seen = []

    def stop_at_3(step: Step) -> bool:
        seen.append(step.index)
        return step.index == 3

    with pytest.raises(SamplingStopped, match=f"step 4/{steps}"):
        sample(
            Denoiser(oracle, sch, "v", NULL),
            torch.tensor([1]),
            generators_from_seeds([0]),
            sampler,
            steps,
            callback=stop_at_3,
        )
    assert seen == [0, 1, 2, 3] and len(oracle.calls) == 4  # no network evaluation after the stop


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampler": "euler"}, r"unknown sampler 'euler'; allowed: ddpm, ddim, dpm\+\+"),
        ({"sampler": "ddpm", "steps": 50}, r"ddpm runs all 1000 steps; got steps=50"),
        ({"sampler": "ddim", "steps": 0}, r"steps must be in 1\.\.1000 for ddim, got 0"),
        ({"sampler": "dpm++", "steps": 1001}, r"steps must be in 1\.\.1000 for dpm\+\+, got 1001"),
        ({"sampler": "heun", "steps": 1000}, r"steps must be in 1\.\.999 for heun, got 1000"),
        ({"guidance": -1.0}, r"guidance must be a finite number >= 0, got -1\.0"),
        ({"guidance": float("nan")}, r"guidance must be a finite number >= 0"),
        ({"guidance": float("inf")}, r"guidance must be a finite number >= 0"),
        ({"sampler": "ddim", "eta": 1.5}, r"eta must be in \[0, 1\], got 1\.5"),
        ({"sampler": "ddim", "eta": -0.1}, r"eta must be in \[0, 1\]"),
        ({"generators": 1}, r"need one generator per image: 2 labels, 1 generators"),
        ({"labels": [0, 11]}, r"labels must be in 0\.\.9 \(or 10, the null class"),
        ({"labels": [-1, 2]}, r"labels must be in 0\.\.9"),
        ({"labels": [0.0, 1.0]}, r"labels must be a 1-D integer tensor"),
    ],
)
def test_bad_input_raises_value_error_saying_what_is_allowed(kwargs, message):
    sch = Schedule.named("linear")
    oracle = DeltaOracle(sch, "eps", class_images())
    labels = torch.tensor(kwargs.pop("labels", [1, 2]))
    generators = generators_from_seeds(range(kwargs.pop("generators", 2)))
    args = {"sampler": "ddim", "steps": 10} | kwargs
    with pytest.raises(ValueError, match=message):
        sample(Denoiser(oracle, sch, "eps", NULL), labels, generators, **args)
    assert oracle.calls == []  # rejected before any work


def test_the_null_class_samples_unconditionally():
    sch = Schedule.named("linear")
    images = class_images()
    x, _ = run(Denoiser(DeltaOracle(sch, "eps", images), sch, "eps", NULL), [NULL], [0], "dpm++", 10)
    torch.testing.assert_close(x[0], images[NULL], atol=2e-5, rtol=0)


# --- helpers -------------------------------------------------------------------------------------


def test_spaced_timesteps_start_from_pure_noise_and_descend():
    assert spaced_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert spaced_timesteps(1000, 4) == [999, 749, 499, 249]
    for steps in (1, 7, 20, 50, 333):
        ts = spaced_timesteps(1000, steps)
        assert len(ts) == steps and ts[0] == 999 and ts[-1] >= 0
        assert all(a > b for a, b in zip(ts, ts[1:], strict=False))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_karras_timesteps_follow_edms_levels_and_never_repeat(schedule):
    sch = Schedule.named(schedule)
    sigma = sch.noise_level()
    ts = karras_timesteps(sch, 18)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 19
    # After pure noise, rho = 7 spacing from sigma 80 (or the schedule's highest below T-1) to sigma at
    # t = 0: each level's sigma is the nearest a timestep has to it.
    hi = min(80.0, sigma[998])
    inv = 1 / 7
    wanted = (hi**inv + np.linspace(0, 1, 18) * (sigma[0] ** inv - hi**inv)) ** 7
    grid_step = np.abs(np.diff(np.log(sigma))).max()
    assert np.abs(np.log(sigma[ts[1:]]) - np.log(wanted)).max() <= grid_step
    for steps in (1, 2, 50, 500, 999):
        ts = karras_timesteps(sch, steps)
        assert len(ts) == steps + 1 and ts[0] == 999 and ts[-1] == 0
        assert all(a > b for a, b in zip(ts, ts[1:], strict=False))  # crowded low levels move down, not repeat


@pytest.mark.parametrize(
    ("sampler", "steps", "message"),
    [
        ("heun", 60, r"60 steps of heun take 120 network evaluations, over the 100 allowed; allowed: at most 50 steps"),
        ("ddim", 101, r"101 steps of ddim take 101 network evaluations, over the 100 allowed; allowed: at most 100"),
        ("ddpm", 1000, r"1000 steps of ddpm take 1000 network evaluations, .*allowed: a sampler of fewer steps"),
    ],
)
def test_check_steps_counts_network_evaluations_against_the_limit(sampler, steps, message):
    check_steps(sampler, 50 if sampler == "heun" else 100 if sampler == "ddim" else 1000, 1000, 1000)
    with pytest.raises(ValueError, match=message):
        check_steps(sampler, steps, 1000, 100)


def test_heuns_lowest_level_is_where_it_jumps_to_x0():
    sch = Schedule.named("cosine")
    sigma = sch.noise_level()
    ts = karras_timesteps(sch, 18, sigma_min=0.09)
    assert len(ts) == 19 and abs(np.log(sigma[ts[-1]] / 0.09)) <= np.abs(np.diff(np.log(sigma))).max()
    images = class_images()
    oracle = DeltaOracle(sch, "v", images)
    x = sample(
        Denoiser(oracle, sch, "v", NULL), torch.tensor([3]), generators_from_seeds([0]), "heun", 4, sigma_min=0.2
    )
    assert oracle.calls[-1][1] == [karras_timesteps(sch, 4, sigma_min=0.2)[-1]]  # the jump starts at sigma 0.2
    torch.testing.assert_close(x[0], images[3], atol=2e-5, rtol=0)
    for bad in (0.001, 80.0, float("nan")):
        with pytest.raises(ValueError, match="sigma_min must be in"):
            karras_timesteps(sch, 4, sigma_min=bad)
    with pytest.raises(ValueError, match="sigma_min applies to heun only"):
        sample(
            Denoiser(oracle, sch, "v", NULL), torch.tensor([3]), generators_from_seeds([0]), "ddim", 4, sigma_min=0.2
        )


def test_to_uint8_maps_minus_one_one_to_0_255_and_clamps():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 1, 6)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 6)
    assert out.ravel().tolist() == [0, 0, 128, 191, 255, 255]
