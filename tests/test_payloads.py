"""Sampled payload logging (service/payloads.py) on a real `python -m service`: familiar
and unfamiliar images in a skewed class mix, over /predict, /v2 (tritonclient) and gRPC;
the shards hold exactly what was sampled, at the rate asked; off, nothing is written; the
disk cap holds under a burst; a read-only folder fails no request; and the traffic report
finds the skew and the unfamiliar share."""

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from scipy import stats

from bench.load import multipart_form, png_bytes
from bench.servers import (
    HOST,
    SETTING_NAMES,
    free_port,
    server_process,
    service_env,
    service_process,
)
from contract.modelcard import FAMILIARITY_NAME, INPUT_NAME, OUTPUT_NAME
from service.rpc import inference_pb2 as pb
from service.rpc.inference_pb2_grpc import GRPCInferenceServiceStub
from tests.synthetic import make_images
from training.__main__ import main as training

SMALL = "cifar100-712868"
RATE = 0.5
PER_REQUEST = 8
UNFAMILIAR = 0.01
ROOT = Path(__file__).resolve().parent.parent
PREDICT, V2 = "/predict", "/v2/models/{model_name}/infer"
GRPC = "/inference.GRPCInferenceService/ModelInfer"


def ask_file(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """The exported file's own outputs, asked directly (not through the service)."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    found = session.run([OUTPUT_NAME, FAMILIARITY_NAME], {INPUT_NAME: images})
    return dict(zip((OUTPUT_NAME, FAMILIARITY_NAME), found, strict=True))


@pytest.fixture(scope="module")
def traffic_images(models_dir) -> tuple[np.ndarray, int]:
    """320 images: 3 in 4 familiar ones in a skewed mix (half of them of one class), 1 in 4
    uniform noise that the file itself finds unfamiliar; and the skewed class."""
    rng = np.random.default_rng(5)
    skewed = 42
    classes = np.where(rng.random(600) < 0.5, skewed, rng.choice([3, 17, 58, 99], 600))
    candidates = make_images(classes, seed=8)
    noise = rng.integers(0, 256, size=(2000, 32, 32, 3), dtype=np.uint8)
    path = models_dir / f"{SMALL}.onnx"
    familiar = candidates[ask_file(path, candidates)[FAMILIARITY_NAME][:, 0] > UNFAMILIAR]
    strange = noise[ask_file(path, noise)[FAMILIARITY_NAME][:, 0] <= UNFAMILIAR]
    assert len(familiar) >= 240 and len(strange) >= 80, (len(familiar), len(strange))
    images = np.concatenate([familiar[:240], strange[:80]])
    return images[rng.permutation(len(images))], skewed


def post(port: int, path: str, body: bytes, headers: dict) -> dict:
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", body, headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def metrics(port: int) -> dict[str, float]:
    """Every sample of /metrics, by name and labels."""
    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=30).read().decode()
    return {
        sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def payload_counts(port: int) -> tuple[float, dict[str, float], float]:
    found = metrics(port)
    dropped = {
        reason: found[f'payload_images_dropped_total{{"reason": "{reason}"}}']
        for reason in ("queue_full", "write_error", "over_cap")
    }
    return found["payload_images_logged_total{}"], dropped, found["payload_bytes_on_disk{}"]


def read_shards(folder: Path) -> dict[str, np.ndarray | list]:
    paths = sorted(folder.glob("*.parquet"))
    assert all(not p.name.startswith(".") for p in paths)
    table = pq.ParquetDataset(paths).read() if paths else None
    return {} if table is None else table.to_pydict()


def send_all(port: int, grpc_port: int, images: np.ndarray) -> dict[tuple[str, int], dict]:
    """Send `images` in requests of PER_REQUEST, in turn over /predict, /v2 (tritonclient)
    and gRPC, each with its own request id; what was sent and answered, by (request id,
    image): the pixels, the top 5 classes and probabilities, the familiarity."""
    sent = {}
    client = triton.InferenceServerClient(f"{HOST}:{port}")
    with grpc.insecure_channel(f"{HOST}:{grpc_port}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        for n, start in enumerate(range(0, len(images), PER_REQUEST)):
            chunk, request_id = images[start : start + PER_REQUEST], uuid.uuid4().hex
            route = (PREDICT, V2, GRPC)[n % 3]
            if route == PREDICT:
                answers = predict(port, chunk, request_id)
            elif route == V2:
                answers = top_5(*infer_v2(client, chunk, request_id))
            else:
                answers = top_5(*infer_grpc(stub, chunk, request_id))
            for i, (pixels, answer) in enumerate(zip(chunk, answers, strict=True)):
                sent[(request_id, i)] = {"route": route, "pixels": pixels, **answer}
    client.close()
    return sent


def predict(port: int, images: np.ndarray, request_id: str) -> list[dict]:
    body, kind = multipart_form([(f"{i}.png", png_bytes(x)) for i, x in enumerate(images)])
    answer = post(port, "/predict", body, {"Content-Type": kind, "X-Request-ID": request_id})
    return [
        {
            "classes": [c["class_id"] for c in p["top_k"]],
            "probabilities": [c["probability"] for c in p["top_k"]],
            "familiarity": p["familiarity"],
        }
        for p in answer["predictions"]
    ]


def infer_v2(client, images: np.ndarray, request_id: str) -> tuple[np.ndarray, np.ndarray]:
    tensor = triton.InferInput(INPUT_NAME, list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=True)
    outputs = [triton.InferRequestedOutput(name) for name in (OUTPUT_NAME, FAMILIARITY_NAME)]
    result = client.infer(SMALL, [tensor], outputs=outputs, headers={"X-Request-ID": request_id})
    return result.as_numpy(OUTPUT_NAME), result.as_numpy(FAMILIARITY_NAME)


def infer_grpc(stub, images: np.ndarray, request_id: str) -> tuple[np.ndarray, np.ndarray]:
    request = pb.ModelInferRequest(model_name=SMALL)
    request.inputs.add(name=INPUT_NAME, datatype="UINT8", shape=images.shape)
    request.raw_input_contents.append(images.tobytes())
    for name in (OUTPUT_NAME, FAMILIARITY_NAME):
        request.outputs.add(name=name)
    reply = stub.ModelInfer(request, metadata=(("x-request-id", request_id),))
    raw = dict(zip([o.name for o in reply.outputs], reply.raw_output_contents, strict=True))
    probabilities = np.frombuffer(raw[OUTPUT_NAME], np.float32).reshape(len(images), -1)
    return probabilities, np.frombuffer(raw[FAMILIARITY_NAME], np.float32).reshape(-1, 1)


def top_5(probabilities: np.ndarray, familiarity: np.ndarray) -> list[dict]:
    """The top 5 as /predict orders them: by probability, ties by the lower index."""
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :5]
    return [
        {"classes": t.tolist(), "probabilities": p[t].tolist(), "familiarity": float(f[0])}
        for t, p, f in zip(top, probabilities, familiarity, strict=True)
    ]


def unset() -> dict[str, str]:
    """This environment without any setting (as service_process starts the service)."""
    return {k: v for k, v in os.environ.items() if k.upper() not in SETTING_NAMES}


def explain(port: int, image: np.ndarray) -> None:
    body, kind = multipart_form([("x.png", png_bytes(image))], field="file")
    post(port, "/explain", body, {"Content-Type": kind})


def settled(port: int, timeout: float = 60.0) -> tuple[float, dict[str, float], float]:
    """The payload counters once they stopped moving: every answered request's sampled
    images are queued, and a shard closes within PAYLOAD_SHARD_SECONDS (0.5 s here)."""
    deadline, last = time.monotonic() + timeout, None
    while (now := payload_counts(port)) != last:
        assert time.monotonic() < deadline, "the payload counters kept moving"
        last = now
        time.sleep(1.5)
    return now


@pytest.fixture(scope="module")
def logged(models_dir, traffic_images, tmp_path_factory):
    """A server logging RATE of its answers; the traffic sent, its shards and metrics."""
    folder = tmp_path_factory.mktemp("payloads") / "log"  # made by the service
    images, skewed = traffic_images
    grpc_port = free_port()
    settings = dict(models_dir=models_dir, default_model=SMALL, grpc_port=grpc_port,
                    payload_log=folder, payload_sample=RATE, payload_shard_seconds=0.5)  # fmt: skip
    with service_process(**settings) as (port, _):
        sent = send_all(port, grpc_port, images)
        for image in images[:3]:  # explanations are not logged
            explain(port, image)
        counts = settled(port)
    return {"folder": folder, "sent": sent, "rows": read_shards(folder), "counts": counts,
            "skewed": skewed}  # fmt: skip


def test_shards_hold_exactly_the_sampled_images_and_answers(logged):
    rows, sent = logged["rows"], logged["sent"]
    n = len(rows["request_id"])
    assert n > 0
    keys = list(zip(rows["request_id"], rows["image"], strict=True))
    assert len(set(keys)) == n  # no image twice
    for k, key in enumerate(keys):
        expected = sent[key]  # every row is an image that was sent and answered
        pixels = np.frombuffer(rows["pixels"][k], np.uint8).reshape(32, 32, 3)
        assert np.array_equal(pixels, expected["pixels"])
        assert rows["route"][k] == expected["route"]
        assert rows["model_id"][k] == SMALL
        assert rows["top_classes"][k] == expected["classes"]
        # float32 in the shard; the answers carried float32 values too
        # float32 values both ways (JSON carries them exactly as doubles): equal, not close
        assert rows["top_probabilities"][k] == expected["probabilities"]
        assert rows["familiarity"][k] == expected["familiarity"]
    assert set(rows["route"]) == {PREDICT, V2, GRPC}
    assert not {"upload", "address", "client", "authorization"} & set(rows)


def test_the_sampled_share_is_the_rate_within_a_binomial_bound(logged):
    n, total = len(logged["rows"]["request_id"]), len(logged["sent"])
    low, high = stats.binom.interval(1 - 1e-6, total, RATE)
    assert low <= n <= high, (n, total, low, high)


def test_metrics_count_what_is_on_disk(logged):
    logged_count, dropped, on_disk = logged["counts"]
    assert logged_count == len(logged["rows"]["request_id"])
    assert dropped == {"queue_full": 0, "write_error": 0, "over_cap": 0}
    assert on_disk == sum(p.stat().st_size for p in logged["folder"].glob("*.parquet"))


@pytest.mark.parametrize("payload_log", [None, ""], ids=["unset", "empty"])
def test_nothing_is_written_with_payload_log_unset(
    models_dir, traffic_images, tmp_path, payload_log
):
    """Run from an empty folder: after traffic and shutdown it is still empty (an empty
    PAYLOAD_LOG is off too, not the working directory)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    port = free_port()
    env = service_env(host=HOST, port=port, log_level="WARNING", grpc_port=0,
                      models_dir=models_dir, default_model=SMALL)  # fmt: skip
    env["PYTHONPATH"] = str(ROOT)
    if payload_log is not None:
        env["PAYLOAD_LOG"] = payload_log
    command = [sys.executable, "-m", "service"]
    with server_process(command, env, port, cwd=cwd, inherit=unset()):
        assert len(predict(port, traffic_images[0][:16], "off")) == 16
        logged_count, dropped, on_disk = payload_counts(port)
    assert (logged_count, on_disk) == (0, 0) and not any(dropped.values())
    assert list(cwd.rglob("*")) == []


def test_the_disk_cap_holds_under_a_burst(models_dir, traffic_images, tmp_path):
    """Every image logged, in shards of ~6 images, under a cap of a few shards: the
    folder never holds more than the cap, and what is left is the newest."""
    folder, cap = tmp_path / "log", 80_000
    settings = dict(models_dir=models_dir, default_model=SMALL, payload_log=folder,
                    payload_sample=1.0, payload_shard_bytes=20_000, payload_max_bytes=cap,
                    payload_shard_seconds=0.5,
                    # the burst is to be answered, not shed at the door or the queue
                    max_queue_delay_ms=0, max_queue_images=1024)  # fmt: skip
    images = traffic_images[0]
    bodies = [multipart_form([(f"{i}.png", png_bytes(x)) for i, x in enumerate(chunk)])
              for chunk in np.split(images[:256], 16)]  # fmt: skip
    peaks, done = [], threading.Event()

    def watch() -> None:
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError):  # a shard deleted while summed
                peaks.append(sum(p.stat().st_size for p in folder.glob("*.parquet")))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    with service_process(**settings) as (port, _):
        watcher.start()
        try:  # a failed request must not leave the watcher running
            with ThreadPoolExecutor(8) as pool:
                for burst in range(4):  # 1,024 images
                    answers = pool.map(
                        lambda b: post(port, "/predict", b[0], {"Content-Type": b[1]}), bodies
                    )
                    assert all(len(a["predictions"]) == 16 for a in answers)
                    if burst == 0:
                        first_burst_answered = datetime.now(UTC)
            logged_count, dropped, on_disk = settled(port)
        finally:
            done.set()
            watcher.join()
    # Sampling everything, each image is logged or dropped because the writer was behind.
    assert logged_count + dropped["queue_full"] == 1024 and logged_count > 100
    assert dropped["write_error"] == 0 and dropped["over_cap"] == 0
    assert max(peaks) <= cap
    shards = sorted(folder.glob("*.parquet"))
    assert on_disk == sum(p.stat().st_size for p in shards) <= cap and len(shards) >= 2
    kept = pq.ParquetDataset(shards).read().column("time").to_pylist()
    # Older shards were deleted: what is left came after the first burst (its 256 images
    # alone are ~10 times the cap).
    assert len(kept) < logged_count and min(kept) > first_burst_answered


