"""The score job on real Ray: a two-node cluster on this machine (`ray start --head` and a
second `ray start --address`, each one CPU, on free loopback ports, stopped at the end),
`python -m score` run against it as a user would, and its Parquet checked row by row
against onnxruntime on the same files (asked directly, not through the service's code)
and against the service's own /predict answer for the same image. A run killed mid-way
and rerun gives what an uninterrupted run gives; bad files become rows with an error.
No timing is asserted."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bench.raycluster import local_cluster
from score.__main__ import build_parser
from service.config import available_cpus
from tests.interrupt import kill_when
from training import data as cifar100
from training.processes import ROOT, run_python

MODEL = "cifar100-712868"
IMAGES = 40  # of the test split, as 32x32 PNG files
SHARD_SIZE, BATCH_SIZE = 16, 8
CLUSTER_START_S = 120


@pytest.fixture(scope="module")
def cluster():
    """The environment of a driver joining a two-node cluster, one CPU a node."""
    with local_cluster([1, 1], start_timeout=CLUSTER_START_S) as env:
        yield env


def score(env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_python("-m", "score", *args, env=env, timeout=timeout)


def read_shards(folder: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("part-*.parquet")))


@pytest.fixture(scope="module")
def image_folder(cifar_dir, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """IMAGES test-split images as 32x32 PNGs, two larger ones to resize, and bad files."""
    folder = tmp_path_factory.mktemp("photos")
    pixels = cifar100.test_split(cifar_dir).images[:IMAGES]
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"img-{i:03d}.png")
    big = Image.fromarray(pixels[0]).resize((64, 48))
    big.save(folder / "photo.jpg", quality=90)
    Image.fromarray(pixels[1]).convert("RGBA").resize((50, 40)).save(folder / "wide.png")
    (folder / "notes.png").write_text("not an image\n")
    whole = (folder / "img-002.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "oversized.jpg").write_bytes(np.random.default_rng(0).bytes(1_200_000))
    Image.new("1", (3000, 3000)).save(folder / "bomb.png")  # 9 Mpx in a few hundred bytes
    return folder, pixels


BAD = {"notes.png": 422, "truncated.png": 422, "oversized.jpg": 413, "bomb.png": 413}


@pytest.fixture(scope="module")
def scored(cluster, image_folder, models_dir, tmp_path_factory) -> tuple[pa.Table, str]:
    env = cluster
    folder, _ = image_folder
    out = tmp_path_factory.mktemp("scores")
    run = score(
        env,
        "--model",
        MODEL,
        "--models-dir",
        str(models_dir),
        "--input",
        str(folder),
        "--output",
        str(out),
        "--resize",
        "--features",
        "--shard-size",
        str(SHARD_SIZE),
        "--batch-size",
        str(BATCH_SIZE),
        "--progress-seconds",
        "0",
    )
    return read_shards(out), run.stderr


def session_answers(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"images": images}), strict=True))


def test_rows_equal_onnxruntime_on_the_files(scored, image_folder, models_dir):
    table, stderr = scored
    folder, pixels = image_folder
    files = sorted(p for p in folder.iterdir())
    assert table["path"].to_pylist() == [str(p) for p in files]
    assert table["index"].to_pylist() == list(range(len(files)))
    assert "images/s" in stderr and "ETA" in stderr
    # one actor a CPU: the two actors are on the two nodes
    assert "2 actor(s), 1 CPU(s) and 0 GPU(s) each, on a Ray cluster of 2 node(s)" in stderr
    path = models_dir / f"{MODEL}.onnx"
    meta = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
    names = json.loads(meta["class_names"])
    to_coarse = np.array(json.loads(meta["fine_to_coarse"]))
    supers = json.loads(meta["superclass_names"])
    pngs = [
        np.asarray(Image.open(folder / f"img-{i:03d}.png").convert("RGB")) for i in range(IMAGES)
    ]
    np.testing.assert_array_equal(np.stack(pngs), pixels)  # the files hold the pixels
    expected = session_answers(path, np.stack(pngs))
    rows = {r["path"]: r for r in table.to_pylist()}
    for i in range(IMAGES):
        row = rows[str(folder / f"img-{i:03d}.png")]
        probabilities = expected["probabilities"][i]
        top = np.argsort(-probabilities, kind="stable")[:5]
        assert row["error"] is None
        assert row["model_id"] == MODEL
        assert row["top_k_ids"] == top.tolist()
        assert row["top_k_labels"] == [names[k] for k in top]
        np.testing.assert_allclose(
            row["top_k_probabilities"], probabilities[top], rtol=1e-5, atol=1e-7
        )
        sums = np.bincount(to_coarse, weights=probabilities, minlength=20)
        assert row["superclass_id"] == int(sums.argmax())
        assert row["superclass"] == supers[int(sums.argmax())]
        assert row["superclass_probability"] == pytest.approx(sums.max(), rel=1e-5)
        assert row["familiarity"] == pytest.approx(float(expected["familiarity"][i, 0]), abs=1e-6)
        np.testing.assert_allclose(row["features"], expected["features"][i], rtol=1e-4, atol=1e-5)


def test_rows_equal_the_services_predict(scored, client):
    table, _ = scored
    version = {m["model_id"]: m["version"] for m in client.get("/models").json()["models"]}
    for row in table.to_pylist():
        name = Path(row["path"]).name
        with open(row["path"], "rb") as file:
            answer = client.post(
                "/predict",
                params={"model": MODEL, "resize": "true"},
                files={"file": (name, file.read())},
            )
        if name in BAD:
            assert answer.status_code == BAD[name], answer.text
            assert row["error"] and row["top_k_ids"] is None and row["model_id"] is None
            if name != "oversized.jpg":  # the service refuses it by its upload size first
                assert row["error"] in answer.json()["detail"]
            continue
        assert answer.status_code == 200, answer.text
        body = answer.json()
        (prediction,) = body["predictions"]
        assert row["model_version"] == body["model_version"] == version[MODEL]
        assert row["top_k_ids"] == [c["class_id"] for c in prediction["top_k"]]
        assert row["top_k_labels"] == [c["label"] for c in prediction["top_k"]]
        np.testing.assert_allclose(
            row["top_k_probabilities"],
            [c["probability"] for c in prediction["top_k"]],
            rtol=1e-5,
            atol=1e-7,
        )
        assert row["superclass_id"] == prediction["superclass"]["superclass_id"]
        assert row["superclass"] == prediction["superclass"]["label"]
        assert row["superclass_probability"] == pytest.approx(
            prediction["superclass"]["probability"], rel=1e-5
        )
        assert row["familiarity"] == pytest.approx(prediction["familiarity"], abs=1e-6)


def test_bad_files_become_error_rows(scored, image_folder):
    table, _ = scored
    folder, _ = image_folder
    rows = {Path(r["path"]).name: r for r in table.to_pylist()}
    assert {name for name, r in rows.items() if r["error"]} == set(BAD)
    assert "not an image" in rows["notes.png"]["error"]
    assert "truncated or corrupt" in rows["truncated.png"]["error"]
    assert "1,200,000 bytes" in rows["oversized.jpg"]["error"]
    assert "3000x3000" in rows["bomb.png"]["error"]
    # every shard was written whole, the bad files' ones too
    assert len(table) == len(list(folder.iterdir()))


def test_killed_job_resumes_to_the_same_output(cluster, cifar_dir, models_dir, tmp_path):
    """The CIFAR-100 test split as input (pixels, no files): a run killed once its first
    shard is written, rerun, equals an uninterrupted run on local Ray (`ray.init()` with
    no address); and both equal onnxruntime on the pixels."""
    env = cluster
    common = [
        "--model",
        MODEL,
        "--models-dir",
        str(models_dir),
        "--input",
        str(cifar_dir),
        "--shard-size",
        "50",
        "--batch-size",
        "1",
        "--actors",
        "1",
    ]
    # Slow on purpose (batches of one image through one actor): the kill lands mid-run.
    killed = tmp_path / "killed"
    kill_when(
        [sys.executable, "-m", "score", *common, "--output", str(killed)],
        lambda: any(killed.glob("part-*.parquet")),
        "the first shard",
        env=env,
        cwd=ROOT,
        timeout=240,
    )
    before = {p.name: p.stat() for p in killed.glob("part-*.parquet")}
    assert 1 <= len(before) < 10, f"{len(before)} of 10 shards when killed"

    resumed = score(env, *common, "--output", str(killed))
    assert f"{len(before)} already written" in resumed.stderr
    for name, stat in before.items():  # untouched, not rewritten
        now = (killed / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)

    # Local Ray, in a folder of its own (short: Ray's socket paths have a length limit), so
    # that `ray.init()` finds no other cluster and starts one.
    local_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    local_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": local_tmp}
    whole = tmp_path / "whole"
    try:
        local = score(local_env, *common, "--output", str(whole))
    finally:
        shutil.rmtree(local_tmp, ignore_errors=True)
    assert "on a Ray cluster of 1 node(s)" in local.stderr
    assert sorted(p.name for p in killed.glob("part-*")) == [
        f"part-{i:05d}.parquet" for i in range(10)
    ]
    assert read_shards(killed).equals(read_shards(whole))

    images = cifar100.test_split(cifar_dir).images
    expected = session_answers(models_dir / f"{MODEL}.onnx", images)["probabilities"]
    table = read_shards(whole)
    assert table["path"].to_pylist() == [f"{cifar_dir}#test/{i}" for i in range(len(images))]
    tops = np.argsort(-expected, axis=1, kind="stable")[:, :5]
    assert table["top_k_ids"].to_pylist() == tops.tolist()


def test_rerun_with_other_settings_is_refused(cluster, image_folder, models_dir, tmp_path):
    env = cluster
    folder, _ = image_folder
    out = tmp_path / "out"
    out.mkdir()
    (out / "_job.json").write_text(json.dumps({"model_id": MODEL, "top_k": 3}))
    run = run_python(
        "-m", "score", "--model", MODEL, "--models-dir", str(models_dir),
        "--input", str(folder), "--output", str(out),
        env=env, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 2
    assert "another job" in run.stderr and "top_k" in run.stderr


def test_list_inputs_and_unknown_model(image_folder, models_dir, tmp_path):
    from score.inputs import list_inputs
    from score.job import JobError, find_model

    folder, _ = image_folder
    pq.write_table(
        pa.table({"path": ["img-001.png", str(folder / "img-000.png")]}),
        folder.parent / "list.parquet",
    )
    (folder.parent / "list.csv").write_text("path\nimg-001.png\n")
    listed = list_inputs(str(folder.parent / "list.parquet"))
    assert listed.paths == [str(folder.parent / "img-001.png"), str(folder / "img-000.png")]
    from_csv = list_inputs(str(folder.parent / "list.csv"))
    assert from_csv.paths == [str(folder.parent / "img-001.png")]
    assert list_inputs(str(folder / "img-00*.png")).paths == [
        str(folder / f"img-{i:03d}.png") for i in range(10)
    ]
    assert find_model(models_dir, MODEL).model_id == MODEL
    with pytest.raises(JobError, match="no model 'nope'"):
        find_model(models_dir, "nope")
    assert build_parser().parse_args(["--model", "m", "--input", "i", "--output", "o"]).top_k == 5


# --- hostile inputs: nothing a path names hangs or crashes the job ----------------------
# Each kind of path that is not a readable regular image file, and the row it must become
# (docs/scoring.md). /proc/self/mem is a file nobody can read from its start, root
# included (reading it fails with EIO), so the case holds whoever runs the suite.
HOSTILE = {
    "fifo": "cannot read the file: not a regular file (a FIFO)",
    "socket": "cannot read the file: not a regular file (a socket)",
    "/dev/zero": "cannot read the file: not a regular file (a character device)",
    "folder": "cannot read the file: not a regular file (a folder)",
    "link-to-folder": "cannot read the file: not a regular file (a folder)",
    "loop-a": "cannot read the file: Too many levels of symbolic links",
    "dangling": "cannot read the file: No such file or directory",
    "unreadable.png": "cannot read the file: Input/output error",
}
HOSTILE_JOB_TIMEOUT_S = 240  # a hang fails the test here instead of stalling the suite


@pytest.fixture
def hostile_folder(image_folder, tmp_path) -> Path:
    """A folder of every HOSTILE kind beside two good images (its socket is bound for the
    test's duration)."""
    import socket

    folder, _ = image_folder
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    shutil.copy(folder / "img-000.png", hostile / "good-1.png")
    shutil.copy(folder / "img-001.png", hostile / "good-2.png")
    os.mkfifo(hostile / "fifo")
    (hostile / "folder").mkdir()
    (hostile / "folder" / "inside.png").write_bytes((folder / "img-002.png").read_bytes())
    (hostile / "link-to-folder").symlink_to(hostile / "folder")
    (hostile / "loop-a").symlink_to(hostile / "loop-b")
    (hostile / "loop-b").symlink_to(hostile / "loop-a")
    (hostile / "dangling").symlink_to(hostile / "nowhere")
    (hostile / "unreadable.png").symlink_to("/proc/self/mem")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(hostile / "socket"))
    yield hostile
    server.close()


