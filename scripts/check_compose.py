"""Assertions on the rendered compose model (``docker compose config`` or podman-compose's), run by
``scripts/static-checks.sh``: the GPU reservation, health check, ports, Prometheus wiring, the CPU
variant, and a stop grace period that covers the service's drain.

    python scripts/check_compose.py GPU_RENDERED.yml CPU_RENDERED.yml RAY_RENDERED.yml deploy/prometheus.yml
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

DRAIN_SECONDS = 30  # FASHION_DRAIN_SECONDS's default (app/settings.py)
DRAIN_MARGIN_S = 5  # what python -m app gives uvicorn beyond the drain (app/__main__.py)


class Checks:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def __call__(self, ok: bool, what: str) -> None:
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            self.problems.append(what)


def seconds(value: Any) -> float:
    """Compose durations: 180, "180s", "3m0s" (docker compose renders Go durations); -1 if unreadable."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", str(value))
    return sum(float(n) * units[u] for n, u in parts) if parts else -1.0


def env(service: dict[str, Any]) -> dict[str, Any]:
    e = service.get("environment") or {}
    if isinstance(e, list):
        e = dict(item.split("=", 1) if "=" in item else (item, None) for item in e)
    return e


def published(service: dict[str, Any]) -> set[tuple[str, str]]:
    out = set()
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out.add((str(p.get("published")), str(p.get("target"))))
        else:
            *_, pub, target = str(p).split(":")
            out.add((pub, target.split("/")[0]))
    return out


def mount_targets(service: dict[str, Any]) -> list[str]:
    """Where each volume is mounted in the container (long or short syntax)."""
    return [str(v.get("target")) if isinstance(v, dict) else str(v).split(":")[1] for v in service.get("volumes") or []]


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


def check_gpu(check: Checks, gpu: dict[str, Any], prom: dict[str, Any]) -> None:
    services = gpu.get("services", {})
    check({"fashion", "prometheus"} <= set(services), "services fashion and prometheus exist")
    app, prometheus = services.get("fashion", {}), services.get("prometheus", {})

    nvidia = [d for d in gpu_devices(app) if d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])]
    check(bool(nvidia), "GPU reservation: deploy.resources.reservations.devices has driver nvidia, capabilities [gpu]")
    check(
        any(str(d.get("count")) in ("1", "all", "-1") or d.get("device_ids") for d in nvidia),
        "GPU reservation asks for count 1 / all (or device_ids)",
    )
    check(env(app).get("FASHION_DEVICE") == "cuda", "FASHION_DEVICE=cuda in the GPU variant")

    hc = app.get("healthcheck") or {}
    check("/readyz" in " ".join(map(str, hc.get("test") or [])), "healthcheck probes /readyz")
    check(seconds(hc.get("start_period", 0)) >= 60, f"healthcheck start_period >= 60s (got {hc.get('start_period')})")
    check(
        app.get("restart") in ("always", "unless-stopped", "on-failure"), f"restart policy (got {app.get('restart')})"
    )
    check(("8000", "8000") in published(app), "fashion publishes port 8000")
    drain = float(env(app).get("FASHION_DRAIN_SECONDS") or DRAIN_SECONDS)
    grace = seconds(app.get("stop_grace_period", "10s"))
    check(
        grace > drain + DRAIN_MARGIN_S,
        f"stop_grace_period ({grace:.0f} s) outlasts the drain ({drain:.0f} s) and {DRAIN_MARGIN_S} s after it",
    )

    image = str(prometheus.get("image", ""))
    check(image.startswith(("prom/prometheus", "docker.io/prom/prometheus")), "prometheus image")
    check(("9090", "9090") in published(prometheus), "prometheus publishes port 9090")
    mounts = " ".join(
        str(v.get("source", "")) + ":" + str(v.get("target", "")) if isinstance(v, dict) else str(v)
        for v in prometheus.get("volumes") or []
    )
    check(
        "deploy/prometheus.yml" in mounts and "/etc/prometheus/prometheus.yml" in mounts,
        "prometheus mounts deploy/prometheus.yml",
    )
    jobs = prom.get("scrape_configs", [])
    targets = [t for job in jobs for sc in job.get("static_configs", []) for t in sc.get("targets", [])]
    paths = {job.get("metrics_path", "/metrics") for job in jobs}
    check("fashion:8000" in targets and paths == {"/metrics"}, "deploy/prometheus.yml scrapes fashion:8000/metrics")


def check_cpu(check: Checks, cpu: dict[str, Any]) -> None:
    app = (cpu.get("services") or {}).get("fashion", {})
    check(not gpu_devices(app), "CPU variant has no device reservation")
    check(env(app).get("FASHION_DEVICE") == "cpu", "CPU variant sets FASHION_DEVICE=cpu")
    check("prometheus" in (cpu.get("services") or {}), "CPU variant keeps prometheus")


def check_ray(check: Checks, ray: dict[str, Any], prom: dict[str, Any]) -> None:
    """docker-compose.ray.yml: the same image under Ray Serve, every GPU, Prometheus on Ray's discovery file."""
    services = ray.get("services", {})
    app, prometheus = services.get("fashion", {}), services.get("prometheus", {})
    command = " ".join(map(str, app.get("command") or []))
    check("ray start --head" in command and "serve run deploy/ray/serve.yaml" in command, "Ray: starts Ray, serves")
    check("--metrics-export-port=8080" in command, "Ray: a fixed metrics export port")
    check(str(app.get("image", "")).startswith("fashion-diffusion"), "Ray: the same image as docker-compose.yml")
    nvidia = [d for d in gpu_devices(app) if d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])]
    check(any(str(d.get("count")) in ("all", "-1") for d in nvidia), "Ray: reserves every host GPU (count all)")
    serve_config = yaml.safe_load((REPO / "deploy/ray/serve.yaml").read_text())
    proxy_env = (((serve_config.get("controller_options") or {}).get("runtime_env") or {}).get("env_vars")) or {}
    check(
        proxy_env.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH") == "app.ray.proxy:middlewares",
        "Ray: deploy/ray/serve.yaml has the proxy load app.ray.proxy",
    )
    check(("8000", "8000") in published(app), "Ray: the proxy publishes port 8000")
    exposed = {target for _, target in published(app)} - {"8000"}
    check(not exposed and "--dashboard-host" not in command, "Ray: the dashboard (it runs jobs) is not published")
    check(
        "/tmp/ray" in mount_targets(app) and "/tmp/ray" in mount_targets(prometheus),
        "Ray: /tmp/ray shared with Prometheus",
    )
    files = [
        f
        for job in prom.get("scrape_configs", [])
        for sd in job.get("file_sd_configs", [])
        for f in sd.get("files", [])
    ]
    check(
        "/tmp/ray/prom_metrics_service_discovery.json" in files,
        "deploy/prometheus.yml reads Ray's service discovery file",
    )
    grace = seconds(app.get("stop_grace_period", "10s"))
    check(grace > 30 + DRAIN_MARGIN_S, f"Ray: stop_grace_period ({grace:.0f} s) outlasts Serve's graceful shutdown")


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    gpu, cpu, ray, prom = (yaml.safe_load(Path(path).read_text()) for path in argv)
    check = Checks()
    check_gpu(check, gpu, prom)
    check_cpu(check, cpu)
    check_ray(check, ray, prom)
    return 1 if check.problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
