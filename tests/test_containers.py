"""Static checks of the Docker files: there is no Docker engine on these machines, so
nothing here builds or runs an image. We check that the compose file follows the Compose
specification, that the Dockerfiles pass hadolint, and that every path, port, command,
module and setting they name exists in the project."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from service.config import Settings
from service.main import create_app
from training.__main__ import DEFAULT_MODELS_DIR, DEFAULT_REPORTS_DIR, DEFAULT_RUNS_DIR, parser

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def dockerfile(name: str) -> str:
    return (ROOT / SERVICES[name]["build"]["dockerfile"]).read_text()


def instructions(text: str, keyword: str) -> list[str]:
    joined = text.replace("\\\n", " ")
    return [
        line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(keyword + " ")
    ]


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


def test_gpu_is_reserved_exactly_where_intended():
    for name in ("api", "train"):
        (device,) = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for name in ("api-cpu", "train-cpu"):
        assert "deploy" not in SERVICES[name]
    assert SERVICES["api-cpu"]["environment"]["DEVICE"] == "cpu"
    assert "profiles" not in SERVICES["api"]  # `docker compose up` serves
    assert SERVICES["train"]["profiles"] == ["train"]


def test_api_image_serves_the_app_as_non_root_without_tensorflow():
    text = dockerfile("api")
    (cmd,) = instructions(text, "CMD")
    # python -m service: our server, every limit from the settings (PORT default 8000)
    assert re.search(r"exec python -m service\b", cmd) and Path("service/__main__.py").is_file()
    port = str(Settings.model_fields["port"].default)
    assert "PROMETHEUS_MULTIPROC_DIR=" in text and "WEB_CONCURRENCY=" in text
    assert instructions(text, "EXPOSE") == [port]
    assert SERVICES["api"]["ports"] == [f"{port}:{port}"]
    (user,) = instructions(text, "USER")
    assert user not in ("root", "0")

    # Only the service package goes in, installed without extras: no TensorFlow.
    copied = [c.split()[0] for c in instructions(text, "COPY")]
    assert "training" not in copied and "service" in copied
    assert "pip install ." in text.replace("\\\n", " ")
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in base if re.match(r"(tensorflow|keras|tf2onnx|onnxruntime==)", d)]
    assert any(d.startswith("onnxruntime-gpu==") for d in base)


def test_api_healthcheck_settings_and_volume_match_the_app():
    api = SERVICES["api"]
    routes = create_app().openapi()["paths"]
    for check in (
        api["healthcheck"]["test"][-1],
        instructions(dockerfile("api"), "HEALTHCHECK")[0],
    ):
        url = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]+)", check)
        assert url[1] == "8000" and url[2] in routes
    names = set(Settings.model_fields)
    names |= {a.lower() for f in Settings.model_fields.values() if f.validation_alias
              for a in f.validation_alias.choices}  # fmt: skip
    for variable in api["environment"]:
        assert variable.lower() in names, variable
    mounts = {v.split(":")[1]: v.split(":") for v in api["volumes"]}
    for variable in ("MODELS_DIR", "REPORTS_DIR"):
        host, _, mode = mounts[api["environment"][variable]]
        assert mode == "ro" and host.startswith("./")


def test_bind_mounted_folders_exist_in_a_fresh_clone():
    # Docker would create a missing one as root, and the training user could not write it.
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).is_dir(), source
                assert (
                    subprocess.run(
                        ["git", "ls-files", "--error-unmatch", source],
                        cwd=ROOT,
                        capture_output=True,
                    ).returncode
                    == 0
                ), f"{source} is not in git"


def test_train_service_runs_the_training_cli_into_the_mounted_folders():
    train = SERVICES["train"]
    text = dockerfile("train")
    assert instructions(text, "ENTRYPOINT") == ['["python", "-m", "training"]']
    args = parser().parse_args([a.replace("${EPOCHS:-48}", "48") for a in train["command"]])
    assert args.command.__name__ == "run_train_export" and args.epochs == 48
    (workdir,) = instructions(text, "WORKDIR")
    mounts = dict(v.split(":")[:2] for v in train["volumes"])
    assert mounts["./models"] == f"{workdir}/{DEFAULT_MODELS_DIR}"
    assert mounts["./runs"] == f"{workdir}/{DEFAULT_RUNS_DIR}"
    assert mounts["./reports"] == f"{workdir}/{DEFAULT_REPORTS_DIR}"
    cache = train["environment"]["CIFAR100_CACHE"]
    assert cache in mounts.values() and f"CIFAR100_CACHE={cache}" in text
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert re.search(r'pip install "\.\[([\w-]+)\]"', text)[1] in extras


def test_only_the_gpu_build_of_onnxruntime_is_installed():
    """onnxruntime and onnxruntime-gpu own the same module; side by side they break."""
    import importlib.metadata

    names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names
