"""Samplers: ancestral DDPM, DDIM, DPM-Solver++(2M), EDM's Heun on Karras noise levels and multistep
consistency sampling, with classifier-free guidance or autoguidance.

A sampler is an explicit per-trajectory state (``SamplerState``: x_t, the step index, the
sampler's memory, the per-image generators) and a pure step function
``step(state, schedule, eps, x0_pred) -> state``. Nothing is shared between trajectories, so an
engine can advance many of them, each at its own step and with its own sampler, from one network
evaluation (``Denoiser.rows`` takes a timestep and a guidance scale per row); ``sample`` is the
thin loop driver over the same step that evaluation, the benches and the tests use. (The per-call
state that diffusers' schedulers keep hidden is what makes them unsafe to share.)

Every image draws all its randomness (x_T and any per-step noise) from its own
``torch.Generator``, so an image depends only on its seed and parameters, never on what
else is in the batch.

The same state and step serve image-to-image editing (``model.editing``): a run may start lower than
pure noise (``strength``, SDEdit), hold a known region that every step puts back (inpainting, RePaint's
merge), jump back up between evaluations (RePaint's resampling), or climb from an image to a noise level
(DDIM inversion). ``step`` does all of it, so an engine that evaluates ``state.t`` and calls ``step`` runs
every editing method unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from model.diffusion import Schedule, split_prediction

KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5: the spacing of Heun's noise levels
EDM_SIGMA_MAX = 80.0  # and its highest one after the first step from pure noise
# What a guided row is guided away from: the null class (Ho & Salimans 2022) or a guide network (Karras et al. 2024).
GUIDANCE_METHODS = ("classifier-free", "autoguidance")


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


def blend(out: torch.Tensor, rows: Sequence[int], ref: torch.Tensor, guidance: Sequence[float]) -> torch.Tensor:
    """``out`` with each of ``rows`` guided away from its reference (``ref``, one row each, in order):
    ref + w (out - ref), in place."""
    idx = torch.tensor(list(rows), device=out.device)  # (G,)
    w = torch.tensor([float(guidance[i]) for i in rows], device=out.device).reshape(-1, 1, 1, 1)  # (G, 1, 1, 1)
    out[idx] = ref + w * (out[idx] - ref)
    return out


def check_guidance_interval(lo: float, hi: float) -> None:
    if not (np.isfinite(lo) and 0 <= lo < hi):
        raise ValueError(f"guidance_interval must be (sigma_lo, sigma_hi) with 0 <= lo < hi, got {(lo, hi)}")


def check_guidance(guidance: float) -> None:
    if not np.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")


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
    # Autoguidance (Karras et al. 2024): a smaller, less-trained conditional network of the same schedule
    # and target. Guided rows then take their reference from it instead of from the null class.
    guide: torch.nn.Module | None = None
    # Combined guidance: with a guide, a weight w_a != 1 keeps every row's reference the null class and adds
    # autoguidance on top, out_cfg + (w_a - 1)(out_cond - out_guide): classifier-free guidance for the class,
    # the guide for variety (three evaluations per guided row). 1: autoguidance or classifier-free alone.
    guide_weight: float = 1.0

    def __post_init__(self):
        if self.guidance_interval is not None:
            check_guidance_interval(*self.guidance_interval)
        if not np.isfinite(self.guide_weight) or self.guide_weight < 0:
            raise ValueError(f"guide_weight must be a finite number >= 0, got {self.guide_weight}")

    def guides_at(self, t: int) -> bool:
        """Whether guidance applies at timestep t (Kynkaanniemi et al. 2024: guidance at high noise
        collapses the variety of shapes, at low noise it only sharpens detail; the middle is what
        makes a sample look like its class)."""
        if self.guidance_interval is None:
            return True
        lo, hi = self.guidance_interval
        return lo < float(self.schedule.noise_level()[t]) <= hi

    def needs_null_row(self, t: int, guidance: float) -> bool:
        """Whether a row at timestep t with this guidance scale also needs a reference pass: a null-class
        row, or under autoguidance a row of the guide network."""
        return guidance != 1.0 and self.guides_at(t)

    def autoguided(self, rows: int, autoguide: Sequence[bool] | None) -> list[bool]:
        """Per row, whether its reference is the guide network: ``autoguide`` as given (None: every row,
        when there is a guide), refused where there is none."""
        if autoguide is None:
            return [self.guide is not None and self.guide_weight == 1.0] * rows
        if len(autoguide) != rows:
            raise ValueError(f"need one autoguide flag per row: {rows} rows, {len(autoguide)} flags")
        if self.guide is None and any(autoguide):
            raise ValueError("autoguidance needs a guide network; this denoiser has none")
        return [bool(a) for a in autoguide]

    @torch.no_grad()
    def rows(
        self,
        x_t: torch.Tensor,
        t: Sequence[int],
        y: torch.Tensor,
        guidance: Sequence[float],
        autoguide: Sequence[bool] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0_pred) for rows that each bring their own timestep, guidance scale and kind of guidance:
        one evaluation of the network over the conditional rows and a null-class row for each row that
        guides with classifier-free guidance, and one of the guide over the rows that it guides.

        Ho & Salimans 2022, eq. 6: out = out_ref + w (out_cond - out_ref) with out_ref the null-class
        output; Karras et al. 2024, eq. 2: the same with out_ref the guide's conditional output. w = 1 is
        the plain conditional model. The output is linear in eps and v alike, so guiding the raw output is
        the same as guiding eps. Outside ``guidance_interval`` w is 1. With a ``guide_weight`` the
        classifier-free rows also take the guide's term (combined guidance, see the field).
        """
        b = len(x_t)
        if not len(t) == len(guidance) == b:
            raise ValueError(f"need one timestep and one guidance per row: {b} rows, {len(t)} t, {len(guidance)} w")
        auto = self.autoguided(b, autoguide)
        ts = torch.tensor(list(t), device=x_t.device, dtype=torch.long)  # (B,)
        tt = ts.float()
        guided = [i for i in range(b) if self.needs_null_row(int(t[i]), float(guidance[i]))]
        nulls, autos = [i for i in guided if not auto[i]], [i for i in guided if auto[i]]
        if not nulls:
            out = self.model(x_t, tt, y).float()  # (B, C, H, W)
        else:
            n = torch.tensor(nulls, device=x_t.device)  # (N,)
            null = torch.full((len(nulls),), self.null_class, device=y.device, dtype=y.dtype)
            both = self.model(torch.cat([x_t, x_t[n]]), torch.cat([tt, tt[n]]), torch.cat([y, null])).float()
            out = blend(both[:b].clone(), nulls, both[b:], guidance)
            if self.guide is not None and self.guide_weight != 1.0:  # combined guidance
                cond = both[:b][n]
                out[n] += (self.guide_weight - 1.0) * (cond - self.guide(x_t[n], tt[n], y[n]).float())
        if autos:
            a = torch.tensor(autos, device=x_t.device)  # (A,)
            assert self.guide is not None  # autoguided() refuses otherwise
            out = blend(out.clone() if not nulls else out, autos, self.guide(x_t[a], tt[a], y[a]).float(), guidance)
        return split_prediction(self.prediction, self.schedule, x_t, ts, out)

    def __call__(
        self, x_t: torch.Tensor, t: int, y: torch.Tensor, guidance: float, autoguide: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0_pred) at one timestep t for every row, guided with scale ``guidance`` (``autoguide``: from
        the guide network or the null class; None: the guide where there is one, as ``autoguided``)."""
        b = len(x_t)
        return self.rows(x_t, [t] * b, y, [guidance] * b, None if autoguide is None else [autoguide] * b)


def initial_noise(
    generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device | str
) -> torch.Tensor:
    """x_T, one image per generator: (B, *shape). Drawn on the CPU so CPU and GPU give the same noise."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def _noise_like(x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x.device, x.dtype)


