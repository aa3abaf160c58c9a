"""Pictures of the diffusion process (the figures of Ho et al. 2020), as PNG grids.

    python -m model.visualize forward --weights weights/fashion-unet.safetensors -o forward.png
    python -m model.visualize reverse --weights weights/fashion-unet.safetensors --sampler ddim --steps 50 \
        --every 5 -o reverse.png

``forward``: one test image of each class (rows) through the forward process at t = 0, T/10, ..., T
(columns); only the weights' card is read, for its schedule (or pass ``--schedule``).
``reverse``: a reverse trajectory per class: for each class a row of x_t and below it a row of the
x0 prediction, every k steps, with the final sample in the last column.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.atomic import atomic_path
from model.data import CLASS_NAMES, FILES, NUM_CLASSES, read_idx, resolve_dir, to_model_range
from model.diffusion import SCHEDULES, Schedule, q_sample
from model.images import grid
from model.io import WeightsError, card_sampling, load_weights, read_card
from model.samplers import SAMPLERS, Denoiser, Step, generators_from_seeds, sample, sampler_named, to_uint8

DEFAULT_WEIGHTS = "weights/fashion-unet.safetensors"


def example_images(data_dir: str | os.PathLike | None = None, per_class: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` test images of each class, class by class: uint8 (10 * per_class, 28, 28)
    and their labels. Reads only the two test-set files."""
    root = resolve_dir(data_dir)
    images = read_idx(root / FILES["test_images"], 2051)
    labels = read_idx(root / FILES["test_labels"], 2049).astype(np.int64)
    picks = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise ValueError(
                f"{FILES['test_labels']}: {len(idx)} images of class {c} ({CLASS_NAMES[c]}), need {per_class}"
            )
        picks.append(idx)
    order = np.concatenate(picks)
    return images[order], labels[order]


def forward_process(
    schedule: Schedule, x0: torch.Tensor, columns: int = 10, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, list[int]]:
    """x_t of each image at t = 0, T/columns, ..., T: (N, columns + 1, C, H, W) and the t values.

    t counts noising steps as in Ho et al. (t = 0 is the clean image, x_t uses alpha_bar_t, which
    is ``schedule.alpha_bar[t - 1]`` in the 0-based arrays). Each image keeps one noise draw across
    its row, so the row shows that image dissolving rather than fresh noise in every column.
    """
    if not 1 <= columns <= schedule.T:
        raise ValueError(f"columns must be in 1..{schedule.T}, got {columns}")
    ts = [round(k * schedule.T / columns) for k in range(columns + 1)]
    eps = torch.randn(x0.shape, generator=generator).to(x0)  # (N, C, H, W)
    frames = [x0 if t == 0 else q_sample(schedule, x0, torch.full((len(x0),), t - 1), eps) for t in ts]
    return torch.stack(frames, dim=1), ts  # (N, columns + 1, C, H, W)


@dataclass(frozen=True)
class ReverseTrajectory:
    """What a sampler passed through: recorded every ``every`` steps and at the last step."""

    steps: list[int]  # 0-based indices of the recorded steps
    t: list[int]  # the timestep of each recorded step
    x_t: torch.Tensor  # (N, K, C, H, W) the sample entering each recorded step
    x0_pred: torch.Tensor  # (N, K, C, H, W) the guided x0 prediction at each recorded step
    final: torch.Tensor  # (N, C, H, W) the sampler's output


def reverse_trajectory(
    denoiser: Denoiser,
    labels: torch.Tensor,
    seeds: Sequence[int],
    sampler: str = "ddim",
    steps: int = 50,
    every: int = 5,
    guidance: float = 1.0,
    eta: float = 0.0,
) -> ReverseTrajectory:
    """Run ``sample`` once, keeping x_t and x0_pred of every ``every``-th step (and the last)."""
    if every < 1:
        raise ValueError(f"every must be a positive number of steps, got {every}")
    kept: list[Step] = []

    def keep(step: Step) -> None:
        if step.index % every == 0 or step.index == step.total - 1:
            kept.append(step)

    final = sample(denoiser, labels, generators_from_seeds(seeds), sampler, steps, guidance, keep, eta)
    return ReverseTrajectory(
        steps=[s.index for s in kept],
        t=[s.t for s in kept],
        x_t=torch.stack([s.x_t for s in kept], dim=1).cpu(),
        x0_pred=torch.stack([s.x0_pred for s in kept], dim=1).cpu(),
        final=final.cpu(),
    )


