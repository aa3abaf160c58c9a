"""Distil the guided teacher into a few-step student: consistency distillation on teacher trajectories.

    python -m model.distill trajectories --teacher weights/fashion-unet.safetensors --run-dir RUN --count 20000
    python -m model.distill train --teacher weights/fashion-unet.safetensors --run-dir RUN --steps 3000 --resume
    python -m model.distill export --run-dir RUN --out weights/fashion-student.safetensors --ema 0.999

The method, in two stages that each resume where they stopped:

1. ``trajectories`` (model/trajectories.py): the teacher samples with its card's sampler and
   guidance, and every x_t along each trajectory is kept with the image it ends on, in shards.
2. ``train``: the student starts as a copy of the teacher and learns f(x_t, t, class) = the end of the
   teacher's trajectory through x_t, at the timesteps the student samples at (1, 2 and 4 steps all
   use the trailing 4-step grid 999, 749, 499, 249). This is the consistency function of Song et al.
   2023 learned by regression on the teacher's probability-flow ODE solutions, which are computed
   once and reused every epoch, instead of by bootstrapping against an EMA target; the loss is
   their pseudo-Huber distance (Song & Dhariwal 2023, sec. 3.3) on the x0 prediction. Guidance is
   distilled in (Meng et al. 2023): the trajectories are guided, the student runs on the
   conditional branch alone, so one step costs one network evaluation.

The student samples with ``model.samplers``'s "consistency" sampler (re-noising the prediction to
each next timestep). ``export`` writes it with a card naming its teacher, its method and its
sampling defaults; its ``training`` section records the CPU minutes of both stages.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.cli import add_config_arguments, config_from_args
from model.diffusion import split_prediction
from model.ema import EMA, ema_weights
from model.io import (
    LoadedWeights,
    atomic_torch_save,
    card_sampling,
    load_matching,
    load_weights,
    read_card,
    save_weights,
)
from model.machine import DTYPES, describe
from model.optim import PRECISIONS, cooldown, optimizer_step, step_generator, training_autocast, warmup
from model.runlog import Log, progress_bar
from model.samplers import spaced_timesteps
from model.trajectories import Pairs, TrajectoryConfig, make_trajectories, shard_cpu_seconds, shard_trajectories
from model.unet import UNet, UNetConfig, count_parameters

STUDENT_STEPS = 4  # the student's grid: the trailing 4-step timesteps, which hold the 2- and 1-step grids
METHOD = (
    "consistency distillation on guided teacher trajectories: the student regresses the end of the "
    "teacher's DPM-Solver++ trajectory from x_t on the 4-step grid, pseudo-Huber loss on x0"
)


@dataclass(frozen=True)
class DistillConfig:
    teacher: str  # the teacher's .safetensors (its card beside it)
    run_dir: str  # where `trajectories` wrote its shards; the checkpoint and metrics go here too
    steps: int = 3000  # optimizer steps in all, over every resume
    batch_size: int = 128  # pairs per optimizer step
    lr: float = 1e-4  # Adam's learning rate after the warm-up
    warmup_steps: int = 100  # linear learning-rate warm-up
    cooldown_steps: int = 500  # linear decay to zero over the last steps
    ema_decays: tuple[float, ...] = (0.999, 0.9995)  # EMAs kept; the first is validated (export picks one)
    huber_c: float = 0.00054 * math.sqrt(28 * 28)  # Song & Dhariwal 2023: 0.00054 sqrt(d) for data in [-1, 1]
    grad_clip: float = 1.0  # largest gradient norm
    val_trajectories: int = 500  # the last shard(s) are held out for the validation loss
    checkpoint_every: int = 100  # steps between validation, a metrics line and the checkpoint
    seed: int = 0  # of each step's draw of pairs
    threads: int = 2  # torch CPU threads
    precision: str = "auto"  # bfloat16 autocast for the student's passes; loss, optimizer and EMAs in float32
    max_minutes: float | None = None  # wall-clock budget over every resume
    student_steps: int = STUDENT_STEPS  # the student's sampling steps (its card's default)
    timesteps: tuple[int, ...] = field(default=())  # trained timesteps (none: the student_steps trailing grid)
    init_from: str | None = None  # start from this earlier student of the same network instead of the teacher

    def __post_init__(self):
        if not self.ema_decays:
            raise ValueError("ema_decays must name at least one decay (the first is validated)")

    def lr_at(self, step: int) -> float:
        return self.lr * warmup(step, self.warmup_steps) * cooldown(step, self.steps, self.cooldown_steps)


def consistency_loss(
    student: torch.nn.Module,
    teacher: LoadedWeights,
    x_t: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    x0: torch.Tensor,
    c: float,
) -> torch.Tensor:
    """Mean pseudo-Huber distance sqrt(|x0_pred - x0|^2 + c^2) - c between the student's x0
    prediction at (x_t, t, y) and the end of the teacher's trajectory."""
    den = teacher.denoiser
    out = student(x_t, t.float(), y).float()  # (B, 1, 28, 28)
    _, x0_pred = split_prediction(den.prediction, den.schedule, x_t, t, out)
    d2 = (x0_pred - x0).pow(2).flatten(1).sum(1)  # (B,)
    return (torch.sqrt(d2 + c * c) - c).mean()