def test_a_folder_lists_every_entry_but_its_sub_folders(hostile_folder):
    """Symlink loops, dangling links, FIFOs, sockets and links to folders are listed (each
    becomes an error row), not skipped; the sub-folder is walked, not listed."""
    from score.inputs import list_inputs

    names = {
        str(Path(p).relative_to(hostile_folder)) for p in list_inputs(str(hostile_folder)).paths
    }
    assert names == {"good-1.png", "good-2.png", "fifo", "socket", "link-to-folder", "loop-a",
                     "loop-b", "dangling", "unreadable.png", "folder/inside.png"}  # fmt: skip


def test_non_files_become_error_rows_and_the_good_rows_stay(
    cluster, hostile_folder, models_dir, tmp_path
):
    """A path list naming each HOSTILE kind between two good images, all in one shard and
    one batch, scored with a signed model and TRUSTED_KEYS (the driver and each actor
    verify it): every row comes back within the timeout, each bad one with its error, the
    good ones equal to onnxruntime on the same pixels."""
    from tests.signing import make_key
    from training.sign import sign_file

    private, public, _ = make_key(tmp_path, "signing")
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(models_dir / f"{MODEL}.onnx", models)
    sign_file(models / f"{MODEL}.onnx", private)
    expected_errors = {
        name if name.startswith("/") else str(hostile_folder / name): error
        for name, error in HOSTILE.items()
    }
    paths = [
        str(hostile_folder / "good-1.png"),
        *expected_errors,
        str(hostile_folder / "good-2.png"),
    ]
    listing = hostile_folder / "list.csv"
    listing.write_text("path\n" + "".join(f"{p}\n" for p in paths))
    out = tmp_path / "out"
    run = score(cluster, "--model", MODEL, "--models-dir", str(models), "--input", str(listing),
                "--output", str(out), "--batch-size", "16", "--shard-size", "100",
                "--trusted-keys", str(public), timeout=HOSTILE_JOB_TIMEOUT_S)  # fmt: skip
    assert "1 shard(s)" in run.stderr
    rows = read_shards(out).to_pylist()
    assert [r["path"] for r in rows] == paths
    assert {r["path"]: r["error"] for r in rows[1:-1]} == expected_errors
    good = [rows[0], rows[-1]]
    assert all(r["error"] is None for r in good)
    pixels = np.stack([np.asarray(Image.open(hostile_folder / n).convert("RGB"))
                       for n in ("good-1.png", "good-2.png")])  # fmt: skip
    expected = session_answers(models / f"{MODEL}.onnx", pixels)["probabilities"]
    for row, probabilities in zip(good, expected, strict=True):
        assert row["top_k_ids"] == list(np.argsort(-probabilities, kind="stable")[:5])


