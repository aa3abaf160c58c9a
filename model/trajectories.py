"""Stage 1 of distillation (``python -m model.distill trajectories``): the teacher's trajectories.

The teacher samples with its card's sampler and guidance (DPM-Solver++ 20 steps at 1.35: 40 network
evaluations per image), and every x_t along each trajectory is kept with the image it ends on, in
shards of ``RUN/trajectories/`` that are written atomically, so a stopped run resumes at the first
missing shard. Each shard's metadata records what it cost (seconds x threads); ``Pairs`` reads back
the (x_t, t, class) -> x0 pairs at the timesteps the student trains at (model/distill.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.atomic import atomic_path
from model.io import LoadedWeights, card_sampling, load_weights
from model.machine import DTYPES, autocast
from model.runlog import Log, progress_bar
from model.samplers import Step, generators_from_seeds, sample

SEED_BASE = 10_000_000  # trajectory seeds start here, far from model.evaluate's 0, 1, 2, ...


@dataclass(frozen=True)
class TrajectoryConfig:
    teacher: str  # the teacher's .safetensors (its card beside it says how it samples)
    run_dir: str  # the shards go to RUN/trajectories/
    count: int = 20_000  # trajectories in all, over every resume
    shard_size: int = 500  # trajectories per shard (count is a multiple of it)
    precision: str = "bfloat16"  # autocast of the teacher's evaluations
    threads: int = 2  # torch CPU threads


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


def make_trajectories(cfg: TrajectoryConfig, progress: bool = True) -> None:
    """Write ``cfg.count`` trajectories as shards of ``cfg.shard_size``; shards already written are kept."""
    if cfg.count < 1 or cfg.shard_size < 1 or cfg.count % cfg.shard_size:
        raise ValueError(f"count ({cfg.count}) must be a positive multiple of shard_size ({cfg.shard_size})")
    if cfg.precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {cfg.precision!r}")
    torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    teacher = load_weights(cfg.teacher, "cpu")
    meta = {"teacher": str(Path(cfg.teacher).resolve()), "sampling": asdict(card_sampling(teacher.card))}
    meta_path = run_dir / "trajectories" / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text())["teacher"] != meta["teacher"]:
        raise ValueError(f"{meta_path}: these trajectories come from another teacher")
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    shards = cfg.count // cfg.shard_size
    bar = progress_bar(shards, "trajectory shards", progress, unit="shard")
    with Log(run_dir / "trajectories" / "log.jsonl") as log:
        for k in range(shards):
            bar.update(1)
            if shard_path(run_dir, k).exists():
                continue
            start = time.perf_counter()
            tensors = trajectory_shard(teacher, k, cfg.shard_size, cfg.precision)
            seconds = time.perf_counter() - start
            with atomic_path(shard_path(run_dir, k)) as tmp:
                save_file(tensors, tmp, metadata={"seconds": f"{seconds:.2f}", "threads": str(cfg.threads)})
            log.row({"shard": k, "trajectories": cfg.shard_size, "seconds": round(seconds, 2)})
    bar.close()


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