def test_a_read_only_folder_fails_no_request_and_counts_its_drops(
    models_dir, traffic_images, tmp_path
):
    """The folder exists but nothing may be written in it (root may write anywhere, so as
    root the folder is made immutable, `chattr +i`, which binds root too): every request is
    answered, every image dropped with reason write_error."""
    root = os.geteuid() == 0
    folder = tmp_path / "log"
    folder.mkdir()
    if root:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
    port = free_port()
    env = service_env(host=HOST, port=port, log_level="WARNING", grpc_port=0,
                      models_dir=models_dir, default_model=SMALL, payload_log=folder,
                      payload_sample=1.0, payload_shard_seconds=0.2)  # fmt: skip
    try:
        with pytest.raises(OSError):  # the premise: this process cannot write there either
            (folder / "probe").write_bytes(b"")
        with server_process([sys.executable, "-m", "service"], env, port, cwd=ROOT,
                            inherit=unset()):  # fmt: skip
            for n, chunk in enumerate(np.split(traffic_images[0][:64], 8)):
                assert len(predict(port, chunk, f"read-only-{n}")) == 8
            logged_count, dropped, _ = settled(port)
        assert list(folder.iterdir()) == []
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)
    assert logged_count == 0 and dropped == {"queue_full": 0, "write_error": 64, "over_cap": 0}


