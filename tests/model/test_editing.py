"""model/editing.py (and the strength, merge and jump logic of model/samplers.py it relies on) against
numbers worked by hand or in float64, with the oracle denoisers of test_samplers.py:

* ``DeltaOracle``: the data is one image per class, so every x_t along a trajectory must be a draw from
  q(x_t | that image), and a run must end on it.
* ``GaussianOracle``: N(mu_c, sigma0^2) per pixel, whose probability-flow ODE is known in closed form:
  (x_t - a mu) / sqrt(a^2 sigma0^2 + s^2) stays constant, a = sqrt(ab_t), s = sqrt(1 - ab_t).

The byte-exact inpainting tests use a tiny random U-Net, whose outputs are as arbitrary as they come.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.diffusion import Schedule
from model.editing import (
    RePaint,
    inpainting_evaluations,
    inversion_timesteps,
    repaint_schedule,
    repaint_timesteps,
    seed_frames,
    slerp,
    slerp_frames,
    start_from_image,
    start_inpainting,
    start_interpolation,
    start_inversion,
    with_class_mixes,
)
from model.samplers import (
    Denoiser,
    Step,
    evaluations,
    generators_from_seeds,
    run,
    spaced_timesteps,
    start_at,
    step,
    timesteps_for,
    to_uint8,
)
from tests.model.test_samplers import NULL, DeltaOracle, GaussianOracle, class_images

COSINE = Schedule.named("cosine")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tiny networks gain nothing from a second one, and on a busy two-core machine its
    spinning at every barrier made this file 15x slower (70 s against 5 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cosine_alpha_bar(t: int) -> float:
    """Nichol & Dhariwal 2021, eq. 17 by hand: ab_t = f(t + 1) / f(0) (no beta is clipped below t = 999)."""

    def f(u: float) -> float:
        return math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    return f(t + 1) / f(0)


def seed_draws(seed: int, n: int) -> list[torch.Tensor]:
    """The first n (1, 28, 28) draws of a seed's generator, as every draw of a sampler is made."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((1, 28, 28), generator=g) for _ in range(n)]


def traced(den: Denoiser, state, labels: list[int], guidance: float = 1.0) -> tuple[torch.Tensor, list[Step]]:
    trace: list[Step] = []
    x = run(den, state, torch.tensor(labels), guidance, callback=trace.append)
    return x, trace