def job_error(*args: str, env: dict | None = None) -> str:
    """`python -m score` that must fail as a job error: exit 2, one line on stderr."""
    run = run_python("-m", "score", *args, env=env, timeout=120, check=False)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("score: "), run.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize(
    "case",
    ["output is a file", "input is a FIFO", "list is a FIFO", "list is not Parquet",
     "job record is not one", "model changed after signing", "private key as trusted"],
)  # fmt: skip
def test_job_errors_are_one_line_and_exit_2(case, image_folder, models_dir, tmp_path):
    """Each fails before Ray starts, with the reason and no traceback."""
    from tests.signing import flip_byte, make_key
    from training.sign import sign_file

    folder, _ = image_folder
    common = ["--model", MODEL, "--models-dir", str(models_dir), "--input", str(folder)]
    output = ["--output", str(tmp_path / "out")]
    if case == "output is a file":
        (tmp_path / "out").write_text("taken\n")
        assert "is a file, not a folder" in job_error(*common, *output)
    elif case == "input is a FIFO":
        os.mkfifo(tmp_path / "photos")
        common[-1] = str(tmp_path / "photos")
        assert "photos: not a regular file (a FIFO)" in job_error(*common, *output)
    elif case == "list is a FIFO":
        os.mkfifo(tmp_path / "list.csv")
        common[-1] = str(tmp_path / "list.csv")
        assert "list.csv: not a regular file (a FIFO)" in job_error(*common, *output)
    elif case == "list is not Parquet":
        (tmp_path / "list.parquet").write_text("path\nimg-000.png\n")
        common[-1] = str(tmp_path / "list.parquet")
        assert "cannot be read as a list of paths" in job_error(*common, *output)
    elif case == "job record is not one":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "_job.json").write_text("{not json")
        assert "_job.json is not a job's record" in job_error(*common, *output)
    else:
        private, public, _ = make_key(tmp_path, "signing")
        model = tmp_path / f"{MODEL}.onnx"
        shutil.copy(models_dir / model.name, model)
        sign_file(model, private)
        flip_byte(model)
        trusted = str(private if case == "private key as trusted" else public)
        common[:4] = ["--model", str(model)]
        line = job_error(*common, *output, "--trusted-keys", trusted)
        if case == "private key as trusted":
            assert "is a private key" in line
        else:
            assert "its bytes are not the bytes signed" in line


