"""Sampling speed: seconds and images/s per sampler and step count, the network's FLOPs per
evaluation, and the achieved GFLOP/s beside a float32 matrix-product peak measured in the same run.

    python -m bench.sampling                                   # shipped weights, n = 16, 3 repeats
    python -m bench.sampling --guidance 1 --repeats 5 --runs dpm++:10 dpm++:20
    python -m bench.sampling --precisions float32                # only float32 (default: float32 and auto)
    python -m bench.sampling --student-runs consistency:1 consistency:4
    python -m bench.sampling --compile --runs dpm++:20                # as FASHION_COMPILE=1 serves it

The distilled student (``--student``, weights/fashion-student.safetensors when it exists) is timed
beside the teacher at its card's guidance (1: distilled in) for 1, 2 and 4 steps, and every row
gets its speed-up over the teacher's DPM-Solver++ 20 steps in the same precision, measured in the
same run.

Without the weights file it times a freshly initialised network of the default shape
(UNetConfig defaults with base_channels=48) and says so: speed does not depend on the weights' values.
Each row runs in float32 and in the precision that FASHION_PRECISION=auto picks on this machine
(``model.machine.autocast_dtype``: bfloat16 on a CPU with AVX512_BF16 or AMX, float16 on CUDA), with
the speed-up against float32 measured in the same run.
Prints a Markdown table, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.diffusion import Schedule
from model.io import WeightsError, load_weights
from model.machine import autocast, autocast_dtype, describe, serving_network
from model.samplers import Denoiser, check_steps, evaluations, generators_from_seeds, sample
from model.unet import UNet, UNetConfig, count_parameters

DEFAULT_RUNS = ["ddpm:1000", "ddim:50", "dpm++:10", "dpm++:20"]
STUDENT_RUNS = ["consistency:1", "consistency:2", "consistency:4"]
REFERENCE = ("dpm++", 20)  # the teacher's card sampling: every row's speed-up is against it


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, size: int = 2048, seconds: float = 1.0) -> float:
    """Best float32 GFLOP/s of torch.mm on two size x size matrices (2 size^3 FLOPs each)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device)
    b = torch.randn(size, size, generator=g).to(device)
    torch.mm(a, b)  # warm-up
    sync(device)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds or best == 0.0:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return best