@dataclass
class Student:
    """What the checkpoint (RUN/student.pt) holds: the network, its optimizer and EMAs, how far it got."""

    model: UNet
    opt: torch.optim.Adam
    emas: dict[float, EMA]
    step: int = 0
    elapsed: float = 0.0  # seconds of training over every resume
    cpu_seconds: float = 0.0  # elapsed seconds times the threads of each resumed part
    train_loss: float = math.nan
    val_loss: float = math.nan

    @classmethod
    def new(cls, cfg: DistillConfig, teacher: LoadedWeights) -> Student:
        """A copy of the teacher (or of ``cfg.init_from``, an earlier student of the same network and
        diffusion), its Adam and its EMAs (no EMA warm-up: there is no initialisation to forget)."""
        torch.manual_seed(cfg.seed)
        model = UNet(UNetConfig(**teacher.card["unet"]))
        start = teacher.model
        if cfg.init_from:
            start = load_matching(cfg.init_from, teacher.model.config, teacher.card["diffusion"])
        model.load_state_dict(start.state_dict())
        model.train().requires_grad_(True)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        return cls(model, opt, {d: EMA(model, d, warmup=False) for d in cfg.ema_decays})

    def resume(self, path: Path) -> None:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(saved["model"])
        for d, e in self.emas.items():
            e.model.load_state_dict(saved["ema"][str(d)])
        self.opt.load_state_dict(saved["optimizer"])
        self.step, self.elapsed = saved["step"], saved["elapsed"]
        self.train_loss, self.val_loss = saved["train_loss"], saved["val_loss"]
        self.cpu_seconds = saved.get("cpu_seconds", saved["elapsed"] * saved["config"]["threads"])

    def checkpoint(self, cfg: DistillConfig) -> dict:
        return {
            "config": {**asdict(cfg), "timesteps": list(cfg.timesteps), "ema_decays": list(cfg.ema_decays)},
            "model": self.model.state_dict(),
            "ema": {str(d): e.model.state_dict() for d, e in self.emas.items()},
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed,
            "cpu_seconds": self.cpu_seconds,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
        }


@torch.no_grad()
def validation_loss(model: torch.nn.Module, teacher: LoadedWeights, val: Pairs, cfg: DistillConfig) -> float:
    model.eval()
    total = 0.0
    with training_autocast(cfg.precision, torch.device("cpu")):
        for i in range(0, len(val.t), 500):
            sl = slice(i, i + 500)
            loss = consistency_loss(model, teacher, val.x_t[sl].float(), val.t[sl], val.y[sl], val.x0[sl], cfg.huber_c)
            total += loss.item() * len(val.t[sl])
    model.train()
    return total / len(val.t)