# --- deploy/ray: the RayJob, checked offline ------------------------------------------
# There is no Kubernetes cluster or KubeRay here, and KubeRay's CRD schema is not
# installable from the package index: the RayJob's own fields are checked against the
# names KubeRay's ray.io/v1 API documents (below), its pod templates strictly against the
# Kubernetes schemas (kubernetes-validate), and everything it names against the project.
DEPLOY = ROOT / "deploy" / "ray"
RAYJOB_SPEC = {
    "entrypoint",
    "runtimeEnvYAML",
    "rayClusterSpec",
    "clusterSelector",
    "shutdownAfterJobFinishes",
    "ttlSecondsAfterFinished",
    "activeDeadlineSeconds",
    "backoffLimit",
    "submissionMode",
    "submitterPodTemplate",
    "submitterConfig",
    "jobId",
    "metadata",
    "suspend",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "entrypointResources",
    "managedBy",
    "deletionStrategy",
}
CLUSTER_SPEC = {
    "rayVersion",
    "headGroupSpec",
    "workerGroupSpecs",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headServiceAnnotations",
    "suspend",
    "managedBy",
    "gcsFaultToleranceOptions",
}
HEAD_SPEC = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_SPEC = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "rayStartParams",
    "template",
    "numOfHosts",
    "scaleStrategy",
    "suspend",
    "idleTimeoutSeconds",
}


