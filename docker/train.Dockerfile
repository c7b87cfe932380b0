# Training and export.
#   EXTRA=train-gpu (default): TensorFlow with its CUDA libraries from PyPI (gigabytes);
#     without an NVIDIA GPU, TensorFlow trains on the CPU in the same image.
#   EXTRA=train: TensorFlow alone, for CPU-only machines (compose's train-cpu builds this).
# BASE: a mirror of the default, or any Debian-family image whose `python` is 3.11-3.13
# and whose `pip` installs into a writable environment (--build-arg BASE=...).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG EXTRA=train-gpu
# A package index of your own, passed only when set (--build-arg PIP_INDEX_URL=...).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CIFAR100_CACHE=/cache

WORKDIR /app
# The dependencies first, from pyproject.toml alone (empty files stand in for the code and
# the README), so that a change to either rebuilds only the small layer below.
COPY pyproject.toml ./
RUN mkdir contract service training \
    && touch README.md contract/__init__.py service/__init__.py training/__init__.py \
    && pip install ".[${EXTRA}]" \
    && if [ "${EXTRA}" = "train-gpu" ]; then \
         python -m venv /opt/serve && /opt/serve/bin/pip install . "onnxruntime-gpu[cuda,cudnn]"; \
       fi \
    && rm -rf README.md contract service training build ./*.egg-info
COPY README.md ./
COPY contract ./contract
COPY service ./service
COPY training ./training
RUN pip install --no-deps . \
    && if [ -x /opt/serve/bin/pip ]; then /opt/serve/bin/pip install --no-deps .; fi \
    && rm -rf build ./*.egg-info \
    && mkdir -p /cache /cuda-cache /app/models /app/runs /app/reports \
    && chmod 1777 /cache /cuda-cache /app/models /app/runs /app/reports

# `docker compose run --rm train gpu-check` (train-gpu only): the check serves with the
# service's own environment above, whose onnxruntime-gpu wheels bring CUDA 13 and cuDNN 9;
# TensorFlow's CUDA 12 wheels unpack into the same site-packages/nvidia/ folders.
ENV GPU_CHECK_SERVICE_PYTHON=/opt/serve/bin/python

# docker-compose.yml runs this as the host user (HOST_UID), so its files are theirs.
USER 65534
ENTRYPOINT ["python", "-m", "training"]
CMD ["train-export"]
