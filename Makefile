# One command for the main job (`make train-export`), one for the tests (`make test`).
# Every target installs what it needs into .venv first.

# TensorFlow 2.21 has wheels for CPython 3.11 to 3.13 only: take the first of those
# installed (PYTHON=... to choose), or stop with one line saying so.
PYTHON ?= $(firstword $(foreach v,3.11 3.12 3.13,$(shell command -v python$(v) 2>/dev/null)) \
	$(shell python3 -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' \
	2>/dev/null && command -v python3))
VENV ?= .venv
PY := $(VENV)/bin/python
EPOCHS ?= 48
MODEL_IDS := cifar100-712868 cifar100-5735844
TRAIN_FLAGS ?=

.PHONY: setup train-export report test lint format serve bench bench-peers bench-faults \
	bench-profile bench-floor triton-repo sign gpu-check docs docs-build score traffic-report

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: needs Python 3.11, 3.12 or 3.13 (TensorFlow 2.21 has no wheels for others); install one or set PYTHON=/path/to/python3.1x" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,dev,score]'
	touch $@

setup: $(VENV)/.installed

# Train, evaluate on the test set and export each model to models/<id>.onnx.
train-export: setup
	$(PY) -m training train-export --epochs $(EPOCHS) $(TRAIN_FLAGS)

# reports/<id>/index.html for every model in models/ (needs the dataset, like training).
report: setup
	$(PY) -m training report

# reports/<id>/traffic.html from the service's payload log (PAYLOAD_LOG): TRAFFIC=dir.
traffic-report: setup
	@test -n "$(TRAFFIC)" || { echo "make traffic-report: set TRAFFIC=... (the PAYLOAD_LOG folder)" >&2; exit 1; }
	$(PY) -m training report --traffic '$(TRAFFIC)'

test: setup lint docs-build
	$(PY) -m pytest

# The documentation: docs-build checks it (--strict: a dead link or anchor, or a setting
# name that is no longer a setting, fails) into site/; docs serves it while you edit.
docs-build: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve --dev-addr 127.0.0.1:8001

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# WORKERS: uvicorn processes; on a CPU-only machine, one per core serves the most requests.
WORKERS ?= 1
serve: setup
	rm -rf .prometheus && mkdir -p .prometheus
	PROMETHEUS_MULTIPROC_DIR=$(CURDIR)/.prometheus WEB_CONCURRENCY=$(WORKERS) $(PY) -m service

bench: setup
	$(PY) -m bench

# BentoML and LitServe beside the service, same run, same table (installs them, pinned,
# into their own virtual environments under bench-results/peers/).
bench-peers: setup
	$(PY) -m bench --peers

# Classify a folder, glob, list of paths (.parquet/.csv) or cifar-100-python archive into
# Parquet shards under OUTPUT, on Ray Data (local Ray, or the cluster RAY_ADDRESS names);
# a rerun resumes. SCORE_FLAGS: more options (--resize, --features, --top-k; see --help).
MODEL ?= cifar100-5735844
MODELS_DIR ?= models
SCORE_FLAGS ?=
score: setup
	@test -n "$(INPUT)" -a -n "$(OUTPUT)" || { echo "make score: set INPUT=... and OUTPUT=... (and MODEL=...)" >&2; exit 1; }
	$(PY) -m score --model $(MODEL) --models-dir $(MODELS_DIR) --input '$(INPUT)' --output '$(OUTPUT)' $(SCORE_FLAGS)

# Faults and overload on loopback, one table. SOAK_SECONDS: length of the soak.
SOAK_SECONDS ?= 150
bench-faults: setup
	$(PY) -m bench faults --soak-seconds $(SOAK_SECONDS)

# Where each request's microseconds go (py-spy, in its own environment).
bench-profile: setup
	test -x bench-results/tools/venv/bin/py-spy || ($(PYTHON) -m venv bench-results/tools/venv \
		&& bench-results/tools/venv/bin/pip install --quiet py-spy==0.4.3)
	$(PY) -m bench profile --py-spy bench-results/tools/venv/bin/py-spy

# Server CPU per request: bare ASGI, Starlette and FastAPI apps beside the service.
bench-floor: setup
	$(PY) -m bench floor

# model_repository/: a Triton model repository from models/ (reads the ONNX files only).
triton-repo: setup
	$(PY) -m training export-triton

# A signature bundle (<file>.sig) beside each models/*.onnx and model_repository/*/1/model.onnx,
# with the EC private key KEY (default: $SIGNING_KEY); docs/trust.md makes one. FILES: other
# files or folders. No TensorFlow needed.
KEY ?= $(SIGNING_KEY)
FILES ?=
sign: setup
	@test -n "$(KEY)" || { echo "make sign: set KEY=path/to/signing.pem (or SIGNING_KEY)" >&2; exit 1; }
	$(PY) -m training sign --key '$(KEY)' $(FILES)

# On a machine with an NVIDIA GPU: two epochs per model on synthetic data, export, serve
# with DEVICE=cuda, check CUDAExecutionProvider, print images/s. Without one: a message
# and exit code 1, asked of the driver before anything is installed. Training and serving
# get an environment each, built on first use under $(GPU_VENVS): TensorFlow's CUDA 12
# wheels (.[train-gpu]) and onnxruntime-gpu's CUDA 13 wheels ([cuda,cudnn]) unpack into the
# same site-packages/nvidia/ folders and cannot share one. (Inside the training image:
# `docker compose run --rm train gpu-check`.)
GPU_VENVS ?= $(VENV)/gpu
gpu-check:
	@test -n "$(PYTHON)" || { echo "make: needs Python 3.11, 3.12 or 3.13; set PYTHON=/path/to/python3.1x" >&2; exit 1; }
	$(PYTHON) -m training.gpu_check --driver-only
	$(MAKE) --no-print-directory $(GPU_VENVS)/train/.installed $(GPU_VENVS)/serve/.installed
	$(GPU_VENVS)/train/bin/python -m training.gpu_check \
		--service-python $(GPU_VENVS)/serve/bin/python

$(GPU_VENVS)/train/.installed: pyproject.toml
	$(PYTHON) -m venv $(GPU_VENVS)/train
	$(GPU_VENVS)/train/bin/python -m pip install --quiet --upgrade pip
	$(GPU_VENVS)/train/bin/python -m pip install --quiet -e '.[train-gpu]'
	touch $@

# The service and onnxruntime-gpu (the version pyproject.toml pins) with its CUDA 13 and
# cuDNN 9 wheels.
$(GPU_VENVS)/serve/.installed: pyproject.toml
	$(PYTHON) -m venv $(GPU_VENVS)/serve
	$(GPU_VENVS)/serve/bin/python -m pip install --quiet --upgrade pip
	$(GPU_VENVS)/serve/bin/python -m pip install --quiet -e . 'onnxruntime-gpu[cuda,cudnn]'
	touch $@
