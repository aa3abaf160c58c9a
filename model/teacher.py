"""Training the teacher: its config (``TrainConfig``), and the epochs and steps of a run
(``model.train`` is its command line and its export).

One run is a ``Loop`` (what every step shares: the data on the device, the schedule, the network as
steps call it) over a ``State`` (what a checkpoint holds). Epochs go through a seeded order of the
training images; each step draws its timesteps, noise and label dropout from (seed, step), so a
resumed run and every torchrun rank draw what one uninterrupted process would have; each epoch
ends with the EMA's validation loss, a sample grid, a line in metrics.jsonl and an atomic
checkpoint. Under torchrun each rank computes its share of every batch and rank 0 alone writes
(model/distributed.py has the rules).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from model import distributed
from model.data import NUM_CLASSES, FashionMNIST, to_model_range
from model.diffusion import Schedule, draw_timesteps, training_loss
from model.distributed import World
from model.ema import EMA
from model.images import grid
from model.io import atomic_torch_save, load_matching
from model.machine import describe
from model.optim import cooldown, cosine, optimizer_step, rsqrt, step_generator, training_autocast, warmup
from model.runlog import Log, progress_bar
from model.samplers import Denoiser, generators_from_seeds, sample, to_uint8
from model.unet import UNet, UNetConfig, count_parameters

LR_SCHEDULES = ("cosine", "rsqrt")


@dataclass(frozen=True)
class TrainConfig:
    """A teacher's training run; every field is an option of ``python -m model.train`` (UNetConfig's too)."""

    data_dir: str | None = None  # Fashion-MNIST IDX directory (None: $FASHION_MNIST_DIR)
    run_dir: str = "runs/default"  # checkpoints, metrics and pictures of this run
    weights_dir: str = "weights"  # where the exported weights and card go
    name: str = "fashion-unet"  # exported as <weights_dir>/<name>.safetensors + .json
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: str = "cosine"  # "linear" or "cosine"
    T: int = 1000  # diffusion timesteps
    prediction: str = "v"  # network target: "eps" or "v"
    min_snr_gamma: float | None = 5.0  # min-SNR loss weighting (None or 0: plain MSE)
    noise_levels: str = "uniform"  # training noise levels: "uniform" timesteps or EDM's "lognormal" sigma
    p_mean: float = -1.2  # lognormal: mean of ln sigma (EDM, Karras et al. 2022)
    p_std: float = 1.2  # lognormal: standard deviation of ln sigma
    epochs: int = 20  # upper bound on epochs; --max-minutes may end sooner
    max_minutes: float | None = None  # wall-clock budget for training (excluding export)
    batch_size: int = 128  # images per optimizer step, over all torchrun ranks
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    warmup_steps: int = 200  # linear learning-rate warm-up
    min_lr_ratio: float = 0.02  # the cosine decay ends at lr * min_lr_ratio
    lr_schedule: str = "cosine"  # "cosine" (against the step and time budget) or "rsqrt" (continues across resumes)
    rsqrt_ref_steps: int = 2000  # rsqrt: lr = peak * sqrt(ref / step) once step > ref (EDM2, Karras et al. 2024)
    cooldown_steps: int = 0  # rsqrt: decay linearly to 0 over the last N steps of --epochs (WSD, Hägele et al. 2024)
    grad_clip: float = 1.0  # largest gradient norm
    ema_decay: float = 0.999  # the EMA that is validated, sampled and exported
    ema_extra: tuple[float, ...] = ()  # more decays kept beside it, to pick one after training (--export-ema)
    init_from: str | None = None  # start from these weights (.safetensors with its card) instead of random
    precision: str = "auto"  # autocast: "bfloat16", "float32", or "auto" (bfloat16 on CUDA, float32 elsewhere)
    label_dropout: float = 0.1  # probability of training a label as "null" (for guidance)
    val_size: int = 5_000  # training images held out for the validation loss
    train_limit: int | None = None  # use only the first N training images (quick runs and tests)
    seed: int = 0  # of the network, the split, the data order and every step's draws
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    threads: int | None = None  # torch CPU threads (None: torch's default)
    channels_last: bool = False  # train in the channels-last memory layout
    compile: bool = False  # torch.compile the network
    sample_guidance: float = 2.0  # guidance of the per-epoch sample grid
    sample_steps: int = 20  # sampler steps of the per-epoch sample grid
    log_every: int = 50  # steps between the training lines of metrics.jsonl

    def __post_init__(self):
        if self.min_snr_gamma is not None and self.min_snr_gamma < 0:
            raise ValueError(f"min_snr_gamma must be positive, or 0 or None for plain MSE; got {self.min_snr_gamma}")
        if self.p_std <= 0:
            raise ValueError(f"p_std must be positive; got {self.p_std}")
        if self.min_snr_gamma == 0:  # a gamma of 0 would weight every loss by 0: it means no weighting
            object.__setattr__(self, "min_snr_gamma", None)


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def initial_weights(cfg: TrainConfig) -> UNet:
    """The network of ``cfg.init_from``, checked to match this run's architecture and diffusion."""
    return load_matching(
        cfg.init_from or "", cfg.unet, {key: getattr(cfg, key) for key in ("schedule", "T", "prediction")}
    )


