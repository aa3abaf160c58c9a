"""Train the class-conditional diffusion U-Net on Fashion-MNIST.

    python -m model.train --data-dir ../shared/data/fashion-mnist --run-dir /work/runs/main \
        --max-minutes 85 --name fashion-unet

Every epoch: validation loss of the EMA weights, a sample grid, an atomic checkpoint
(``RUN/checkpoint.pt``) and a line in ``RUN/metrics.jsonl``. ``--resume`` continues from the
checkpoint. ``--max-minutes`` ends training cleanly (the learning rate anneals against the
time budget as well as the step budget) and still exports ``weights/<name>.safetensors`` and
``weights/<name>.json``.

    torchrun --nproc-per-node 4 -m model.train ...   # the same run as 4 DistributedDataParallel ranks

Under torchrun every rank computes its share of each ``--batch-size`` batch and rank 0 alone
writes; model/distributed.py has the rules.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import distributed
from model.data import CLASS_NAMES, NUM_CLASSES, FashionMNIST, to_model_range
from model.diffusion import Schedule, training_loss
from model.distributed import World
from model.images import grid
from model.io import atomic_torch_save, save_weights
from model.machine import describe, resolve_device
from model.samplers import Denoiser, generators_from_seeds, sample, to_uint8
from model.unet import UNet, UNetConfig, count_parameters


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str | None = None  # Fashion-MNIST IDX directory (None: $FASHION_MNIST_DIR)
    run_dir: str = "runs/default"  # checkpoints, metrics and pictures of this run
    weights_dir: str = "weights"  # where the exported weights and card go
    name: str = "fashion-unet"  # exported as <weights_dir>/<name>.safetensors + .json
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: str = "cosine"  # "linear" or "cosine"
    T: int = 1000  # diffusion timesteps
    prediction: str = "v"  # network target: "eps" or "v"
    min_snr_gamma: float | None = 5.0  # min-SNR loss weighting (None: plain MSE)
    epochs: int = 20  # upper bound on epochs; --max-minutes may end sooner
    max_minutes: float | None = None  # wall-clock budget for training (excluding export)
    batch_size: int = 128
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.0
    warmup_steps: int = 200
    min_lr_ratio: float = 0.02  # the cosine decay ends at lr * min_lr_ratio
    lr_schedule: str = "cosine"  # "cosine" (against the step and time budget) or "rsqrt" (continues across resumes)
    rsqrt_ref_steps: int = 2000  # rsqrt: lr = peak * sqrt(ref / step) once step > ref (EDM2, Karras et al. 2024)
    cooldown_steps: int = 0  # rsqrt: decay linearly to 0 over the last N steps of --epochs (WSD, Hägele et al. 2024)
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # the EMA that is validated, sampled and exported
    ema_extra: tuple[float, ...] = ()  # more decays kept beside it, to pick one after training (--export-ema)
    init_from: str | None = None  # start from these weights (.safetensors with its card) instead of random
    precision: str = "auto"  # autocast: "bfloat16", "float32", or "auto" (bfloat16 on CUDA, float32 elsewhere)
    label_dropout: float = 0.1  # probability of training a label as "null" (for guidance)
    val_size: int = 5_000
    train_limit: int | None = None  # use only the first N training images (quick runs and tests)
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    channels_last: bool = False
    compile: bool = False
    sample_guidance: float = 2.0  # guidance of the per-epoch sample grid
    sample_steps: int = 20
    log_every: int = 50  # steps between the training lines of metrics.jsonl


def uses_bfloat16(precision: str, device: torch.device) -> bool:
    """Whether the forward and backward passes run under bfloat16 autocast. The loss, the optimizer
    and the EMAs stay in float32 either way; on CPUs with AVX512_BF16 or AMX bfloat16 is faster."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    return precision == "bfloat16" or (precision == "auto" and device.type == "cuda")


def initial_weights(cfg: TrainConfig) -> UNet:
    """The network of ``cfg.init_from``, checked to match this run's architecture and diffusion."""
    from model.io import load_weights

    loaded = load_weights(cfg.init_from or "", "cpu")
    diffusion = loaded.card.get("diffusion", {})
    if loaded.card.get("unet") != json.loads(json.dumps(cfg.unet.to_dict())):  # tuples as the card's lists
        raise ValueError(f"{cfg.init_from}: its UNetConfig {loaded.card.get('unet')} differs from this run's")
    for key in ("schedule", "T", "prediction"):
        if diffusion.get(key) != getattr(cfg, key):
            raise ValueError(f"{cfg.init_from}: trained with {key}={diffusion.get(key)!r}, not {getattr(cfg, key)!r}")
    return loaded.model


