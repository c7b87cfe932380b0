# The API, two images from this file (docker-compose.yml builds both):
#   EXTRA=gpu (default, `api`): onnxruntime-gpu on CUDA 13 + cuDNN 9 (what onnxruntime-gpu
#     1.31 is built for), on NVIDIA's CUDA base; without a GPU it runs on the CPU too.
#   EXTRA=cpu (`api-cpu`): onnxruntime's CPU build on a plain Debian base: no CUDA
#     libraries at all.
# Both carry OpenVINO, the CPU engine (bfloat16 where the CPU has it), and no TensorFlow:
# only the service's packages and their dependencies are installed.
# BASE: a mirror of the default, or any Debian-family image with apt and Python 3.11+
# (--build-arg BASE=...); without CUDA and cuDNN in it, the service runs on the CPU only.
ARG BASE=nvidia/cuda:13.1.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}

# gpu or cpu: which onnxruntime (pyproject.toml's extras of those names)
ARG EXTRA=gpu
# A package index of your own, passed only when set (--build-arg PIP_INDEX_URL=...).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Debian's Python where the base has none (NVIDIA's CUDA images); a Python base keeps its own.
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
         apt-get update \
         && apt-get install -y --no-install-recommends python3 python3-venv \
         && rm -rf /var/lib/apt/lists/*; \
       fi \
    && python3 -m venv /opt/venv

WORKDIR /app
# Only contract/ and service/ are copied, so `pip install .` finds and installs only those.
# The dependencies first, from pyproject.toml alone (empty files stand in for the code and
# the README), so that a change to either rebuilds only the small layer below.
COPY pyproject.toml ./
RUN mkdir contract service \
    && touch README.md contract/__init__.py service/__init__.py \
    && pip install ".[${EXTRA}]" \
    && rm -rf README.md contract service build ./*.egg-info
COPY README.md ./
COPY contract ./contract
COPY service ./service
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    && useradd --system --uid 10001 --no-create-home api
USER 10001

# WEB_CONCURRENCY: uvicorn worker processes (on a CPU-only host, one per core).
# Their Prometheus values meet in PROMETHEUS_MULTIPROC_DIR, emptied at every start.
ENV MODELS_DIR=/models \
    WEB_CONCURRENCY=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
EXPOSE 8000
# The Open Inference Protocol over gRPC (GRPC_PORT; 0 turns it off)
EXPOSE 8081
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4)"]
CMD ["sh", "-c", "rm -rf \"$PROMETHEUS_MULTIPROC_DIR\" && mkdir -p \"$PROMETHEUS_MULTIPROC_DIR\" && exec python -m service"]
