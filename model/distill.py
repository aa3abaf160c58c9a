"""Distil the guided teacher into a few-step student: consistency distillation on teacher trajectories.

    python -m model.distill trajectories --teacher weights/fashion-unet.safetensors --run-dir RUN --count 20000
    python -m model.distill train --teacher weights/fashion-unet.safetensors --run-dir RUN --steps 3000 --resume
    python -m model.distill export --run-dir RUN --out weights/fashion-student.safetensors --ema 0.999

The method, in two stages that each resume where they stopped:

1. ``trajectories``: the teacher samples with its card's sampler and guidance (DPM-Solver++ 20 steps
   at 1.35: 40 network evaluations per image), and every x_t along each trajectory is kept with the
   image it ends on, in shards of ``RUN/trajectories/`` that are written atomically.
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
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from model.atomic import atomic_path
from model.diffusion import split_prediction
from model.io import LoadedWeights, atomic_torch_save, card_sampling, load_weights, read_card, save_weights
from model.machine import DTYPES, autocast, describe
from model.samplers import Step, generators_from_seeds, sample, spaced_timesteps
from model.train import EMA, Log, uses_bfloat16
from model.unet import UNet, UNetConfig, count_parameters

SEED_BASE = 10_000_000  # trajectory seeds start here, far from model.evaluate's 0, 1, 2, ...
STUDENT_STEPS = 4  # the student's grid: the trailing 4-step timesteps, which hold the 2- and 1-step grids
METHOD = (
    "consistency distillation on guided teacher trajectories: the student regresses the end of the "
    "teacher's DPM-Solver++ trajectory from x_t on the 4-step grid, pseudo-Huber loss on x0"
)


# --- stage 1: teacher trajectories ---------------------------------------------------------------


def shard_path(run_dir: Path, index: int) -> Path:
    return run_dir / "trajectories" / f"shard-{index:05d}.safetensors"


def trajectory_shard(
    teacher: LoadedWeights, index: int, size: int, precision: str, batch_size: int = 250
) -> dict[str, torch.Tensor]:
    """``size`` teacher trajectories at the card's sampling: x_t before every step (S, size, 1, 28, 28)
    as float16, the image each ends on (size, 1, 28, 28) in float32, their labels and the timesteps.
    Image ``i`` of shard ``k`` has seed SEED_BASE + k * size + i and class (k * size + i) mod 10."""
    den, s = teacher.denoiser, card_sampling(teacher.card)
    device = next(den.model.parameters()).device
    first = index * size
    labels = torch.arange(first, first + size) % den.null_class  # (size,)
    xs, ends, timesteps = [], [], []
    for lo in range(0, size, batch_size):
        y = labels[lo : lo + batch_size].to(device)
        gens = generators_from_seeds(range(SEED_BASE + first + lo, SEED_BASE + first + lo + len(y)))
        seen: list[Step] = []
        with autocast(device.type, DTYPES[precision]):
            end = sample(den, y, gens, s.sampler, s.steps, s.guidance, callback=seen.append)
        xs.append(torch.stack([st.x_t for st in seen]).half().cpu())  # (S, b, 1, 28, 28)
        ends.append(end.float().cpu())
        timesteps = [st.t for st in seen]
    return {
        "x_t": torch.cat(xs, dim=1).contiguous(),
        "x0": torch.cat(ends).contiguous(),
        "labels": labels,
        "timesteps": torch.tensor(timesteps),
    }


def make_trajectories(
    teacher_path: Path, run_dir: Path, count: int, shard_size: int, precision: str, threads: int, progress: bool
) -> None:
    """Write ``count`` trajectories as shards of ``shard_size``; shards already written are kept."""
    if count < 1 or shard_size < 1 or count % shard_size:
        raise ValueError(f"count ({count}) must be a positive multiple of shard_size ({shard_size})")
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    torch.set_num_threads(threads)
    teacher = load_weights(teacher_path, "cpu")
    meta = {"teacher": str(Path(teacher_path).resolve()), "sampling": asdict(card_sampling(teacher.card))}
    meta_path = run_dir / "trajectories" / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text())["teacher"] != meta["teacher"]:
        raise ValueError(f"{meta_path}: these trajectories come from another teacher")
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    for k in tqdm(range(count // shard_size), desc="trajectory shards", disable=not progress):
        if shard_path(run_dir, k).exists():
            continue
        start = time.perf_counter()
        tensors = trajectory_shard(teacher, k, shard_size, precision)
        seconds = time.perf_counter() - start
        with atomic_path(shard_path(run_dir, k)) as tmp:
            save_file(tensors, tmp, metadata={"seconds": f"{seconds:.2f}", "threads": str(threads)})
        with (run_dir / "trajectories" / "log.jsonl").open("a") as f:
            f.write(json.dumps({"shard": k, "trajectories": shard_size, "seconds": round(seconds, 2)}) + "\n")


def shard_cpu_seconds(path: Path) -> float:
    """What sampling the shard cost: its metadata's seconds times threads, read without its tensors."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return float(meta["seconds"]) * int(meta["threads"])