@dataclass
class Data:
    """The split's images, in the model's range [-1, 1], and their labels, on the training device."""

    x_train: torch.Tensor  # (N, 1, 28, 28)
    y_train: torch.Tensor  # (N,)
    x_val: torch.Tensor  # (val_size, 1, 28, 28)
    y_val: torch.Tensor  # (val_size,)

    @classmethod
    def load(cls, cfg: TrainConfig, device: torch.device) -> Data:
        (tr_x, tr_y), (va_x, va_y) = FashionMNIST.load(cfg.data_dir).split(cfg.val_size, cfg.seed)
        if cfg.train_limit:
            tr_x, tr_y = tr_x[: cfg.train_limit], tr_y[: cfg.train_limit]
        return cls(
            to_model_range(tr_x).to(device),
            torch.from_numpy(tr_y).to(device),
            to_model_range(va_x).to(device),
            torch.from_numpy(va_y).to(device),
        )


@dataclass
class State:
    """What a checkpoint holds: the network, its optimizer and EMAs, and how far training got."""

    model: UNet
    opt: torch.optim.AdamW
    ema: EMA  # the EMA that is validated, sampled and exported
    extra: dict[float, EMA]  # the --ema-extra decays
    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    images_seen: int = 0  # over all ranks
    elapsed: float = 0.0  # seconds of training and validation over every resume (rank 0's clock)
    train_loss: float = math.nan  # running mean of the global batches' loss at the end of the last epoch
    val_loss: float = math.nan  # of the EMA weights, after the last epoch

    @classmethod
    def new(cls, cfg: TrainConfig, device: torch.device, warm_start: bool) -> State:
        """A seeded network, the same on every rank (``warm_start``: ``cfg.init_from``'s weights)."""
        torch.manual_seed(cfg.seed)
        model = UNet(cfg.unet).to(device)
        if warm_start:
            model.load_state_dict(initial_weights(cfg).state_dict())
        model = model.to(memory_format=memory_format(cfg))  # type: ignore[call-overload]  # missing from torch's stubs
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = not cfg.init_from
        extra = {decay: EMA(model, decay, warmup) for decay in cfg.ema_extra}
        return cls(model, opt, EMA(model, cfg.ema_decay, warmup), extra)

    def resume(self, path: Path, cfg: TrainConfig, device: torch.device) -> None:
        """Continue from the checkpoint at ``path``; refuse one of another network or diffusion."""
        state = torch.load(path, map_location=device, weights_only=True)
        saved = state["config"]
        for key in ("schedule", "T", "prediction"):
            if saved[key] != getattr(cfg, key):
                raise ValueError(f"{path}: checkpoint was trained with {key}={saved[key]!r}, not {getattr(cfg, key)!r}")
        if saved["unet"] != cfg.unet.to_dict():
            raise ValueError(f"{path}: checkpoint was trained with a different UNetConfig: {saved['unet']}")
        self.model.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        for decay, other in self.extra.items():
            other.model.load_state_dict(state["ema_extra"][str(decay)])
        for ema in (self.ema, *self.extra.values()):
            ema.updates = state["ema_updates"]
        self.opt.load_state_dict(state["optimizer"])
        self.epoch, self.step, self.images_seen = state["epoch"], state["step"], state["images_seen"]
        self.elapsed, self.train_loss, self.val_loss = state["elapsed"], state["train_loss"], state["val_loss"]

    def checkpoint(self, cfg: TrainConfig, world_size: int) -> dict:
        return {
            "config": {**asdict(cfg), "unet": cfg.unet.to_dict()},
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict(),
            "ema_updates": self.ema.updates,
            "ema_extra": {str(d): e.model.state_dict() for d, e in self.extra.items()},
            "optimizer": self.opt.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "images_seen": self.images_seen,
            "elapsed": self.elapsed,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "world_size": world_size,  # of the run that wrote it (older checkpoints lack it: 1)
        }