class EMA:
    """Exponential moving average of the weights, with the usual warm-up of the decay
    ((1 + n) / (10 + n), as in Tensorflow's ExponentialMovingAverage) so that a short run
    does not keep traces of the random initialisation.

    The warm-up caps every decay at (1 + n) / (10 + n) for the first 9 / (1 - decay) steps (9,000
    for 0.999), so EMAs of different decays stay identical that long. A warm start from trained
    weights has no initialisation to forget: it runs without the warm-up (``warmup=False``)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        ema = list(self.model.state_dict().values())
        new = list(model.state_dict().values())
        floats = [(e, n) for e, n in zip(ema, new, strict=True) if e.dtype.is_floating_point]
        torch._foreach_lerp_([e for e, _ in floats], [n for _, n in floats], 1 - d)


LR_SCHEDULES = ("cosine", "rsqrt")
PRECISIONS = ("auto", "float32", "bfloat16")


def lr_factor(progress: float, step: int, cfg: TrainConfig, total_steps: int | None = None) -> float:
    """Linear warm-up, then cosine decay over ``progress`` in [0, 1] down to ``min_lr_ratio``, or
    (``rsqrt``) the inverse square root of the step, which needs no end point and so carries on
    unchanged when a finished run is resumed with a larger budget. ``cooldown_steps`` ends an
    rsqrt run with a linear decay to zero over its last steps, up to ``total_steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "rsqrt":
        factor = math.sqrt(cfg.rsqrt_ref_steps / max(step + 1, cfg.rsqrt_ref_steps))
        if cfg.cooldown_steps and total_steps is not None:
            factor *= min(1.0, max(0.0, (total_steps - step) / cfg.cooldown_steps))
        return factor
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, schedule: Schedule, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor
) -> float:
    """Loss on the validation split with fixed timesteps and noise, so epochs compare fairly."""
    g = torch.Generator(device=x.device).manual_seed(1234)
    total = 0.0
    for i in range(0, len(x), 500):
        xb, yb = x[i : i + 500], y[i : i + 500]
        total += training_loss(model, schedule, xb, yb, cfg.prediction, cfg.min_snr_gamma, g).item() * len(xb)
    return total / len(x)


def sample_grid(model: torch.nn.Module, schedule: Schedule, cfg: TrainConfig, device: torch.device, per_class: int = 8):
    labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(per_class)
    den = Denoiser(model, schedule, cfg.prediction, cfg.unet.num_classes)
    x = sample(den, labels, generators_from_seeds(range(len(labels))), "dpm++", cfg.sample_steps, cfg.sample_guidance)
    return grid(to_uint8(x), ncol=per_class, scale=2)