def implied_noise(step_: Step, x0: torch.Tensor) -> torch.Tensor:
    """The eps for which step_.x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
    ab = COSINE.alpha_bar[step_.t]
    return (step_.x_t.double() - math.sqrt(ab) * x0.double()) / math.sqrt(1 - ab)


def exact_flow(x_t: torch.Tensor, t: int, means: torch.Tensor, sigma0: float) -> torch.Tensor:
    """Where the probability-flow ODE of N(mu, sigma0^2) data takes x_t at timestep t: its clean end."""
    ab = COSINE.alpha_bar[t]
    z = (x_t.double() - math.sqrt(ab) * means) / math.sqrt(ab * sigma0**2 + 1 - ab)
    return means + sigma0 * z


# --- strength ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "steps", "strength", "expected"),
    [
        ("ddim", 10, 0.5, [499, 399, 299, 199, 99]),
        ("ddim", 10, 0.35, [299, 199, 99]),  # int(3.5) = 3: rounded down, as diffusers' img2img
        ("ddim", 10, 0.1, [99]),
        ("dpm++", 3, 0.67, [666, 332]),  # int(2.01) = 2
        ("consistency", 4, 0.5, [499, 249]),
        ("ddpm", 1000, 0.004, [3, 2, 1, 0]),
        # heun, 3 levels from pure noise: [999, 991, 802, 802, 0, 0]. From an image it starts at a kept level's
        # Euler step, without the jump from pure noise: 2k - 1 evaluations for k levels.
        ("heun", 3, 1.0, [991, 802, 802, 0, 0]),
        ("heun", 3, 2 / 3, [802, 0, 0]),
        ("heun", 3, 1 / 3, [0]),
    ],
)
def test_strength_keeps_the_last_steps(sampler, steps, strength, expected):
    assert timesteps_for(sampler, COSINE, steps, strength) == expected
    assert evaluations(sampler, steps, strength) == len(expected)
    state = start_from_image(sampler, COSINE, steps, generators_from_seeds([0]), torch.zeros(1, 1, 28, 28), strength)
    assert list(state.timesteps) == expected


def test_evaluations_from_pure_noise_are_unchanged_and_scale_with_strength():
    assert evaluations("heun", 18) == 36 and evaluations("heun", 18, 1.0) == 35 and evaluations("heun", 18, 0.5) == 17
    assert evaluations("ddim", 50) == 50 and evaluations("ddim", 50, 0.3) == 15
    assert evaluations("ddpm", 1000, 0.25) == 250


def test_a_strength_written_k_over_steps_keeps_k_steps():
    for steps in range(1, 121):  # 49 * (1 / 49) is 0.9999999999999999 in floats
        assert [evaluations("ddim", steps, k / steps) for k in range(1, steps + 1)] == list(range(1, steps + 1))


@pytest.mark.parametrize(
    ("sampler", "steps", "strength", "message"),
    [
        ("ddim", 10, 0.09, r"keeps none of 10 steps .* the least strength for 10 steps is 1/10 = 0\.1"),
        ("heun", 18, 0.05, r"the least strength for 18 steps is 1/18 = 0\.05556"),
        ("ddim", 10, 0.0, r"strength must be in \(0, 1\], got 0\.0"),
        ("ddim", 10, -0.1, r"strength must be in \(0, 1\]"),
        ("ddim", 10, 1.5, r"strength must be in \(0, 1\]"),
        ("ddim", 10, float("nan"), r"strength must be in \(0, 1\]"),
    ],
)
def test_a_strength_that_keeps_no_step_is_refused_before_any_draw(sampler, steps, strength, message):
    gens = generators_from_seeds([3])
    before = gens[0].get_state()
    with pytest.raises(ValueError, match=message):
        start_from_image(sampler, COSINE, steps, gens, torch.zeros(1, 1, 28, 28), strength)
    assert torch.equal(gens[0].get_state(), before)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (torch.zeros(2, 1, 28, 28), r"one generator per image: got \(2, 1, 28, 28\), 1 generators"),
        (torch.zeros(1, 1, 28, 28, dtype=torch.uint8), r"image must be floats in \[-1, 1\]"),
        (torch.full((1, 1, 28, 28), 1.5), r"image must be in \[-1, 1\], got 1\.5\.\.1\.5"),
    ],
)
def test_a_bad_image_is_refused(image, message):
    with pytest.raises(ValueError, match=message):
        start_from_image("ddim", COSINE, 10, generators_from_seeds([0]), image, 0.5)


# --- variations (SDEdit) -------------------------------------------------------------------------


@pytest.mark.parametrize(("sampler", "steps", "strength", "t"), [("ddim", 10, 0.5, 499), ("heun", 3, 2 / 3, 802)])
def test_the_image_is_noised_to_the_first_kept_level_with_the_seeds_noise(sampler, steps, strength, t):
    image = class_images()[[2, 5]]  # (2, 1, 28, 28)
    state = start_from_image(sampler, COSINE, steps, generators_from_seeds([7, 8]), image, strength)
    ab = cosine_alpha_bar(t)
    eps = torch.stack([seed_draws(7, 1)[0], seed_draws(8, 1)[0]]).double()  # drawn as x_T would be
    torch.testing.assert_close(state.x.double(), math.sqrt(ab) * image.double() + math.sqrt(1 - ab) * eps)


FROM_IMAGE_RUNS = [
    ("ddpm", 1000, 0.0, 0.1),  # the last 100 of its 1000 steps
    *(
        (sampler, steps, eta, strength)
        for strength in (1.0, 0.5)
        for sampler, steps, eta in [
            ("ddim", 20, 0.0),
            ("ddim", 20, 1.0),
            ("dpm++", 10, 0.0),
            ("heun", 6, 0.0),
            ("consistency", 4, 0.0),
        ]
    ),
]


@pytest.mark.parametrize(("sampler", "steps", "eta", "strength"), FROM_IMAGE_RUNS)
def test_every_sampler_from_an_image_stays_on_q_and_ends_on_the_oracles_image(sampler, steps, eta, strength):
    images = class_images()
    oracle = DeltaOracle(COSINE, "v", images)
    den = Denoiser(oracle, COSINE, "v", NULL)
    labels = [1, 4, 4, 8]
    x0 = images[labels]
    state = start_from_image(sampler, COSINE, steps, generators_from_seeds(range(4)), x0, strength, eta=eta)
    x, trace = traced(den, state, labels)
    torch.testing.assert_close(x, x0, atol=2e-5, rtol=0)
    assert len(oracle.calls) == len(trace) == evaluations(sampler, steps, strength)  # no evaluation uncounted
    stds = np.array([implied_noise(st, x0).std().item() for st in trace])
    assert np.abs(stds - 1).max() < 0.05, stds  # every x_t a draw from q(x_t | x0)


def test_from_an_image_deterministic_samplers_follow_the_exact_probability_flow():
    # Heun's truncated timesteps must pair each Euler step with its correction: second order, error / 4 per
    # doubling of levels. A broken pairing (an Euler step onto its own level) would be far off the flow.
    sigma0, labels = 0.3, [0, 4, 8, 9]
    means = class_images(1)
    den = Denoiser(GaussianOracle(COSINE, "v", means, sigma0), COSINE, "v", NULL)
    image = class_images(5)[labels]
    errors = {}
    for sampler, steps in [("ddim", 40), ("dpm++", 20), ("heun", 20), ("heun", 40)]:
        state = start_from_image(sampler, COSINE, steps, generators_from_seeds([5, 6, 7, 8]), image, 0.6)
        exact = exact_flow(state.x, state.t, means[labels].double(), sigma0)
        errors[sampler, steps] = (run(den, state, torch.tensor(labels)).double() - exact).abs().max().item()
    # Strength 0.6 keeps 12 steps of dpm++, 24 of ddim and 12 or 24 Heun levels (23 or 47 evaluations).
    assert errors["dpm++", 20] < 0.05 and errors["heun", 40] < 0.02
    assert errors["heun", 20] < errors["ddim", 40]  # 23 evaluations against 24
    assert errors["heun", 40] < 0.3 * errors["heun", 20]


def test_dpm_solver_from_an_image_starts_with_an_empty_memory_its_first_step_ddims():
    image = class_images()[[3]]
    eps = seed_draws(99, 1)[0][None] * 0.5  # any prediction pair will do
    x0 = image * 0.9
    states = {s: start_from_image(s, COSINE, 10, generators_from_seeds([1]), image, 0.5) for s in ("dpm++", "ddim")}
    assert states["dpm++"].x0_prev is None and states["dpm++"].h_prev is None
    after = {s: step(st, COSINE, eps, x0) for s, st in states.items()}
    # DPM-Solver++ of first order is DDIM (Lu et al. 2022, sec. 4.1): x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s) eps_t.
    a_s, a_t = cosine_alpha_bar(399), cosine_alpha_bar(499)
    eps_t = (states["ddim"].x.double() - math.sqrt(a_t) * x0.double()) / math.sqrt(1 - a_t)
    want = math.sqrt(a_s) * x0.double() + math.sqrt(1 - a_s) * eps_t
    torch.testing.assert_close(after["dpm++"].x.double(), want, atol=1e-5, rtol=0)


# --- inpainting ----------------------------------------------------------------------------------


def box_mask(b: int, top: int, left: int, size: int) -> torch.Tensor:
    mask = torch.zeros(b, 1, 28, 28)
    mask[:, :, top : top + size, left : left + size] = 1
    return mask


INPAINT_RUNS = [
    ("ddpm", 1000, 0.02, {}),  # 20 steps of the 1000: the merge is the same, the test 50x shorter
    ("ddim", 10, 1.0, {"eta": 0.0}),
    ("ddim", 10, 1.0, {"eta": 1.0}),
    ("dpm++", 8, 1.0, {}),
    ("heun", 4, 1.0, {}),
    ("heun", 4, 0.5, {}),
    ("consistency", 4, 1.0, {}),
    ("ddim", 10, 1.0, {"repaint": RePaint(2, 2)}),
]


@pytest.mark.parametrize(("sampler", "steps", "strength", "kwargs"), INPAINT_RUNS, ids=lambda v: str(v))
def test_inpainting_keeps_the_known_pixels_byte_for_byte(tiny_unet, sampler, steps, strength, kwargs):
    # Row 0 comes from uint8 pixels as a client sends them, row 1 is any float image in [-1, 1].
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 256, (1, 1, 28, 28), generator=g, dtype=torch.uint8)
    image = torch.cat([u / 127.5 - 1, torch.rand(1, 1, 28, 28, generator=g) * 2 - 1])  # (2, 1, 28, 28)
    mask = torch.cat([box_mask(1, 4, 6, 12), box_mask(1, 10, 2, 16)])
    den = Denoiser(tiny_unet, COSINE, "v", NULL)
    state = start_inpainting(sampler, COSINE, steps, generators_from_seeds([1, 2]), image, mask, strength, **kwargs)
    assert state.total == inpainting_evaluations(sampler, steps, strength, kwargs.get("repaint"))
    out = run(den, state, torch.tensor([3, 7]), 1.5)
    keep = mask == 0
    assert torch.equal(out[keep], image[keep])  # the input itself, not merely close
    pixels, keep2d = to_uint8(out), keep.squeeze(1).numpy()
    assert np.array_equal(pixels[0][keep2d[0]], u.squeeze(1).numpy()[0][keep2d[0]])
    assert np.array_equal(pixels[1][keep2d[1]], to_uint8(image)[1][keep2d[1]])
    if strength == 1.0:
        assert (out - image)[mask == 1].abs().mean() > 0.1  # the masked region was generated


@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 10), ("dpm++", 10), ("heun", 5)])
def test_the_known_region_is_the_input_noised_to_each_evaluated_level(sampler, steps):
    images = class_images()
    den = Denoiser(DeltaOracle(COSINE, "v", images), COSINE, "v", NULL)
    labels, known = [2, 6, 2, 6], images[[9, 8, 7, 9]]  # the oracle draws classes 2 and 6, the input others
    mask = box_mask(4, 0, 0, 14)
    state = start_inpainting(sampler, COSINE, steps, generators_from_seeds([4, 5, 6, 7]), known, mask)
    x, trace = traced(den, state, labels)
    keep = mask == 0
    for st in trace:  # on the known pixels, every x_t entering an evaluation is a draw from q(x_t | input):
        e = implied_noise(st, known)[keep]  # 2,352 values, whose mean and std wander by 0.02 and 0.015
        assert abs(e.std().item() - 1) < 0.07 and abs(e.mean().item()) < 0.1, st.t
    torch.testing.assert_close(x, torch.where(mask == 1, images[labels], known), atol=2e-5, rtol=0)


def test_consistency_inpainting_merges_the_x0_prediction_before_re_noising():
    # Song et al. 2023, alg. 4: x <- sqrt(ab_s) (m C + (1 - m) K) + sqrt(1 - ab_s) z, one draw z per step.
    images = class_images()
    den = Denoiser(DeltaOracle(COSINE, "v", images), COSINE, "v", NULL)
    known, mask = images[[0]], box_mask(1, 7, 7, 14)
    state = start_inpainting("consistency", COSINE, 4, generators_from_seeds([11]), known, mask)
    eps, x0 = den(state.x, state.t, torch.tensor([5]), 1.0)
    after = step(state, COSINE, eps, x0)
    z = seed_draws(11, 2)[1].double()  # the start drew the first
    a = cosine_alpha_bar(749)
    merged = torch.where(mask == 1, images[[5]], known).double()
    torch.testing.assert_close(after.x.double(), math.sqrt(a) * merged + math.sqrt(1 - a) * z, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask": torch.full((1, 1, 28, 28), 0.5)}, r"mask must hold only 0 \(keep the input\) and 1"),
        ({"mask": torch.ones(1, 28, 28)}, r"mask must be \(B, 1, H, W\) = \(1, 1, 28, 28\)"),
        ({"sampler": "dpm++", "repaint": RePaint(2, 2)}, r"RePaint's resampling runs on ddim"),
        ({"eta": 0.0, "repaint": RePaint(2, 2)}, r"runs ddim at eta = 1"),
        ({"repaint": RePaint(10, 2)}, r"jump_length must be in 1\.\.9 for a grid of 10 steps, got 10"),
    ],
)
def test_bad_inpainting_input_is_refused(kwargs, message):
    args = {"sampler": "ddim", "mask": box_mask(1, 0, 0, 5)} | kwargs
    with pytest.raises(ValueError, match=message):
        start_inpainting(args.pop("sampler"), COSINE, 10, generators_from_seeds([0]), torch.zeros(1, 1, 28, 28), **args)
    with pytest.raises(ValueError, match="jump_length and resamplings must be integers >= 1"):
        RePaint(0, 2)


# --- RePaint's schedule --------------------------------------------------------------------------


def test_repaint_schedule_matches_a_hand_worked_case():
    # 5 levels, j = 2, r = 2: jumps wait at 0 and 2 (range(0, 5 - 2, 2)), once each. Down 4, 3, 2; back up to
    # 4; down 3, 2 (its jump spent), 1, 0; back up to 2; down 1, 0, and -1, the clean image.
    assert repaint_schedule(5, 2, 2) == [4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]
    timesteps, lands = repaint_timesteps(spaced_timesteps(1000, 5), RePaint(2, 2))  # the grid 999, 799, ..., 199
    assert timesteps == (999, 799, 999, 799, 599, 399, 599, 399, 199)
    assert lands == (799, 599, 799, 599, 399, 199, 399, 199, -1)
    # The paper's 250 levels, j = r = 10: 24 jump points, each adding 9 x 10 evaluations.
    assert inpainting_evaluations("ddim", 250, 1.0, RePaint(10, 10)) == 250 + 24 * 9 * 10
    # One resampling is no resampling: the grid itself.
    grid = spaced_timesteps(1000, 8)
    assert repaint_timesteps(grid, RePaint(3, 1)) == (tuple(grid), (*grid[1:], -1))


def test_repaint_jumps_back_up_without_evaluating_and_stays_on_q():
    images = class_images()
    oracle = DeltaOracle(COSINE, "v", images)
    den = Denoiser(oracle, COSINE, "v", NULL)
    labels = [4, 4]
    x0, mask = images[labels], torch.cat([box_mask(1, 0, 0, 14), box_mask(1, 10, 10, 18)])
    state = start_inpainting("ddim", COSINE, 20, generators_from_seeds([0, 1]), x0, mask, repaint=RePaint(5, 3))
    assert state.total == 20 + 2 * 5 * 3 and state.eta == 1.0
    x, trace = traced(den, state, labels)
    ts = [st.t for st in trace]
    assert ts == list(state.timesteps) and len(oracle.calls) == state.total  # jumps cost no evaluation
    assert sum(b > a for a, b in zip(ts, ts[1:], strict=False)) == 6  # 3 jump points, 2 jumps each
    # Right after a jump too, x_t is a draw from q(x_t | x0): without the forward noising it would sit at the
    # level below, its implied noise far under 1.
    stds = np.array([implied_noise(st, x0).std().item() for st in trace])
    assert np.abs(stds - 1).max() < 0.05, stds
    torch.testing.assert_close(x, x0, atol=2e-5, rtol=0)


# --- interpolation -------------------------------------------------------------------------------


def test_slerp_on_orthogonal_unit_vectors_is_the_arc():
    a, b = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(slerp(a, b, 0.5), torch.tensor([1, 1], dtype=torch.float64) / math.sqrt(2))
    torch.testing.assert_close(slerp(a, b, 1 / 3), torch.tensor([math.sqrt(3) / 2, 0.5], dtype=torch.float64))
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)


def test_slerp_keeps_the_norm_that_lerp_loses():
    a, b = seed_draws(1, 1)[0].double(), seed_draws(2, 1)[0].double()
    b = b * (a.norm() / b.norm())  # equal norms: slerp keeps them exactly
    for t in np.linspace(0, 1, 9):
        assert slerp(a, b, float(t)).norm().item() == pytest.approx(a.norm().item(), rel=1e-12)
    assert ((a + b) / 2).norm() < 0.75 * a.norm()  # two x_T are nearly orthogonal: lerp's midpoint shrinks


def test_slerp_of_near_parallel_vectors_is_lerp_and_finite():
    a = seed_draws(3, 1)[0].double()
    b = a * 1.5 + 1e-9
    torch.testing.assert_close(slerp(a, b, 0.25), 0.75 * a + 0.25 * b, atol=1e-12, rtol=0)
    assert torch.isfinite(slerp(a, -a, 0.5)).all() and torch.isfinite(slerp(a, a, 0.3)).all()
    with pytest.raises(ValueError, match="one shape"):
        slerp(a, a[:, :3], 0.5)
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        slerp(a, b, 1.5)
    with pytest.raises(ValueError, match="frames must be at least 2"):
        slerp_frames(a, b, 1)


def test_seed_frames_run_from_one_seeds_noise_to_the_others():
    frames = seed_frames(generators_from_seeds([21])[0], generators_from_seeds([22])[0], 5)
    assert frames.shape == (5, 1, 28, 28) and frames.dtype == torch.float32
    assert torch.equal(frames[0], seed_draws(21, 1)[0]) and torch.equal(frames[-1], seed_draws(22, 1)[0])
    norms = frames.flatten(1).norm(dim=1)
    assert (norms / norms[0]).sub(1).abs().max() < 0.05  # on the shell of x_T, about sqrt(784) = 28


def test_inversion_climbs_the_levels_ddim_descends():
    assert inversion_timesteps(COSINE, 5, 0.6) == ([0, 199, 399], [199, 399, 599])  # ddim: 599, 399, 199
    timesteps, lands = inversion_timesteps(COSINE, 1000, 1.0)  # the lowest level is 0 itself: no repeat
    assert timesteps == list(range(999)) and lands == list(range(1, 1000))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_inversion_then_ddim_sampling_gives_the_image_back(prediction):
    sigma0, labels = 0.3, [0, 4]
    means = class_images(1)[labels].double()
    oracle = GaussianOracle(COSINE, prediction, class_images(1), sigma0)
    den = Denoiser(oracle, COSINE, prediction, NULL)
    image = (means + sigma0 * torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    image = image.float()
    back = {}
    for steps in (200, 400):
        state = start_inversion(COSINE, steps, image)
        latent = run(den, state, torch.tensor(labels))
        assert [c[1][0] for c in oracle.calls[-steps:]] == list(state.timesteps)  # evaluated at state.t, ascending
        # The exact flow from the clean image up to t = 999: a mu + sqrt(a^2 sigma0^2 + s^2) (x0 - mu) / sigma0.
        a2 = COSINE.alpha_bar[999]
        exact = math.sqrt(a2) * means + math.sqrt(a2 * sigma0**2 + 1 - a2) * (image.double() - means) / sigma0
        assert (latent.double() - exact).abs().max() < 0.06
        x = run(den, start_at("ddim", COSINE, steps, generators_from_seeds([0, 1]), latent, 1.0), torch.tensor(labels))
        back[steps] = (x - image).abs().max().item()
    assert back[200] < 0.04 and back[400] < 0.6 * back[200]  # first order: twice the steps, half the error
    assert np.abs(to_uint8(x).astype(int) - to_uint8(image).astype(int)).max() <= 2


def test_frames_between_two_inverted_images_start_and_end_on_them():
    sigma0, steps, strength = 0.3, 200, 0.7
    den = Denoiser(GaussianOracle(COSINE, "v", class_images(1), sigma0), COSINE, "v", NULL)
    g = torch.Generator().manual_seed(6)
    images = (class_images(1)[[3, 3]] + sigma0 * torch.randn(2, 1, 28, 28, generator=g)).clamp(-1, 1)  # class 3
    latents = run(den, start_inversion(COSINE, steps, images, strength), torch.tensor([3, 3]))
    state = start_interpolation(COSINE, steps, latents[0], latents[1], 4, strength)
    assert state.sampler == "ddim" and state.eta == 0.0 and state.t == timesteps_for("ddim", COSINE, steps, 0.7)[0]
    frames = run(den, state, torch.tensor([3] * 4))  # (4, 1, 28, 28)
    torch.testing.assert_close(frames[[0, 3]], images, atol=0.04, rtol=0)
    assert (frames[1] - frames[2]).abs().max() > 0.05  # the inner frames differ from each other


# --- seeds and batches ---------------------------------------------------------------------------


def test_an_edited_image_depends_only_on_its_seed_and_inputs():
    den = Denoiser(GaussianOracle(COSINE, "v", class_images(4), 0.3), COSINE, "v", NULL)
    images = class_images(7)[[1, 2, 3]] * 0.9
    masks = torch.cat([box_mask(1, 2, 2, 10), box_mask(1, 5, 5, 20), box_mask(1, 0, 8, 12)])

    def edit(rows: list[int], seeds: list[int], how: str) -> torch.Tensor:
        gens, img = generators_from_seeds(seeds), images[rows]
        if how == "variation":
            state = start_from_image("ddim", COSINE, 10, gens, img, 0.6, eta=1.0)
        elif how == "consistency":
            state = start_inpainting("consistency", COSINE, 4, gens, img, masks[rows])
        else:
            state = start_inpainting("ddim", COSINE, 10, gens, img, masks[rows], repaint=RePaint(3, 2))
        return run(den, state, torch.tensor([5] * len(rows)), 2.0)

    for how in ("variation", "consistency", "repaint"):
        alone = edit([1], [7], how)
        batch = edit([0, 1, 2], [11, 7, 13], how)
        assert torch.equal(batch[1], alone[0]), how  # bit for bit: every draw from the image's own generator
        assert not torch.equal(edit([1], [8], how), alone), how  # another seed, another image


def test_an_engines_shared_ticks_run_every_method_unchanged():
    # As app/generation/engine.py does: one evaluation per tick over every unfinished state's rows, each row at
    # its own state.t, then step() per state. Each method must come out as it does run alone.
    den = Denoiser(GaussianOracle(COSINE, "v", class_images(4), 0.3), COSINE, "v", NULL)
    images = class_images(9)[[1, 2]] * 0.9
    mask = box_mask(2, 4, 4, 12)

    def states():
        return [
            (start_from_image("heun", COSINE, 6, generators_from_seeds([1, 2]), images, 0.5), [3, 4]),
            (
                start_inpainting("ddim", COSINE, 8, generators_from_seeds([3, 4]), images, mask, repaint=RePaint(2, 3)),
                [5, 6],
            ),
            (start_inpainting("consistency", COSINE, 4, generators_from_seeds([5, 6]), images, mask), [7, 8]),
            (start_inversion(COSINE, 10, images, 0.8), [1, 2]),
        ]

    alone = [run(den, st, torch.tensor(y), 2.0) for st, y in states()]
    jobs = states()
    while any(not st.done for st, _ in jobs):
        live = [i for i, (st, _) in enumerate(jobs) if not st.done]
        x = torch.cat([jobs[i][0].x for i in live])
        t = [jobs[i][0].t for i in live for _ in range(2)]
        y = torch.tensor([c for i in live for c in jobs[i][1]])
        eps, x0 = den.rows(x, t, y, [2.0] * len(t))
        for k, i in enumerate(live):
            st, labels = jobs[i]
            jobs[i] = (step(st, COSINE, eps[2 * k : 2 * k + 2], x0[2 * k : 2 * k + 2]), labels)
    for (st, _), want in zip(jobs, alone, strict=True):
        assert torch.equal(st.x, want), st.sampler


def test_with_a_real_network_the_start_is_batch_independent_and_the_end_within_float_noise(tiny_unet):
    den = Denoiser(tiny_unet, COSINE, "v", NULL)
    images = class_images(8)[[0, 1, 2]] * 0.9
    masks = torch.cat([box_mask(1, 2, 2, 10), box_mask(1, 5, 5, 20), box_mask(1, 0, 8, 12)])
    alone = start_inpainting("ddim", COSINE, 6, generators_from_seeds([7]), images[[1]], masks[[1]], eta=1.0)
    batch = start_inpainting("ddim", COSINE, 6, generators_from_seeds([3, 7, 9]), images, masks, eta=1.0)
    assert torch.equal(batch.x[1], alone.x[0])
    a, b = run(den, alone, torch.tensor([4])), run(den, batch, torch.tensor([2, 4, 6]))
    # CPU kernels are not batch-invariant bit for bit (test_samplers.py), so within a batch an image may differ
    # in its last float bits, never more; the kept pixels are the input exactly either way.
    torch.testing.assert_close(b[1], a[0], atol=1e-4, rtol=0)
    assert np.abs(to_uint8(b[1:2]).astype(int) - to_uint8(a).astype(int)).max() <= 1


# --- classes -------------------------------------------------------------------------------------


def test_class_mixes_embed_between_two_classes_and_leave_the_network_alone(tiny_unet):
    table = tiny_unet.class_emb.weight.detach().clone()
    mixed = with_class_mixes(tiny_unet, [(2, 7, 0.0), (2, 7, 1.0), (2, 7, 0.25)])
    want = 0.75 * table[2].double() + 0.25 * table[7].double()
    torch.testing.assert_close(mixed.class_emb.weight[13].double(), want)
    x = seed_draws(5, 1)[0][None]
    t = torch.tensor([500.0])

    def out(model, label: int) -> torch.Tensor:
        with torch.no_grad():
            return model(x, t, torch.tensor([label]))

    assert torch.equal(out(mixed, 11), out(tiny_unet, 2)) and torch.equal(out(mixed, 12), out(tiny_unet, 7))
    quarter = out(mixed, 13)
    assert (quarter - out(tiny_unet, 2)).abs().max() > 1e-4 and (quarter - out(tiny_unet, 7)).abs().max() > 1e-4
    # The original keeps its 11 rows and its output; the copy shares every other parameter.
    assert tiny_unet.class_emb.num_embeddings == NULL + 1 and torch.equal(tiny_unet.class_emb.weight, table)
    assert mixed.stem.weight is tiny_unet.stem.weight
    with pytest.raises(ValueError, match=r"a class mix is \(a, b, w\) with a, b in 0\.\.10"):
        with_class_mixes(tiny_unet, [(2, 11, 0.5)])