@dataclass
class Loop:
    """What every step of one run shares."""

    cfg: TrainConfig
    world: World
    device: torch.device
    data: Data
    schedule: Schedule
    forward: Callable[..., torch.Tensor]  # the network as steps call it: DDP under torchrun, compiled with --compile
    autocast: contextlib.AbstractContextManager[Any]  # of the forward and backward passes
    steps_per_epoch: int
    total_steps: int
    budget: float | None  # seconds (--max-minutes)
    draws: torch.Generator  # re-seeded from (seed, step) at every step

    @classmethod
    def new(cls, cfg: TrainConfig, world: World, device: torch.device, data: Data, model: UNet) -> Loop:
        steps_per_epoch = len(data.x_train) // cfg.batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"batch_size {cfg.batch_size} is larger than the {len(data.x_train)} training images")
        # The network is the same on every rank; what still draws from torch's global generator from
        # here on (dropout) draws differently on each.
        torch.manual_seed(cfg.seed + world.rank)
        forward: Callable[..., torch.Tensor] = model
        if world.launched:
            forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            forward = torch.compile(forward)
        return cls(
            cfg,
            world,
            device,
            data,
            Schedule.named(cfg.schedule, cfg.T),
            forward,
            training_autocast(cfg.precision, device),
            steps_per_epoch,
            cfg.epochs * steps_per_epoch,
            cfg.max_minutes * 60 if cfg.max_minutes else None,
            torch.Generator(device=device),
        )

    def describe(self, model: UNet) -> str:
        cfg, world, data = self.cfg, self.world, self.data
        ranks = (
            f"{world.size} ranks x {world.per_rank_batch(cfg.batch_size)} images per step; " if world.launched else ""
        )
        return (
            f"UNet {count_parameters(model) / 1e6:.2f}M params on {describe(self.device)}; {ranks}"
            f"{len(data.x_train)} train / {len(data.x_val)} val images; {self.steps_per_epoch} steps per epoch"
        )

    def fraction_done(self, state: State, t_epoch: float) -> float:
        """How far through its budget of steps, or of time (rank 0's clock, so all ranks stop together), training is."""
        frac = state.step / self.total_steps
        if self.budget:
            spent = distributed.broadcast(state.elapsed + time.perf_counter() - t_epoch, self.device)
            frac = max(frac, spent / self.budget)
        return frac


