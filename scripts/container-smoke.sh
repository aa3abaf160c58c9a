#!/usr/bin/env bash
# Build the image and prove the container serves: it becomes ready (and its HEALTHCHECK passes),
# GET /models lists the shipped models (the teacher first), POST /generate returns n decodable 28x28 grayscale PNGs, /metrics counts them, the server
# process is not root, and it stops cleanly on SIGTERM. The container is removed whatever happens;
# the script exits non-zero on any failure.
#
#   scripts/container-smoke.sh
#
# Environment (all optional):
#   CONTAINER_ENGINE  docker or podman; default: docker when a Docker engine answers, else podman
#   IMAGE             tag to build and run (fashion-diffusion:smoke)
#   BUILD_FLAGS       extra build flags; RUN_FLAGS extra run flags. With podman on a machine that has
#                     ../shared/tools/containers.sh (a Podman set up without a Docker engine), that
#                     script's build-flags and run-flags are the defaults.
#   SKIP_BUILD=1      run an image built before
#   BUILD_CONTEXT     the build context (the repository root; e.g. a `git archive` export instead)
#   SMOKE_WEIGHTS     a .safetensors file (its .json card beside it) to mount instead of the baked weights
#   SMOKE_N (16), SMOKE_CLASS (3), SMOKE_STEPS (10), READY_TIMEOUT (seconds, 600)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-fashion-diffusion:smoke}
NAME=fashion-smoke-$$
SMOKE_N=${SMOKE_N:-16}
SMOKE_CLASS=${SMOKE_CLASS:-3}
SMOKE_STEPS=${SMOKE_STEPS:-10}
READY_TIMEOUT=${READY_TIMEOUT:-600}
HERE_TOOLS=../shared/tools/containers.sh

