"""Session fixtures: a small dataset in the official format, and models trained and
exported from it by the real command line, shared by the training and service tests."""

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.service_helpers import serve
from tests.synthetic import make_images, write_cifar100, write_tarball

# Servers the tests start by other routes than service_process or live_server (the
# gpu-check's `python -m service`) serve no gRPC unless a test names a port: the default
# 8081 may be taken on the machine, or by another server of this run.
os.environ.setdefault("GRPC_PORT", "0")
# The suite compares the service's answers with onnxruntime's float32 outputs for the same
# files, so every server it starts computes float32 files in float32 (PRECISION), whatever
# this CPU offers; tests/test_engines.py asks for the other precisions and the automatic
# choice by name.
os.environ.setdefault("PRECISION", "float32")

KSERVE_SDK = ("kserve==0.21.0", "kubernetes==35.0.0")
TRITON_GRPC = ("tritonclient[grpc]==2.73.0", "numpy==2.4.6")
GRPC_TOOLS = ("grpcio-tools==1.85.4",)
VAL_SIZE = 500
SMALL_VAL_SIZE = 100  # of small_tarball's 800 training images

# The tiers. A test is marked here, by what it uses, so a new one lands in its tier without
# anyone marking it: by the fixtures it uses (however indirectly), or, where no fixture
# shows the cost, by name; a test in none of these tiers is `quick`. `make check` runs the
# quick ones (`pytest -m quick`); `make test` and CI run every test.
TIERS_BY_FIXTURE = {
    "workspace": "trained",  # the models this run trains and exports (models_dir, client, ...)
    "small_tarball": "trained",  # training processes of its own, on the small dataset
    "stack": "containers",  # images built and run by a Docker engine
    "qemu": "emulated",  # an emulated CPU
}
TIERS_BY_NAME = {
    "test_training.py::test_same_seed_same_weights": "trained",
    "test_training.py::test_speed_switches_reach_tensorflow_and_keras_and_are_saved": "trained",
    "test_training.py::test_gpu_check_steps_run_end_to_end_on_the_cpu": "trained",
    # servers started and measured for rounds, as `make bench-floor` does
    "test_bench.py::test_the_floor_mode_measures_every_target_against_the_bare_asgi_app": (
        "benchmark"
    ),
    "test_bench.py::test_the_shadow_mode_compares_every_copy_of_the_same_answers_or_sheds_it": (
        "benchmark"
    ),
}
# A quick-tier test slower than this (set-up and call, on the machine at hand) is named at
# the end of the run, so that it is moved before the quick tier stops being quick.
QUICK_NOTICE_S = 30


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tiers = {TIERS_BY_FIXTURE[f] for f in TIERS_BY_FIXTURE.keys() & set(item.fixturenames)}
        name = f"{item.path.name}::{item.originalname}"
        tiers |= {TIERS_BY_NAME[name]} if name in TIERS_BY_NAME else set()
        for tier in sorted(tiers) or ["quick"]:
            item.add_marker(tier)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    seconds: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            # Set-up and call: a teardown may be a shared fixture's, ended after its last user.
            quick = isinstance(report, pytest.TestReport) and "quick" in report.keywords
            if quick and report.when != "teardown":
                seconds[report.nodeid] = seconds.get(report.nodeid, 0) + report.duration
    slow = sorted((s, n) for n, s in seconds.items() if s > QUICK_NOTICE_S)
    if slow:
        terminalreporter.section("quick-tier tests that are not quick")
        for s, nodeid in reversed(slow):
            terminalreporter.write_line(f"{s:6.0f} s  {nodeid}")
        terminalreporter.write_line(
            "Name each in tests/conftest.py (TIERS_BY_NAME), or by the fixture that costs the "
            "time (TIERS_BY_FIXTURE), unless this machine was just busy."
        )


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """<tmp>/cifar-100-python: 40 training and 5 test images per class."""
    return write_cifar100(tmp_path_factory.mktemp("data"), train_per_class=40, test_per_class=5)