def lr_factor(progress: float, step: int, cfg: TrainConfig, total_steps: int | None = None) -> float:
    """Linear warm-up, then cosine decay over ``progress`` in [0, 1] down to ``min_lr_ratio``, or
    (``rsqrt``) the inverse square root of the step, which needs no end point and so carries on
    unchanged when a finished run is resumed with a larger budget. ``cooldown_steps`` ends an
    rsqrt run with a linear decay to zero over its last steps, up to ``total_steps``."""
    if step < cfg.warmup_steps:
        return warmup(step, cfg.warmup_steps)
    if cfg.lr_schedule == "rsqrt":
        factor = rsqrt(step, cfg.rsqrt_ref_steps)
        return factor if total_steps is None else factor * cooldown(step, total_steps, cfg.cooldown_steps)
    return cosine(progress, cfg.min_lr_ratio)


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, schedule: Schedule, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor
) -> float:
    """Loss on the validation split with fixed timesteps and noise, so epochs compare fairly."""
    g = torch.Generator(device=x.device).manual_seed(1234)
    total = 0.0
    for i in range(0, len(x), 500):
        xb, yb = x[i : i + 500], y[i : i + 500]
        # Drawn in training_loss's order (t, then eps), at this run's noise levels.
        t = draw_timesteps(schedule, len(xb), cfg.noise_levels, g, x.device, cfg.p_mean, cfg.p_std)
        eps = torch.randn(xb.shape, device=x.device, generator=g, dtype=xb.dtype)
        loss = training_loss(model, schedule, xb, yb, cfg.prediction, cfg.min_snr_gamma, t=t, eps=eps)
        total += loss.item() * len(xb)
    return total / len(x)


def sample_grid(model: torch.nn.Module, schedule: Schedule, cfg: TrainConfig, device: torch.device, per_class: int = 8):
    labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(per_class)
    den = Denoiser(model, schedule, cfg.prediction, cfg.unet.num_classes)
    x = sample(den, labels, generators_from_seeds(range(len(labels))), "dpm++", cfg.sample_steps, cfg.sample_guidance)
    return grid(to_uint8(x), ncol=per_class, scale=2)


def train_epochs(loop: Loop, state: State, log: Log, progress: bool) -> None:
    """Epochs up to --epochs, each validated and checkpointed, until the step or time budget runs out."""
    while state.epoch < loop.cfg.epochs:
        if loop.budget and state.elapsed >= loop.budget:
            return  # resumed a run whose time was already spent: nothing left to train
        t_epoch = time.perf_counter()
        finished = run_epoch(loop, state, log, t_epoch, progress)
        end_epoch(loop, state, log, t_epoch)
        if not finished:
            return


def run_epoch(loop: Loop, state: State, log: Log, t_epoch: float, progress: bool) -> bool:
    """Train through one epoch's seeded order of the images (the same on every rank); False when the
    step or time budget ran out before its end."""
    cfg = loop.cfg
    g = torch.Generator().manual_seed(cfg.seed * 1000 + state.epoch)  # resumable data order
    order = torch.randperm(len(loop.data.x_train), generator=g).to(loop.device)
    state.model.train()
    shown = progress and loop.world.is_main
    bar = progress_bar(loop.steps_per_epoch, f"epoch {state.epoch + 1}/{cfg.epochs}", shown, unit="batch")
    running, finished = None, True
    for i in range(loop.steps_per_epoch):
        t_step = time.perf_counter()
        frac = loop.fraction_done(state, t_epoch)
        if frac >= 1.0:
            finished = False
            break
        for group in state.opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(frac, state.step, cfg, loop.total_steps)
        loss = train_step(loop, state, order[i * cfg.batch_size : (i + 1) * cfg.batch_size]).item()
        running = loss if running is None else 0.98 * running + 0.02 * loss
        rate = cfg.batch_size / (time.perf_counter() - t_step)
        lr = state.opt.param_groups[0]["lr"]
        # The bar shows rank 0's share of the batch, without a collective per step; the log has every rank's.
        bar.set_postfix(loss=f"{running:.4f}", img_s=f"{rate:.0f}", lr=f"{lr:.1e}", refresh=False)
        bar.update(1)
        if state.step % cfg.log_every == 0:
            # Each rank's loss is the mean over its equal share of the global batch, and the running mean
            # is linear in the losses: the averages over ranks are the global batch's loss and running mean.
            running_all, loss_all = distributed.average([running, loss], loop.device)
            row = {"step": state.step, "images": state.images_seen, "loss": running_all, "batch_loss": loss_all}
            log.row({"kind": "train", **row, "lr": lr, "images_per_s": rate})
    bar.close()
    if running is not None:
        state.train_loss = distributed.average([running], loop.device)[0]
    return finished


