"""Shadowing (service/shadow.py): a candidate answers copies of live requests after the
fact, on every transport; its agreement with the serving version is what onnxruntime says
of the two files; copies are shed, never live requests; and the payload log carries both
answers. Over real sockets, except the door's busy signal, asked of real parts directly."""

import asyncio
import concurrent.futures
import io
import json
import math
import time
import urllib.request
from collections import Counter

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.load import multipart_body
from bench.servers import free_port
from contract.columns import PAYLOAD_SCHEMA
from contract.modelcard import INPUT_NAME
from service.admission import Admission
from service.catalog import load_catalog
from service.config import Settings
from service.context import RequestContext
from service.metrics import Metrics
from service.rollout import rollouts_for
from service.rpc import inference_pb2 as pb
from service.rpc.inference_pb2_grpc import GRPCInferenceServiceStub
from service.shadow import Shadows
from tests.rollouts import (
    ADMIN,
    MODEL,
    call,
    coloured_images,
    metric,
    metrics_of,
    tiny_version,
    top_classes,
    v2_body,
)
from tests.service_helpers import encode, live_server
from training.__main__ import main as training
from training.report.traffic import read_log
from training.synthetic import CLASS_NAMES


@pytest.fixture
def folder(tmp_path):
    """Two versions of MODEL that disagree on some images: (folder, serving, candidate)."""
    models = tmp_path / "models"
    models.mkdir()
    return models, tiny_version(models / "a.onnx", 0), tiny_version(models / "b.onnx", 10)


def shadow(base: str, serving: str, candidate: str, share: float = 1.0) -> None:
    body = {"candidate": candidate, "mode": "shadow", "share": share, "serving": serving}
    status, reply = call(base, "PUT", f"/v1/models/{MODEL}/rollout", body)
    assert status == 200, reply


def compared(base: str, at_least: float, timeout: float = 60) -> str:
    """/metrics once the candidate has compared `at_least` images."""
    deadline = time.monotonic() + timeout
    while metric(text := metrics_of(base), "shadow_images_compared_total") < at_least:
        assert time.monotonic() < deadline, "the shadow worker fell behind"
        time.sleep(0.05)
    return text


def predict(base: str, images: np.ndarray) -> list[int]:
    """Each image's top class, one /predict request each."""
    answers = []
    for image in images:  # PNG: lossless, so the model sees these very pixels
        body, kind = multipart_body(encode(image), "a.png")
        request = urllib.request.Request(f"{base}/predict?model={MODEL}", data=body,
                                         headers={"Content-Type": kind})  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            answers.append(json.loads(response.read())["predictions"][0]["top_k"][0]["class_id"])
    return answers


def grpc_infer(port: int, images: np.ndarray) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = pb.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name=INPUT_NAME, datatype="UINT8", shape=images.shape)
        request.raw_input_contents.append(images.tobytes())
        GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)


