# The API: onnxruntime-gpu on CUDA 13 + cuDNN 9 (what onnxruntime-gpu 1.31 is built for).
# No TensorFlow: only the service package and its base dependencies are installed.
# On a machine without an NVIDIA GPU it runs on the CPU (DEVICE=auto).
FROM nvidia/cuda:13.1.1-cudnn-runtime-ubuntu24.04

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
# Only service/ is copied, so `pip install .` finds and installs only that package.
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home api
USER 10001

# WEB_CONCURRENCY: uvicorn worker processes (on a CPU-only host, one per core).
# Their Prometheus values meet in PROMETHEUS_MULTIPROC_DIR, emptied at every start.
ENV MODELS_DIR=/models \
    WEB_CONCURRENCY=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4)"]
CMD ["sh", "-c", "rm -rf \"$PROMETHEUS_MULTIPROC_DIR\" && mkdir -p \"$PROMETHEUS_MULTIPROC_DIR\" && exec python -m service"]