def plot_losses(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r["kind"] == "train"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["images"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="train (running mean)")
    ax.plot([r["images"] for r in epochs], [r["val_loss"] for r in epochs], "o-", label="validation (EMA weights)")
    ax.set_xlabel("images seen")
    ax.set_ylabel("weighted diffusion loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def make_card(cfg: TrainConfig, record: dict) -> dict:
    return {
        "name": cfg.name,
        "unet": cfg.unet.to_dict(),
        "diffusion": {"schedule": cfg.schedule, "T": cfg.T, "prediction": cfg.prediction},
        "classes": list(CLASS_NAMES),
        "sampling": {"sampler": "dpm++", "steps": cfg.sample_steps, "guidance": cfg.sample_guidance},
        "training": record,
    }


class Log:
    """RUN/metrics.jsonl and the printed lines. Only the main rank writes: every other rank's Log is silent."""

    def __init__(self, path: Path, enabled: bool):
        self.enabled = enabled
        self.file = path.open("a") if enabled else None

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file:
            self.file.close()

    def row(self, row: dict) -> None:
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def say(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


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
    autocast: torch.autocast
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
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bfloat16(cfg.precision, device)),
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


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) training and export the weights; returns the card's path. Under torchrun this
    process is one rank of a DistributedDataParallel run (model/distributed.py has the rules)."""
    world = World.from_env()
    world.per_rank_batch(cfg.batch_size)  # refuse an uneven split before loading anything
    device = world.device(resolve_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Path(cfg.run_dir)
    ckpt_path, metrics_path = run / "checkpoint.pt", run / "metrics.jsonl"
    resuming = resume and ckpt_path.exists()
    with distributed.process_group(world, device):
        if world.is_main:
            run.mkdir(parents=True, exist_ok=True)
            if not resume:
                metrics_path.unlink(missing_ok=True)
        data = Data.load(cfg, device)
        state = State.new(cfg, device, warm_start=bool(cfg.init_from) and not resuming)
        with Log(metrics_path, world.is_main) as log:
            if resuming:  # every rank loads the same checkpoint
                state.resume(ckpt_path, cfg, device)
                minutes = state.elapsed / 60
                log.say(f"resumed {ckpt_path} at epoch {state.epoch}, {state.images_seen} images, {minutes:.1f} min")
            loop = Loop.new(cfg, world, device, data, state.model)
            log.say(loop.describe(state.model))
            train_epochs(loop, state, log, progress)
        if world.is_main:
            plot_losses(metrics_path, run / "loss_curve.png")
            export(cfg, ckpt_path)
        distributed.barrier()  # the other ranks return once the weights are written
    return weights_path(cfg).with_suffix(".json")


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
    bar = tqdm(
        range(loop.steps_per_epoch),
        desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
        disable=not (progress and loop.world.is_main),
        unit="batch",
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 60,
    )
    running, finished = None, True
    for i in bar:
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
    entropy = np.random.SeedSequence((loop.cfg.seed, step)).generate_state(1, np.uint64)[0]
    g = loop.draws.manual_seed(int(entropy))
    t = torch.randint(0, loop.schedule.T, (rows,), device=loop.device, generator=g)  # (B,)
    eps = torch.randn((rows, *loop.data.x_train.shape[1:]), device=loop.device, generator=g)  # (B, 1, 28, 28)
    drop = torch.rand(rows, device=loop.device, generator=g) < loop.cfg.label_dropout  # (B,)
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
    state.opt.zero_grad(set_to_none=True)
    loss.backward()  # under DDP the gradients arrive averaged over the ranks: the global batch's
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    state.opt.step()
    for ema in (state.ema, *state.extra.values()):
        ema.update(state.model)
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


def weights_path(cfg: TrainConfig) -> Path:
    """Where ``cfg``'s weights are exported; the card goes beside them (.json)."""
    return Path(cfg.weights_dir) / f"{cfg.name}.safetensors"


def export(cfg: TrainConfig, ckpt_path: Path, ema_decay: float | None = None) -> Path:
    """Write the checkpoint's EMA weights (``ema_decay``: one of the extra EMAs instead of the main
    one; 0: the raw weights, an EMA of decay 0) and card to ``weights_dir``.

    What defines the network and its training comes from the checkpoint, not from ``cfg``,
    so ``--export-only`` cannot mislabel weights; ``cfg`` supplies only the name and place.
    """
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    saved = {k: v for k, v in state["config"].items() if k not in ("name", "weights_dir", "run_dir", "data_dir")}
    cfg = replace(cfg, **{**saved, "unet": UNetConfig(**saved["unet"])})
    model = UNet(cfg.unet)
    if ema_decay is None or ema_decay == cfg.ema_decay:
        model.load_state_dict(state["ema"])
    elif ema_decay == 0:  # after a cooldown to a zero learning rate the weights themselves can be best
        model.load_state_dict(state["model"])
        cfg = replace(cfg, ema_decay=0.0)
    else:
        kept = state.get("ema_extra", {})
        if str(ema_decay) not in kept:
            allowed = ", ".join([str(cfg.ema_decay), *kept, "0 (the raw weights)"])
            raise ValueError(f"{ckpt_path} keeps no EMA with decay {ema_decay}; allowed: {allowed}")
        model.load_state_dict(kept[str(ema_decay)])
        cfg = replace(cfg, ema_decay=ema_decay)
    device = resolve_device(cfg.device)
    world_size = state.get("world_size", 1)
    record = {
        "epochs": state["epoch"],
        "steps": state["step"],
        "images_seen": state["images_seen"],
        "batch_size": cfg.batch_size,
        "world_size": world_size,  # processes (torchrun ranks) that shared each batch
        "per_rank_batch_size": cfg.batch_size // world_size,
        "wall_minutes": round(state["elapsed"] / 60, 2),
        "hardware": describe(device, cfg.threads),
        "torch": torch.__version__,
        "final_train_loss": state["train_loss"],
        "final_val_loss": state["val_loss"],
        "exported_ema_decay": cfg.ema_decay,
        "parameters": count_parameters(model),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("unet", "data_dir", "run_dir", "weights_dir")},
    }
    if cfg.init_from:  # a warm start: the earlier training is part of what these weights cost
        from model.io import read_card

        earlier = read_card(Path(cfg.init_from).with_suffix(".json")).get("training", {})
        record["initialised_from"] = {"weights": Path(cfg.init_from).name, "training": earlier}
        before = earlier.get("total_wall_minutes", earlier.get("wall_minutes", 0.0))
        record["total_wall_minutes"] = round(record["wall_minutes"] + float(before), 2)
    out = weights_path(cfg)
    card_path = save_weights(model, make_card(cfg, record), out)
    print(f"exported {out} and {card_path}")
    return card_path


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    d = TrainConfig()
    u = UNetConfig()
    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--run-dir", default=d.run_dir)
    p.add_argument("--weights-dir", default=d.weights_dir)
    p.add_argument("--name", default=d.name)
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    p.add_argument("--export-only", action="store_true", help="export RUN/checkpoint.pt and stop")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--ema-extra", type=float, nargs="*", default=list(d.ema_extra), help="more EMA decays to keep")
    p.add_argument(
        "--export-ema", type=float, default=None, help="with --export-only: export this EMA decay (0: the raw weights)"
    )
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule)
    p.add_argument("--rsqrt-ref-steps", type=int, default=d.rsqrt_ref_steps)
    p.add_argument("--cooldown-steps", type=int, default=d.cooldown_steps, help="rsqrt: final linear decay to 0")
    p.add_argument("--init-from", default=None, help="start from these weights (.safetensors) instead of random")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision)
    p.add_argument("--label-dropout", type=float, default=d.label_dropout)
    p.add_argument("--schedule", choices=("linear", "cosine"), default=d.schedule)
    p.add_argument("--prediction", choices=("eps", "v"), default=d.prediction)
    p.add_argument("--min-snr-gamma", type=float, default=d.min_snr_gamma, help="0 disables min-SNR weighting")
    p.add_argument("--val-size", type=int, default=d.val_size)
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between metrics.jsonl lines")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help="sampler steps of the per-epoch grid")
    p.add_argument("--base-channels", type=int, default=u.base_channels)
    p.add_argument("--channel-mults", type=int, nargs="+", default=list(u.channel_mults))
    p.add_argument("--blocks-per-stage", type=int, default=u.blocks_per_stage)
    p.add_argument("--attention-stages", type=int, nargs="*", default=list(u.attention_stages))
    p.add_argument("--stem-patch", type=int, default=u.stem_patch)
    p.add_argument(
        "--full-res-channels", type=int, default=u.full_res_channels, help="a thin full-resolution stage (0: none)"
    )
    p.add_argument("--dropout", type=float, default=u.dropout)
    p.add_argument("--groups", type=int, default=u.groups, help="GroupNorm groups")
    a = p.parse_args(argv)
    unet = replace(
        u,
        base_channels=a.base_channels,
        channel_mults=tuple(a.channel_mults),
        blocks_per_stage=a.blocks_per_stage,
        attention_stages=tuple(a.attention_stages),
        stem_patch=a.stem_patch,
        full_res_channels=a.full_res_channels,
        dropout=a.dropout,
        groups=a.groups,
    )
    cfg = TrainConfig(
        data_dir=a.data_dir,
        run_dir=a.run_dir,
        weights_dir=a.weights_dir,
        name=a.name,
        unet=unet,
        schedule=a.schedule,
        prediction=a.prediction,
        min_snr_gamma=a.min_snr_gamma or None,
        epochs=a.epochs,
        max_minutes=a.max_minutes,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        ema_decay=a.ema_decay,
        ema_extra=tuple(a.ema_extra),
        lr_schedule=a.lr_schedule,
        rsqrt_ref_steps=a.rsqrt_ref_steps,
        cooldown_steps=a.cooldown_steps,
        init_from=a.init_from,
        precision=a.precision,
        label_dropout=a.label_dropout,
        val_size=a.val_size,
        train_limit=a.train_limit,
        seed=a.seed,
        device=a.device,
        threads=a.threads,
        channels_last=a.channels_last,
        compile=a.compile,
        log_every=a.log_every,
        sample_steps=a.sample_steps,
    )
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    if args.export_only:
        if World.from_env().is_main:  # started by torchrun, the other ranks have nothing to do
            export(cfg, Path(cfg.run_dir) / "checkpoint.pt", args.export_ema)
    else:
        train(cfg, resume=args.resume, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