def test_agreement_on_every_transport_is_what_the_two_files_say(folder, tmp_path, cifar_tarball):
    models, serving, candidate = folder
    images = coloured_images(60, seed=7)
    theirs = top_classes(models / "b.onnx", images)
    ours = top_classes(models / "a.onnx", images)
    agreeing = np.cumsum(ours == theirs)  # the independent count, image by image
    assert 0 < agreeing[-1] < len(images)  # the versions disagree somewhere, not everywhere
    log = tmp_path / "payloads"
    grpc_port = free_port()
    with live_server(models, admin_keys=ADMIN, grpc_port=grpc_port, payload_log=log,
                     payload_sample=1, payload_shard_seconds=0.2) as port:  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        shadow(base, serving, candidate)
        # /v2, then /predict, then gRPC: each phase's copies counted before the next.
        for start in range(0, 20, 5):
            status, reply = call(base, "POST", f"/v2/models/{MODEL}/infer",
                                 v2_body(images[start : start + 5]), None)  # fmt: skip
            assert status == 200 and reply["model_version"] == serving
        text = compared(base, 20)
        labels = {"model": MODEL, "version": serving, "candidate": candidate}
        assert metric(text, "shadow_images_agreed_total", **labels) == agreeing[19]
        assert predict(base, images[20:40]) == ours[20:40].tolist()  # the live answers
        text = compared(base, 40)
        assert metric(text, "shadow_images_agreed_total", **labels) == agreeing[39]
        for start in range(40, 60, 10):
            grpc_infer(grpc_port, images[start : start + 10])
        text = compared(base, 60)
        assert metric(text, "shadow_images_compared_total", **labels) == 60
        assert metric(text, "shadow_images_agreed_total", **labels) == agreeing[59]
        assert metric(text, "shadow_candidate_errors_total") == 0
        assert metric(text, "shadow_images_shed_total") == 0
        assert metric(text, "shadow_candidate_seconds_count", **labels) == 4 + 20 + 2
        # The live metrics count live work only: the candidate answered no caller.
        assert metric(text, "images_classified_total", version=candidate) == 0
    # The payload log carries both answers, and reads with the traffic page's reader.
    rows = pq.ParquetDataset(sorted(log.glob("*.parquet")), schema=PAYLOAD_SCHEMA).read()
    rows = rows.to_pydict()
    assert len(rows["pixels"]) == 60 and set(rows["candidate_version"]) == {candidate}
    pixels = np.frombuffer(b"".join(rows["pixels"]), np.uint8).reshape(-1, 32, 32, 3)
    assert [c[0] for c in rows["top_classes"]] == top_classes(models / "a.onnx", pixels).tolist()
    assert [c[0] for c in rows["candidate_top_classes"]] == top_classes(
        models / "b.onnx", pixels
    ).tolist()
    # (The event loop's clock, which times the serving version, may tick in milliseconds.)
    assert all(ms is not None and ms >= 0 for ms in rows["latency_ms"])
    assert all(ms is not None and ms > 0 for ms in rows["candidate_latency_ms"])
    assert set(rows["candidate_familiarity"]) == {None}  # these files have no familiarity
    assert len(read_log(log)[MODEL]["pixels"]) == 60
    # The rollout page, from this log alone.
    reports = tmp_path / "reports"
    command = ["report", "--compare", str(log), "--reports-dir", str(reports),
               "--data-dir", str(cifar_tarball), "--val-size", "100"]  # fmt: skip
    assert training(command) == 0
    report = json.loads((reports / MODEL / f"rollout-{MODEL}.json").read_text())
    (comparison,) = report["comparisons"]
    assert (comparison["serving"], comparison["candidate"]) == (serving, candidate)
    overall = comparison["overall"]
    assert (overall["agree"], overall["images"]) == (agreeing[-1], 60)
    assert (overall["low"], overall["high"]) == pytest.approx(wilson(agreeing[-1], 60))
    served = top_classes(models / "a.onnx", pixels)
    shadowed = top_classes(models / "b.onnx", pixels)
    differ = served != shadowed
    trades = Counter(zip(served[differ].tolist(), shadowed[differ].tolist(), strict=True))
    names = CLASS_NAMES
    commonest = comparison["traded"][0]
    assert trades[(names.index(commonest["serving"]), names.index(commonest["candidate"]))] == (
        max(trades.values())
    )
    for row in comparison["by_class"]:
        mine = served == names.index(row["name"])
        assert (row["images"], row["agree"]) == (mine.sum(), (shadowed[mine] == served[mine]).sum())
    assert len(comparison["disagreements"]) == min(20, 60 - agreeing[-1])
    page = (reports / MODEL / f"rollout-{MODEL}.html").read_text()
    assert f"on {agreeing[-1]} of 60 images" in page
    assert all((reports / MODEL / name).is_file() for name in comparison["figures"])


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval, from its formula."""
    p = successes / n
    middle = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return middle - half, middle + half


def test_a_full_shadow_queue_sheds_copies_never_live_requests(folder):
    models, serving, candidate = folder
    per_request, requests, clients = 8, 15, 4
    with live_server(models, admin_keys=ADMIN, shadow_queue_images=per_request,
                     max_queue_delay_ms=0) as port:  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        shadow(base, serving, candidate)

        def client(number: int) -> list[tuple[int, str]]:
            images = coloured_images(per_request, number)
            outcomes = []
            for _ in range(requests):
                status, reply = call(base, "POST", f"/v2/models/{MODEL}/infer", v2_body(images),
                                     None)  # fmt: skip
                outcomes.append((status, reply.get("model_version", reply)))
            return outcomes

        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            outcomes = [o for f in [pool.submit(client, n) for n in range(clients)]
                        for o in f.result(timeout=120)]  # fmt: skip
        total = per_request * requests * clients
        deadline = time.monotonic() + 60
        while True:  # every copy is compared or shed, none lost
            text = metrics_of(base)
            done = metric(text, "shadow_images_compared_total") + metric(
                text, "shadow_images_shed_total"
            )
            if done == total or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert outcomes == [(200, serving)] * (requests * clients)
    assert done == total
    assert metric(text, "shadow_images_shed_total", reason="queue_full") > 0
    assert metric(text, "shadow_images_shed_total", reason="busy") == 0


def test_copies_are_shed_while_the_door_refuses_live_requests(folder):
    """The door's verdict is read from the real Admission: busy sheds the copy."""
    models, serving, candidate = folder

    async def scenario() -> tuple[bool, bool, float]:
        settings = Settings(models_dir=models)
        metrics = Metrics()
        catalog = await load_catalog(settings, metrics)
        try:
            rollouts = rollouts_for(catalog, settings.rollout_path)
            rollouts.start(MODEL, candidate, "shadow", 1.0, serving)
            admission = Admission(max_delay=0.05)
            shadows = Shadows(settings, metrics, catalog, rollouts, admission, None)
            served = catalog.get(MODEL)
            images = coloured_images(3, 0)
            outputs = {"probabilities": np.zeros((3, 100), np.float32)}
            context = RequestContext("r")
            admission.images_per_second = 10.0  # measured as slow,
            for _ in range(5):  # with five requests in: a new one would wait 0.5 s
                admission.enter()
            busy = shadows.offer(context, served, images, outputs, 1.0)
            for _ in range(5):
                admission.leave()
            idle = shadows.offer(context, served, images, outputs, 1.0)
            labels = {"model": MODEL, "version": serving, "candidate": candidate,
                      "reason": "busy"}  # fmt: skip
            return busy, idle, metrics.registry.get_sample_value("shadow_images_shed_total", labels)
        finally:
            await catalog.stop()

    busy, idle, shed = asyncio.run(scenario())
    assert (busy, idle, shed) == (False, True, 3)