def test_the_traffic_report_finds_the_skew_and_the_unfamiliar_share(
    logged, models_dir, tmp_path, monkeypatch
):
    # No dataset on this host: the training mix comes from the model file's card.
    monkeypatch.setenv("CIFAR100_DIR", str(tmp_path / "no-dataset"))
    reports = tmp_path / "reports"
    command = ["report", "--traffic", str(logged["folder"]), "--reports-dir", str(reports),
               "--models-dir", str(models_dir)]  # fmt: skip
    assert training(command) == 0
    out = reports / SMALL
    report = json.loads((out / "traffic.json").read_text())
    assert report["training_counts_from"] == "the model card"
    # 40 training images written per class, the same share of each held for validation.
    assert [r["train_share"] for r in report["classes"]["rows"]] == pytest.approx([0.01] * 100)
    rows = logged["rows"]
    n = len(rows["request_id"])
    assert report["images"] == n
    # The class mix, counted here from the shards, against the synthetic training set's
    # (40 images of each class: uniform).
    top1 = np.array([classes[0] for classes in rows["top_classes"]])
    observed = np.bincount(top1, minlength=100)
    chi_square = (((observed - n / 100) ** 2) / (n / 100)).sum()
    mix = report["classes"]
    assert mix["chi_square"] == pytest.approx(chi_square)
    assert mix["shifted"] and mix["p_value"] < 1e-6
    assert mix["most_over"][0]["name"] == mix["rows"][int(observed.argmax())]["name"]
    assert mix["most_over"][0]["ratio"] == pytest.approx(observed.max() / n * 100)
    never = sorted(report["classes"]["rows"][i]["name"] for i in np.flatnonzero(observed == 0))
    assert sorted(report["never_answered"]) == never
    # The unfamiliar share: a quarter of what was sent was noise the file calls unfamiliar.
    familiarity = np.array(rows["familiarity"])
    unfamiliar = int((familiarity <= UNFAMILIAR).sum())
    overall = report["familiarity"]["overall"]
    assert overall["unfamiliar"] == unfamiliar and overall["images"] == n
    assert overall["unfamiliar_share"] == pytest.approx(unfamiliar / n)
    # 80 of the 320 sent, about 40 of the 160 or so logged, where 1 % would be 1.6 (below
    # 15 with probability under 1e-6).
    assert unfamiliar >= 15 and overall["unfamiliar_p_value"] < 1e-6
    shown = [image["familiarity"] for image in report["familiarity"]["most_unfamiliar"]]
    assert shown == sorted(familiarity.tolist())[:20]
    # Top-2 pairs counted here.
    pairs: dict = {}
    for classes in rows["top_classes"]:
        key = tuple(sorted(classes[:2]))
        pairs[key] = pairs.get(key, 0) + 1
    assert report["top2_pairs"][0]["images"] == max(pairs.values())
    page = (out / "traffic.html").read_text()
    assert report["findings"]["classes"] in page.replace("&#39;", "'")
    assert f"{unfamiliar} of {n} images" in page
    for figure in ("traffic_classes.png", "traffic_superclasses.png",
                   "traffic_familiarity.png", "traffic_unfamiliar.png"):  # fmt: skip
        assert (out / figure).stat().st_size > 1000


