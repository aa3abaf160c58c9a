"""How much the service costs over sampling in-process, and what dynamic batching buys.

    python bench/serve.py                       # the shipped weights, on the default device
    python bench/serve.py --weights path/to/w.safetensors --device cuda
    python bench/serve.py --tiny --steps 4      # a tiny random network: checks the script, not the model

It starts the real service (``python -m app``) in a subprocess on a free loopback port and
prints one table:

* latency of ``POST /generate`` with n=16 against the same sampling done in-process
  (``model.samplers.sample`` on a batch of 16 + ``to_uint8``); the ratio is the service's
  overhead (HTTP, queue, batching wait, fixed-row chunks, PNG + base64 + JSON);
* throughput of 16 concurrent clients asking n=1 each against one client asking n=16;
  the ratio is what batching recovers of a single big batch.

Medians over ``--repeats`` runs; the machine, torch and thread count are printed with it.
Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.device import FixedRows  # noqa: E402
from app.settings import default_weights_path  # noqa: E402
from model.io import load_weights, save_weights  # noqa: E402
from model.machine import describe  # noqa: E402
from model.samplers import generators_from_seeds, sample, to_uint8  # noqa: E402
from model.unet import UNetConfig, perturbed_unet  # noqa: E402


def tiny_weights(directory: Path) -> Path:
    """A small random U-Net (v-prediction keeps its output bounded) for checking the script."""
    config = UNetConfig(base_channels=8, channel_mults=(1, 2), attention_stages=(), groups=4)
    net = perturbed_unet(config)
    card = {
        "name": "bench-tiny",
        "unet": config.to_dict(),
        "diffusion": {"schedule": "cosine", "T": 1000, "prediction": "v"},
        "sampling": {"sampler": "dpm++", "steps": 20, "guidance": 2.0},
    }
    path = directory / "bench-tiny.safetensors"
    save_weights(net, card, path)
    return path


def machine(device: str) -> str:
    """model.machine's one-line description, plus the load average: this machine may be shared."""
    line = describe(device)
    if hasattr(os, "getloadavg"):
        line += f"; load average {os.getloadavg()[0]:.1f} at start"
    return line


class InProcess:
    """The same sampling without the service: plain ``sample()``, and with the service's fixed rows."""

    def __init__(self, weights: Path, device: str, sampler: str, steps: int, guidance: float) -> None:
        loaded = load_weights(weights, device)
        rows = 8 if device == "cpu" else 128  # what app.device.prepare picks by default
        self.denoisers = {
            "plain": loaded.denoiser,
            "fixed_rows": replace(loaded.denoiser, model=FixedRows(loaded.model, rows)),
        }
        self.device, self.sampler, self.steps, self.guidance = device, sampler, steps, guidance

    def seconds(self, variant: str, n: int, seed: int) -> float:
        labels = torch.full((n,), 3, device=self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(weights: Path, device: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FASHION_WEIGHTS": str(weights), "FASHION_DEVICE": device, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "app", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not become ready in 300 s")
        time.sleep(0.2)


async def batches_so_far(http: httpx.AsyncClient) -> float:
    """fashion_batch_size_jobs_count from the server's /metrics: how many batches it has sampled."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample_ in family.samples:
            if sample_.name == "fashion_batch_size_jobs_count":
                return sample_.value
    return 0.0


async def measure(url: str, local: InProcess, body: dict, n: int, clients: int, repeats: int) -> dict:
    """Per repeat, in turn: in-process (plain, fixed rows), one client n, ``clients`` clients n=1.

    Interleaving keeps slow drifts of a shared machine's load out of the ratios."""
    runs: dict[str, list[float]] = {k: [] for k in ("plain", "fixed_rows", "single", "concurrent", "batches")}
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def post(payload: dict) -> None:
            r = await http.post("/generate", json=payload)
            r.raise_for_status()

        # Warm up both sides, and open one keep-alive connection per client, as long-lived clients hold.
        local.seconds("plain", n, 0)
        local.seconds("fixed_rows", n, 0)
        await post({**body, "n": n})
        await asyncio.gather(*(post({**body, "n": 1}) for _ in range(clients)))
        for r in range(repeats):
            runs["plain"].append(local.seconds("plain", n, r))
            runs["fixed_rows"].append(local.seconds("fixed_rows", n, r))
            t0 = time.perf_counter()
            await post({**body, "n": n, "seed": r})
            runs["single"].append(time.perf_counter() - t0)
            before = await batches_so_far(http)
            t0 = time.perf_counter()
            await asyncio.gather(*(post({**body, "n": 1, "seed": 1000 * r + k}) for k in range(clients)))
            runs["concurrent"].append(time.perf_counter() - t0)
            runs["batches"].append(await batches_so_far(http) - before)
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
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        weights = tiny_weights(Path(tmp)) if args.tiny else (args.weights or default_weights_path())
        card = load_weights(weights, "cpu").card
        section = card.get("sampling") or {}
        sampler = args.sampler or section.get("sampler", "dpm++")
        steps = args.steps or section.get("steps", 20)
        guidance = args.guidance if args.guidance is not None else section.get("guidance", 1.0)
        where = machine(args.device)

        local = InProcess(weights, args.device, sampler, steps, guidance)
        port = free_port()
        server = start_server(weights, args.device, port)
        try:
            body = {"class": 3, "sampler": sampler, "steps": steps, "guidance": guidance}
            runs = asyncio.run(measure(f"http://127.0.0.1:{port}", local, body, args.n, args.clients, args.repeats))
        finally:
            server.terminate()
            server.wait(30)

    n, c = args.n, args.clients
    name = card.get("name", weights.stem)
    print(f"# bench/serve.py: {name}, {sampler} {steps} steps, guidance {guidance}, {args.device}")
    print(f"# machine: {where}")
    print(f"# medians of {args.repeats} runs\n")
    print("| measurement | seconds | images/s | ratio |")
    print("|---|---:|---:|---:|")

    def row(what: str, key: str, images: int, ratio: str = "") -> None:
        seconds = statistics.median(runs[key])
        print(f"| {what} | {seconds:.3f} | {images / seconds:.1f} | {ratio} |")

    def ratio(f: Callable[[int], float]) -> float:
        return statistics.median(f(r) for r in range(args.repeats))

    overhead = ratio(lambda r: runs["single"][r] / runs["plain"][r])
    own = ratio(lambda r: runs["single"][r] / runs["fixed_rows"][r])
    gain = ratio(lambda r: (c / runs["concurrent"][r]) / (n / runs["single"][r]))
    batches = statistics.median(runs["batches"])
    row(f"in-process sample(), n={n}", "plain", n)
    row(f"in-process, fixed rows as served, n={n}", "fixed_rows", n)
    row(f"POST /generate n={n}", "single", n, f"{overhead:.2f} of in-process (target <= 1.1); {own:.2f} of fixed rows")
    row(
        f"{c} clients at once, n=1 each ({batches:.0f} batches)",
        "concurrent",
        c,
        f"{gain:.2f} of one n={n} (target >= 0.8)",
    )


if __name__ == "__main__":
    main()