def split_pairs(cfg: DistillConfig) -> tuple[Pairs, Pairs]:
    """The run's training pairs and, from its last shards, its validation pairs."""
    shards = sorted((Path(cfg.run_dir) / "trajectories").glob("shard-*.safetensors"))
    held = -(-cfg.val_trajectories // max(1, shard_trajectories(shards[0]))) if shards else 0
    if len(shards) <= held:
        raise ValueError(
            f"{cfg.run_dir}/trajectories holds {len(shards)} shards and {held} are held out for validation "
            f"(val_trajectories={cfg.val_trajectories}); run `trajectories` with a larger --count first"
        )
    return Pairs.load(shards[:-held], list(cfg.timesteps)), Pairs.load(shards[-held:], list(cfg.timesteps))


def distill_step(st: Student, cfg: DistillConfig, teacher: LoadedWeights, train: Pairs, g: torch.Generator) -> float:
    """One optimizer step on a batch of pairs drawn from (seed, step); returns its loss."""
    idx = torch.randint(0, len(train.t), (cfg.batch_size,), generator=step_generator(g, cfg.seed, st.step))
    for group in st.opt.param_groups:
        group["lr"] = cfg.lr_at(st.step)
    with training_autocast(cfg.precision, torch.device("cpu")):
        x_t, x0 = train.x_t[idx].float(), train.x0[idx]
        loss = consistency_loss(st.model, teacher, x_t, train.t[idx], train.y[idx], x0, cfg.huber_c)
    optimizer_step(loss, st.model, st.opt, cfg.grad_clip, st.emas.values())
    st.step += 1
    return loss.item()


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train the student on the run's trajectories; returns the checkpoint's path."""
    run_dir, ckpt = Path(cfg.run_dir), Path(cfg.run_dir) / "student.pt"
    torch.set_num_threads(cfg.threads)
    teacher = load_weights(cfg.teacher, "cpu")
    grid = spaced_timesteps(teacher.denoiser.schedule.T, cfg.student_steps)
    cfg = DistillConfig(**{**asdict(cfg), "timesteps": tuple(cfg.timesteps or grid)})
    train, val = split_pairs(cfg)
    st = Student.new(cfg, teacher)
    if resume and ckpt.exists():
        st.resume(ckpt)
    budget, draws, first = cfg.max_minutes * 60 if cfg.max_minutes else None, torch.Generator(), cfg.ema_decays[0]
    with Log(run_dir / "distill_metrics.jsonl") as log:
        log.say(
            f"student {count_parameters(st.model) / 1e6:.2f}M params from {cfg.teacher}; {len(train.t)} train / "
            f"{len(val.t)} val pairs at t={list(cfg.timesteps)}; {describe('cpu', cfg.threads)}; step {st.step}"
        )
        bar = progress_bar(cfg.steps, "distill", progress, initial=st.step)
        t0, running = time.perf_counter() - st.elapsed, []
        while st.step < cfg.steps and (budget is None or st.elapsed < budget):
            running.append(distill_step(st, cfg, teacher, train, draws))
            now = time.perf_counter() - t0
            st.cpu_seconds += (now - st.elapsed) * cfg.threads
            st.elapsed = now
            bar.update(1)
            if st.step % cfg.checkpoint_every == 0 or st.step == cfg.steps:
                st.train_loss, running = float(np.mean(running)), []
                st.val_loss = validation_loss(st.emas[first].model, teacher, val, cfg)
                row = {"step": st.step, "loss": st.train_loss, "val_loss": st.val_loss, "lr": cfg.lr_at(st.step)}
                log.row({**row, "minutes": round(st.elapsed / 60, 2)})
                log.say(
                    f"step {st.step}: train {st.train_loss:.4f}  val(EMA {first}) {st.val_loss:.4f}"
                    f"  {st.elapsed / 60:.1f} min"
                )
                atomic_torch_save(st.checkpoint(cfg), ckpt)
                t0 = time.perf_counter() - st.elapsed  # validation is not training time
        bar.close()
    atomic_torch_save(st.checkpoint(cfg), ckpt)
    return ckpt


def export(run_dir: Path, out: Path, ema_decay: float | None, name: str = "fashion-student") -> Path:
    """Write the student (``ema_decay``: one of the checkpoint's EMAs; 0: the raw weights) and its card."""
    saved = torch.load(run_dir / "student.pt", map_location="cpu", weights_only=True)
    cfg = saved["config"]
    teacher_card = read_card(Path(cfg["teacher"]))
    model = UNet(UNetConfig(**teacher_card["unet"]))
    decay = cfg["ema_decays"][0] if ema_decay is None else ema_decay
    model.load_state_dict(ema_weights(saved["ema"], saved["model"], decay, run_dir / "student.pt"))
    shards = sorted((run_dir / "trajectories").glob("shard-*.safetensors"))
    pairs_cpu = sum(shard_cpu_seconds(path) for path in shards)
    teacher_sampling = asdict(card_sampling(teacher_card))
    train_cpu_minutes = saved.get("cpu_seconds", saved["elapsed"] * cfg["threads"]) / 60
    card: dict[str, Any] = {
        "name": name,
        "unet": teacher_card["unet"],
        "diffusion": teacher_card["diffusion"],
        "classes": teacher_card.get("classes"),
        "sampling": {
            "sampler": "consistency",
            "steps": cfg["student_steps"],
            "guidance": 1.0,
            "guidance_interval": None,
        },
        "distillation": {
            "teacher": teacher_card.get("name"),
            "method": METHOD,
            "guidance": teacher_sampling["guidance"],
            "teacher_sampling": teacher_sampling,
            "trajectories": sum(shard_trajectories(path) for path in shards),
            "timesteps": cfg["timesteps"],
        },
        "training": {
            "steps": saved["step"],
            "images_seen": saved["step"] * cfg["batch_size"],
            "batch_size": cfg["batch_size"],
            "lr": cfg["lr"],
            "exported_ema_decay": decay,
            "final_train_loss": saved["train_loss"],
            "final_val_loss": saved["val_loss"],
            "trajectory_cpu_minutes": round(pairs_cpu / 60, 1),
            "train_cpu_minutes": round(train_cpu_minutes, 1),
            "total_cpu_minutes": round(pairs_cpu / 60 + train_cpu_minutes, 1),
            "hardware": describe("cpu", cfg["threads"]),
            "torch": torch.__version__,
            "parameters": count_parameters(model),
            "config": cfg,
        },
    }
    if cfg.get("init_from"):  # a warm start: the earlier student's distillation is part of what these weights cost
        earlier = read_card(Path(cfg["init_from"])).get("training", {})
        card["training"]["initialised_from"] = {"weights": Path(cfg["init_from"]).name, "training": earlier}
        card["training"]["cumulative_cpu_minutes"] = round(
            card["training"]["total_cpu_minutes"]
            + earlier.get("cumulative_cpu_minutes", earlier.get("total_cpu_minutes", 0)),
            1,
        )
    card_path = save_weights(model, card, out)
    print(f"exported {out} and {card_path}")
    return card_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command (``trajectories``, ``train`` or ``export``) and its options; the first two have one
    option per field of their config (TrajectoryConfig, DistillConfig), so a new field is one line there."""
    p = argparse.ArgumentParser(prog="python -m model.distill", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    stages = {
        "trajectories": (TrajectoryConfig, "sample and keep the teacher's trajectories", tuple(DTYPES)),
        "train": (DistillConfig, "train the student on the run's trajectories", PRECISIONS),
    }
    for command, (cls, help, precisions) in stages.items():
        stage = sub.add_parser(command, help=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_config_arguments(stage, cls, {"precision": precisions})
        if command == "train":
            stage.add_argument("--resume", action="store_true", help="continue from RUN/student.pt")
        stage.add_argument("--no-progress", action="store_true", help="no progress bar")
    ex = sub.add_parser("export", help="write the student's weights and card")
    ex.add_argument("--run-dir", type=Path, required=True)
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--ema", type=float, default=None, help="one of the run's --ema-decays, or 0 for the raw weights")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "trajectories":
        make_trajectories(config_from_args(TrajectoryConfig, args), progress=not args.no_progress)
    elif args.command == "train":
        distill(config_from_args(DistillConfig, args), resume=args.resume, progress=not args.no_progress)
    else:
        export(args.run_dir, args.out, args.ema)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