def test_the_benchmark_measures_logging_on_against_off(models_dir, tmp_path):
    """`python -m bench payloads`, briefly: both servers answered, the logged one logged."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bench", "payloads", "--models-dir", str(models_dir),
               "--model", SMALL, "--seconds", "1", "--pairs", "1", "--sample", "0.5",
               "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT, env=unset(), timeout=600)
    results = json.loads((out / "payloads.json").read_text())
    (pair,) = results["pairs"]
    assert pair["off"]["rps"] > 0 and pair["on"]["rps"] > 0
    assert results["median_ratio"] == pytest.approx(pair["on"]["rps"] / pair["off"]["rps"], 1e-3)
    assert results["images_logged"] > 0 and results["sample"] == 0.5
    assert "median throughput ratio on/off" in (out / "payloads.md").read_text()


def test_the_open_shard_is_written_at_shutdown(models_dir, traffic_images, tmp_path):
    """With the default age bound (five minutes), sampled images wait in the open shard:
    SIGTERM writes it before the process exits."""
    folder = tmp_path / "log"
    settings = dict(models_dir=models_dir, default_model=SMALL, payload_log=folder,
                    payload_sample=1.0)  # fmt: skip
    images = traffic_images[0][:8]
    with service_process(**settings) as (port, _):
        predict(port, images, "at-shutdown")
        time.sleep(1)
        assert payload_counts(port)[0] == 0 and list(folder.glob("*.parquet")) == []
    rows = read_shards(folder)
    assert rows["request_id"] == ["at-shutdown"] * 8 and rows["image"] == list(range(8))
    sent = np.stack([np.frombuffer(p, np.uint8).reshape(32, 32, 3) for p in rows["pixels"]])
    assert np.array_equal(sent, images)
