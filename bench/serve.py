"""What the service costs over sampling in-process, and what step-level batching buys.

    python -m bench.serve                       # the shipped weights, on the default device
    python -m bench.serve --server-repo ../old  # the same table against another checkout's server
    python -m bench.serve --tiny --steps 4      # a tiny random network: checks the script, not the model

It starts the real service (``python -m app``, from this checkout or ``--server-repo``) in a
subprocess on a free loopback port and prints one table, each figure a ratio measured in this run:

1. a 1-image request's latency while a 16-image, 200-step DDIM job runs, against an idle server
   (head-of-line blocking; whether it finished before the long job);
2. eight concurrent requests that differ in sampler, steps and guidance, against the same requests
   one by one;
3. ``POST /generate`` with n=16 against the same sampling in-process, in the same precision and layout
   (``model.samplers.sample`` on a batch of 16 + ``to_uint8``, plain and on the service's fixed-row
   chunks): HTTP, queue, PNG, base64 and JSON overhead;
4. 16 concurrent clients asking n=1 each against one client asking n=16;
5. time to the first ``step`` event of a stream, idle and while the long job runs.

Medians over ``--repeats`` runs for 3 and 4; the machine, torch and thread count are printed with it.
Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from app.generation.device import prepare
from app.settings import default_weights_path
from model.io import load_weights
from model.machine import describe
from model.samplers import generators_from_seeds, sample, to_uint8
from testkit import servers
from testkit.weights import tiny_weights

REPO = Path(__file__).resolve().parents[1]


def machine(device: str) -> str:
    """model.machine's one-line description, plus the load average: this machine may be shared."""
    line = describe(device)
    if hasattr(os, "getloadavg"):
        line += f"; load average {os.getloadavg()[0]:.1f} at start"
    return line


class InProcess:
    """The same sampling without the service, in the precision and layout the service runs: plain
    ``sample()`` on the whole batch, and on the service's fixed-row chunks."""

    def __init__(self, weights: Path, device: str, sampler: str, steps: int, guidance: float, precision: str) -> None:
        loaded = load_weights(weights, device)
        # What the service prepares by default (app.generation.device.prepare: the autocast dtype, the layout
        # measured here, fixed-row chunks), and the same network without the chunks.
        served = prepare(loaded, torch.device(device), precision=precision, channels_last="auto", max_rows=128)
        layout = served.layout == "channels_last"
        plain = prepare(loaded, torch.device(device), precision=precision, channels_last=layout, fixed_rows=0)
        self.runtime = served
        self.denoisers = {"plain": plain.denoiser, "fixed_rows": served.denoiser}
        self.device, self.sampler, self.steps, self.guidance = device, sampler, steps, guidance

    def seconds(self, variant: str, n: int, seed: int) -> float:
        labels = torch.full((n,), 3, device=self.device)
        t0 = time.perf_counter()
        with torch.inference_mode(), self.runtime.autocast():
            x = sample(
                self.denoisers[variant],
                labels,
                generators_from_seeds(range(seed, seed + n)),
                self.sampler,
                self.steps,
                self.guidance,
            )
            to_uint8(x)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def start_server(
    weights: Path, device: str, repo: Path, *, threads: int | None = None, **settings: str
) -> tuple[subprocess.Popen[str], str]:
    """``python -m app`` from ``repo`` on a free port, once /readyz says 200 (``threads``: OMP_NUM_THREADS);
    the shell's other FASHION_* variables pass through, so a setting can be benched."""
    env = servers.app_env({"weights": str(weights), "device": device, **settings}, repo=repo, keep=True)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return servers.start_app(
        {}, args=["-m", "app", "--log-level", "warning"], repo=repo, env=env, capture=False, timeout=300
    )


def bench_tiny_weights(directory: Path) -> Path:
    """A tiny random network (``--tiny``): checks the script, not the model."""
    return tiny_weights(directory / "bench-tiny.safetensors", name="bench-tiny", steps=20)