def check_steps(sampler: str, steps: int, T: int, max_evaluations: int | None = None) -> None:
    """Refuse a step count ``sampler`` cannot take on a schedule of T timesteps, or one that takes more
    than ``max_evaluations`` network evaluations, saying what it can (``Sampler.check_steps``)."""
    sampler_named(sampler).check_steps(steps, T, max_evaluations)


def _heun_range(schedule: Schedule) -> tuple[float, float]:
    """The noise levels Heun's Karras spacing spans by default: the schedule's lowest, and EDM's sigma_max
    (or the highest below x_T's own, where that is lower)."""
    sigma = schedule.noise_level()
    return float(sigma[0]), min(EDM_SIGMA_MAX, float(sigma[schedule.T - 2]))


def check_sigma_min(schedule: Schedule, sigma_min: float) -> None:
    """Refuse a lowest noise level for Heun that the schedule's levels below EDM's sigma_max do not span."""
    lo, hi = _heun_range(schedule)
    if not (np.isfinite(sigma_min) and lo <= sigma_min < hi):
        raise ValueError(f"sigma_min must be in [{lo:.4g}, {hi:.4g}) for this schedule, got {sigma_min}")


def evaluations(sampler: str, steps: int, strength: float | None = None) -> int:
    """Network evaluations per image (before guidance's reference rows) of ``steps`` steps of ``sampler``: from
    pure noise (``strength`` None), or the kept ones from an image (``kept_steps``, ``Sampler.evaluations``)."""
    return sampler_named(sampler).evaluations(steps, strength)


