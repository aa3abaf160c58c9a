"""Train the class-conditional diffusion U-Net on Fashion-MNIST.

    python -m model.train --data-dir ../shared/data/fashion-mnist --run-dir /work/runs/main \
        --max-minutes 85 --name fashion-unet

Every epoch: validation loss of the EMA weights, a sample grid, an atomic checkpoint
(``RUN/checkpoint.pt``) and a line in ``RUN/metrics.jsonl``. ``--resume`` continues from the
checkpoint. ``--max-minutes`` ends training cleanly (the learning rate anneals against the
time budget as well as the step budget) and still exports ``weights/<name>.safetensors`` and
``weights/<name>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from model.data import CLASS_NAMES, NUM_CLASSES, FashionMNIST, to_model_range
from model.diffusion import Schedule, training_loss
from model.images import grid
from model.io import atomic_torch_save, save_weights
from model.machine import describe
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) training; returns the exported card's path."""
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = run / "checkpoint.pt", run / "metrics.jsonl"

    data = FashionMNIST.load(cfg.data_dir)
    (tr_x, tr_y), (va_x, va_y) = data.split(cfg.val_size, cfg.seed)
    if cfg.train_limit:
        tr_x, tr_y = tr_x[: cfg.train_limit], tr_y[: cfg.train_limit]
    x_train, y_train = to_model_range(tr_x).to(device), torch.from_numpy(tr_y).to(device)
    x_val, y_val = to_model_range(va_x).to(device), torch.from_numpy(va_y).to(device)

    torch.manual_seed(cfg.seed)
    schedule = Schedule.named(cfg.schedule, cfg.T)
    model = UNet(cfg.unet).to(device)
    if cfg.init_from and not (resume and ckpt_path.exists()):
        model.load_state_dict(initial_weights(cfg).state_dict())
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)  # type: ignore[call-overload]  # missing from torch's stubs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = not cfg.init_from
    ema = EMA(model, cfg.ema_decay, warmup)
    extra = {decay: EMA(model, decay, warmup) for decay in cfg.ema_extra}
    start_epoch, step, images_seen, elapsed = 0, 0, 0, 0.0
    train_loss = val = float("nan")

    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        saved = state["config"]
        for key in ("schedule", "T", "prediction"):
            if saved[key] != getattr(cfg, key):
                raise ValueError(
                    f"{ckpt_path}: checkpoint was trained with {key}={saved[key]!r}, not {getattr(cfg, key)!r}"
                )
        if saved["unet"] != cfg.unet.to_dict():
            raise ValueError(f"{ckpt_path}: checkpoint was trained with a different UNetConfig: {saved['unet']}")
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        ema.updates = state["ema_updates"]
        for decay, other in extra.items():
            other.model.load_state_dict(state["ema_extra"][str(decay)])
            other.updates = state["ema_updates"]
        opt.load_state_dict(state["optimizer"])
        start_epoch, step, images_seen, elapsed = state["epoch"], state["step"], state["images_seen"], state["elapsed"]
        train_loss, val = state["train_loss"], state["val_loss"]
        print(f"resumed {ckpt_path} at epoch {start_epoch}, {images_seen} images, {elapsed / 60:.1f} min")
    elif not resume and metrics_path.exists():
        metrics_path.unlink()

    forward = torch.compile(model) if cfg.compile else model
    steps_per_epoch = len(x_train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the {len(x_train)} training images")
    total_steps = cfg.epochs * steps_per_epoch
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bfloat16(cfg.precision, device))
    print(
        f"UNet {count_parameters(model) / 1e6:.2f}M params on {describe(device)}; "
        f"{len(x_train)} train / {len(x_val)} val images; {steps_per_epoch} steps per epoch"
    )

    out_of_time = False
    with metrics_path.open("a") as log:
        for epoch in range(start_epoch, cfg.epochs):
            if budget and elapsed >= budget:
                break  # resumed a run whose time was already spent: nothing left to train
            g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # resumable data order
            order = torch.randperm(len(x_train), generator=g).to(device)
            model.train()
            bar = tqdm(
                range(steps_per_epoch),
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=not progress,
                unit="batch",
                dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 60,
            )
            t_epoch, running = time.perf_counter(), None
            for i in bar:
                t_step = time.perf_counter()
                frac = step / total_steps
                if budget:
                    frac = max(frac, (elapsed + (time.perf_counter() - t_epoch)) / budget)
                if frac >= 1.0:
                    out_of_time = True
                    break
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * lr_factor(frac, step, cfg, total_steps)
                idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                xb, yb = x_train[idx].contiguous(memory_format=memory_format), y_train[idx].clone()
                yb[torch.rand(len(yb), device=device) < cfg.label_dropout] = cfg.unet.num_classes
                with autocast:
                    loss = training_loss(forward, schedule, xb, yb, cfg.prediction, cfg.min_snr_gamma)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                ema.update(model)
                for other in extra.values():
                    other.update(model)
                step += 1
                images_seen += len(xb)
                running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
                rate = len(xb) / (time.perf_counter() - t_step)
                bar.set_postfix(
                    loss=f"{running:.4f}", img_s=f"{rate:.0f}", lr=f"{opt.param_groups[0]['lr']:.1e}", refresh=False
                )
                if step % 50 == 0:
                    log.write(
                        json.dumps(
                            {
                                "kind": "train",
                                "step": step,
                                "images": images_seen,
                                "loss": running,
                                "lr": opt.param_groups[0]["lr"],
                                "images_per_s": rate,
                            }
                        )
                        + "\n"
                    )
                    log.flush()
            bar.close()
            train_loss = running if running is not None else train_loss
            val = validation_loss(ema.model, schedule, cfg, x_val, y_val)
            val_extra = {str(d): validation_loss(e.model, schedule, cfg, x_val, y_val) for d, e in extra.items()}
            sample_grid(ema.model, schedule, cfg, device).save(run / f"samples_epoch{epoch + 1:03d}.png")
            elapsed += time.perf_counter() - t_epoch  # the budget and the record include validation
            row = {
                "kind": "epoch",
                "epoch": epoch + 1,
                "step": step,
                "images": images_seen,
                "train_loss": train_loss,
                "val_loss": val,
                "val_loss_ema_extra": val_extra,
                "elapsed_min": elapsed / 60,
            }
            log.write(json.dumps(row) + "\n")
            log.flush()
            tqdm.write(
                f"epoch {epoch + 1}: train {train_loss:.4f}  val(EMA) {val:.4f}  "
                f"{images_seen} images  {elapsed / 60:.1f} min"
            )
            atomic_torch_save(
                {
                    "config": {**asdict(cfg), "unet": cfg.unet.to_dict()},
                    "model": model.state_dict(),
                    "ema": ema.model.state_dict(),
                    "ema_updates": ema.updates,
                    "ema_extra": {str(d): e.model.state_dict() for d, e in extra.items()},
                    "optimizer": opt.state_dict(),
                    "epoch": epoch + 1,
                    "step": step,
                    "images_seen": images_seen,
                    "elapsed": elapsed,
                    "train_loss": train_loss,
                    "val_loss": val,
                },
                ckpt_path,
            )
            if out_of_time:
                break

    plot_losses(metrics_path, run / "loss_curve.png")
    return export(cfg, ckpt_path)