def test_payload_shards_written_before_shadowing_still_read(tmp_path):
    """A shard of the columns as they were before the candidate's: its new columns read
    as null, and the traffic page's reader reads it."""
    old = pa.schema([f for f in PAYLOAD_SCHEMA if f.name in OLD_COLUMNS])
    pixels = coloured_images(2, 0)
    table = pa.table({
        "time": [0, 1], "request_id": ["a", "b"], "route": ["/predict"] * 2, "image": [0, 0],
        "model_id": [MODEL] * 2, "model_version": ["v"] * 2,
        "pixels": [p.tobytes() for p in pixels], "top_classes": [[1, 2], [3, 4]],
        "top_labels": [["a", "b"], ["c", "d"]], "top_probabilities": [[0.6, 0.4], [0.7, 0.3]],
        "familiarity": [0.5, None],
    }, schema=old)  # fmt: skip
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    (tmp_path / "old.parquet").write_bytes(buffer.getvalue())
    read = pq.ParquetDataset([tmp_path / "old.parquet"], schema=PAYLOAD_SCHEMA).read()
    assert read.column("candidate_version").to_pylist() == [None, None]
    assert read_log(tmp_path)[MODEL]["top_classes"].tolist() == [[1, 2], [3, 4]]


OLD_COLUMNS = ("time", "request_id", "route", "image", "model_id", "model_version", "pixels",
               "top_classes", "top_labels", "top_probabilities", "familiarity")  # fmt: skip