def karras_timesteps(schedule: Schedule, steps: int, sigma_min: float | None = None) -> list[int]:
    """Heun's noise levels as timesteps, descending: T-1 (pure noise), then ``steps`` levels spaced as
    Karras et al. 2022 space them (eq. 5, rho = 7) from EDM's sigma_max = 80 down to ``sigma_min``
    (None: sigma at t = 0, the schedule's lowest), from which the last step jumps to x0.

    EDM starts at sigma 80. The cosine schedule's x_T is at sigma 2e4, where the spacing would spend
    most of its steps, so the sampler first jumps to 80 with one Euler step (exact while the denoiser
    is constant, as it is that far up). Each level becomes the timestep nearest it in log sigma (the
    network knows integer timesteps only, as k-diffusion's quantised discrete denoisers); where
    rounding would repeat one, the next lower is taken, so the levels are always distinct and end at 0."""
    T = schedule.T
    check_steps("heun", steps, T)
    log_sigma = np.log(schedule.noise_level())  # increasing in t
    lo, hi = _heun_range(schedule)
    if sigma_min is not None:
        check_sigma_min(schedule, sigma_min)
        lo = float(sigma_min)
    ramp = np.linspace(0, 1, steps) if steps > 1 else np.ones(1)
    inv = 1 / KARRAS_RHO
    sigmas = (hi**inv + ramp * (lo**inv - hi**inv)) ** KARRAS_RHO
    nearest = np.rint(np.interp(np.log(sigmas), log_sigma, np.arange(T))).astype(int)
    ts = [T - 1]
    for k, t in enumerate(nearest.tolist(), start=1):
        ts.append(min(max(t, steps - k), ts[-1] - 1))
    return ts