def shard_trajectories(path: Path) -> int:
    """How many trajectories the shard holds, read from its header alone."""
    with safe_open(str(path), "pt") as f:
        return f.get_slice("labels").get_shape()[0]


@dataclass
class Pairs:
    """Every (x_t, t, class) -> x0 pair at the student's timesteps, and the CPU seconds they cost."""

    x_t: torch.Tensor  # (N, 1, 28, 28) float16
    t: torch.Tensor  # (N,) int64
    y: torch.Tensor  # (N,)
    x0: torch.Tensor  # (N, 1, 28, 28) float32
    cpu_seconds: float  # seconds x threads of the teacher sampling them

    @classmethod
    def load(cls, paths: list[Path], timesteps: list[int]) -> Pairs:
        xs, ts, ys, ends, cpu = [], [], [], [], 0.0
        for path in paths:
            shard = load_file(str(path))
            have = shard["timesteps"].tolist()
            missing = sorted(set(timesteps) - set(have))
            if missing:
                raise ValueError(f"{path}: the teacher's trajectories never pass timesteps {missing}")
            for t in timesteps:
                xs.append(shard["x_t"][have.index(t)])
                ts.append(torch.full((len(shard["labels"]),), t))
                ys.append(shard["labels"])
                ends.append(shard["x0"])
            cpu += shard_cpu_seconds(path)
        return cls(torch.cat(xs), torch.cat(ts), torch.cat(ys), torch.cat(ends), cpu)


