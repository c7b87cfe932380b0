# The score job's image, for every pod of a Ray cluster (head and workers): Ray's own
# image at the version pyproject.toml's `score` extra pins, with this project installed
# into its Python (the contract's decode and loader, the CIFAR-100 reader, score/).
# No TensorFlow: the base dependencies and the score extra only. Build from the repository
# root: docker build -f deploy/ray/score.Dockerfile -t cifar100-score:0.1.0 .
ARG BASE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE}

# A package index of your own, passed only when set (--build-arg PIP_INDEX_URL=...).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The image's user (ray, uid 1000) owns its Python: install as that user.
WORKDIR /home/ray/app
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 contract ./contract
COPY --chown=1000:100 service ./service
COPY --chown=1000:100 training ./training
COPY --chown=1000:100 score ./score
RUN pip install ".[cpu,score]" \
    && rm -rf build ./*.egg-info

ENV MODELS_DIR=/models
