# The fashion-diffusion service on a CUDA build of PyTorch, with the shipped weights inside.
#
#   docker build -t fashion-diffusion .
#   docker run --gpus all -p 8000:8000 fashion-diffusion          # or: docker compose up
#
# Optional CLIP weights, baked in where the builder has internet (off by default):
#   docker build --build-arg CLIP_MODEL=ViT-B-32 --build-arg CLIP_PRETRAINED=laion2b_s34b_b79k -t fashion-diffusion .
# or a local open_clip checkpoint mounted at run time (the volume /models/clip):
#   docker run -v "$PWD/clip:/models/clip:ro" -e FASHION_CLIP_MODEL=ViT-B-32 \
#     -e FASHION_CLIP_CHECKPOINT=/models/clip/open_clip_model.safetensors ... fashion-diffusion
#
# Layers, from the least to the most often rebuilt: base, user, dependencies (pyproject.toml only),
# baked CLIP weights, shipped weights, source.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="fashion-diffusion" \
      org.opencontainers.image.description="Class-conditional diffusion for Fashion-MNIST, served over HTTP" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed numeric uid, so `runAsNonRoot` style checks and volume permissions are predictable.
ARG APP_UID=10001
RUN groupadd --system --gid "${APP_UID}" app \
    && useradd --system --uid "${APP_UID}" --gid app --create-home --home-dir /home/app \
       --shell /usr/sbin/nologin app \
    && mkdir -p /models/clip /opt/clip-cache /tmp/ray \
    && chown app:app /models/clip /opt/clip-cache /tmp/ray

WORKDIR /srv/fashion

# 1. Dependencies, from pyproject.toml alone: this layer does not rebuild when only the source changes.
#    The base image's CUDA torch is kept as it is (install_deps.py pins it; pip cannot replace it).
# ray: the same image runs under Ray Serve (docker-compose.ray.yml); python -m app never imports it.
ARG EXTRAS=clip,ray
COPY pyproject.toml ./
COPY deploy/install_deps.py /tmp/install_deps.py
RUN python /tmp/install_deps.py pyproject.toml --extras "${EXTRAS}" && rm /tmp/install_deps.py

# 2. Optional: bake a named open_clip checkpoint into FASHION_CLIP_CACHE_DIR (needs internet at build
#    time), where the service finds it without network. Run the image with the same
#    FASHION_CLIP_MODEL / FASHION_CLIP_PRETRAINED (docker-compose.yml passes one pair to both).
ARG CLIP_MODEL=""
ARG CLIP_PRETRAINED=""
RUN if [ -n "${CLIP_MODEL}" ]; then \
        python -c "import sys, open_clip; open_clip.create_model_and_transforms(sys.argv[1], pretrained=sys.argv[2], cache_dir='/opt/clip-cache')" \
            "${CLIP_MODEL}" "${CLIP_PRETRAINED}" \
        && chown -R app:app /opt/clip-cache; \
    fi

# 3. The shipped weights (the teacher U-Net, the distilled student once trained, their JSON cards, the
#    evaluation classifier).
COPY weights/ ./weights/

# 4. The source, installed from pyproject.toml (dependencies are already in place).
COPY README.md ./
COPY model/ ./model/
COPY app/ ./app/
COPY deploy/ray/ ./deploy/ray/
RUN python -m pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info

# Settings: every FASHION_* variable of app/settings.py can be given with `-e` / compose `environment:`.
# The shipped models are served from FASHION_WEIGHTS_DIR: fashion-unet, and fashion-student once it is
# in weights/ (FASHION_MODELS='["/path/a.safetensors", ...]' or FASHION_WEIGHTS=/path/a.safetensors for others).
ENV FASHION_WEIGHTS_DIR=/srv/fashion/weights \
    FASHION_DEVICE=auto \
    FASHION_CLIP_CACHE_DIR=/opt/clip-cache \
    UVICORN_HOST=0.0.0.0 \
    UVICORN_PORT=8000 \
    FASHION_DRAIN_SECONDS=30

USER ${APP_UID}
EXPOSE 8000

# Ready = weights loaded and warmed up (/readyz answers 503 before that). The start period covers
# loading and warm-up; compose and orchestrators may override these timings.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('UVICORN_PORT', '8000'), timeout=4)"]

# `python -m app` listens on UVICORN_HOST / UVICORN_PORT, so the address can change without a new command
# line. On `docker stop` (SIGTERM) it drains: running and queued jobs get FASHION_DRAIN_SECONDS to finish,
# then it exits 0; compose's stop_grace_period leaves it 10 s more than that.
CMD ["python", "-m", "app"]