def step_draws(loop: Loop, step: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The timesteps, noise and label-dropout mask of one step's whole global batch, from a generator
    seeded by (seed, step). Every rank draws the same and takes its rows, so the ranks' averaged
    gradient is the one process's gradient of the same batch; a resumed run draws what it would have."""
    cfg = loop.cfg
    g = step_generator(loop.draws, cfg.seed, step)
    t = draw_timesteps(loop.schedule, rows, cfg.noise_levels, g, loop.device, cfg.p_mean, cfg.p_std)  # (B,)
    eps = torch.randn((rows, *loop.data.x_train.shape[1:]), device=loop.device, generator=g)  # (B, 1, 28, 28)
    drop = torch.rand(rows, device=loop.device, generator=g) < cfg.label_dropout  # (B,)
    return t, eps, drop


def train_step(loop: Loop, state: State, batch: torch.Tensor) -> torch.Tensor:
    """One optimizer step on the global batch ``batch`` (indices into the training images), of which
    this rank computes its part; returns the loss of that part."""
    cfg, world = loop.cfg, loop.world
    t, eps, drop = (world.part(rows) for rows in step_draws(loop, state.step, len(batch)))
    idx = world.part(batch)
    x0 = loop.data.x_train[idx].contiguous(memory_format=memory_format(cfg))  # (b, 1, 28, 28)
    y = torch.where(drop, cfg.unet.num_classes, loop.data.y_train[idx])  # dropped labels: the null class
    with loop.autocast:
        loss = training_loss(loop.forward, loop.schedule, x0, y, cfg.prediction, cfg.min_snr_gamma, t=t, eps=eps)
    # Under DDP the gradients arrive averaged over the ranks: the global batch's.
    optimizer_step(loss, state.model, state.opt, cfg.grad_clip, (state.ema, *state.extra.values()))
    state.step += 1
    state.images_seen += len(batch)
    return loss


def end_epoch(loop: Loop, state: State, log: Log, t_epoch: float) -> None:
    """Validate the EMAs, save the sample grid, log the epoch and save the checkpoint, on rank 0 while
    the other ranks wait; then every rank carries on with rank 0's clock."""
    cfg, run, x, y = loop.cfg, Path(loop.cfg.run_dir), loop.data.x_val, loop.data.y_val
    state.epoch += 1
    if loop.world.is_main:
        state.val_loss = validation_loss(state.ema.model, loop.schedule, cfg, x, y)
        val_extra = {str(d): validation_loss(e.model, loop.schedule, cfg, x, y) for d, e in state.extra.items()}
        sample_grid(state.ema.model, loop.schedule, cfg, loop.device).save(run / f"samples_epoch{state.epoch:03d}.png")
        state.elapsed += time.perf_counter() - t_epoch  # the budget and the record include validation
        log.row(
            {
                "kind": "epoch",
                "epoch": state.epoch,
                "step": state.step,
                "images": state.images_seen,
                "train_loss": state.train_loss,
                "val_loss": state.val_loss,
                "val_loss_ema_extra": val_extra,
                "elapsed_min": state.elapsed / 60,
            }
        )
        log.say(
            f"epoch {state.epoch}: train {state.train_loss:.4f}  val(EMA) {state.val_loss:.4f}  "
            f"{state.images_seen} images  {state.elapsed / 60:.1f} min"
        )
        atomic_torch_save(state.checkpoint(cfg, loop.world.size), run / "checkpoint.pt")
    state.elapsed = distributed.broadcast(state.elapsed, loop.device)  # and a barrier