def spaced_timesteps(T: int, steps: int) -> list[int]:
    """``steps`` evaluation timesteps from T-1 downwards, evenly spaced ("trailing" spacing,
    Lin et al. 2024, table 2), so the first step always starts from pure noise."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    return [int(round(T - i * T / steps)) - 1 for i in range(steps)]


# --- the state and the step ---------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerState:
    """A batch of trajectories in flight, all at the same step of the same sampler."""

    sampler: str  # one of SAMPLERS, or INVERSION (model.editing.start_inversion)
    timesteps: tuple[int, ...]  # the evaluation timesteps, descending
    x: torch.Tensor  # (B, C, H, W) x_t at timesteps[index]; the sample itself once done
    generators: tuple[torch.Generator, ...]  # one per image: x_T and every later noise draw
    index: int = 0  # the next step to take, 0-based
    eta: float = 0.0  # DDIM's stochasticity
    x0_prev: torch.Tensor | None = None  # DPM-Solver++(2M): the previous step's x0 prediction
    h_prev: float | None = None  # and that step's size in half log-SNR
    # Heun, between its Euler step and the correction: x/sqrt(ab) at the step's start plus half the step along
    # its slope, to which the correction adds the other half along the slope at the step's end.
    heun_half: torch.Tensor | None = None
    # Inpainting (model.editing.start_inpainting): the input image in [-1, 1] and where to generate. After every
    # step the pixels where mask is False are the input noised to the next timestep's level, the input itself
    # after the last step (``merge_known``).
    known: torch.Tensor | None = None  # (B, C, H, W) the input image, in [-1, 1]
    mask: torch.Tensor | None = None  # (B, 1, H, W) bool: True where the image is generated, False where kept
    # The level each step ends at (-1: the clean image), where that is not the next timestep: RePaint's schedule
    # (a next timestep above it is a jump back up, ``jump_up``) and DDIM inversion (which ends above its last).
    lands: tuple[int, ...] | None = None

    @property
    def total(self) -> int:
        return len(self.timesteps)

    @property
    def landing(self) -> int:
        """The level the next step ends at: the next timestep, or -1 (the clean image) after the last one,
        unless ``lands`` says otherwise."""
        if self.lands is not None:
            return self.lands[self.index]
        return self.timesteps[self.index + 1] if self.index + 1 < len(self.timesteps) else -1

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def t(self) -> int:
        """The timestep the network is evaluated at for the next step."""
        return self.timesteps[self.index]


def check_eta(eta: float) -> None:
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")


def kept_steps(steps: int, strength: float) -> int:
    """How many of its ``steps`` steps a run from an image keeps, the last ones: int(steps * strength), as
    diffusers' img2img (``init_timestep = min(int(steps * strength), steps)``). Rounded down, so the
    network evaluations scale with strength; to within 1e-9, so a strength written k / steps keeps k steps
    whatever the float rounding (49 * (1 / 49) is 0.99999...)."""
    if not (np.isfinite(strength) and 0.0 < strength <= 1.0):
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    kept = min(int(steps * strength + 1e-9), steps)
    if kept < 1:
        raise ValueError(
            f"strength {strength} keeps none of {steps} steps (it keeps int(steps * strength)); "
            f"the least strength for {steps} steps is 1/{steps} = {1 / steps:.4g}"
        )
    return kept


def timesteps_for(
    sampler: str, schedule: Schedule, steps: int, strength: float | None = None, sigma_min: float | None = None
) -> list[int]:
    """The evaluation timesteps of ``steps`` steps of ``sampler``: all of them for a run from pure noise
    (``strength`` None), or the last ``Sampler.evaluations(steps, strength)`` of them for one that starts from
    an image noised to the first of those (SDEdit, ``model.editing``). ``sigma_min`` (heun only) is its lowest
    level (``karras_timesteps``)."""
    entry = sampler_named(sampler)
    entry.check_steps(steps, schedule.T)
    if sigma_min is not None and not entry.takes_sigma_min:
        takers = ", ".join(s.name for s in REGISTRY.values() if s.takes_sigma_min)
        raise ValueError(f"sigma_min applies to {takers} only, not {sampler}")
    timesteps = entry.timesteps(schedule, steps, sigma_min)
    if strength is None:
        return timesteps
    return timesteps[len(timesteps) - entry.evaluations(steps, strength) :]


def start(
    sampler: str,
    schedule: Schedule,
    steps: int,
    generators: Sequence[torch.Generator],
    shape: tuple[int, ...] = (1, 28, 28),
    device: torch.device | str = "cpu",
    eta: float = 0.0,
    sigma_min: float | None = None,
) -> SamplerState:
    """The state before the first step: x_T drawn from each image's generator, and the evaluation
    timesteps of the sampler's registry entry (``REGISTRY``) for ``steps`` steps. ``sigma_min`` (heun
    only) is its lowest level (``karras_timesteps``)."""
    timesteps_for(sampler, schedule, steps, None, sigma_min)  # refused before any noise is drawn
    check_eta(eta)
    x_T = initial_noise(generators, shape, device)  # (B, *shape)
    return start_at(sampler, schedule, steps, generators, x_T, None, eta, sigma_min)


def start_at(
    sampler: str,
    schedule: Schedule,
    steps: int,
    generators: Sequence[torch.Generator],
    x: torch.Tensor,
    strength: float | None = None,
    eta: float = 0.0,
    sigma_min: float | None = None,
) -> SamplerState:
    """The state before the first step from a given ``x`` (B, C, H, W) at the first of ``timesteps_for``'s
    timesteps: x_T for a run from pure noise (``strength`` None); a noised image or an inverted latent for one
    that starts lower (``model.editing``)."""
    timesteps = timesteps_for(sampler, schedule, steps, strength, sigma_min)
    check_eta(eta)
    if x.ndim != 4 or len(x) != len(generators):
        raise ValueError(f"need x as (B, C, H, W) with one generator per image: x {tuple(x.shape)}, {len(generators)}")
    eta = eta if sampler_named(sampler).takes_eta else 0.0
    return SamplerState(sampler, tuple(timesteps), x, tuple(generators), eta=eta)


def step(state: SamplerState, schedule: Schedule, eps: torch.Tensor, x0: torch.Tensor) -> SamplerState:
    """The next state, from the network's (guided) eps and x0 predictions at ``state.t``: the sampler's step,
    then RePaint's jump back up where the next timestep is above the level the step ended at, then the known
    region put back where the state inpaints. Every sampler gets the editing methods from here alone."""
    if state.done:
        raise ValueError(f"the trajectory has taken all its {state.total} steps")
    landing = state.landing
    # 1. Consistency models' zero-shot editing (Song et al. 2023, alg. 4): the known pixels go into the x0
    #    prediction, which the consistency step re-noises (or returns, after its last step).
    edits_x0 = state.known is not None and sampler_named(state.sampler).edits_x0
    if edits_x0:
        x0 = _paste_known(state, x0)
    # 2. The sampler's own step.
    state = STEPS[state.sampler](state, schedule, eps, x0)
    # 3. RePaint's resampling: back up to the next timestep when it is above the level the step ended at.
    state = jump_up(state, schedule, landing)
    # 4. RePaint's merge: the known region, noised to the next timestep's level.
    if state.known is not None and not edits_x0:
        state = merge_known(state, schedule)
    return state


def _paste_known(state: SamplerState, x: torch.Tensor) -> torch.Tensor:
    """``x`` where the state generates, the known image elsewhere: torch.where, exact (never 0 * x), and in the
    wider of the two dtypes, so the known pixels keep every bit."""
    assert state.known is not None and state.mask is not None
    return torch.where(state.mask, x, state.known)  # (B, C, H, W)


def merge_known(state: SamplerState, schedule: Schedule) -> SamplerState:
    """RePaint's merge (Lugmayr et al. 2022, eq. 8): x = m * x_known + (1 - m) * x_unknown, with m the known
    region (False in ``state.mask``) and x_known ~ q(x_t | x_0) the input noised to the level of the next
    timestep (Ho et al. 2020, eq. 4), with fresh noise from each image's generator. After the last step it is
    the input itself, so the known pixels come out exactly as they went in."""
    assert state.known is not None and state.mask is not None
    if state.done:
        return replace(state, x=_paste_known(state, state.x))
    ab = float(schedule.alpha_bar[state.t])
    x_known = np.sqrt(ab) * state.known + np.sqrt(1 - ab) * _noise_like(state.x, state.generators)  # (B, C, H, W)
    return replace(state, x=torch.where(state.mask, state.x, x_known))


def jump_up(state: SamplerState, schedule: Schedule, landed: int) -> SamplerState:
    """RePaint's resampling (Lugmayr et al. 2022, sec. 4.2 and alg. 1): where the next timestep t is above the
    level l the last step ended at, the sample goes back up with the forward process,
    x_t ~ q(x_t | x_l) = N(sqrt(ab_t / ab_l) x_l, (1 - ab_t / ab_l) I) (Ho et al. 2020, eq. 2 over t - l steps),
    with noise from each image's generator. It costs no network evaluation, so ``timesteps`` still counts
    evaluations alone."""
    if state.done or state.t <= landed:
        return state
    ab = schedule.alpha_bar
    ratio = float(ab[state.t] / (1.0 if landed < 0 else ab[landed]))  # ab_t / ab_l, in float64
    x = np.sqrt(ratio) * state.x + np.sqrt(1 - ratio) * _noise_like(state.x, state.generators)  # (B, C, H, W)
    return replace(state, x=x)


def _ddpm_step(state: SamplerState, schedule: Schedule, eps: torch.Tensor, x0: torch.Tensor) -> SamplerState:
    """Ancestral sampling (Ho et al. 2020, alg. 2), with the posterior q(x_{t-1} | x_t, x_0) of
    eq. 6-7: mean from x0_pred, variance beta_tilde_t."""
    t, x = state.t, state.x
    ab = schedule.alpha_bar
    ab_prev = 1.0 if t == 0 else ab[t - 1]
    # 1. Posterior mean, Ho et al. eq. 7.
    c_x0 = np.sqrt(ab_prev) * schedule.betas[t] / (1 - ab[t])
    c_xt = np.sqrt(schedule.alphas[t]) * (1 - ab_prev) / (1 - ab[t])
    mean = c_x0 * x0 + c_xt * x
    # 2. Posterior variance beta_tilde_t; no noise on the last step.
    if t > 0:
        var = schedule.betas[t] * (1 - ab_prev) / (1 - ab[t])
        x = mean + float(np.sqrt(var)) * _noise_like(x, state.generators)
    else:
        x = mean
    return replace(state, x=x, index=state.index + 1)


def _ddim_step(state: SamplerState, schedule: Schedule, eps: torch.Tensor, x0: torch.Tensor) -> SamplerState:
    """DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
    i, ts, ab = state.index, state.timesteps, schedule.alpha_bar
    a_t = ab[ts[i]]
    a_prev = ab[state.landing] if state.landing >= 0 else 1.0  # the next timestep, or RePaint's level below
    # 1. sigma_t of eq. 16, scaled by eta.
    sigma = state.eta * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(1 - a_t / a_prev)
    # 2. x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z.
    x = float(np.sqrt(a_prev)) * x0 + float(np.sqrt(max(1 - a_prev - sigma**2, 0.0))) * eps
    if sigma > 0:
        x = x + float(sigma) * _noise_like(x, state.generators)
    return replace(state, x=x, index=i + 1)