def flops_per_image(model: torch.nn.Module, config: UNetConfig, device: torch.device, batch: int = 4) -> float:
    """FLOPs of one network evaluation per image, as torch's FlopCounterMode counts them
    (convolutions, matrix products, attention; not the elementwise work of norms and activations)."""
    x = torch.zeros(batch, config.in_channels, config.image_size, config.image_size, device=device)
    t = torch.full((batch,), 500.0, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops() / batch


def parse_run(text: str) -> tuple[str, int]:
    sampler, _, steps = text.partition(":")
    if not steps.isdigit():
        raise argparse.ArgumentTypeError(f"expected SAMPLER:STEPS such as dpm++:20, got {text!r}")
    return sampler, int(steps)


def build_denoiser(weights: Path, device: torch.device) -> tuple[Denoiser, str, float]:
    """The weights' denoiser, a description, and the card's guidance; or a fresh default network."""
    if weights.exists():
        loaded = load_weights(weights, device)
        d = loaded.card["diffusion"]
        what = (
            f"{weights} ({count_parameters(loaded.model) / 1e6:.2f}M parameters, {d['schedule']} schedule, "
            f"{d['prediction']} prediction)"
        )
        return loaded.denoiser, what, float(loaded.card.get("sampling", {}).get("guidance", 2.0))
    config = replace(UNetConfig(), base_channels=48)
    model = UNet(config).to(device).eval().requires_grad_(False)
    what = (
        f"{weights} not found: timing a freshly initialised network (UNetConfig defaults, base_channels=48, "
        f"{count_parameters(model) / 1e6:.2f}M parameters); speed does not depend on the weights' values"
    )
    return Denoiser(model, Schedule.named("cosine"), "v", config.num_classes), what, 2.0


def time_run(
    den: Denoiser,
    n: int,
    sampler: str,
    steps: int,
    guidance: float,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
) -> float:
    """Median wall-clock seconds of ``repeats`` sampling calls for n images (one per class in turn),
    the network laid out and under autocast to ``dtype`` as the service runs it (channels-last, its
    layers stored in ``dtype``; ``compile``: as FASHION_COMPILE=1 has it), without the service's
    fixed-row chunks."""
    den = replace(den, model=serving_network(den.model, dtype, compile=compile))  # as the service lays it out
    labels = (torch.arange(n) % den.null_class).to(device)
    if compile:  # compiles for this batch's one shape, outside the timing
        with torch.inference_mode(), autocast(device.type, dtype):
            sample(den, labels, generators_from_seeds(range(n)), "ddim", 1, guidance)
    times = []
    for r in range(repeats):
        generators = generators_from_seeds(range(r * n, (r + 1) * n))
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast(device.type, dtype):
            sample(den, labels, generators, sampler, steps, guidance)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class Row:
    model: str
    den: Denoiser
    sampler: str
    steps: int
    guidance: float

    @property
    def evaluations(self) -> int:
        """Network evaluations per image: the sampler's, twice while guided (the conditional and the null branch)."""
        return evaluations(self.sampler, self.steps) * (1 if self.guidance == 1.0 else 2)


def check_runs(p: argparse.ArgumentParser, runs: list[tuple[str, int]], T: int) -> None:
    for sampler, steps in runs:  # refuse bad rows before spending minutes on good ones
        try:
            check_steps(sampler, steps, T)
        except ValueError as err:
            p.exit(2, f"error: {sampler}:{steps}: {err}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=Path("weights/fashion-unet.safetensors"))
    p.add_argument("--student", type=Path, default=Path("weights/fashion-student.safetensors"))
    p.add_argument("--guidance", type=float, default=None, help="default: the card's sampling guidance (2.0 without)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row; the median is reported")
    p.add_argument("--n", type=int, default=16, help="images per call")
    p.add_argument(
        "--runs", type=parse_run, nargs="+", default=[parse_run(r) for r in DEFAULT_RUNS], metavar="SAMPLER:STEPS"
    )
    p.add_argument(
        "--student-runs",
        type=parse_run,
        nargs="*",
        default=[parse_run(r) for r in STUDENT_RUNS],
        metavar="SAMPLER:STEPS",
        help="the student's rows (none: the teacher alone)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile every row's network, as FASHION_COMPILE=1 serves it"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument(
        "--precisions",
        nargs="+",
        choices=("float32", "auto", "bfloat16", "float16"),
        default=["float32", "auto"],
        help="autocast dtypes to time each row in (auto: what FASHION_PRECISION=auto picks here)",
    )
    args = p.parse_args(argv)
    if args.repeats < 1 or args.n < 1:
        p.error("--repeats and --n must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    try:
        den, what, card_guidance = build_denoiser(args.weights, device)
        student = load_weights(args.student, device) if args.student_runs and args.student.exists() else None
    except WeightsError as err:
        p.exit(2, f"error: {err}\n")
    T = den.schedule.T
    check_runs(p, [*args.runs, *args.student_runs], T)
    guidance = card_guidance if args.guidance is None else args.guidance
    runs = list(dict.fromkeys([*args.runs, REFERENCE]))  # the reference always runs
    rows = [Row("teacher", den, sampler, steps, guidance) for sampler, steps in runs]
    if student is not None:
        s_guidance = float(student.card.get("sampling", {}).get("guidance", 1.0))
        rows += [Row("student", student.denoiser, sampler, steps, s_guidance) for sampler, steps in args.student_runs]
    assert isinstance(den.model, UNet)  # build_denoiser's, before serving_network lays it out
    flops = flops_per_image(den.model, den.model.config, device)
    peak = matmul_peak(device, args.matmul_size)

    print(f"machine: {describe(device)}")
    print(f"teacher: {what}")
    if student is not None:
        teacher_name = student.card.get("distillation", {}).get("teacher")
        print(f"student: {args.student} ({student.card.get('name')}, distilled from {teacher_name})")
    else:
        print(f"student: {args.student} not found or not asked for: the teacher alone")
    print(f"network: {flops / 1e9:.3f} GFLOP per image per evaluation (torch FlopCounterMode)")
    print(f"matmul peak: {peak:.1f} GFLOP/s (float32 torch.mm, {args.matmul_size}x{args.matmul_size}, best of 1 s)")
    print(
        f"n = {args.n} images, teacher guidance {guidance:g} (2 network evaluations per image and step unless 1), "
        f"median of {args.repeats} run(s){', torch.compile (FASHION_COMPILE=1)' if args.compile else ''}\n"
    )

    dtypes = list(dict.fromkeys(autocast_dtype(p, device) for p in args.precisions))  # auto may be float32
    names = {
        d: str(d).removeprefix("torch.") + (" (auto)" if d == autocast_dtype("auto", device) else "") for d in dtypes
    }
    for dtype in dtypes:
        time_run(den, args.n, "dpm++", 2, guidance, 1, device, dtype)  # warm-up: allocator, kernels, caches
    seconds = {
        (i, dtype): time_run(r.den, args.n, r.sampler, r.steps, r.guidance, args.repeats, device, dtype, args.compile)
        for i, r in enumerate(rows)
        for dtype in dtypes
    }
    reference = runs.index(REFERENCE)
    print(
        "| model | sampler | steps | evaluations/image | precision | seconds | images/s | vs float32 "
        "| vs teacher dpm++ 20 | GFLOP/s | % of float32 matmul peak |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rows):
        for dtype in dtypes:
            sec = seconds[i, dtype]
            vs_fp32 = f"{seconds[i, torch.float32] / sec:.2f}x" if (i, torch.float32) in seconds else ""
            achieved = flops * args.n * r.evaluations / sec / 1e9
            print(
                f"| {r.model} | {r.sampler} | {r.steps} | {r.evaluations} | {names[dtype]} | {sec:.2f} | "
                f"{args.n / sec:.2f} | {vs_fp32} | {seconds[reference, dtype] / sec:.1f}x | {achieved:.1f} | "
                f"{100 * achieved / peak:.0f}% |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