@pytest.fixture(scope="module")
def deploy_objects() -> dict[str, dict]:
    return kustomize(DEPLOY)


def kustomize(folder: Path, *options: str) -> dict[str, dict]:
    import yaml

    kubectl = Path(sys.executable).with_name("kubectl")
    build = subprocess.run(
        [kubectl, "kustomize", *options, str(folder)], capture_output=True, text=True, timeout=60
    )
    assert build.returncode == 0, build.stderr
    return {o["kind"]: o for o in yaml.safe_load_all(build.stdout)}


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(name: str) -> str:
    (pin,) = [
        p
        for p in pyproject()["project"]["optional-dependencies"]["score"]
        if p.split("[")[0].split("==")[0] == name
    ]
    return pin.split("==")[1]


def test_rayjob_fields_are_kuberays(deploy_objects):
    assert sorted(deploy_objects) == ["PersistentVolumeClaim", "RayJob"]
    job = deploy_objects["RayJob"]
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= CLUSTER_SPEC, set(cluster) - CLUSTER_SPEC
    assert set(cluster["headGroupSpec"]) <= HEAD_SPEC
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_SPEC, set(group) - WORKER_SPEC
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        # KubeRay passes them to `ray start` as --key=value: a map of strings
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert isinstance(spec[key], int) and spec[key] >= 0


