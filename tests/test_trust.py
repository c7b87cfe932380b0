"""Signed files (contract/trust.py, training/sign.py): keys made here with openssl, the
session's exported files signed by the real `python -m training sign`, served by a real
`python -m service` over a real socket with TRUSTED_KEYS set. A signed file serves; the
same file changed by one byte after signing, an unsigned file, a file signed by another
key and a bundle rewritten to match a changed file are each refused with their reason
while the others serve; on startup, on reload and when a file is added. The twins and the
Triton repository's copies verify too, with the library's own verifier as well as ours.
The expected fingerprints come from openssl, not from the code under test."""

import base64
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import model_signing
import pytest

from bench.load import multipart_body, pixel_images, png_bytes
from bench.modelfiles import copy_verified
from bench.servers import HOST, service_process
from contract.classifier import Classifier
from contract.errors import InvalidModel
from contract.trust import TrustedKeys, UnusableKeys, bundle_path
from tests.service_helpers import serve
from tests.signing import flip_byte, make_key, openssl
from training.sign import sign_file

ROOT = Path(__file__).resolve().parent.parent
SMALL, LARGE = "cifar100-712868", "cifar100-5735844"
MISSING = "no signature bundle (x.onnx.sig) beside it"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, Path, str]]:
    """`current` and `next` (both trusted while keys rotate) and a `stranger`'s."""
    folder = tmp_path_factory.mktemp("keys")
    return {name: make_key(folder, name) for name in ("current", "next", "stranger")}


@pytest.fixture(scope="module")
def trusted(keys, tmp_path_factory) -> Path:
    """TRUSTED_KEYS as a folder holding the public keys of `current` and `next`."""
    folder = tmp_path_factory.mktemp("trusted")
    for name in ("current", "next"):
        shutil.copy(keys[name][1], folder / f"{name}.pub")
    return folder


def sign_cli(key: Path, *files: Path) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "training", "sign", "--key", str(key), *map(str, files)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run.stdout


def forge_bundle(path: Path) -> None:
    """The bundle beside `path` rewritten to name `path`'s current digest, as someone who
    changed the file but holds no key would: the envelope's payload changes, its signature
    cannot follow."""
    bundle = json.loads(bundle_path(path).read_text())
    envelope = bundle["dsseEnvelope"]
    statement = json.loads(base64.b64decode(envelope["payload"]))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    statement["predicate"]["resources"][0]["digest"] = digest
    statement["subject"][0]["digest"]["sha256"] = hashlib.sha256(bytes.fromhex(digest)).hexdigest()
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    bundle_path(path).write_text(json.dumps(bundle))


def get(port: int, path: str) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def predict(port: int, model_id: str) -> dict:
    body, content_type = multipart_body(png_bytes(pixel_images(1)[0]), "one.png", "file")
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        connection.request(
            "POST", f"/predict?model={model_id}", body, {"Content-Type": content_type}
        )
        response = connection.getresponse()
        assert response.status == 200, response.read()
        return json.loads(response.read())
    finally:
        connection.close()


