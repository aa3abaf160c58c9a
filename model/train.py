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
writes; model/distributed.py has the rules. ``TrainConfig`` and the epochs and steps are in
model/teacher.py; every option is a field of ``TrainConfig`` (or of its ``UNetConfig``), so a new one
is a line there.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from model import distributed
from model.cli import add_config_arguments, config_from_args
from model.data import CLASS_NAMES
from model.diffusion import NOISE_LEVELS, PREDICTIONS, SCHEDULES
from model.distributed import World
from model.ema import ema_weights
from model.io import Card, read_card, save_weights
from model.machine import describe, resolve_device
from model.optim import PRECISIONS
from model.runlog import Log
from model.teacher import LR_SCHEDULES, Data, Loop, State, TrainConfig, train_epochs
from model.unet import UNet, UNetConfig, count_parameters

CHOICES = {
    "schedule": SCHEDULES,
    "prediction": PREDICTIONS,
    "noise_levels": NOISE_LEVELS,
    "lr_schedule": LR_SCHEDULES,
    "precision": PRECISIONS,
}
NO_OPTION = ("image_size", "in_channels", "num_classes", "extra")  # UNetConfig fields that the data fixes


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


def make_card(cfg: TrainConfig, record: dict) -> Card:
    return {
        "name": cfg.name,
        "unet": cfg.unet.to_dict(),
        "diffusion": {"schedule": cfg.schedule, "T": cfg.T, "prediction": cfg.prediction},
        "classes": list(CLASS_NAMES),
        "sampling": {"sampler": "dpm++", "steps": cfg.sample_steps, "guidance": cfg.sample_guidance},
        "training": record,
    }


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
    kept = {str(cfg.ema_decay): state["ema"], **state.get("ema_extra", {})}
    cfg = replace(cfg, ema_decay=cfg.ema_decay if ema_decay is None else ema_decay)
    model.load_state_dict(ema_weights(kept, state["model"], cfg.ema_decay, ckpt_path))
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
        earlier = read_card(Path(cfg.init_from).with_suffix(".json")).get("training", {})
        record["initialised_from"] = {"weights": Path(cfg.init_from).name, "training": earlier}
        before = earlier.get("total_wall_minutes", earlier.get("wall_minutes", 0.0))
        record["total_wall_minutes"] = round(record["wall_minutes"] + float(before), 2)
    out = weights_path(cfg)
    card_path = save_weights(model, make_card(cfg, record), out)
    print(f"exported {out} and {card_path}")
    return card_path


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """The TrainConfig of a command line (one option per field, UNetConfig's included) and what to do."""
    p = argparse.ArgumentParser(
        prog="python -m model.train",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_arguments(p, TrainConfig, CHOICES, skip=NO_OPTION)
    run = p.add_argument_group("what to do")
    run.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    run.add_argument("--export-only", action="store_true", help="export RUN/checkpoint.pt and stop")
    run.add_argument("--export-ema", type=float, help="with --export-only: export this EMA decay (0: the raw weights)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    return config_from_args(TrainConfig, args), args


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
