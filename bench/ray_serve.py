"""Throughput on Ray Serve with 1 and 2 CPU replicas, against the single process, and the proxy's cost.

    python -m bench.ray_serve                  # the shipped weights on this machine's CPU
    python -m bench.ray_serve --tiny           # a tiny random network: checks the script, not the model

Starts each service for real, one after another, on free loopback ports: ``python -m app`` (all
threads, then 1 thread) and ``serve run`` on deploy/ray/serve-cpu.yaml with 1 and 2 replicas of 1
thread each (its own local Ray cluster, stopped after). Each gets the same load: ``--clients``
concurrent clients asking ``--n`` images, ``--requests`` requests in all; images/s is the figure, and
each row's ratio is against the single process with all threads, measured in this run. Then the
proxy's own cost: the median latency of ``GET /healthz`` and of a 1-image, 1-step ``/generate``,
straight to ``python -m app`` and through Ray's proxy. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from app.settings import default_weights_path
from bench.serve import REPO, bench_tiny_weights, machine, start_server
from testkit import servers


@contextmanager
def python_app(weights: Path, threads: int | None) -> Iterator[str]:
    server, url = start_server(weights, "cpu", REPO, threads=threads)
    try:
        yield url
    finally:
        servers.stop(server)


@contextmanager
def ray_serve(weights: Path, replicas: int, work: Path) -> Iterator[str]:
    """``serve run`` on the CPU config with ``replicas`` replicas, until every one answers."""
    config = yaml.safe_load((REPO / "deploy/ray/serve-cpu.yaml").read_text())
    config["http_options"]["port"] = port = servers.free_port()
    config["applications"][0]["deployments"][0]["num_replicas"] = replicas
    path = work / f"serve-{replicas}.yaml"
    path.write_text(yaml.safe_dump(config))
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's sockets live under it
    env = {**os.environ, "FASHION_WEIGHTS": str(weights), "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO)}
    log = (work / f"serve-{replicas}.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "serve"), "run", str(path)], env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while len(asyncio.run(replicas_answering(url))) < replicas:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve run did not come up; see {work / f'serve-{replicas}.log'}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(120)
        log.close()


async def replicas_answering(url: str) -> set[str]:
    async with httpx.AsyncClient(timeout=5) as c:
        rs = await asyncio.gather(*(c.get(f"{url}/readyz") for _ in range(8)), return_exceptions=True)
    return {r.headers.get("x-replica", "") for r in rs if isinstance(r, httpx.Response) and r.status_code == 200}


async def throughput(url: str, body: dict, clients: int, requests: int) -> tuple[float, set[str]]:
    """Images per second with ``clients`` concurrent clients sharing ``requests`` requests."""
    todo = iter(range(requests))
    replicas: set[str] = set()

    async with httpx.AsyncClient(timeout=600) as c:

        async def client() -> None:
            for _ in todo:
                r = await c.post(f"{url}/generate", json=body)
                r.raise_for_status()
                replicas.add(r.headers.get("x-replica", ""))

        await c.post(f"{url}/generate", json={**body, "n": 1})  # warm connections and the engine
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return requests * body["n"] / (time.perf_counter() - t0), replicas


async def latency(url: str, repeats: int) -> tuple[float, float]:
    """Median seconds of GET /healthz and of a 1-image, 1-step /generate, one at a time."""
    async with httpx.AsyncClient(timeout=60) as c:
        health, gen = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            (await c.get(f"{url}/healthz")).raise_for_status()
            health.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            (
                await c.post(f"{url}/generate", json={"class": 0, "n": 1, "steps": 1, "sampler": "ddim"})
            ).raise_for_status()
            gen.append(time.perf_counter() - t0)
    return statistics.median(health), statistics.median(gen)


DIRECT, PROXIED = "python -m app, 1 thread", "Ray Serve, 1 replica x 1 thread"
LATENCY = (DIRECT, PROXIED)  # the same thread count, with and without the proxy


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None, help="default: the shipped weights")
    p.add_argument("--tiny", action="store_true", help="a tiny random network instead (checks the script)")
    p.add_argument("-n", type=int, default=4, help="images per request")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--repeats", type=int, default=30, help="latency samples")
    args = p.parse_args(argv)
    where = machine("cpu")
    body = {"class": 3, "n": args.n}
    rows: list[tuple[str, float, set[str]]] = []
    lat: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = bench_tiny_weights(Path(tmp)) if args.tiny else (args.weights or default_weights_path())
        setups = [
            ("python -m app, all threads", lambda: python_app(weights, None)),
            (DIRECT, lambda: python_app(weights, 1)),
            (PROXIED, lambda: ray_serve(weights, 1, Path(tmp))),
            ("Ray Serve, 2 replicas x 1 thread", lambda: ray_serve(weights, 2, Path(tmp))),
        ]
        for name, start in setups:
            with start() as url:
                rate, replicas = asyncio.run(throughput(url, body, args.clients, args.requests))
                rows.append((name, rate, replicas))
                if name in LATENCY:
                    lat[name] = asyncio.run(latency(url, args.repeats))
    print(
        f"# python -m bench.ray_serve: {weights.name}, the card's sampler, n={args.n} per request, "
        f"{args.clients} clients, {args.requests} requests"
    )
    print(f"# machine: {where}\n")
    print("| service | images/s | vs python -m app (all threads) | replicas that answered |")
    print("|---|---:|---:|---:|")
    for name, rate, replicas in rows:
        print(f"| {name} | {rate:.2f} | {rate / rows[0][1]:.2f} | {len(replicas)} |")
    direct, proxied = lat[DIRECT], lat[PROXIED]
    print(f"\n| request (median of {args.repeats}, one at a time) | python -m app | through Ray's proxy | added |")
    print("|---|---:|---:|---:|")
    for i, what in enumerate(("GET /healthz", "POST /generate n=1, ddim 1 step")):
        added = (proxied[i] - direct[i]) * 1e3
        print(f"| {what} | {direct[i] * 1e3:.1f} ms | {proxied[i] * 1e3:.1f} ms | {added:.1f} ms |")


if __name__ == "__main__":
    main()
