"""`make gpu-check`: the whole pipeline on an NVIDIA GPU, on the small synthetic dataset.

Trains each model for one epoch (mixed precision), exports it, serves the exports with
DEVICE=cuda, checks that `/models` reports CUDAExecutionProvider for each, and prints
images per second for training and for serving. On a machine without an NVIDIA GPU it
stops at once with a message saying so (exit code 1).

    python -m training.gpu_check [--keep DIR]
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Model ids, spelled here so that a machine without a GPU is told so before TensorFlow
# loads; tests/test_training.py checks they are training.models.MODEL_IDS.
MODEL_IDS = ("cifar100-712868", "cifar100-5735844")
TRAIN_PER_CLASS, TEST_PER_CLASS, VAL_SIZE = 40, 5, 500
SERVE_SECONDS, SERVE_CLIENTS, IMAGES_PER_REQUEST = 10, 8, 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.gpu_check", description=__doc__)
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    if problem := missing_gpu():
        print(f"gpu-check: {problem}. This check needs an NVIDIA GPU; nothing was run.")
        return 1
    work = args.keep or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        run(work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def missing_gpu() -> str | None:
    """Why this machine cannot run the check, or None. Asks the driver before importing
    TensorFlow, then asks TensorFlow (a driver without CUDA libraries is no use either)."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"no NVIDIA driver here (nvidia-smi: {err})"
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return f"nvidia-smi lists no GPU ({(listed.stderr or listed.stdout).strip()})"
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return (
            f"the driver lists {listed.stdout.strip()}, but TensorFlow sees no GPU "
            "(install the training extra with CUDA: pip install -e '.[train-gpu]')"
        )
    return None


def run(work: Path) -> None:
    from tests.synthetic import write_cifar100, write_tarball  # the tests' small dataset
    from training.__main__ import main as training

    data = write_tarball(
        write_cifar100(work / "data", TRAIN_PER_CLASS, TEST_PER_CLASS),
        work / "cifar-100-python.tar.gz",
    )
    common = ["--data-dir", str(data), "--val-size", str(VAL_SIZE)]
    common += ["--runs-dir", str(work / "runs")]
    train_images = 100 * TRAIN_PER_CLASS - VAL_SIZE
    for model_id in MODEL_IDS:
        start = time.perf_counter()
        train = ["train", "--model", model_id, "--epochs", "1", "--mixed-precision"]
        if training([*train, *common]) != 0:
            raise SystemExit(f"gpu-check: training {model_id} failed")
        seconds = time.perf_counter() - start
        print(
            f"gpu-check: trained {model_id}: {train_images / seconds:,.0f} images/s "
            f"(one epoch of {train_images} images, tracing included)",
            flush=True,
        )
        export = ["export", "--model", model_id, "--models-dir", str(work / "models")]
        if training([*export, *common]) != 0:
            raise SystemExit(f"gpu-check: exporting {model_id} failed")
    serve(work / "models")
    print("gpu-check: passed")


def serve(models_dir: Path) -> None:
    """Serve `models_dir` with DEVICE=cuda, check the provider, measure images/s."""
    port = free_port()
    env = {**os.environ, "MODELS_DIR": str(models_dir), "DEVICE": "cuda", "LOG_JSON": "false"}
    command = [sys.executable, "-m", "uvicorn", "--factory", "service.main:create_app"]
    server = subprocess.Popen([*command, "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, server)
        with urllib.request.urlopen(f"{base}/models", timeout=30) as response:
            listing = json.load(response)
        providers = {model["model_id"]: model["provider"] for model in listing["models"]}
        print(f"gpu-check: /models providers: {providers}", flush=True)
        if sorted(providers) != sorted(MODEL_IDS) or any(
            provider != "CUDAExecutionProvider" for provider in providers.values()
        ):
            raise SystemExit(
                f"gpu-check: expected both models on CUDAExecutionProvider, got {providers} "
                f"(failed: {listing.get('failed')})"
            )
        for model_id in MODEL_IDS:
            rate = serving_rate(f"{base}/predict?model={model_id}&top_k=1")
            print(
                f"gpu-check: served {model_id}: {rate:,.0f} images/s ({SERVE_CLIENTS} clients, "
                f"{IMAGES_PER_REQUEST} PNGs per request, {SERVE_SECONDS} s)",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(timeout=30)


def serving_rate(url: str) -> float:
    from bench.load import multipart_form, png_images

    pngs = png_images(IMAGES_PER_REQUEST)
    body, content_type = multipart_form([(f"{i}.png", png) for i, png in enumerate(pngs)])
    deadline = time.perf_counter() + SERVE_SECONDS

    def client(_: int) -> int:
        images = 0
        while time.perf_counter() < deadline:
            request = urllib.request.Request(url, data=body, method="POST")
            request.add_header("Content-Type", content_type)
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
            images += IMAGES_PER_REQUEST
        return images

    start = time.perf_counter()
    with ThreadPoolExecutor(SERVE_CLIENTS) as pool:
        total = sum(pool.map(client, range(SERVE_CLIENTS)))
    return total / (time.perf_counter() - start)


def wait_until_ready(base: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"gpu-check: the service exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"gpu-check: the service was not ready within {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
