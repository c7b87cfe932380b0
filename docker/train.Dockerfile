# Training and export: TensorFlow with its CUDA libraries from PyPI (the `train-gpu` extra).
# Without an NVIDIA GPU, TensorFlow trains on the CPU in the same image.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CIFAR100_CACHE=/cache

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
RUN pip install ".[train-gpu]" \
    && mkdir -p /cache /app/models /app/runs /app/reports \
    && chmod 1777 /cache /app/models /app/runs /app/reports

# docker-compose.yml runs this as the host user (HOST_UID), so its files are theirs.
USER 65534
ENTRYPOINT ["python", "-m", "training"]
CMD ["train-export"]
