"""`make gpu-check`: the whole pipeline on an NVIDIA GPU, on a small synthetic dataset.

Trains each model for two epochs (mixed precision) with the default recipe and again
with the speed switches (--no-deterministic, --steps-per-execution), exports the first,
serves the exports with DEVICE=cuda, checks that `/models` reports CUDAExecutionProvider
for each, and prints images per second for training and for serving. On a machine
without an NVIDIA GPU it stops at once with a message saying so (exit code 1).

Two environments, because TensorFlow 2.21's CUDA 12 wheels and onnxruntime-gpu 1.31's
CUDA 13 wheels unpack into the same site-packages/nvidia/ folders:
- training and export run in this interpreter's environment (`.[train-gpu]`, or the
  training image), each in a process of its own, so no TensorFlow holds GPU memory while
  the service runs (this process never imports TensorFlow, and checks that at the end);
- serving runs `python -m service` with --service-python ($GPU_CHECK_SERVICE_PYTHON):
  an environment with the service and `onnxruntime-gpu[cuda,cudnn]` (the Makefile builds
  one), or the service image's Python; its pip-installed CUDA libraries are put on
  LD_LIBRARY_PATH, since onnxruntime's CUDA provider has no search path for them.

    python -m training.gpu_check [--service-python PY] [--keep DIR]
    python -m training gpu-check ...            (the same; the training image's entry)
    python -m training.gpu_check --driver-only  (is there a GPU at all? standard library only)

This process never imports TensorFlow, onnxruntime or the service, and --driver-only
needs the standard library alone: the Makefile asks the driver with any Python 3.11+
before it installs anything.
"""

import argparse
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from training.processes import ROOT, ProcessFailed, run_python

# Model ids, spelled here so that a machine without a GPU is told so before TensorFlow
# loads; tests/test_training.py checks they are training.models.MODEL_IDS.
MODEL_IDS = ("cifar100-712868", "cifar100-5735844")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
TRAIN_PER_CLASS, TEST_PER_CLASS = 100, 5
EPOCHS = 2  # the first pays for tracing (and on sm_90, PTX compilation); the second is timed
# The recipe's defaults, and on a GPU mixed precision (float16 has no fast path on a CPU,
# where --device cpu leaves it out). Each model trains twice: as `make train-export` would
# (op determinism on: the run that is exported, and the proof that every op has a
# deterministic GPU kernel), then with the speed switches, to show what they are worth.
GPU_TRAIN_FLAGS = ("--mixed-precision",)
SPEED_FLAGS = ("--no-deterministic", "--steps-per-execution", "16")
SERVE_SECONDS, SERVE_CLIENTS, IMAGES_PER_REQUEST = 10, 8, 64

# Run in the training environment: does TensorFlow see a GPU? (In a process of its own,
# so this one never holds a CUDA context.)
TENSORFLOW_PROBE = """
import json, tensorflow as tf
print(json.dumps([d.name for d in tf.config.list_physical_devices("GPU")]))
"""
# Run in the serving environment: where its pip-installed NVIDIA libraries are, and which
# providers its onnxruntime has.
SERVICE_ENV_PROBE = """
import importlib.util, json, onnxruntime as ort
spec = importlib.util.find_spec("nvidia")
roots = list(spec.submodule_search_locations) if spec else []
libs = sorted(str(p) for root in roots for p in __import__("pathlib").Path(root).glob("*/lib"))
print(json.dumps({"lib_dirs": libs, "providers": ort.get_available_providers()}))
"""
# Then, with those libraries on LD_LIBRARY_PATH: can a session really run on CUDA?
CUDA_SESSION_PROBE = """
import numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
session.run(None, {"x": np.ones((1, 4), np.float32)})
print(session.get_providers()[0])
"""


class CheckFailed(Exception):
    """A step of the check failed; the message says which and what to do."""


