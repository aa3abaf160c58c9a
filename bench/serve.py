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
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.device import FixedRows  # noqa: E402
from app.settings import default_weights_path  # noqa: E402
from model.io import load_weights, save_weights  # noqa: E402
from model.samplers import generators_from_seeds, sample, to_uint8  # noqa: E402
from model.unet import UNet, UNetConfig  # noqa: E402


def tiny_weights(directory: Path) -> Path:
    """A small random U-Net (v-prediction keeps its output bounded) for checking the script."""
    config = UNetConfig(base_channels=8, channel_mults=(1, 2), attention_stages=(), groups=4)
    torch.manual_seed(0)
    net = UNet(config)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
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
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    if hasattr(os, "getloadavg"):
        parts.append(f"load average {os.getloadavg()[0]:.1f} at start")
    return "; ".join(parts)


def in_process(weights: Path, device: str, sampler: str, steps: int, guidance: float, n: int, repeats: int) -> dict:
    """Median seconds of sampling n images in this process: plain, and with the service's fixed rows."""
    loaded = load_weights(weights, device)
    labels = torch.full((n,), 3, device=device)
    out = {}
    for name, rows in (("plain", 0), ("fixed_rows", 8 if device == "cpu" else 128)):
        den = replace(loaded.denoiser, model=FixedRows(loaded.model, rows)) if rows else loaded.denoiser
        times = []
        for r in range(repeats + 1):  # the first run warms up
            t0 = time.perf_counter()
            with torch.inference_mode():
                to_uint8(sample(den, labels, generators_from_seeds(range(r, r + n)), sampler, steps, guidance))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if r:
                times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


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


async def over_http(url: str, body: dict, n: int, clients: int, repeats: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def post(payload: dict) -> None:
            r = await http.post("/generate", json=payload)
            r.raise_for_status()

        await post({**body, "n": n})  # warm the connection pool and the server
        single, concurrent = [], []
        for r in range(repeats):
            t0 = time.perf_counter()
            await post({**body, "n": n, "seed": r})
            single.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await asyncio.gather(*(post({**body, "n": 1, "seed": 1000 * r + k}) for k in range(clients)))
            concurrent.append(time.perf_counter() - t0)
    return {"single": statistics.median(single), "concurrent": statistics.median(concurrent)}


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

        local = in_process(weights, args.device, sampler, steps, guidance, args.n, args.repeats)
        port = free_port()
        server = start_server(weights, args.device, port)
        try:
            body = {"class": 3, "sampler": sampler, "steps": steps, "guidance": guidance}
            http = asyncio.run(over_http(f"http://127.0.0.1:{port}", body, args.n, args.clients, args.repeats))
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

    def row(what: str, seconds: float, images: int, ratio: str = "") -> None:
        print(f"| {what} | {seconds:.3f} | {images / seconds:.1f} | {ratio} |")

    row(f"in-process sample(), n={n}", local["plain"], n)
    row(f"in-process, fixed rows as served, n={n}", local["fixed_rows"], n)
    row(f"POST /generate n={n}", http["single"], n, f"{http['single'] / local['plain']:.2f} (target <= 1.1)")
    gain = (c / http["concurrent"]) / (n / http["single"])
    row(f"{c} concurrent clients, n=1 each", http["concurrent"], c, f"{gain:.2f} of one n={n} (target >= 0.8)")


if __name__ == "__main__":
    main()