@pytest.mark.parametrize("version", ["1.30.0", "latest"])
def test_rayjob_pods_and_volume_are_valid_kubernetes(deploy_objects, version):
    import kubernetes_validate

    version = kubernetes_validate.utils.latest_version() if version == "latest" else version
    cluster = deploy_objects["RayJob"]["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [g["template"] for g in cluster["workerGroupSpecs"]]
    objects = [deploy_objects["PersistentVolumeClaim"]]
    objects += [
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": t}
        for i, t in enumerate(templates)
    ]
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{obj['kind']} on Kubernetes {version}: {err.message} at {err.path}")


def test_rayjob_runs_our_command_and_image(deploy_objects):
    import shlex

    spec = deploy_objects["RayJob"]["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == pinned("ray")
    # The entrypoint is the command line this package parses.
    python, flag, module, *rest = shlex.split(spec["entrypoint"])
    assert (python, flag, module) == ("python", "-m", "score")
    args = build_parser().parse_args(rest)
    dockerfile = (DEPLOY / "score.Dockerfile").read_text()
    (base,) = [
        line.split("=", 1)[1] for line in dockerfile.splitlines() if line.startswith("ARG BASE=")
    ]
    ray_version, python_tag, _ = base.split(":", 1)[1].split("-")
    assert base.startswith("rayproject/ray:") and ray_version == pinned("ray")
    minor = int(python_tag.removeprefix("py3"))
    assert 11 <= minor <= 13  # requires-python >=3.11,<3.14
    for package in ("service", "training", "score"):  # what score/ imports
        assert f"COPY --chown=1000:100 {package} ./{package}" in dockerfile
    assert 'pip install ".[cpu,score]"' in dockerfile  # onnxruntime's CPU build: no CUDA
    image = f"cifar100-score:{pyproject()['project']['version']}"
    assert f"-t {image}" in dockerfile
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["containers"]
        assert container["image"] == image
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert claims[mounts[str(args.models_dir)]["name"]] == "cifar100-models"  # the service's
        data = Path(args.input).parent
        assert (
            claims[mounts[str(data)]["name"]]
            == deploy_objects["PersistentVolumeClaim"]["metadata"]["name"]
        )
    head = mounts_of(pods[0])
    assert not head[str(args.output.parent)].get("readOnly")  # the driver writes the shards
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # actors on workers


def mounts_of(pod: dict) -> dict[str, dict]:
    (container,) = pod["containers"]
    return {m["mountPath"]: m for m in container["volumeMounts"]}


def test_rayjob_with_trusted_keys_verifies_in_every_pod(deploy_objects, tmp_path, monkeypatch):
    """deploy/ray/components/trusted-keys in an overlay: every pod of the job (the head,
    where the driver checks each file, and the workers, where each actor verifies what it
    loads) reads the service's Secret, read-only, at the folder TRUSTED_KEYS names, which
    the score job takes as --trusted-keys; nothing else of the job changes."""
    import shlex

    import kubernetes_validate
    import yaml

    here = os.path.relpath(DEPLOY, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources:\n  - {here}\ncomponents:\n  - {here}/components/trusted-keys\n"
    )
    signed = kustomize(tmp_path, "--load-restrictor", "LoadRestrictionsNone")
    service = yaml.safe_load(
        (ROOT / "deploy/kubernetes/components/trusted-keys/deployment.yaml").read_text()
    )
    (secret,) = [v["secret"]["secretName"] for v in service["spec"]["template"]["spec"]["volumes"]]
    cluster = signed["RayJob"]["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    folders = set()
    for group in groups:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        folder = env["TRUSTED_KEYS"]
        folders.add(folder)
        mount = mounts_of(pod)[folder]
        assert mount["readOnly"] is True
        volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
        assert volume["secret"]["secretName"] == secret
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                    "template": group["template"]}  # fmt: skip
        kubernetes_validate.validate(template, kubernetes_validate.utils.latest_version(),
                                     strict=True)  # fmt: skip
        # Without what the component added, the pod is the base's.
        container.pop("env")
        container["volumeMounts"].remove(mount)
        pod["volumes"].remove(volume)
    assert len(folders) == 1  # the driver and the actors read one path
    assert signed == deploy_objects
    monkeypatch.setenv("TRUSTED_KEYS", folders.pop())
    _, _, _, *rest = shlex.split(signed["RayJob"]["spec"]["entrypoint"])
    assert str(build_parser().parse_args(rest).trusted_keys) == os.environ["TRUSTED_KEYS"]


def test_score_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run(
        [
            hadolint,
            "--config",
            ".hadolint.yaml",
            "--failure-threshold",
            "info",
            str(DEPLOY / "score.Dockerfile"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_bench_score_smoke_produces_every_row(models_dir, tmp_path):
    """`python -m bench score --smoke`: every row, each related to the ceiling windows next
    to it. No speed is asserted: that is for the benchmark to measure."""
    run_python(
        "-m", "bench", "score", "--smoke", "--models-dir", str(models_dir), "--model", MODEL,
        "--out", str(tmp_path), timeout=900,
    )  # fmt: skip
    results = json.loads((tmp_path / "score.json").read_text())
    assert results["weights"] == "trained weights" and results["images"] == 200
    cpus = available_cpus()
    rows = ["1 node, decode included", "1 node, decode excluded"]
    if cpus >= 2:  # the CPUs split between two nodes
        rows.append(f"2 nodes ({cpus // 2}+{cpus - cpus // 2} CPUs), decode included")
    assert list(results["rows"]) == rows
    for row in results["rows"].values():
        assert row["requests"] == 200
        assert row["ceiling_before"] > 0 and row["ceiling_after"] > 0
        assert row["share_of_ceiling"] == pytest.approx(
            row["images_per_s"] / row["ceiling"], abs=1e-3
        )
    assert results["ceiling_windows"]["count"] == len(rows) + 1
    assert "share of ceiling" in (tmp_path / "score.md").read_text()


def test_score_imports_no_tensorflow_and_the_service_no_ray():
    """In a fresh interpreter: the whole score job, the CIFAR-100 reader it uses included,
    loads without TensorFlow; the service's app loads without Ray or score/."""
    probe = (
        "import sys, score.__main__, score.job, score.scorer, score.inputs, training.data\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]\n"
        "import service.main\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('ray', 'score')]\n"
        "print(sorted(heavy))\n"
    )
    run = run_python("-c", probe, timeout=120)
    # score/ is loaded (this interpreter asked for it) but no module of Ray's
    assert "'ray" not in run.stdout
    service = run_python(
        "-c",
        "import sys, service.main; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'score')))",
        timeout=120,
    )
    assert service.stdout.strip() == "[]", service.stdout