def _consistency_step(state: SamplerState, schedule: Schedule, eps: torch.Tensor, x0: torch.Tensor) -> SamplerState:
    """Multistep consistency sampling (Song et al. 2023, alg. 1): the network's x0 prediction is
    taken as the end of the trajectory, and re-noised with fresh noise to the next timestep. For a
    network distilled to map x_t to its trajectory's end (``model.distill``), one step is a sample
    and each further step corrects it at a lower noise level."""
    i, ts = state.index, state.timesteps
    if i + 1 == len(ts):
        return replace(state, x=x0, index=i + 1)
    # x_s = sqrt(alpha_bar_s) x0 + sqrt(1 - alpha_bar_s) z, z ~ N(0, I) drawn from each image's generator.
    a_s = schedule.alpha_bar[ts[i + 1]]
    x = float(np.sqrt(a_s)) * x0 + float(np.sqrt(1 - a_s)) * _noise_like(x0, state.generators)
    return replace(state, x=x, index=i + 1)


def _dpm_solver_pp_step(state: SamplerState, schedule: Schedule, eps: torch.Tensor, x0: torch.Tensor) -> SamplerState:
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2): second-order multistep in the data prediction,
    first order on the first step and on the final jump to the clean image."""
    i, ts = state.index, state.timesteps
    if i + 1 == len(ts):
        return replace(state, x=x0, index=i + 1)  # sigma = 0 at the end: the solution is the data prediction
    ab = schedule.alpha_bar
    t, s = ts[i], ts[i + 1]
    alpha = np.sqrt(ab[[t, s]])  # alpha_t, alpha_s in the paper's notation
    sigma = np.sqrt(1 - ab[[t, s]])
    lam = np.log(alpha) - np.log(sigma)  # half log-SNR, decreasing in t
    h = float(lam[1] - lam[0])
    # 1. First order (DPM-Solver++ 1 = DDIM) on the first step, else the 2M correction (eq. 10).
    if state.x0_prev is None or state.h_prev is None:
        d = x0
    else:
        r = state.h_prev / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * state.x0_prev
    # 2. x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D.
    x = float(sigma[1] / sigma[0]) * state.x - float(alpha[1] * np.expm1(-h)) * d
    return replace(state, x=x, index=i + 1, x0_prev=x0, h_prev=h)


def _heun_step(state: SamplerState, schedule: Schedule, eps: torch.Tensor, x0: torch.Tensor) -> SamplerState:
    """One evaluation of EDM's deterministic sampler (Karras et al. 2022, alg. 1): Heun's second-order
    method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma in x = x_t / sqrt(ab),
    whose slope is the network's eps. An Euler step goes from each level to the next, and the next
    evaluation corrects it with the slope found there; the jump from pure noise and the last step, to
    sigma = 0 (x0 itself), stay Euler."""
    i, ts = state.index, state.timesteps
    if i + 1 == len(ts):
        return replace(state, x=x0, index=i + 1)
    sigma, ab = schedule.noise_level(), schedule.alpha_bar
    if state.heun_half is None:  # Euler from ts[i] to ts[i + 1]: x0 + sigma eps, DDIM's step
        s_cur, s_next = float(sigma[ts[i]]), float(sigma[ts[i + 1]])
        x = float(np.sqrt(ab[ts[i + 1]])) * (x0 + s_next * eps)
        # A correction follows where the next level comes twice (``_heun_timesteps``): not after the jump from
        # pure noise, which a run from an image (``timesteps_for`` with a strength) does not take.
        corrected = i + 2 < len(ts) and ts[i + 2] == ts[i + 1]
        half = state.x / float(np.sqrt(ab[ts[i]])) + 0.5 * (s_next - s_cur) * eps if corrected else None
        return replace(state, x=x, index=i + 1, heun_half=half)
    s_prev, s_cur = float(sigma[ts[i - 1]]), float(sigma[ts[i]])
    x = float(np.sqrt(ab[ts[i]])) * (state.heun_half + 0.5 * (s_cur - s_prev) * eps)
    return replace(state, x=x, index=i + 1, heun_half=None)


def _ddim_inversion_step(state: SamplerState, schedule: Schedule, eps: torch.Tensor, x0: torch.Tensor) -> SamplerState:
    """DDIM inversion (Song et al. 2021, sec. 4.3 and 5.4): the deterministic DDIM update (eq. 12, eta = 0) run
    towards more noise, x_next = sqrt(ab_next) x0_pred + sqrt(1 - ab_next) eps, the prediction at the level
    the sample is at standing in for the one at the level it goes to (Euler on the probability-flow ODE, eq. 14,
    the other way). Its timesteps ascend; ``lands`` holds the level each step goes up to."""
    a_next = float(schedule.alpha_bar[state.landing])
    x = np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps  # (B, C, H, W)
    return replace(state, x=x, index=state.index + 1)


# --- the registry --------------------------------------------------------------------------------

StepFn = Callable[[SamplerState, Schedule, torch.Tensor, torch.Tensor], SamplerState]
TimestepsFn = Callable[[Schedule, int, float | None], list[int]]


def _one_each(kept: int) -> int:
    return kept


def _heun_kept(kept: int) -> int:
    """From an image, Heun starts at its kept levels' first, with the Euler step from it (a run from pure noise
    jumps there first): k - 1 Euler steps each corrected, and the last one, to x0, not: 2k - 1 evaluations,
    a suffix of its timesteps that starts at a level's second appearance, where its Euler step is."""
    return 2 * kept - 1