def export(cfg: TrainConfig, ckpt_path: Path, ema_decay: float | None = None) -> Path:
    """Write the checkpoint's EMA weights (``ema_decay``: one of the extra EMAs instead of the main
    one) and card to ``weights_dir``.

    What defines the network and its training comes from the checkpoint, not from ``cfg``,
    so ``--export-only`` cannot mislabel weights; ``cfg`` supplies only the name and place.
    """
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    saved = {k: v for k, v in state["config"].items() if k not in ("name", "weights_dir", "run_dir", "data_dir")}
    cfg = replace(cfg, **{**saved, "unet": UNetConfig(**saved["unet"])})
    model = UNet(cfg.unet)
    if ema_decay is None or ema_decay == cfg.ema_decay:
        model.load_state_dict(state["ema"])
    else:
        kept = state.get("ema_extra", {})
        if str(ema_decay) not in kept:
            allowed = ", ".join([str(cfg.ema_decay), *kept])
            raise ValueError(f"{ckpt_path} keeps no EMA with decay {ema_decay}; allowed: {allowed}")
        model.load_state_dict(kept[str(ema_decay)])
        cfg = replace(cfg, ema_decay=ema_decay)
    device = resolve_device(cfg.device)
    record = {
        "epochs": state["epoch"],
        "steps": state["step"],
        "images_seen": state["images_seen"],
        "batch_size": cfg.batch_size,
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
    out = Path(cfg.weights_dir) / f"{cfg.name}.safetensors"
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
    p.add_argument("--export-ema", type=float, default=None, help="with --export-only: export this EMA decay")
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
    p.add_argument("--base-channels", type=int, default=u.base_channels)
    p.add_argument("--channel-mults", type=int, nargs="+", default=list(u.channel_mults))
    p.add_argument("--blocks-per-stage", type=int, default=u.blocks_per_stage)
    p.add_argument("--attention-stages", type=int, nargs="*", default=list(u.attention_stages))
    p.add_argument("--stem-patch", type=int, default=u.stem_patch)
    p.add_argument("--dropout", type=float, default=u.dropout)
    a = p.parse_args(argv)
    unet = replace(
        u,
        base_channels=a.base_channels,
        channel_mults=tuple(a.channel_mults),
        blocks_per_stage=a.blocks_per_stage,
        attention_stages=tuple(a.attention_stages),
        stem_patch=a.stem_patch,
        dropout=a.dropout,
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
    )
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    if args.export_only:
        export(cfg, Path(cfg.run_dir) / "checkpoint.pt", args.export_ema)
    else:
        train(cfg, resume=args.resume, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
