"""Training speed in one process and as torchrun ranks: images/s of the shipped network's training
steps on the CPU, each launch measured side by side in one run.

    python -m bench.train_scaling                          # 1 process vs torchrun --nproc-per-node 2, 1 thread each
    python -m bench.train_scaling --ranks 1 2 4 --steps 30 --repeats 2

Every launch is a real ``python -m model.train`` (for 1) or ``torchrun --nproc-per-node N -m model.train``
of one short epoch on the same global batch, with the shipped network's config (weights/fashion-unet.json's
"unet"; the UNetConfig of base 48, channel mults 1 3, attention at stage 1 without the file). It logs every
step, and the figure is the median of the steps after --warmup: rank 0's images of the global batch over
its wall time per step, the gradient all-reduce included; start-up, validation and export are not counted.
With --repeats the launches are interleaved (1, 2, 1, 2, ...), so that a drift in the machine's speed
shows in both. Prints a Markdown table, with the machine it ran on. Run it on an otherwise idle machine:
the ranks must not share cores with anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from model.data import ENV_DIR
from model.machine import describe
from model.unet import UNetConfig
from testkit.servers import free_port

REPO = Path(__file__).resolve().parents[1]
SHIPPED_FALLBACK = {"base_channels": 48, "channel_mults": [1, 3], "attention_stages": [1]}


def network_flags(card_path: Path) -> tuple[list[str], str]:
    """model.train's flags for the shipped network, and where its config came from."""
    if card_path.exists():
        unet, source = json.loads(card_path.read_text())["unet"], str(card_path)
    else:
        unet, source = SHIPPED_FALLBACK, f"{card_path} not found: UNetConfig defaults with {SHIPPED_FALLBACK}"
    config = UNetConfig(**{**UNetConfig().to_dict(), **unet})
    if config.attention_heads != UNetConfig().attention_heads:
        raise SystemExit(f"error: {source}: attention_heads={config.attention_heads} has no model.train flag")
    flags = [
        *("--base-channels", str(config.base_channels), "--channel-mults", *map(str, config.channel_mults)),
        *("--blocks-per-stage", str(config.blocks_per_stage), "--attention-stages", *map(str, config.attention_stages)),
        *("--stem-patch", str(config.stem_patch), "--groups", str(config.groups), "--dropout", str(config.dropout)),
    ]
    return flags, source


def launch(ranks: int, train_args: list[str], threads: int, run: Path) -> list[float]:
    """Train once as ``ranks`` processes; the images/s of each logged step, in order."""
    if ranks == 1:
        command = [sys.executable, "-m", "model.train"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
        command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "model.train"]
    command += [*train_args, "--run-dir", str(run), "--weights-dir", str(run / "weights")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["images_per_s"] for r in rows if r["kind"] == "train"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_scaling", description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="processes per launch; 1: no torchrun")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of each process")
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split among the ranks")
    p.add_argument("--steps", type=int, default=20, help="timed steps per launch")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels, caches)")
    p.add_argument("--repeats", type=int, default=1, help="launches per row, interleaved; the median is reported")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--data-dir", default=os.environ.get(ENV_DIR) or str(REPO.parent / "shared/data/fashion-mnist"))
    p.add_argument("--card", type=Path, default=REPO / "weights" / "fashion-unet.json")
    args = p.parse_args(argv)
    if min(args.ranks) < 1 or args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.threads < 1:
        p.error("--ranks, --steps, --repeats and --threads must be at least 1, --warmup at least 0")
    for n in args.ranks:
        if args.batch_size % n:
            p.error(f"--batch-size {args.batch_size} does not divide among {n} ranks")

    flags, source = network_flags(args.card)
    steps = args.warmup + args.steps
    train_args = [
        *flags,
        *("--epochs", "1", "--batch-size", str(args.batch_size), "--train-limit", str(args.batch_size * steps)),
        *("--val-size", "10", "--sample-steps", "1", "--threads", str(args.threads), "--device", "cpu"),
        *("--precision", args.precision, "--log-every", "1", "--no-progress", "--name", "bench"),
        *("--data-dir", args.data_dir),
        *(["--channels-last"] if args.channels_last else []),
    ]
    print(f"machine: {describe('cpu', args.threads)} per process")
    print(f"network: {source}")
    print(
        f"global batch {args.batch_size}, {args.precision}{', channels-last' if args.channels_last else ''}; "
        f"median of {args.steps} steps after {args.warmup} untimed, {args.repeats} launch(es) per row"
    )
    if max(args.ranks) * args.threads > (os.cpu_count() or 1):
        print(f"warning: {max(args.ranks)} ranks x {args.threads} threads exceed the {os.cpu_count()} logical CPUs")
    print()

    rates: dict[int, list[float]] = {n: [] for n in args.ranks}
    with tempfile.TemporaryDirectory(prefix="train-scaling-") as tmp:
        for r in range(args.repeats):
            for n in args.ranks:
                rates[n] += launch(n, train_args, args.threads, Path(tmp) / f"run{r}-{n}")[args.warmup :]
    base, first = statistics.median(rates[args.ranks[0]]), args.ranks[0]
    print(f"| processes | launcher | images per rank and step | images/s | speed-up | per process (vs {first}) |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in args.ranks:
        rate = statistics.median(rates[n])
        launcher = "python -m model.train" if n == 1 else f"torchrun --nproc-per-node {n}"
        speedup = rate / base
        print(
            f"| {n} | {launcher} | {args.batch_size // n} | {rate:.1f} | {speedup:.2f}x | {speedup * first / n:.0%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