@dataclass(frozen=True)
class Sampler:
    """One sampler, everything the rest of the project asks of it: the timesteps it evaluates for a
    number of steps, its step, its network evaluations per step, and which steps it can take."""

    name: str
    default_steps: int  # where neither a request nor a card names any (all_steps: T whatever this says)
    timesteps: TimestepsFn  # (schedule, steps, sigma_min) -> the evaluation timesteps, descending
    step: StepFn  # (state, schedule, eps, x0_pred) -> the next state
    evaluations_per_step: int = 1
    all_steps: bool = False  # it runs every timestep of the schedule: steps must be T
    levels_below_T: bool = False  # its levels come after x_T's own, so at most T - 1 steps
    takes_eta: bool = False  # DDIM's stochasticity applies
    takes_sigma_min: bool = False  # a lowest noise level applies (Heun's)
    # From an image (a strength, ``kept_steps``): the network evaluations of its last ``kept`` steps, the suffix
    # of its timesteps it runs from the level it starts at.
    kept_evaluations: Callable[[int], int] = _one_each
    # Inpainting puts the known pixels into the x0 prediction before the step (consistency models' zero-shot
    # editing, Song et al. 2023, alg. 4) rather than into x after it (RePaint's merge).
    edits_x0: bool = False

    def max_steps(self, T: int) -> int:
        return T - 1 if self.levels_below_T else T

    def evaluations(self, steps: int, strength: float | None = None) -> int:
        """Network evaluations per image (before guidance's reference rows) of ``steps`` steps: from pure
        noise (``strength`` None), or from an image noised to the level ``strength`` picks (``kept_steps``)."""
        if strength is None:
            return self.evaluations_per_step * steps
        return self.kept_evaluations(kept_steps(steps, strength))

    def steps_for(self, asked: int | None, default: int, T: int) -> int:
        """The steps a run takes: ``asked``, else ``default``; a sampler that runs all T steps takes T,
        which ``asked`` may only repeat."""
        if self.all_steps:
            if asked is not None and asked != T:
                raise ValueError(f"{self.name} runs all {T} steps; got steps={asked}")
            return T
        return default if asked is None else asked

    def check_steps(self, steps: int, T: int, max_evaluations: int | None = None) -> None:
        """Refuse a step count this sampler cannot take on a schedule of T timesteps, or one that takes
        more than ``max_evaluations`` network evaluations, saying what it can."""
        if self.all_steps:
            if steps != T:
                raise ValueError(f"{self.name} runs all {T} steps; got steps={steps}")
        elif not 1 <= steps <= self.max_steps(T):
            raise ValueError(f"steps must be in 1..{self.max_steps(T)} for {self.name}, got {steps}")
        if max_evaluations is not None and self.evaluations(steps) > max_evaluations:
            most = max_evaluations // self.evaluations_per_step
            fewer = ", ".join(s.name for s in REGISTRY.values() if not s.all_steps)
            allowed = (
                f"a sampler of fewer steps ({fewer})" if self.all_steps else f"at most {most} steps of {self.name}"
            )
            raise ValueError(
                f"{steps} steps of {self.name} take {self.evaluations(steps)} network evaluations, over the "
                f"{max_evaluations} allowed; allowed: {allowed}"
            )


