#!/usr/bin/env bash
# Run a real Prometheus server (Debian's package) with the repository's deploy/prometheus.yml,
# its target rewritten from the compose address (fashion:8000) to the service on loopback, and
# ask Prometheus's HTTP API until the target is up and the service's metrics are stored. Stops
# everything it started, and exits non-zero on any failure.
#
#   scripts/prometheus-check.sh                    # starts the service itself on a free loopback port
#   FASHION_URL=http://127.0.0.1:8000 scripts/prometheus-check.sh   # or scrapes one already running
#
# Environment (all optional):
#   PYTHON          interpreter that runs `python -m app` (python3); FASHION_* settings pass through
#                   (FASHION_MODELS or FASHION_WEIGHTS for other weights; FASHION_DEVICE defaults to cpu here)
#   CHECK_TIMEOUT   seconds to wait for the service and for Prometheus (300)
# Installs the prometheus package with apt-get when it is missing and the script runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

PYTHON=${PYTHON:-python3}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-300}
JOB=fashion-diffusion
tmp=$(mktemp -d)
app_pid=""
prom_pid=""

cleanup() {
  local rc=$?
  for pid in $prom_pid $app_pid; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  if [ "$rc" != 0 ]; then
    [ -f "$tmp/app.log" ] && { echo "--- service log (tail) ---"; tail -20 "$tmp/app.log"; }
    [ -f "$tmp/prometheus.log" ] && { echo "--- prometheus log (tail) ---"; tail -20 "$tmp/prometheus.log"; }
  fi
  rm -rf "$tmp"
  [ "$rc" = 0 ] && echo "prometheus check: PASSED" || echo "prometheus check: FAILED"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
step() { printf '\n== %s\n' "$*"; }
die() { echo "FAIL: $*"; exit 1; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# json EXPR URL: fetch URL and print the Python expression EXPR evaluated on its JSON as `d` ("" on error)
json() { curl -fsS "$2" 2>/dev/null | python3 -c "import json, sys
try:
    d = json.load(sys.stdin); print($1)
except Exception:
    print('')" 2>/dev/null || true; }

step "prometheus binary"
if ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    die "prometheus is not installed (apt-get install prometheus)"
  fi
  echo "installing Debian's prometheus package"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
prometheus --version 2>&1 | head -1

if [ -z "${FASHION_URL:-}" ]; then
  step "start the service on loopback"
  port=$(free_port)
  FASHION_URL=http://127.0.0.1:$port
  FASHION_DEVICE=${FASHION_DEVICE:-cpu} PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" \
    "$PYTHON" -m app --host 127.0.0.1 --port "$port" >"$tmp/app.log" 2>&1 &
  app_pid=$!
  echo "python -m app (pid $app_pid) at $FASHION_URL"
fi
target=${FASHION_URL#http://}
target=${target%%/*}

t0=$SECONDS
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$FASHION_URL/readyz" || true)" = 200 ]; do
  [ -z "$app_pid" ] || kill -0 "$app_pid" 2>/dev/null || die "the service exited"
  [ $((SECONDS - t0)) -lt "$CHECK_TIMEOUT" ] || die "$FASHION_URL/readyz not 200 after $CHECK_TIMEOUT s"
  sleep 1
done
echo "service ready after $((SECONDS - t0)) s"
code=$(curl -s -o "$tmp/generate.json" -w '%{http_code}' -H 'Content-Type: application/json' \
  -d '{"class": "dress", "n": 2, "steps": 4, "seed": 7}' "$FASHION_URL/generate")
[ "$code" = 200 ] || die "POST /generate answered $code: $(head -c 300 "$tmp/generate.json")"
echo "POST /generate: 200 (2 images), so the service's counters have moved"

step "deploy/prometheus.yml with the target $target"
grep -q '"fashion:8000"' deploy/prometheus.yml || die "deploy/prometheus.yml has no fashion:8000 target to adapt"
sed "s/\"fashion:8000\"/\"$target\"/" deploy/prometheus.yml >"$tmp/prometheus.yml"
diff deploy/prometheus.yml "$tmp/prometheus.yml" || true
promtool check config "$tmp/prometheus.yml"

step "run prometheus"
prom_port=$(free_port)
prom=http://127.0.0.1:$prom_port
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
  --web.listen-address="127.0.0.1:$prom_port" --log.level=warn >"$tmp/prometheus.log" 2>&1 &
prom_pid=$!
echo "prometheus (pid $prom_pid) at $prom"

step "Prometheus API: target health"
t0=$SECONDS
health=""
while [ $((SECONDS - t0)) -lt "$CHECK_TIMEOUT" ]; do
  kill -0 "$prom_pid" 2>/dev/null || die "prometheus exited"
  health=$(json "[t['health'] for t in d['data']['activeTargets'] if t['labels']['job'] == '$JOB']" "$prom/api/v1/targets")
  [ "$health" = "['up']" ] && break
  sleep 1
done
[ "$health" = "['up']" ] || die "target $target not up after $CHECK_TIMEOUT s (health: ${health:-none})"
json "[(t['scrapeUrl'], t['health'], t['lastError'] or 'no error') for t in d['data']['activeTargets']]" "$prom/api/v1/targets"

step "Prometheus API: the service's metrics"
query() { json "$2" "$prom/api/v1/query?query=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$1")"; }
values="[(r['metric'].get('sampler', r['metric'].get('__name__')), float(r['value'][1])) for r in d['data']['result']]"
t0=$SECONDS
images=""
until [ -n "$images" ] && [ "$images" != "[]" ]; do
  [ $((SECONDS - t0)) -lt "$CHECK_TIMEOUT" ] || die "fashion_images_generated_total not in Prometheus after $CHECK_TIMEOUT s"
  sleep 1
  images=$(query "fashion_images_generated_total{job=\"$JOB\"}" "$values")
done
up=$(query "up{job=\"$JOB\"}" "[float(r['value'][1]) for r in d['data']['result']]")
ready=$(query "fashion_ready{job=\"$JOB\"}" "[float(r['value'][1]) for r in d['data']['result']]")
families=$(query "count(count by (__name__) ({job=\"$JOB\", __name__=~\"fashion_.+\"}))" "int(float(d['data']['result'][0]['value'][1]))")
echo "up{job=\"$JOB\"} = $up"
echo "fashion_ready = $ready"
echo "fashion_images_generated_total by sampler = $images"
echo "fashion_* series names stored: $families"
[ "$up" = "[1.0]" ] || die "up is not 1"
[ "$ready" = "[1.0]" ] || die "fashion_ready is not 1"
python3 -c "import sys; sys.exit(0 if sum(v for _, v in $images) >= 2 else 1)" || die "images counter below 2"