def forward_grid(frames: torch.Tensor, scale: int = 2) -> Image.Image:
    """(N, K, 1, H, W) in [-1, 1] -> one row per image, one column per timestep."""
    return grid(to_uint8(frames.flatten(0, 1)), ncol=frames.shape[1], scale=scale)


def reverse_grid(trajectory: ReverseTrajectory, scale: int = 2) -> Image.Image:
    """Two rows per image (x_t above the x0 prediction), one column per recorded step, then the final sample."""
    final = trajectory.final[:, None]  # (N, 1, C, H, W)
    rows = torch.stack([torch.cat([trajectory.x_t, final], 1), torch.cat([trajectory.x0_pred, final], 1)], 1)
    return grid(to_uint8(rows.flatten(0, 2)), ncol=rows.shape[2], scale=scale)  # rows: (N, 2, K + 1, C, H, W)


def _schedule_for(args: argparse.Namespace) -> Schedule:
    if args.schedule:
        return Schedule.named(args.schedule, args.T)
    card = read_card(Path(args.weights))
    try:
        return Schedule.named(card["diffusion"]["schedule"], card["diffusion"]["T"])
    except (KeyError, TypeError, ValueError) as err:
        raise WeightsError(f"{Path(args.weights).with_suffix('.json')}: invalid diffusion section ({err})") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.visualize", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_fwd = sub.add_parser("forward", help="test images through the forward process, t = 0 ... T")
    p_rev = sub.add_parser("reverse", help="a reverse trajectory per class: x_t and the x0 prediction")
    for p in (p_fwd, p_rev):
        p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="the .safetensors file (its .json card beside it)")
        p.add_argument("-o", "--output", required=True, help="PNG file to write")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--scale", type=int, default=2, help="pixel magnification")
    p_fwd.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (default: $FASHION_MNIST_DIR)")
    p_fwd.add_argument("--columns", type=int, default=10, help="timesteps shown after t = 0")
    p_fwd.add_argument("--schedule", choices=SCHEDULES, default=None, help="use this schedule instead of the card's")
    p_fwd.add_argument("--T", type=int, default=1000, help="timesteps of --schedule")
    p_rev.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p_rev.add_argument("--steps", type=int, default=None, help="default: ddpm 1000, ddim 50, dpm++ 20")
    p_rev.add_argument("--every", type=int, default=None, help="record every k steps (default: steps / 10)")
    p_rev.add_argument("--guidance", type=float, default=None, help="default: the card's sampling guidance, else 1")
    p_rev.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    p_rev.add_argument("--classes", type=int, nargs="+", default=list(range(NUM_CLASSES)))
    args = parser.parse_args(argv)

    try:
        if args.command == "forward":
            schedule = _schedule_for(args)
            images, labels = example_images(args.data_dir)
            frames, ts = forward_process(
                schedule, to_model_range(images), args.columns, torch.Generator().manual_seed(args.seed)
            )
            picture = forward_grid(frames, args.scale)
            print(f"rows: {', '.join(CLASS_NAMES[c] for c in labels)}")
            print(f"columns: t = {', '.join(map(str, ts))}")
        else:
            loaded = load_weights(args.weights)
            entry = sampler_named(args.sampler)
            steps = entry.steps_for(args.steps, entry.default_steps, loaded.denoiser.schedule.T)
            every = args.every or max(1, steps // 10)
            guidance = args.guidance if args.guidance is not None else card_sampling(loaded.card).guidance
            classes = torch.tensor(args.classes)
            seeds = [args.seed + i for i in range(len(classes))]
            traj = reverse_trajectory(loaded.denoiser, classes, seeds, args.sampler, steps, every, guidance, args.eta)
            picture = reverse_grid(traj, args.scale)
            names = [CLASS_NAMES[c] if c < NUM_CLASSES else "null" for c in args.classes]
            print(f"rows: x_t / x0 prediction for {', '.join(names)}")
            print(
                f"columns: steps {', '.join(map(str, traj.steps))} (t = {', '.join(map(str, traj.t))}), then the sample"
            )
    except (WeightsError, ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    out = Path(args.output)
    with atomic_path(out) as tmp:
        picture.save(tmp, format="PNG")
    print(f"wrote {out} ({picture.width}x{picture.height})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