def _every_timestep(schedule: Schedule, steps: int, sigma_min: float | None) -> list[int]:
    return list(range(schedule.T - 1, -1, -1))


def _spaced(schedule: Schedule, steps: int, sigma_min: float | None) -> list[int]:
    return spaced_timesteps(schedule.T, steps)


def _heun_timesteps(schedule: Schedule, steps: int, sigma_min: float | None) -> list[int]:
    """The jump from pure noise, then each Karras level but the first twice (the correction ending at
    it, the Euler step from it)."""
    levels = karras_timesteps(schedule, steps, sigma_min)
    return [*levels[:2], *(t for t in levels[2:] for _ in (0, 1))]


REGISTRY: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("ddpm", 1000, _every_timestep, _ddpm_step, all_steps=True),
        Sampler("ddim", 50, _spaced, _ddim_step, takes_eta=True),
        Sampler("dpm++", 20, _spaced, _dpm_solver_pp_step),
        Sampler(
            "heun",
            18,
            _heun_timesteps,
            _heun_step,
            evaluations_per_step=2,
            levels_below_T=True,
            takes_sigma_min=True,
            kept_evaluations=_heun_kept,
        ),
        Sampler("consistency", 4, _spaced, _consistency_step, edits_x0=True),
    )
}
SAMPLERS = tuple(REGISTRY)
# DDIM run backwards, from an image up to a noise level (model.editing.start_inversion): a step the engine runs
# like any other, but no way to generate, so it is not in REGISTRY and no API offers it as a sampler.
INVERSION = "ddim-inversion"
STEPS: dict[str, StepFn] = {**{name: s.step for name, s in REGISTRY.items()}, INVERSION: _ddim_inversion_step}