def until(check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "never came true"
        time.sleep(0.1)
    return result


@pytest.fixture(scope="module")
def mixed_folder(models_dir, keys, tmp_path_factory) -> Path:
    """A models folder holding each case (file name -> what it is):
    small.onnx       the small model, signed by `current`: served
    large.onnx       the large model, signed by `next` (rotation): served
    changed.onnx     the large model signed by `current`, then one byte changed: refused
    unsigned.onnx    the large model, no bundle: refused
    stranger.onnx    the large model signed by a key not trusted: refused
    forged.onnx      changed after signing, its bundle rewritten to match: refused
    certified.onnx   a bundle that names a certificate, not a key: refused"""
    folder = tmp_path_factory.mktemp("mixed")
    shutil.copy(models_dir / f"{SMALL}.onnx", folder / "small.onnx")
    for name in ("large", "changed", "unsigned", "stranger", "forged", "certified"):
        shutil.copy(models_dir / f"{LARGE}.onnx", folder / f"{name}.onnx")
    printed = sign_cli(keys["current"][0], folder / "small.onnx", folder / "changed.onnx",
                       folder / "forged.onnx")  # fmt: skip
    assert f"(key {keys['current'][2]})" in printed
    sign_cli(keys["next"][0], folder / "large.onnx")
    sign_cli(keys["stranger"][0], folder / "stranger.onnx")
    flip_byte(folder / "changed.onnx")
    flip_byte(folder / "forged.onnx")
    forge_bundle(folder / "forged.onnx")
    bundle = json.loads(bundle_path(folder / "large.onnx").read_text())
    material = bundle["verificationMaterial"]
    material["x509CertificateChain"] = {"certificates": []}
    del material["publicKey"]
    bundle_path(folder / "certified.onnx").write_text(json.dumps(bundle))
    return folder


def test_signed_files_serve_and_each_untrusted_one_is_refused_with_its_reason(
    mixed_folder, trusted, keys
):
    with service_process(models_dir=mixed_folder, trusted_keys=trusted) as (port, _):
        status, listing = get(port, "/models")
        assert status == 200
        served = {m["file"]: m for m in listing["models"]}
        assert set(served) == {"small.onnx", "large.onnx"}
        assert served["small.onnx"]["provenance"] == f"verified by {keys['current'][2]}"
        assert served["large.onnx"]["provenance"] == f"verified by {keys['next'][2]}"
        failed = listing["failed"]
        assert set(failed) == {"changed.onnx", "unsigned.onnx", "stranger.onnx", "forged.onnx",
                               "certified.onnx"}  # fmt: skip
        assert failed["changed.onnx"].startswith("its bytes are not the bytes signed")
        assert failed["unsigned.onnx"].startswith(MISSING.replace("x.onnx", "unsigned.onnx"))
        assert failed["stranger.onnx"].startswith("signed by a key that TRUSTED_KEYS does not")
        assert keys["current"][2] in failed["stranger.onnx"]  # it names what it trusts
        assert failed["forged.onnx"].startswith("its bundle's signature does not verify")
        assert failed["certified.onnx"].startswith("its bundle is not signed with a key")
        assert get(port, "/health/ready")[0] == 200
        for model_id in (SMALL, LARGE):
            assert predict(port, model_id)["model_id"] == model_id
        _, detail = get(port, f"/models/{SMALL}")
        assert detail["provenance"] == f"verified by {keys['current'][2]}"


def test_readiness_lists_the_refused_files_when_none_verifies(mixed_folder, trusted, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("unsigned.onnx", "changed.onnx", "changed.onnx.sig"):
        shutil.copy(mixed_folder / name, folder / name)
    with service_process(models_dir=folder, trusted_keys=trusted,
                         ready_path="/health/live") as (port, _):  # fmt: skip
        status, health = get(port, "/health/ready")
        assert status == 503
        assert "unsigned.onnx: no signature bundle" in health["detail"]
        assert "changed.onnx: its bytes are not the bytes signed" in health["detail"]


def test_reload_and_hot_add_verify_each_file(models_dir, keys, trusted, tmp_path):
    """With reloading on: an unsigned file added is refused until its bundle arrives
    (the bundle counts as a change), and a served file replaced by changed bytes is
    refused while the version it was meant to replace keeps serving."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(models_dir / f"{SMALL}.onnx", folder / "small.onnx")
    sign_file(folder / "small.onnx", keys["current"][0])
    settings = {"models_dir": folder, "trusted_keys": trusted, "model_poll_seconds": 0.2}
    with service_process(**settings) as (port, _):
        shutil.copy(models_dir / f"{LARGE}.onnx", folder / ".large.tmp")
        os.replace(folder / ".large.tmp", folder / "large.onnx")
        failed = until(lambda: get(port, "/models")[1]["failed"].get("large.onnx"))
        assert failed.startswith("no signature bundle (large.onnx.sig)")
        sign_file(folder / "large.onnx", keys["next"][0])
        until(lambda: not get(port, "/models")[1]["failed"])
        listing = get(port, "/models")[1]
        provenance = {m["model_id"]: m["provenance"] for m in listing["models"]}
        assert provenance == {SMALL: f"verified by {keys['current'][2]}",
                              LARGE: f"verified by {keys['next'][2]}"}  # fmt: skip
        before = {m["model_id"]: m["version"] for m in listing["models"]}[SMALL]
        changed = folder / ".small.tmp"
        shutil.copy(folder / "small.onnx", changed)
        flip_byte(changed)
        os.replace(changed, folder / "small.onnx")  # the old bundle stays beside it
        failed = until(lambda: get(port, "/models")[1]["failed"].get("small.onnx"))
        assert failed.startswith("its bytes are not the bytes signed")
        versions = {m["model_id"]: m["version"] for m in get(port, "/models")[1]["models"]}
        assert versions[SMALL] == before
        assert predict(port, SMALL)["model_version"] == before


def test_without_trusted_keys_every_file_serves_not_verified(client):
    models = client.get("/models").json()["models"]
    assert models and {m["provenance"] for m in models} == {"not verified"}


@pytest.mark.parametrize("case", ["private key", "empty folder", "not a key", "RSA key", "none"])
def test_trusted_keys_that_name_no_usable_key_stop_startup(
    case, keys, monkeypatch, models_dir, tmp_path
):
    if case == "private key":
        source, message = keys["current"][0], "is a private key"
    elif case == "empty folder":
        source, message = tmp_path, "the folder holds no key file"
    elif case == "not a key":
        (source := tmp_path / "notes.pub").write_text("hello\n")
        message = "is not a PEM public key"
    elif case == "RSA key":
        source, message = tmp_path / "rsa.pub", "is not an elliptic-curve key"
        openssl("genpkey", "-algorithm", "RSA", "-out", str(tmp_path / "rsa.pem"))
        openssl("pkey", "-in", str(tmp_path / "rsa.pem"), "-pubout", "-out", str(source))
    else:
        source, message = tmp_path / "absent", "No such file or directory"
    with pytest.raises(UnusableKeys, match=message), serve(monkeypatch, models_dir,
                                                           trusted_keys=source):  # fmt: skip
        pass


def test_twins_signed_at_export_and_triton_copies_verify(
    models_dir, cifar_tarball, keys, trusted, tmp_path
):
    """`export --precision int8/float16 --signing-key` signs each twin it writes;
    export-triton carries each file's bundle beside its copy. Every file verifies with
    model-signing's own verifier (its public API, reading the file from disk) and with
    ours on the bytes loaded; a copy changed afterwards does not."""
    from training.__main__ import main

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(models_dir / f"{SMALL}.onnx", folder)
    sign_file(folder / f"{SMALL}.onnx", keys["current"][0])
    common = ["--data-dir", str(cifar_tarball), "--val-size", "500", "--models-dir", str(folder)]
    for precision in ("int8", "float16"):
        command = ["export", "--model", SMALL, "--precision", precision, *common]
        assert main([*command, "--signing-key", str(keys["next"][0])]) == 0
    repository = tmp_path / "repository"
    assert main(["export-triton", "--models-dir", str(folder), "--out", str(repository)]) == 0
    files = {
        SMALL: (folder / f"{SMALL}.onnx", "current"),
        f"{SMALL}-int8": (folder / f"{SMALL}-int8.onnx", "next"),
        f"{SMALL}-float16": (folder / f"{SMALL}-float16.onnx", "next"),
    }
    keyring = TrustedKeys(trusted)
    library = {
        name: model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys[name][1])
        for name in ("current", "next")
    }
    for model_id, (path, signer) in files.items():
        copy = repository / model_id / "1" / "model.onnx"
        assert copy.read_bytes() == path.read_bytes()
        for each in (path, copy):
            library[signer].verify(each, bundle_path(each))  # raises on a mismatch
            model = Classifier(each, "cpu", 1, 1, max_batch_size=4, trusted=keyring)
            assert model.provenance == f"verified by {keys[signer][2]}"
            assert model.model_id == model_id
    copy = repository / f"{SMALL}-int8" / "1" / "model.onnx"
    flip_byte(copy)
    with pytest.raises(ValueError, match="Signature mismatch"):
        library["next"].verify(copy, bundle_path(copy))
    with pytest.raises(InvalidModel, match="its bytes are not the bytes signed"):
        Classifier(copy, "cpu", 1, 1, trusted=keyring)


def test_bench_copies_only_verified_bytes_with_their_bundle(
    mixed_folder, trusted, monkeypatch, tmp_path
):
    monkeypatch.setenv("TRUSTED_KEYS", str(trusted))
    copy_verified(mixed_folder / "small.onnx", tmp_path / "small.onnx")
    assert (tmp_path / "small.onnx").read_bytes() == (mixed_folder / "small.onnx").read_bytes()
    TrustedKeys(trusted).verify(tmp_path / "small.onnx", (tmp_path / "small.onnx").read_bytes())
    with pytest.raises(InvalidModel, match="its bytes are not the bytes signed"):
        copy_verified(mixed_folder / "changed.onnx", tmp_path / "changed.onnx")
    assert not (tmp_path / "changed.onnx").exists()


def test_sign_without_a_key_or_with_a_public_one_is_one_line(keys, mixed_folder):
    for args, message in (
        ([], "error: no key: pass --key or set $SIGNING_KEY"),
        (["--key", str(keys["current"][1])], f"error: {keys['current'][1]}: not a PEM private"),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "training", "sign", *args, str(mixed_folder / "small.onnx")],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
            env={k: v for k, v in os.environ.items() if k != "SIGNING_KEY"},
        )  # fmt: skip
        assert run.returncode == 2 and run.stderr.startswith(message), run.stderr
        assert len(run.stderr.strip().splitlines()) == 1


def test_the_keys_reach_the_service_from_a_secret_never_from_the_image(tmp_path):
    """deploy/: the Kubernetes component mounts the Secret as TRUSTED_KEYS (built with the
    real kustomize, validated against the Kubernetes schema, strict); the compose file
    gives the service the public keys and the training containers the private key, as
    compose secrets (the compose specification's schema)."""
    import kubernetes_validate
    import yaml

    deploy = ROOT / "deploy"
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(deploy / "kubernetes" / "base", tmp_path)],
        "components": [os.path.relpath(deploy / "kubernetes" / "components" / "trusted-keys",
                                       tmp_path)],
    }))  # fmt: skip
    kubectl = Path(sys.executable).with_name("kubectl")
    built = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert built.returncode == 0, built.stderr
    (deployment,) = [o for o in yaml.safe_load_all(built.stdout) if o["kind"] == "Deployment"]
    kubernetes_validate.validate(
        deployment, kubernetes_validate.utils.latest_version(), strict=True
    )
    pod = deployment["spec"]["template"]["spec"]
    (api,) = pod["containers"]
    env = {v["name"]: v.get("value") for v in api["env"]}
    assert env["TRUSTED_KEYS"] == "/run/keys/trusted" and env["MODELS_DIR"] == "/models"
    mounts = {m["name"]: m for m in api["volumeMounts"]}
    assert mounts["trusted-keys"] == {"name": "trusted-keys", "mountPath": "/run/keys/trusted",
                                      "readOnly": True}  # fmt: skip
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["trusted-keys"]["secret"]["secretName"] == "cifar100-trusted-keys"
    assert "models" in mounts and "models" in volumes  # the base's stay

    compose = deploy / "compose" / "signed-models.yml"
    checked = subprocess.run([Path(sys.executable).with_name("check-jsonschema"),
                              "--builtin-schema", "vendor.compose-spec", str(compose)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    services = yaml.safe_load(compose.read_text())["services"]
    main_file = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert set(services) <= set(main_file)  # it overrides services that exist
    for name in ("api", "api-cpu"):
        assert services[name]["secrets"] == ["trusted-keys"]
        assert services[name]["environment"] == {"TRUSTED_KEYS": "/run/secrets/trusted-keys"}
    for name in ("train", "train-cpu"):
        assert services[name]["secrets"] == ["signing-key"]
        assert services[name]["environment"] == {"SIGNING_KEY": "/run/secrets/signing-key"}