if [ -z "${CONTAINER_ENGINE:-}" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then CONTAINER_ENGINE=docker; else CONTAINER_ENGINE=podman; fi
fi
ENGINE=$CONTAINER_ENGINE
command -v "$ENGINE" >/dev/null || { echo "FAIL: $ENGINE not found (set CONTAINER_ENGINE)"; exit 1; }
if [ "$ENGINE" = podman ] && [ -x "$HERE_TOOLS" ]; then
  BUILD_FLAGS=${BUILD_FLAGS-$("$HERE_TOOLS" build-flags)}
  RUN_FLAGS=${RUN_FLAGS-$("$HERE_TOOLS" run-flags)}
fi
read -r -a build_flags <<<"${BUILD_FLAGS:-}"
read -r -a run_flags <<<"${RUN_FLAGS:-}"

tmp=$(mktemp -d)
started=0
cleanup() {
  local rc=$?
  if [ "$started" = 1 ]; then
    if [ "$rc" != 0 ]; then
      echo "--- last container logs ---"
      "$ENGINE" logs --tail 40 "$NAME" 2>&1 || true
    fi
    "$ENGINE" rm -f "$NAME" >/dev/null 2>&1 || true
    if "$ENGINE" container exists "$NAME" 2>/dev/null || "$ENGINE" inspect "$NAME" >/dev/null 2>&1; then
      echo "FAIL: container $NAME still exists"; rc=1
    fi
  fi
  rm -rf "$tmp"
  [ "$rc" = 0 ] && echo "container smoke: PASSED" || echo "container smoke: FAILED"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
step() { printf '\n== %s\n' "$*"; }
# Podman without systemd complains that it cannot set up healthcheck timers; the check is run by hand below.
engine() { "$ENGINE" "$@" 2> >(grep -v 'systemd connection' >&2); }
die() { echo "FAIL: $*"; exit 1; }

echo "engine: $ENGINE ($("$ENGINE" --version))"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step "build $IMAGE"
  fmt=()
  [ "$ENGINE" = podman ] && fmt=(--format docker)  # OCI images drop HEALTHCHECK; keep it
  t0=$SECONDS
  "$ENGINE" build "${fmt[@]}" "${build_flags[@]}" -t "$IMAGE" "${BUILD_CONTEXT:-.}" 2>&1 | tee "$tmp/build.log" | grep -E '^(STEP|Step|COMMIT|--> Using cache|#[0-9]+ (\[|CACHED)|install_deps:)' || true
  [ "${PIPESTATUS[0]}" = 0 ] || { tail -30 "$tmp/build.log"; die "build failed"; }
  echo "built in $((SECONDS - t0)) s; size $("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE") bytes"
fi

step "image configuration"
user=$("$ENGINE" image inspect --format '{{.Config.User}}' "$IMAGE")
health=$("$ENGINE" image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")
ports=$("$ENGINE" image inspect --format '{{json .Config.ExposedPorts}}' "$IMAGE")
echo "User=$user ExposedPorts=$ports"
echo "Healthcheck=$health"
case "$user" in "" | 0 | 0:* | root | root:*) die "the image runs as root (USER '$user')" ;; esac
[[ "$health" == *"/readyz"* ]] || die "no HEALTHCHECK on /readyz in the image"
[[ "$ports" == *"8000/tcp"* ]] || die "port 8000 not exposed"

step "run"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
net=(-p "127.0.0.1:$port:8000")
if [[ " ${run_flags[*]} " == *" --network host "* || " ${run_flags[*]} " == *"--network=host"* || " ${run_flags[*]} " == *" --net=host "* ]]; then
  net=(-e UVICORN_HOST=127.0.0.1 -e "UVICORN_PORT=$port")  # the host's network: listen on loopback only
fi
mounts=()
if [ -n "${SMOKE_WEIGHTS:-}" ]; then
  w=$(realpath "$SMOKE_WEIGHTS")
  [ -f "$w" ] && [ -f "${w%.safetensors}.json" ] || die "SMOKE_WEIGHTS: $w or its .json card is missing"
  mounts=(-v "$(dirname "$w"):/smoke-weights:ro" -e "FASHION_WEIGHTS=/smoke-weights/$(basename "$w")")
fi
engine run -d --name "$NAME" "${run_flags[@]}" "${net[@]}" "${mounts[@]}" -e FASHION_DEVICE=cpu "$IMAGE" >/dev/null
started=1
base=http://127.0.0.1:$port
echo "container $NAME at $base"

step "wait for readiness"
t0=$SECONDS
code=000
while [ $((SECONDS - t0)) -lt "$READY_TIMEOUT" ]; do
  [ "$("$ENGINE" inspect --format '{{.State.Running}}' "$NAME")" = true ] || die "the container exited: $("$ENGINE" inspect --format '{{.State.ExitCode}}' "$NAME")"
  code=$(curl -s -o "$tmp/readyz.json" -w '%{http_code}' "$base/readyz" || true)
  [ "$code" = 200 ] && break
  sleep 2
done
[ "$code" = 200 ] || die "/readyz still answers $code after $READY_TIMEOUT s"
echo "ready after $((SECONDS - t0)) s: $(cat "$tmp/readyz.json")"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$base/healthz")" = 200 ] || die "/healthz is not 200"

step "HEALTHCHECK"
if [ "$ENGINE" = podman ]; then
  # Podman runs healthchecks from systemd timers, absent here: run the image's check once by hand.
  "$ENGINE" healthcheck run "$NAME" || die "podman healthcheck run: unhealthy"
  echo "podman healthcheck run: healthy"
else
  status=starting
  for _ in $(seq 60); do
    status=$("$ENGINE" inspect --format '{{.State.Health.Status}}' "$NAME")
    [ "$status" = starting ] || break
    sleep 2
  done
  [ "$status" = healthy ] || die "docker health status: $status"
  echo "docker health status: healthy"
fi

step "GET /models"
code=$(curl -s -o "$tmp/models.json" -w '%{http_code}' "$base/models")
[ "$code" = 200 ] || die "/models answered $code: $(head -c 400 "$tmp/models.json")"
python3 - "$tmp/models.json" "${SMOKE_WEIGHTS:+mounted}" <<'PY' || die "/models does not list the served models"
import json
import sys

doc = json.load(open(sys.argv[1]))
assert doc["object"] == "list" and doc["data"], "no models listed"
ids = [m["id"] for m in doc["data"]]
assert doc["data"][0]["default"] and not any(m["default"] for m in doc["data"][1:]), "the first is not the default"
if not sys.argv[2]:  # the baked weights: the teacher first (and the student beside it once shipped)
    assert ids[0] == "fashion-unet", f"models {ids}: the shipped teacher is not first"
print("models: " + ", ".join(f"{m['id']} ({m['kind']}, {m['sampler']} {m['steps']} steps)" for m in doc["data"]))
PY

step "POST /generate {class: $SMOKE_CLASS, n: $SMOKE_N, steps: $SMOKE_STEPS}"
body=$(printf '{"class": %s, "n": %s, "steps": %s, "seed": 1234}' "$SMOKE_CLASS" "$SMOKE_N" "$SMOKE_STEPS")
code=$(curl -s -o "$tmp/generate.json" -w '%{http_code}' -H 'Content-Type: application/json' -d "$body" "$base/generate")
[ "$code" = 200 ] || die "POST /generate answered $code: $(head -c 400 "$tmp/generate.json")"
python3 - "$tmp/generate.json" "$SMOKE_N" <<'PY' || die "the response's images are not n valid 28x28 PNGs"
"""Decode every PNG with the standard library alone (chunks, CRCs, zlib, scanline filters)."""
import base64
import json
import struct
import sys
import zlib

doc = json.load(open(sys.argv[1]))
n = int(sys.argv[2])
images = doc["images"]
assert len(images) == n, f"{len(images)} images, expected {n}"
assert [im["index"] for im in images] == list(range(n)), "indices are not 0..n-1"


def decode(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
        if kind == b"IEND":
            break
    width, height, depth, color, _, _, interlace = ihdr
    assert (width, height) == (28, 28), f"size {width}x{height}, expected 28x28"
    assert (depth, color, interlace) == (8, 0, 0), f"not 8-bit grayscale: depth {depth}, colour type {color}"
    raw, rows, prev = zlib.decompress(idat), [], bytes(width)
    assert len(raw) == height * (width + 1), "pixel data has the wrong length"
    for y in range(height):
        f, line = raw[y * (width + 1)], bytearray(raw[y * (width + 1) + 1 : (y + 1) * (width + 1)])
        for x in range(width):
            a, b = line[x - 1] if x else 0, prev[x]
            c = prev[x - 1] if x else 0
            p = a + b - c
            pred = (0, a, b, (a + b) // 2, a if abs(p - a) <= min(abs(p - b), abs(p - c)) else b if abs(p - b) <= abs(p - c) else c)[f]
            line[x] = (line[x] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return rows


distinct = set()
for im in images:
    rows = decode(base64.b64decode(im["png"]))
    pixels = b"".join(rows)
    assert len(set(pixels)) > 1, f"image {im['index']} is a single flat colour"
    distinct.add(pixels)
assert len(distinct) == n, "some images are identical"
p = doc["params"]
print(f"{n} PNGs decoded: 28x28, 8-bit grayscale, all distinct; model {doc['model']!r}, "
      f"{p['sampler']} {p['steps']} steps, guidance {p['guidance']}, seed {p['seed']}; "
      f"total {doc['timings']['total_ms']:.0f} ms")
PY

step "GET /metrics"
code=$(curl -s -o "$tmp/metrics.txt" -w '%{http_code}' "$base/metrics")
[ "$code" = 200 ] || die "/metrics answered $code"
python3 - "$tmp/metrics.txt" "$SMOKE_N" <<'PY' || die "/metrics does not show the request"
import re
import sys

text, n = open(sys.argv[1]).read(), int(sys.argv[2])
types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
assert types, "no # TYPE lines: not Prometheus exposition"
samples = re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$", text, re.M)
images = sum(float(v) for name, _, v in samples if name == "fashion_images_generated_total")
assert images >= n, f"fashion_images_generated_total is {images}, expected at least {n}"
ours = sorted(name for name in types if name.startswith("fashion_") and not name.endswith("_created"))
print(f"{len(ours)} fashion_* metric families (e.g. {', '.join(ours[:4])}); "
      f"fashion_images_generated_total {images:g} >= {n}")
PY

step "process user"
uid=$("$ENGINE" exec "$NAME" cat /proc/1/status | awk '/^Uid:/ {print $2}')
who=$("$ENGINE" exec "$NAME" sh -c 'id -un; ps -o user= -p 1 2>/dev/null || true' | head -1)
cmd=$("$ENGINE" exec "$NAME" sh -c 'tr "\0" " " </proc/1/cmdline')
echo "PID 1: uid $uid ($who): $cmd"
[ -n "$uid" ] && [ "$uid" != 0 ] || die "the server process runs as root"

step "stop"
t0=$SECONDS
engine stop -t 30 "$NAME" >/dev/null
exit_code=$("$ENGINE" inspect --format '{{.State.ExitCode}}' "$NAME")
echo "stopped in $((SECONDS - t0)) s, exit code $exit_code"
[ "$exit_code" = 0 ] || die "the server did not shut down cleanly on SIGTERM (exit $exit_code)"
engine rm "$NAME" >/dev/null