@pytest.fixture(scope="session")
def cifar_tarball(cifar_dir, tmp_path_factory) -> Path:
    return write_tarball(cifar_dir, tmp_path_factory.mktemp("archive") / "cifar-100-python.tar.gz")


@pytest.fixture(scope="session")
def small_tarball(tmp_path_factory) -> Path:
    """A smaller copy for tests that start training processes of their own (kills,
    resumes, devices): 8 training and 2 test images per class; use SMALL_VAL_SIZE."""
    folder = write_cifar100(tmp_path_factory.mktemp("small"), train_per_class=8, test_per_class=2)
    return write_tarball(folder, folder.parent / "cifar-100-python.tar.gz")


@pytest.fixture(scope="session")
def workspace(cifar_tarball, tmp_path_factory) -> Path:
    """Both models trained, evaluated and exported by `python -m training`.

    The small model trains long enough to learn the synthetic classes; the large one
    trains one epoch, enough to exercise every path. Both keep the old dropout (0.25 /
    0.5): the page, report and reload tests need two imperfect models that disagree
    somewhere, and without dropout both learn the synthetic classes perfectly.
    """
    from training.__main__ import main

    root = tmp_path_factory.mktemp("workspace")
    common = ["--data-dir", str(cifar_tarball), "--val-size", str(VAL_SIZE)]
    common += ["--runs-dir", str(root / "runs")]
    for model_id, epochs in (("cifar100-712868", "5"), ("cifar100-5735844", "1")):
        train = ["train", "--model", model_id, "--epochs", epochs, "--batch-size", "64"]
        dropout = ["--conv-dropout", "0.25", "--dense-dropout", "0.5"]
        assert main([*train, "--no-augment", *dropout, *common]) == 0
        assert (
            main(["export", "--model", model_id, "--models-dir", str(root / "models"), *common])
            == 0
        )
    return root


@pytest.fixture(scope="session")
def models_dir(workspace) -> Path:
    return workspace / "models"


@pytest.fixture
def model_copy(models_dir, tmp_path) -> Path:
    """A private models folder a test may add broken files to."""
    return Path(shutil.copytree(models_dir, tmp_path / "models"))


@pytest.fixture(scope="session")
def images() -> np.ndarray:
    """Six synthetic images of known classes, uint8 [6, 32, 32, 3], for the service tests."""
    return make_images(np.array([3, 17, 42, 99, 0, 58]), seed=11)


@pytest.fixture
def client(monkeypatch, models_dir):
    """The real app, lifespan included, serving the session's models (in-process)."""
    with serve(monkeypatch, models_dir) as client:
        yield client


def venv_python(packages: tuple[str, ...]) -> Path:
    """A Python with `packages` (pinned) in a venv of its own under the user's cache, for
    clients whose pins clash with ours: created once (needs PyPI the first time)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cifar100"
    tag = "-".join(p.replace("==", "-").replace("[", "-").replace("]", "") for p in packages)
    venv = cache / f"venv-{tag}-py{sys.version_info.major}.{sys.version_info.minor}"
    python = venv / "bin" / "python"
    done = venv / ".installed"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once build it once
        if not done.exists():
            shutil.rmtree(venv, ignore_errors=True)
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
            subprocess.run(
                [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 *packages],
                check=True, timeout=900,
            )  # fmt: skip
            done.write_text("\n".join(packages))
    return python


@pytest.fixture(scope="session")
def kserve_python() -> Path:
    """A Python with KServe's SDK (its client and its typed manifests): about 90 s and
    450 MB the first time, since its pins clash with ours."""
    return venv_python(KSERVE_SDK)


@pytest.fixture(scope="session")
def triton_grpc_python() -> Path:
    """A Python with tritonclient's gRPC client: it needs protobuf below 7, and the train
    extra pins protobuf 7 (TensorFlow's), so it cannot share our environment."""
    return venv_python(TRITON_GRPC)


@pytest.fixture(scope="session")
def grpc_tools_python() -> Path:
    """A Python with grpcio-tools (protoc), to check the committed generated code is
    current: grpcio-tools wants a newer setuptools than our environment holds."""
    return venv_python(GRPC_TOOLS)
