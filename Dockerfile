# syntax=docker/dockerfile:1
# fmnist-service images, one build, four targets (see docs/deployment.md):
#
#   docker build --target gateway     -t fmnist-service:gateway     .   # HTTP gateway only, without torch
#   docker build --target worker      -t fmnist-service:worker      .   # batched CPU inference, consumes the broker
#   docker build --target worker-cuda -t fmnist-service:worker-cuda .   # the same worker on an NVIDIA GPU
#   docker build                      -t fmnist-service:serve       .   # everything in one container (`fmnist serve`)
#
# Every download happens in `builder` and the `torch-*-wheels` stages; the runtime stages install
# offline from their wheels, which are bind-mounted only while a RUN installs them, so no wheel ever
# lands in an image layer. BuildKit builds only the stages a target needs: the CPU targets never
# download the CUDA build, and `worker-cuda` never downloads the CPU one.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Keep in step with TORCH_SPEC in the Makefile (tests/deploy/test_dockerfile.py checks it).
ARG TORCH_VERSION=2.14.1

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# Broker backends every image carries, so one image serves memory://, kafka:// and gcp:// URLs.
ARG EXTRAS=kafka,gcp
# Distributions only the model code needs. The gateway image leaves them out: its code path never
# imports torch. A name here that is no longer a project dependency fails the build.
ARG MODEL_ONLY="torch safetensors tqdm matplotlib"

# The requirement lists are derived from pyproject.toml, never copied by hand, so a dependency added
# there reaches both images; the only hand-kept list is MODEL_ONLY above.
COPY deploy/docker/requirements_for_image.py /build/

WORKDIR /src
# Dependencies first, from pyproject.toml alone: editing the code does not download them again.
COPY pyproject.toml ./
RUN set -eux; \
    mkdir -p /wheels/deps /wheels/app; \
    python /build/requirements_for_image.py pyproject.toml "${EXTRAS}" torch > /wheels/deps/worker.txt; \
    python /build/requirements_for_image.py pyproject.toml "${EXTRAS}" ${MODEL_ONLY} > /wheels/deps/gateway.txt; \
    pip wheel --no-cache-dir --prefer-binary --wheel-dir /wheels/deps -r /wheels/deps/worker.txt

COPY README.md ./
COPY app/ app/
COPY ml/ ml/
COPY messaging/ messaging/
# ml/shipped/ links to the checkpoint and its card here; the wheel carries them as package data.
COPY models/ models/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/app .

# ---------------------------------------------------------------------------------------------------
# The CPU-only torch build (no CUDA libraries), from the same index as `make run TORCH_VARIANT=cpu`.
FROM ${PYTHON_IMAGE} AS torch-cpu-wheels
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip wheel --no-cache-dir --wheel-dir /wheels/torch --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The CUDA build with the CUDA runtime, cuDNN and NCCL as wheels beside it, so the runtime image needs
# no CUDA base image: only the host's NVIDIA driver, which the NVIDIA Container Toolkit mounts in.
# cu130 is the CUDA release the pinned torch is built against on PyPI; any cuXYZ index that carries
# TORCH_VERSION works, as long as the nodes' driver supports that CUDA release.
FROM ${PYTHON_IMAGE} AS torch-cuda-wheels
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu130
RUN pip wheel --no-cache-dir --wheel-dir /wheels/torch --index-url "${TORCH_CUDA_INDEX_URL}" "torch==${TORCH_VERSION}"

# ---------------------------------------------------------------------------------------------------
# What every image shares: a non-root user, tini, a virtualenv owned by root (read-only to the service).
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="fmnist-service" \
      org.opencontainers.image.description="FastAPI gateway and batched PyTorch workers behind a pub/sub broker" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# tini as PID 1 forwards SIGTERM to fmnist (workers drain in-flight batches on it) and reaps zombies.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends tini; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 10001 fmnist; \
    useradd --system --uid 10001 --gid fmnist --home-dir /home/fmnist --create-home \
        --shell /usr/sbin/nologin fmnist; \
    python -m venv "${VIRTUAL_ENV}"

WORKDIR /app
# Settings are read from FMNIST_* variables (app/settings.py); these are the image's defaults.
ENV FMNIST_PORT=8000 \
    FMNIST_LOG_LEVEL=INFO
ENTRYPOINT ["tini", "--"]
# Liveness of the HTTP targets, with the interpreter the image already has (no curl). The worker
# target, which serves no HTTP, switches it off.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FMNIST_PORT', '8000'), timeout=4)"]

