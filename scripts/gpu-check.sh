#!/usr/bin/env bash
# The CUDA path end to end on a machine with an NVIDIA GPU: the CUDA tests (tests/test_cuda.py:
# float16, channels-last, compile with CUDA graphs, the engine, the student; and the engine's CPU
# tests), bench/sampling.py on cuda, and the service with FASHION_DEVICE=cuda answering /readyz,
# /generate and a stream for every served model, then draining on SIGTERM. Exits non-zero on the
# first failure; logs and the bench table go to $OUT (or /tmp/gpu-check).
#
#   bash scripts/gpu-check.sh                      # on the GPU machine, from the checkout
#   DEVICE=cpu bash scripts/gpu-check.sh service   # only the service part, on the CPU (a dry run)
#   bash scripts/gpu-check.sh fetch                # the web stack's wheels into .whl/ (needs PyPI)
#
# Where the GPU machine's Python has torch, numpy, pillow, safetensors, httpx, prometheus-client,
# tqdm and pytest but not the web stack (FastAPI, pydantic, uvicorn, ...), run `fetch` on a machine
# that reaches PyPI and copy .whl/ into the checkout on the GPU machine: the check installs from it
# (pure Python, plus pydantic-core built for PY_VERSION, 3.12 by default). The training test skips
# unless FASHION_MNIST_DIR names a copy of Fashion-MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_VERSION=${PY_VERSION:-3.12}  # the GPU image's python3
WHEELS=(
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3
  python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7
  uvicorn==0.54.0 httpx-sse==0.4.3 python-multipart==0.0.34 typing-extensions==4.16.0
)

if [ "${1:-}" = fetch ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  ls .whl
  exit 0
fi

DEVICE=${DEVICE:-cuda}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
step() { printf '\n== %s\n' "$*"; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1

if [ "${1:-}" != service ]; then
step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA"; print(torch.__version__, torch.cuda.get_device_name(0))'

step "tests on cuda"
python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/app/generation/test_engine.py 2>&1 | tee "$out/tests.txt"

step "bench/sampling.py on cuda"
python3 -m bench.sampling --device cuda --repeats 5 2>&1 | tee "$out/bench_sampling_cuda.md"
fi

step "the service with FASHION_DEVICE=$DEVICE"
FASHION_DEVICE=$DEVICE python3 -m app --host 127.0.0.1 --port 8000 >"$out/service.log" 2>&1 &
server=$!
trap 'kill -9 $server 2>/dev/null || true' EXIT
DEVICE=$DEVICE python3 - <<'EOF'
import base64, io, json, os, time

import httpx
from PIL import Image

base = "http://127.0.0.1:8000"
deadline = time.monotonic() + 300
while True:
    try:
        r = httpx.get(f"{base}/readyz", timeout=5)
        if r.status_code == 200:
            break
    except httpx.TransportError:
        pass
    assert time.monotonic() < deadline, "not ready after 300 s"
    time.sleep(1)
ready = r.json()
print("readyz:", json.dumps(ready))
assert ready["device"].startswith(os.environ["DEVICE"]), ready
models = [m["id"] for m in httpx.get(f"{base}/models").json()["data"]]
print("models:", models)
for model in models:
    t0 = time.perf_counter()
    r = httpx.post(f"{base}/generate", json={"class": 3, "n": 16, "model": model}, timeout=120)
    r.raise_for_status()
    body = r.json()
    images = [Image.open(io.BytesIO(base64.b64decode(i["png"]))) for i in body["images"]]
    assert len(images) == 16 and all(im.size == (28, 28) and im.mode == "L" for im in images), body.keys()
    print(f"{model}: 16 PNGs in {time.perf_counter() - t0:.2f} s")
    events = []
    with httpx.stream("GET", f"{base}/generate/stream", params={"class": 1, "n": 2, "model": model}, timeout=120) as s:
        s.raise_for_status()
        events = [line.removeprefix("event:").strip() for line in s.iter_lines() if line.startswith("event:")]
    assert events and events[-1] == "done", events[-5:]
    print(f"{model}: stream of {events.count('step')} step events, then {events[-1]}")
metrics = httpx.get(f"{base}/metrics").text
print([line for line in metrics.splitlines() if line.startswith("fashion_model_info")])
EOF
kill -TERM "$server"
if wait "$server"; then echo "service drained and stopped"; else echo "FAIL: service exit status $?"; exit 1; fi
trap - EXIT
echo "gpu check: PASSED"