def _service_python() -> str:
    named = os.environ.get("GPU_CHECK_SERVICE_PYTHON")
    return named if named and Path(named).exists() else sys.executable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it (default: a temp dir)")
    parser.add_argument(
        "--service-python",
        default=_service_python(),
        help="the Python that serves (default: $GPU_CHECK_SERVICE_PYTHON where it exists, "
        "as in the GPU training image; else this one)",
    )
    parser.add_argument(
        "--driver-only", action="store_true", help="only ask the NVIDIA driver for a GPU"
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: the same steps without a GPU, for the tests (says nothing about a GPU)",
    )
    parser.add_argument("--train-per-class", type=int, default=TRAIN_PER_CLASS)
    parser.add_argument("--serve-seconds", type=float, default=SERVE_SECONDS)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if problem := missing_gpu():
            print(f"gpu-check: {problem}. This check needs an NVIDIA GPU; nothing was run.")
            return 1
        if args.driver_only:
            return 0
    work = args.keep or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        run(work, args.service_python, args.device, args.train_per_class, args.serve_seconds)
    except CheckFailed as err:
        print(f"gpu-check: FAILED: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def missing_gpu() -> str | None:
    """Why this machine has no GPU to check, or None (asks the driver, nothing else)."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"no NVIDIA driver here (nvidia-smi: {err})"
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return f"nvidia-smi lists no GPU ({(listed.stderr or listed.stdout).strip()})"
    print(f"gpu-check: the driver lists {listed.stdout.strip()}", flush=True)
    return None


def run(
    work: Path, service_python: str, device: str, train_per_class: int, serve_seconds: float
) -> None:
    service_env = serving_environment(service_python, device)
    if device == "cuda":
        check_tensorflow_sees_a_gpu()
    from training.synthetic import write_cifar100, write_tarball

    work.mkdir(parents=True, exist_ok=True)
    data = write_tarball(
        write_cifar100(work / "data", train_per_class, TEST_PER_CLASS),
        work / "cifar-100-python.tar.gz",
    )
    val_size = 100 * train_per_class // 10
    train_images = 100 * train_per_class - val_size
    common = ["--data-dir", str(data), "--val-size", str(val_size)]
    variants = (  # (name, flags, runs dir): the first is the run that is exported
        ("default recipe", (), work / "runs"),
        (f"speed switches {' '.join(SPEED_FLAGS)}", SPEED_FLAGS, work / "runs-fast"),
    )
    for model_id in MODEL_IDS:
        train = ["train", "--model", model_id, "--epochs", str(EPOCHS), *common]
        train += GPU_TRAIN_FLAGS if device == "cuda" else []
        for variant, flags, runs in variants:
            output = training_process(
                [*train, *flags, "--runs-dir", str(runs)], f"training {model_id} ({variant})"
            )
            rate = train_rate(output, train_images)
            print(f"gpu-check: trained {model_id} ({variant}): {rate}", flush=True)
        export = ["export", "--model", model_id, "--models-dir", str(work / "models")]
        training_process(
            [*export, *common, "--runs-dir", str(work / "runs")], f"exporting {model_id}"
        )
    serve(work / "models", service_python, service_env, device, serve_seconds)
    # Training ran in processes that have exited; this one must not have loaded TensorFlow
    # (it would hold a CUDA context and, by default, most of the GPU's memory).
    if "tensorflow" in sys.modules:
        raise CheckFailed("TensorFlow was imported by this process, which outlives the service")
    print("gpu-check: passed", flush=True)


def training_process(args: list[str], what: str) -> str:
    """`python -m training ARGS` in a process of its own; its output, echoed."""
    # Memory growth: should anything else share the GPU meanwhile, TensorFlow takes only
    # what it uses rather than nearly all of it.
    env = {**os.environ, "TF_FORCE_GPU_ALLOW_GROWTH": "true", "PYTHONUNBUFFERED": "1"}
    try:
        done = run_python("-m", "training", *args, env=env)
    except ProcessFailed as failed:
        sys.stdout.write(failed.stdout)
        raise CheckFailed(f"{what}: {failed}") from failed
    sys.stdout.write(done.stdout)
    return done.stdout


# Keras's per-epoch line (verbose=2, which training uses off a terminal):
# "28/28 - 3s - 98ms/step - accuracy: ...".
EPOCH_LINE = re.compile(r"^(\d+)/\1 - \S+ - (\d+(?:\.\d+)?)(s|ms|us)/step\b", re.M)


def train_rate(output: str, train_images: int) -> str:
    """Images per second of the last epoch, from Keras's own per-step time."""
    epochs = EPOCH_LINE.findall(output)
    if len(epochs) != EPOCHS:
        raise CheckFailed(f"expected {EPOCHS} epoch lines from Keras, found {len(epochs)}")
    steps, per_step, unit = epochs[-1]
    seconds = float(per_step) * {"s": 1, "ms": 1e-3, "us": 1e-6}[unit] * int(steps)
    return (
        f"{train_images / seconds:,.0f} images/s in epoch {EPOCHS} ({train_images} images, "
        f"{steps} steps of {per_step}{unit}; epoch 1 also traced the graph)"
    )


def serving_environment(service_python: str, device: str) -> dict[str, str]:
    """The environment `python -m service` gets: its NVIDIA wheels' libraries on
    LD_LIBRARY_PATH. With device cuda, checks first that a CUDA session really runs there
    (seconds, rather than finding out after the training)."""
    probe = subprocess.run(
        [service_python, "-c", SERVICE_ENV_PROBE], capture_output=True, text=True, cwd=ROOT
    )
    if probe.returncode != 0:
        raise CheckFailed(
            f"{service_python} cannot run onnxruntime: {probe.stderr.strip()[-2000:]}"
        )
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    paths = [*found["lib_dirs"], *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":"))]
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(paths)}
    if device == "cuda":
        if CUDA not in found["providers"]:
            raise CheckFailed(f"onnxruntime in {service_python} has no {CUDA}: {found}")
        session = subprocess.run(
            [service_python, "-c", CUDA_SESSION_PROBE],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        if session.returncode != 0 or session.stdout.strip().splitlines()[-1:] != [CUDA]:
            raise CheckFailed(
                f"onnxruntime in {service_python} cannot run a session on CUDA; it needs CUDA "
                "13 and cuDNN 9 (pip install 'onnxruntime-gpu[cuda,cudnn]' there, or use the "
                "service image's Python; `make gpu-check` builds such an environment):\n"
                f"{(session.stderr or session.stdout).strip()[-3000:]}"
            )
        print(f"gpu-check: onnxruntime in {service_python} runs on CUDA", flush=True)
    return env


def check_tensorflow_sees_a_gpu() -> None:
    done = run_python("-c", TENSORFLOW_PROBE, check=False)
    gpus = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else []
    if not gpus:
        raise CheckFailed(
            f"TensorFlow in {sys.executable} sees no GPU (install the training extra with "
            "CUDA: pip install -e '.[train-gpu]', or run this in the training image):\n"
            f"{done.stderr.strip()[-2000:]}"
        )
    print(f"gpu-check: TensorFlow sees {', '.join(gpus)}", flush=True)


def serve(
    models_dir: Path, service_python: str, env: dict[str, str], device: str, seconds: float
) -> None:
    """Serve `models_dir` with DEVICE=`device`, check the provider, measure images/s."""
    port = free_port()
    env = {
        **env,
        "MODELS_DIR": str(models_dir),
        "DEVICE": device,
        # What the check is about: onnxruntime's provider (on the CPU, OpenVINO would
        # otherwise take a file that promises bfloat16 on a CPU that has it).
        "ENGINE": "onnxruntime",
        "LOG_JSON": "false",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
        # Room for every image the check's clients can have in flight at once: what is
        # measured is the rate, not the shedding of a deliberate overload.
        "MAX_QUEUE_IMAGES": str(2 * SERVE_CLIENTS * IMAGES_PER_REQUEST),
    }
    server = subprocess.Popen([service_python, "-m", "service"], env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    expected = CUDA if device == "cuda" else CPU
    try:
        wait_until_ready(base, server)
        with urllib.request.urlopen(f"{base}/models", timeout=30) as response:
            listing = json.load(response)
        providers = {m["model_id"]: m["serving"].get("provider") for m in listing["models"]}
        print(f"gpu-check: /models providers: {providers}", flush=True)
        if sorted(providers) != sorted(MODEL_IDS) or any(
            provider != expected for provider in providers.values()
        ):
            raise CheckFailed(
                f"expected both models on {expected}, got {providers} "
                f"(failed: {listing.get('failed')})"
            )
        # The service serves a file only once its self-check has passed on this provider.
        print(f"gpu-check: every model's self-check passed on {expected}", flush=True)
        if device == "cuda":
            print(f"gpu-check: GPU memory while serving: {gpu_memory()}", flush=True)
        for model_id in MODEL_IDS:
            rate = serving_rate(f"{base}/predict?model={model_id}&top_k=1", seconds)
            print(
                f"gpu-check: served {model_id}: {rate:,.0f} images/s ({SERVE_CLIENTS} clients, "
                f"{IMAGES_PER_REQUEST} PNGs per request, {seconds:g} s)",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(timeout=60)


def gpu_memory() -> str:
    """What nvidia-smi says each process holds (the service alone should be listed)."""
    query = ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory"]
    try:
        done = subprocess.run(
            [*query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({err})"
    return "; ".join(done.stdout.strip().splitlines()) or "no process listed"


def serving_rate(url: str, seconds: float) -> float:
    body, content_type = multipart(png_images(IMAGES_PER_REQUEST))
    deadline = time.perf_counter() + seconds

    def client(_: int) -> int:
        images = 0
        while time.perf_counter() < deadline:
            request = urllib.request.Request(url, data=body, method="POST")
            request.add_header("Content-Type", content_type)
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
            except urllib.error.HTTPError as err:
                # Shed at the door when the queue is long: a client retries after Retry-After.
                if err.code == 503 and (wait := err.headers.get("Retry-After")) is not None:
                    time.sleep(min(float(wait), max(0.0, deadline - time.perf_counter())))
                    continue
                raise CheckFailed(f"{url} answered {err.code}: {err.read()[:500]!r}") from None
            images += IMAGES_PER_REQUEST
        return images

    start = time.perf_counter()
    with ThreadPoolExecutor(SERVE_CLIENTS) as pool:
        total = sum(pool.map(client, range(SERVE_CLIENTS)))
    return total / (time.perf_counter() - start)


def png_images(count: int) -> list[bytes]:
    import numpy as np
    from PIL import Image  # the service's dependency, installed with training too

    from training.synthetic import make_images

    pngs = []
    for image in make_images(np.arange(count) % 100, seed=11):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs


def multipart(files: list[bytes], field: str = "files") -> tuple[bytes, str]:
    """A multipart/form-data body with each PNG as one `field` part."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(files)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}"
    )


def wait_until_ready(base: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise CheckFailed(f"the service exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise CheckFailed(f"the service was not ready within {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