# --- stage 2: the student ------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillConfig:
    teacher: str  # the teacher's .safetensors (its card beside it)
    run_dir: str
    steps: int = 3000  # optimizer steps in all, over every resume
    batch_size: int = 128
    lr: float = 1e-4
    warmup_steps: int = 100
    cooldown_steps: int = 500  # linear decay to zero over the last steps
    ema_decays: tuple[float, ...] = (0.999, 0.9995)
    huber_c: float = 0.00054 * math.sqrt(28 * 28)  # Song & Dhariwal 2023: 0.00054 sqrt(d) for data in [-1, 1]
    grad_clip: float = 1.0
    val_trajectories: int = 500  # the last shard(s) are held out for the validation loss
    checkpoint_every: int = 100  # steps
    seed: int = 0
    threads: int = 2
    precision: str = "auto"  # bfloat16 autocast for the student's passes; loss, optimizer and EMAs in float32
    max_minutes: float | None = None
    student_steps: int = STUDENT_STEPS
    timesteps: tuple[int, ...] = field(default=())  # filled from the schedule's trailing grid

    def lr_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps)
        cool = min(1.0, max(0.0, (self.steps - step) / self.cooldown_steps)) if self.cooldown_steps else 1.0
        return self.lr * warm * cool


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
    model: UNet
    opt: torch.optim.Adam
    emas: dict[float, EMA]
    step: int = 0
    elapsed: float = 0.0  # seconds of training over every resume
    cpu_seconds: float = 0.0  # elapsed seconds times the threads of each resumed part
    train_loss: float = math.nan
    val_loss: float = math.nan

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
    with autocast("cpu", torch.bfloat16 if uses_bfloat16(cfg.precision, torch.device("cpu")) else torch.float32):
        for i in range(0, len(val.t), 500):
            sl = slice(i, i + 500)
            loss = consistency_loss(model, teacher, val.x_t[sl].float(), val.t[sl], val.y[sl], val.x0[sl], cfg.huber_c)
            total += loss.item() * len(val.t[sl])
    model.train()
    return total / len(val.t)


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train the student on the run's trajectories; returns the checkpoint's path."""
    run_dir = Path(cfg.run_dir)
    torch.set_num_threads(cfg.threads)
    teacher = load_weights(cfg.teacher, "cpu")
    grid = spaced_timesteps(teacher.denoiser.schedule.T, cfg.student_steps)
    cfg = DistillConfig(**{**asdict(cfg), "timesteps": tuple(cfg.timesteps or grid)})
    shards = sorted((run_dir / "trajectories").glob("shard-*.safetensors"))
    held = -(-cfg.val_trajectories // max(1, shard_trajectories(shards[0]))) if shards else 0
    if len(shards) <= held:
        raise ValueError(
            f"{run_dir}/trajectories holds {len(shards)} shards and {held} are held out for validation "
            f"(val_trajectories={cfg.val_trajectories}); run `trajectories` with a larger --count first"
        )
    train, val = Pairs.load(shards[:-held], list(cfg.timesteps)), Pairs.load(shards[-held:], list(cfg.timesteps))

    torch.manual_seed(cfg.seed)
    model = UNet(UNetConfig(**teacher.card["unet"]))
    model.load_state_dict(teacher.model.state_dict())
    model.train().requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    st = Student(model, opt, {d: EMA(model, d, warmup=False) for d in cfg.ema_decays})
    ckpt = run_dir / "student.pt"
    if resume and ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        for d, e in st.emas.items():
            e.model.load_state_dict(saved["ema"][str(d)])
        opt.load_state_dict(saved["optimizer"])
        st.step, st.elapsed, st.train_loss, st.val_loss = (
            saved["step"],
            saved["elapsed"],
            saved["train_loss"],
            saved["val_loss"],
        )
        st.cpu_seconds = saved.get("cpu_seconds", saved["elapsed"] * saved["config"]["threads"])
    dtype = torch.bfloat16 if uses_bfloat16(cfg.precision, torch.device("cpu")) else torch.float32
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    draws = torch.Generator()
    with Log(run_dir / "distill_metrics.jsonl", True) as log:
        log.say(
            f"student {count_parameters(model) / 1e6:.2f}M params from {cfg.teacher}; {len(train.t)} train / "
            f"{len(val.t)} val pairs at t={list(cfg.timesteps)}; {describe('cpu', cfg.threads)}; step {st.step}"
        )
        bar = tqdm(total=cfg.steps, initial=st.step, disable=not progress, desc="distill")
        t0, running = time.perf_counter() - st.elapsed, []
        while st.step < cfg.steps and (budget is None or st.elapsed < budget):
            entropy = np.random.SeedSequence((cfg.seed, st.step)).generate_state(1, np.uint64)[0]
            idx = torch.randint(0, len(train.t), (cfg.batch_size,), generator=draws.manual_seed(int(entropy)))
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(st.step)
            with autocast("cpu", dtype):
                loss = consistency_loss(
                    model, teacher, train.x_t[idx].float(), train.t[idx], train.y[idx], train.x0[idx], cfg.huber_c
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            for e in st.emas.values():
                e.update(model)
            st.step += 1
            running.append(loss.item())
            now = time.perf_counter() - t0
            st.cpu_seconds += (now - st.elapsed) * cfg.threads
            st.elapsed = now
            bar.update(1)
            if st.step % cfg.checkpoint_every == 0 or st.step == cfg.steps:
                st.train_loss = float(np.mean(running))
                st.val_loss = validation_loss(st.emas[cfg.ema_decays[0]].model, teacher, val, cfg)
                running = []
                log.row(
                    {
                        "step": st.step,
                        "loss": st.train_loss,
                        "val_loss": st.val_loss,
                        "lr": cfg.lr_at(st.step),
                        "minutes": round(st.elapsed / 60, 2),
                    }
                )
                log.say(
                    f"step {st.step}: train {st.train_loss:.4f}  val(EMA {cfg.ema_decays[0]}) {st.val_loss:.4f}"
                    f"  {st.elapsed / 60:.1f} min"
                )
                atomic_torch_save(st.checkpoint(cfg), ckpt)
                t0 = time.perf_counter() - st.elapsed
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
    if decay == 0:
        model.load_state_dict(saved["model"])
    elif str(decay) in saved["ema"]:
        model.load_state_dict(saved["ema"][str(decay)])
    else:
        raise ValueError(f"the checkpoint keeps EMAs {', '.join(saved['ema'])} and 0 (the raw weights), not {decay}")
    shards = sorted((run_dir / "trajectories").glob("shard-*.safetensors"))
    pairs_cpu = sum(shard_cpu_seconds(path) for path in shards)
    teacher_sampling = asdict(card_sampling(teacher_card))
    train_cpu_minutes = saved.get("cpu_seconds", saved["elapsed"] * cfg["threads"]) / 60
    card = {
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
    card_path = save_weights(model, card, out)
    print(f"exported {out} and {card_path}")
    return card_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.distill", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("trajectories", help="sample and keep the teacher's trajectories")
    tr.add_argument("--teacher", type=Path, required=True)
    tr.add_argument("--run-dir", type=Path, required=True)
    tr.add_argument("--count", type=int, default=20_000)
    tr.add_argument("--shard-size", type=int, default=500)
    tr.add_argument("--precision", default="bfloat16", choices=tuple(DTYPES))
    tr.add_argument("--threads", type=int, default=2)
    tr.add_argument("--no-progress", action="store_true")
    d = DistillConfig(teacher="", run_dir="")
    st = sub.add_parser("train", help="train the student on the run's trajectories")
    st.add_argument("--teacher", required=True)
    st.add_argument("--run-dir", required=True)
    st.add_argument("--steps", type=int, default=d.steps)
    st.add_argument("--batch-size", type=int, default=d.batch_size)
    st.add_argument("--lr", type=float, default=d.lr)
    st.add_argument("--cooldown-steps", type=int, default=d.cooldown_steps)
    st.add_argument("--ema-decays", type=float, nargs="+", default=list(d.ema_decays))
    st.add_argument("--threads", type=int, default=d.threads)
    st.add_argument("--precision", default=d.precision, choices=("auto", "float32", "bfloat16"))
    st.add_argument("--max-minutes", type=float, default=None)
    st.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    st.add_argument("--val-trajectories", type=int, default=d.val_trajectories, help="held out (whole shards)")
    st.add_argument("--resume", action="store_true")
    st.add_argument("--no-progress", action="store_true")
    ex = sub.add_parser("export", help="write the student's weights and card")
    ex.add_argument("--run-dir", type=Path, required=True)
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--ema", type=float, default=None, help="one of the run's --ema-decays, or 0 for the raw weights")
    args = p.parse_args(argv)
    if args.command == "trajectories":
        make_trajectories(
            args.teacher, args.run_dir, args.count, args.shard_size, args.precision, args.threads, not args.no_progress
        )
    elif args.command == "train":
        cfg = DistillConfig(
            teacher=args.teacher,
            run_dir=args.run_dir,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            cooldown_steps=args.cooldown_steps,
            ema_decays=tuple(args.ema_decays),
            threads=args.threads,
            precision=args.precision,
            max_minutes=args.max_minutes,
            checkpoint_every=args.checkpoint_every,
            val_trajectories=args.val_trajectories,
        )
        distill(cfg, resume=args.resume, progress=not args.no_progress)
    else:
        export(args.run_dir, args.out, args.ema)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