def sampler_named(name: str) -> Sampler:
    """The registry's entry for ``name``, or a ValueError naming the allowed ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(REGISTRY)}") from None


# --- the loop driver -----------------------------------------------------------------------------


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
    check_guidance(guidance)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    labels: torch.Tensor,
    generators: Sequence[torch.Generator],
    sampler: str = "dpm++",
    steps: int = 20,
    guidance: float = 1.0,
    callback: StepCallback | None = None,
    eta: float = 0.0,
    shape: tuple[int, ...] = (1, 28, 28),
    sigma_min: float | None = None,
    autoguide: bool | None = None,
) -> torch.Tensor:
    """Run ``start`` and ``step`` to the end for one batch; ``callback`` sees every step and may stop it.
    ``autoguide``: guided rows take their reference from the guide network (None: where there is one)."""
    _check(denoiser, labels, generators, guidance)
    state = start(sampler, denoiser.schedule, steps, generators, shape, labels.device, eta, sigma_min)
    return run(denoiser, state, labels, guidance, callback, autoguide)


@torch.no_grad()
def run(
    denoiser: Denoiser,
    state: SamplerState,
    labels: torch.Tensor,
    guidance: float = 1.0,
    callback: StepCallback | None = None,
    autoguide: bool | None = None,
) -> torch.Tensor:
    """Evaluate ``state.t`` and ``step`` until the state is done, as the engine does a tick at a time, from any
    state (``start``, or ``model.editing``'s); its x at the end."""
    while not state.done:
        eps, x0 = denoiser(state.x, state.t, labels, guidance, autoguide)
        if callback is not None and callback(Step(state.index, state.total, state.t, state.x, x0)):
            raise SamplingStopped(f"stopped by callback at step {state.index + 1}/{state.total}")
        state = step(state, denoiser.schedule, eps, x0)
    return state.x


def generators_from_seeds(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 1, H, W) in [-1, 1] -> uint8 (B, H, W)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).cpu().numpy()