# ---------------------------------------------------------------------------------------------------
# The HTTP gateway without torch: dependencies from gateway.txt (pyproject's list minus MODEL_ONLY),
# then the project itself with --no-deps. The last two commands fail the build if the CLI or the
# gateway code path ever needs torch.
FROM runtime AS gateway

RUN --mount=type=bind,from=builder,source=/wheels/deps,target=/wheels/deps \
    pip install --no-cache-dir --no-index --find-links=/wheels/deps -r /wheels/deps/gateway.txt
RUN --mount=type=bind,from=builder,source=/wheels/app,target=/wheels/app \
    set -eux; \
    pip install --no-cache-dir --no-index --no-deps --find-links=/wheels/app fmnist-service; \
    fmnist --help > /dev/null; \
    python -c "import sys, app.gateway.main; assert 'torch' not in sys.modules, 'the gateway imported torch'"

USER 10001:10001
EXPOSE 8000
CMD ["fmnist", "gateway", "--host", "0.0.0.0"]

# ---------------------------------------------------------------------------------------------------
# Everything the model needs: CPU-only torch, the full dependency set (`pip check` verifies it) and
# the shipped checkpoint. The worker and serve targets differ only in their command.
FROM runtime AS torch-runtime
ARG TORCH_VERSION

RUN --mount=type=bind,from=builder,source=/wheels/deps,target=/wheels/deps \
    --mount=type=bind,from=torch-cpu-wheels,source=/wheels/torch,target=/wheels/torch \
    set -eux; \
    pip install --no-cache-dir --no-index --find-links=/wheels/torch --find-links=/wheels/deps \
        "torch==${TORCH_VERSION}" -r /wheels/deps/worker.txt; \
    python -c "import torch; assert torch.version.cuda is None, 'expected the CPU-only torch build'"
RUN --mount=type=bind,from=builder,source=/wheels/app,target=/wheels/app \
    set -eux; \
    pip install --no-cache-dir --no-index --no-deps --find-links=/wheels/app fmnist-service; \
    pip check; \
    fmnist --help > /dev/null

COPY models/ /app/models/
ENV FMNIST_MODEL_PATH=/app/models/fmnist.safetensors
USER 10001:10001

# ---------------------------------------------------------------------------------------------------
FROM torch-runtime AS worker

# On SIGTERM (forwarded by tini) a worker drains: it stops taking messages, finishes its batch,
# publishes and acks. Give it the time to (compose: stop_grace_period).
HEALTHCHECK NONE
CMD ["fmnist", "worker"]

# ---------------------------------------------------------------------------------------------------
# The worker on an NVIDIA GPU: the torch-runtime recipe with the CUDA build of the same torch release.
# The build has no GPU, so it checks that torch is a CUDA build, not that a GPU answers; a node needs
# the NVIDIA driver (and, on Kubernetes, NVIDIA's device plugin: docs/deployment.md).
FROM runtime AS worker-cuda
ARG TORCH_VERSION

RUN --mount=type=bind,from=builder,source=/wheels/deps,target=/wheels/deps \
    --mount=type=bind,from=torch-cuda-wheels,source=/wheels/torch,target=/wheels/torch \
    set -eux; \
    pip install --no-cache-dir --no-index --find-links=/wheels/torch --find-links=/wheels/deps \
        "torch==${TORCH_VERSION}" -r /wheels/deps/worker.txt; \
    python -c "import torch; assert torch.version.cuda is not None, 'expected a CUDA torch build'"
RUN --mount=type=bind,from=builder,source=/wheels/app,target=/wheels/app \
    set -eux; \
    pip install --no-cache-dir --no-index --no-deps --find-links=/wheels/app fmnist-service; \
    pip check; \
    fmnist --help > /dev/null

COPY models/ /app/models/
# FMNIST_DEVICE=cuda, not auto: this image is meant for a GPU, so it should not fall back to CPU unnoticed.
# The NVIDIA Container Toolkit mounts the driver's compute libraries only when asked for `compute`; which
# GPUs a container sees is left to `docker run --gpus` or the device plugin (NVIDIA_VISIBLE_DEVICES).
ENV FMNIST_MODEL_PATH=/app/models/fmnist.safetensors \
    FMNIST_DEVICE=cuda \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
HEALTHCHECK NONE
CMD ["fmnist", "worker"]

# ---------------------------------------------------------------------------------------------------
# The default target (the last stage): gateway + worker + embedded broker in one process, like `make run`.
FROM torch-runtime AS serve

EXPOSE 8000
CMD ["fmnist", "serve", "--host", "0.0.0.0"]