MIXED = [  # eight requests that differ only in sampler, steps and guidance (scenario 2)
    ("dpm++", 10, None),
    ("dpm++", 20, None),
    ("dpm++", 20, 1.0),
    ("ddim", 20, None),
    ("ddim", 40, None),
    ("dpm++", 15, 2.0),
    ("ddim", 30, 1.0),
    ("dpm++", 25, None),
]


async def measure(url: str, local: InProcess, body: dict, n: int, clients: int, repeats: int) -> dict:
    """Every scenario once, then the two throughput ones ``repeats`` times, interleaved with the
    in-process runs so that slow drifts of a shared machine's load stay out of their ratios."""
    runs: dict[str, list[float]] = {k: [] for k in ("plain", "fixed_rows", "single", "concurrent")}
    async with httpx.AsyncClient(base_url=url, timeout=900) as http:

        async def post(payload: dict) -> float:
            t0 = time.perf_counter()
            r = await http.post("/generate", json=payload)
            r.raise_for_status()
            return time.perf_counter() - t0

        async def first_step(payload: dict) -> float:
            from httpx_sse import aconnect_sse

            t0 = time.perf_counter()
            async with aconnect_sse(http, "POST", "/generate/stream", json=payload) as source:
                async for event in source.aiter_sse():
                    if event.event == "step":
                        return time.perf_counter() - t0
            raise RuntimeError("the stream ended without a step")

        # Warm up both sides, and open one keep-alive connection per client, as long-lived clients hold.
        local.seconds("plain", n, 0)
        local.seconds("fixed_rows", n, 0)
        await post({**body, "n": n})
        await asyncio.gather(*(post({**body, "n": 1}) for _ in range(clients)))

        # 1 and 5: a short request and a stream, idle and beside a long job.
        one = {**body, "n": 1, "seed": 7}
        runs["idle_one"] = [await post(one)]
        runs["idle_first_step"] = [await first_step(one)]
        long = asyncio.ensure_future(post({**body, "n": 16, "sampler": "ddim", "steps": 200, "seed": 1}))
        await asyncio.sleep(2.0)  # well inside the long job; then both at once, beside it
        short = asyncio.ensure_future(post(one))
        stream = asyncio.ensure_future(first_step({**one, "seed": 8}))
        runs["loaded_one"] = [await short]
        runs["short_first"] = [0.0 if long.done() else 1.0]
        runs["loaded_first_step"] = [await stream]
        runs["long"] = [await long]

        # 2: mixed parameters, together and one by one.
        mixed = [
            {**body, "n": 2, "seed": k, "sampler": s, "steps": st, **({} if g is None else {"guidance": g})}
            for k, (s, st, g) in enumerate(MIXED)
        ]
        runs["mixed_serial"] = [sum([await post(m) for m in mixed])]
        t0 = time.perf_counter()
        await asyncio.gather(*(post(m) for m in mixed))
        runs["mixed_together"] = [time.perf_counter() - t0]

        # 3 and 4.
        for r in range(repeats):
            runs["plain"].append(local.seconds("plain", n, r))
            runs["fixed_rows"].append(local.seconds("fixed_rows", n, r))
            runs["single"].append(await post({**body, "n": n, "seed": r}))
            t0 = time.perf_counter()
            await asyncio.gather(*(post({**body, "n": 1, "seed": 1000 * r + k}) for k in range(clients)))
            runs["concurrent"].append(time.perf_counter() - t0)
    return runs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None, help="weights .safetensors (default: the shipped weights)")
    p.add_argument("--tiny", action="store_true", help="use a tiny random network instead (checks the script)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sampler", default=None, help="default: the weights card's")
    p.add_argument("--steps", type=int, default=None, help="default: the weights card's")
    p.add_argument("--guidance", type=float, default=None, help="default: the weights card's")
    p.add_argument("-n", type=int, default=16, help="images per big request")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients asking n=1 each")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--server-repo", type=Path, default=REPO, help="the checkout whose service to start")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="of both the service and the in-process sampling (auto: what FASHION_PRECISION=auto picks here)",
    )
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        weights = bench_tiny_weights(Path(tmp)) if args.tiny else (args.weights or default_weights_path())
        card = load_weights(weights, "cpu").card
        section = card.get("sampling") or {}
        sampler = args.sampler or section.get("sampler", "dpm++")
        steps = args.steps or section.get("steps", 20)
        guidance = args.guidance if args.guidance is not None else section.get("guidance", 1.0)
        where = machine(args.device)

        local = InProcess(weights, args.device, sampler, steps, guidance, args.precision)
        # The service in the same precision and layout as the in-process rows, so that row 3 is overhead alone.
        precision, channels_last = local.runtime.precision, str(local.runtime.layout == "channels_last")
        repo = args.server_repo.resolve()
        server, url = start_server(weights, args.device, repo, precision=precision, channels_last=channels_last)
        try:
            body = {"class": 3, "sampler": sampler, "steps": steps, "guidance": guidance}
            runs = asyncio.run(measure(url, local, body, args.n, args.clients, args.repeats))
        finally:
            servers.stop(server, 30)

    n, c = args.n, args.clients
    name = card.get("name", weights.stem)
    med = {key: statistics.median(values) for key, values in runs.items()}
    precision, layout = local.runtime.precision, local.runtime.layout
    print(f"# python -m bench.serve: {name}, {sampler} {steps} steps, guidance {guidance}, {args.device}")
    print(f"# precision {precision}, layout {layout}: the service and the in-process sampling alike")
    print(f"# server: {args.server_repo.resolve()} ({git_head(args.server_repo)})")
    print(f"# machine: {where}")
    print(f"# scenarios 1, 2, 5 once; 3 and 4 medians of {args.repeats} runs\n")
    print("| # | measurement | seconds | ratio | target |")
    print("|---|---|---:|---:|---|")

    def row(k: str, what: str, key: str, ratio: str = "", target: str = "") -> None:
        print(f"| {k} | {what} | {med[key]:.3f} | {ratio} | {target} |")

    def ratio(f: Callable[[int], float]) -> float:
        return statistics.median(f(r) for r in range(args.repeats))

    first = "finished before the long job" if med["short_first"] else "finished AFTER the long job"
    row("1", "n=1 on an idle server", "idle_one")
    row(
        "1",
        f"n=1 beside a 16-image ddim-200 job ({first})",
        "loaded_one",
        f"{med['loaded_one'] / med['idle_one']:.1f}x idle",
        "<= 8x, before the long job",
    )
    row("1", "the 16-image ddim-200 job", "long")
    row("2", "8 requests, mixed sampler/steps/guidance, one by one", "mixed_serial")
    row("2", "the same 8 at once", "mixed_together", f"{med['mixed_together'] / med['mixed_serial']:.2f}", "<= 0.7")
    overhead = ratio(lambda r: runs["single"][r] / runs["plain"][r])
    own = ratio(lambda r: runs["single"][r] / runs["fixed_rows"][r])
    gain = ratio(lambda r: (c / runs["concurrent"][r]) / (n / runs["single"][r]))
    row("3", f"in-process sample(), n={n}", "plain")
    row("3", f"in-process, fixed rows as served, n={n}", "fixed_rows")
    row("3", f"POST /generate n={n}", "single", f"{overhead:.2f} ({own:.2f} of fixed rows)", "<= 1.10")
    row("4", f"{c} clients at once, n=1 each", "concurrent", f"{gain:.2f} of one n={n}", ">= 0.9")
    row("5", "time to first step, idle", "idle_first_step")
    row(
        "5",
        "time to first step beside the long job",
        "loaded_first_step",
        f"{med['loaded_first_step'] / med['idle_first_step']:.1f}x idle",
    )


def git_head(repo: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
        return out.stdout.strip()[:72] or "not a git checkout"
    except OSError:
        return "git not found"


if __name__ == "__main__":
    main()
