"""The HTTP service, driven through the real app with models exported by the training CLI."""

import asyncio
import concurrent.futures
import contextlib
import io
import json
import socket
import struct
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from bench.load import multipart_body
from bench.procfs import process_tree
from bench.servers import service_process
from contract.classifier import file_version
from service.errors import DeviceUnavailable
from service.server import CoalescedTransport
from tests.service_helpers import (
    encode,
    live_server,
    onnx_probabilities,
    png_16_bit,
    serve,
    upload,
)
from tests.synthetic import CLASS_NAMES, FINE_TO_COARSE, SUPERCLASS_NAMES, make_images

LARGE, SMALL = "cifar100-5735844", "cifar100-712868"


def probabilities_of(prediction: dict) -> dict[int, float]:
    return {c["class_id"]: c["probability"] for c in prediction["top_k"]}


# --- /predict returns what the model file says --------------------------------------


@pytest.mark.parametrize("model_id", [LARGE, SMALL])
def test_predict_equals_running_the_onnx_file(client, models_dir, images, model_id):
    response = client.post(
        f"/predict?model={model_id}&top_k=100", files=upload(*map(encode, images))
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == model_id and body["inference_ms"] > 0
    expected = onnx_probabilities(models_dir / f"{model_id}.onnx", images)
    assert [p["filename"] for p in body["predictions"]] == [f"img{i}" for i in range(len(images))]
    for prediction, probs in zip(body["predictions"], expected, strict=True):
        top = prediction["top_k"]
        assert len(top) == 100
        assert [c["probability"] for c in top] == sorted(
            (c["probability"] for c in top), reverse=True
        )
        got = probabilities_of(prediction)
        np.testing.assert_allclose([got[i] for i in range(100)], probs, rtol=1e-6, atol=1e-7)
        for c in top:
            assert c["label"] == CLASS_NAMES[c["class_id"]]
            assert c["superclass"] == SUPERCLASS_NAMES[FINE_TO_COARSE[c["class_id"]]]
        sums = np.zeros(20)
        np.add.at(sums, FINE_TO_COARSE, probs)
        assert prediction["superclass"]["superclass_id"] == int(sums.argmax())
        assert prediction["superclass"]["label"] == SUPERCLASS_NAMES[int(sums.argmax())]
        assert prediction["superclass"]["probability"] == pytest.approx(sums.max(), rel=1e-5)


def test_trained_model_recognises_the_synthetic_classes(client, models_dir):
    labels = np.arange(0, 100, 7)
    images = make_images(labels, seed=123)
    body = client.post(f"/predict?model={SMALL}&top_k=1", files=upload(*map(encode, images))).json()
    predicted = [p["top_k"][0]["class_id"] for p in body["predictions"]]
    assert np.mean(np.array(predicted) == labels) > 0.5  # chance is 1 %


def test_default_model_is_the_largest_unless_configured(client, monkeypatch, models_dir, images):
    data = encode(images[0])
    assert client.post("/predict", files=upload(data)).json()["model_id"] == LARGE
    assert len(client.post("/predict", files=upload(data)).json()["predictions"][0]["top_k"]) == 5
    with serve(monkeypatch, models_dir, default_model=SMALL) as other:
        assert other.post("/predict", files=upload(data)).json()["model_id"] == SMALL


# --- image formats and conversions -----------------------------------------------------


def top1_probability(client, data: bytes, **params) -> dict[int, float]:
    query = "&".join(f"{k}={v}" for k, v in {"top_k": 100, **params}.items())
    response = client.post(f"/predict?{query}", files=upload(data))
    assert response.status_code == 200, response.text
    return probabilities_of(response.json()["predictions"][0])


def assert_served_as(client, models_dir, data: bytes, pixels: np.ndarray, **params):
    got = top1_probability(client, data, **params)
    expected = onnx_probabilities(models_dir / f"{LARGE}.onnx", pixels[None])[0]
    np.testing.assert_allclose([got[i] for i in range(100)], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats(client, models_dir, images, fmt):
    options = {"lossless": True} if fmt == "WEBP" else {}
    assert_served_as(client, models_dir, encode(images[1], fmt, **options), images[1])


def test_jpeg_is_decoded_like_pillow_does(client, models_dir, images):
    data = encode(images[2], "JPEG", quality=90)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert_served_as(client, models_dir, data, decoded)


def test_gif_uses_the_first_frame(client, models_dir, images):
    frames = [Image.fromarray(img).quantize(256) for img in images[:2]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    expected = np.asarray(frames[0].convert("RGB"))
    assert_served_as(client, models_dir, data, expected)


def test_grayscale_and_palette_become_rgb(client, models_dir, images):
    gray = np.asarray(Image.fromarray(images[3]).convert("L"))
    assert_served_as(client, models_dir, encode(gray), np.stack([gray] * 3, axis=-1))
    palette = Image.fromarray(images[3]).quantize(64)
    assert_served_as(client, models_dir, encode(palette), np.asarray(palette.convert("RGB")))


def test_alpha_is_composited_on_white(client, models_dir, images):
    rgba = np.concatenate([images[4], np.full((32, 32, 1), 255, np.uint8)], axis=-1)
    rgba[:16, :, 3] = 0  # top half fully transparent
    rgba[16:20, :, 3] = 128
    expected = images[4].astype(np.float64)
    expected[:16] = 255
    alpha = 128 / 255
    expected[16:20] = expected[16:20] * alpha + 255 * (1 - alpha)
    got = top1_probability(client, encode(rgba))
    reference = onnx_probabilities(
        models_dir / f"{LARGE}.onnx", np.round(expected).astype(np.uint8)[None]
    )[0]
    np.testing.assert_allclose([got[i] for i in range(100)], reference, atol=2e-3)


def test_16_bit_grayscale_keeps_its_top_8_bits(client, models_dir, images):
    gray8 = np.asarray(Image.fromarray(images[5]).convert("L"))
    gray16 = gray8.astype(np.uint16) * 257  # 0..65535, same picture
    data = encode(Image.fromarray(gray16))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert_served_as(client, models_dir, data, np.stack([gray8] * 3, axis=-1))


def test_16_bit_colour_keeps_its_top_8_bits(client, models_dir, images):
    wide = images[5].astype(np.uint16) * 256 + 100  # the low bytes are to be dropped
    assert_served_as(client, models_dir, png_16_bit(wide), images[5])
    opaque = np.concatenate([wide, np.full((32, 32, 1), 65535, np.uint16)], axis=-1)
    assert_served_as(client, models_dir, png_16_bit(opaque), images[5])


def test_other_sizes_need_resize(client, models_dir, images):
    big = np.asarray(Image.fromarray(images[0]).resize((64, 48)))
    response = client.post("/predict", files=upload(encode(big)))
    assert response.status_code == 422
    assert "64x48" in response.json()["detail"] and "resize=true" in response.json()["detail"]
    crop = Image.fromarray(big).resize((32, 32), Image.Resampling.LANCZOS, box=(8, 0, 56, 48))
    assert_served_as(client, models_dir, encode(big), np.asarray(crop), resize="true")


# --- bad input: clear 4xx, never a 500 ---------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims width x height pixels."""
    data = bytearray(encode(np.zeros((1, 1, 3), np.uint8)))
    ihdr = bytearray(data[12:29])  # chunk type + 13 bytes of header
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.mark.parametrize(
    ("files", "query", "status", "message"),
    [
        (upload(b"definitely not an image"), "", 422, "not an image"),
        (upload(b""), "", 422, "empty"),
        ("truncated", "", 422, "truncated or corrupt"),
        (None, "", 422, "send at least one image"),
        ("ok", "?model=cifar100-1", 404, "unknown model 'cifar100-1'"),
        ("ok", "?top_k=0", 422, "greater than or equal to 1"),
        ("ok", "?top_k=101", 422, "less than or equal to 100"),
        (upload(png_claiming(5000, 5000)), "?resize=true", 413, "claims 5000x5000 pixels"),
        (upload(png_claiming(5000, 5000)), "", 413, "claims 5000x5000 pixels"),
        (upload(png_claiming(100_000, 100_000)), "?resize=true", 413, "too many pixels"),
    ],
)
def test_bad_requests_get_clear_errors(client, images, files, query, status, message):
    good = encode(images[0])
    if isinstance(files, str):
        files = {"ok": upload(good), "truncated": upload(good[: len(good) // 2])}[files]
    response = client.post(f"/predict{query}", files=files)
    assert response.status_code == status, response.text
    assert message in json.dumps(response.json())


def test_error_names_the_bad_image_among_good_ones(client, images):
    response = client.post("/predict", files=upload(encode(images[0]), b"junk", encode(images[1])))
    assert response.status_code == 422
    assert response.json()["detail"].startswith("image 2 ('img1')")


def test_upload_limits(monkeypatch, models_dir, images):
    with serve(monkeypatch, models_dir, max_upload_bytes=2048, max_images_per_request=3) as client:
        big = encode(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        assert len(big) > 2048  # noise does not compress
        response = client.post("/predict", files=upload(big))
        assert response.status_code == 413 and "2,048 per image" in response.json()["detail"]

        small = encode(np.full((32, 32, 3), 128, np.uint8))
        response = client.post("/predict", files=upload(*[small] * 4))
        assert response.status_code == 413 and "at most 3" in response.json()["detail"]

        response = client.post("/predict", files=upload(small))
        assert response.status_code == 200  # and the server is fine afterwards


def test_oversized_body_is_refused_while_streaming(monkeypatch, models_dir):
    """Over a real socket: the 413 comes back long before the body would have been sent."""
    limit = 2048 * 2 + 64 * 1024  # max_request_bytes for these settings
    with live_server(models_dir, max_upload_bytes=2048, max_images_per_request=2) as port:
        head = (
            "POST /predict HTTP/1.1\r\nHost: localhost\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n"
        )
        # Declared too large: refused on the header alone.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(f"{head}Content-Length: {100 << 20}\r\n\r\n".encode() + b"x" * 1000)
            assert conn.recv(4096).startswith(b"HTTP/1.1 413")
        # Chunked, no length: cut off once the limit is crossed.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            part = (
                '--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            )
            conn.sendall(
                f"{head}Transfer-Encoding: chunked\r\n\r\n{len(part):x}\r\n{part}\r\n".encode()
            )
            sent, reply = 0, b""
            conn.setblocking(False)
            while not reply and sent < 100 << 20:
                chunk = b"x" * 16384
                with contextlib.suppress(BlockingIOError):
                    conn.sendall(b"4000\r\n" + chunk + b"\r\n")
                    sent += len(chunk)
                with contextlib.suppress(BlockingIOError):
                    reply = conn.recv(4096)
                time.sleep(0.001)
            assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
            assert sent < 8 * limit
            assert b"request body is above" in reply


# --- models, health, metrics, docs -----------------------------------------------------


def test_models_endpoints_read_the_onnx_metadata(client, models_dir):
    listing = client.get("/models").json()
    assert listing["default_model"] == LARGE and listing["failed"] == {}
    by_id = {m["model_id"]: m for m in listing["models"]}
    assert set(by_id) == {LARGE, SMALL}
    assert by_id[LARGE]["parameter_count"] == 5_735_844 and by_id[LARGE]["default"]
    assert by_id[SMALL]["ready"]
    # The suite serves float32 (tests/conftest.py); onnxruntime is the first float32 engine.
    serving = by_id[SMALL]["serving"]
    assert (serving["engine"], serving["precision"], serving["device"]) == (
        "onnxruntime", "float32", "cpu",
    )  # fmt: skip
    assert serving["provider"] == "CPUExecutionProvider" and serving["instructions"]

    detail = client.get(f"/models/{SMALL}").json()
    props = {p.key: p.value for p in onnx.load(models_dir / f"{SMALL}.onnx").metadata_props}
    assert detail["class_names"] == CLASS_NAMES and detail["fine_to_coarse"] == FINE_TO_COARSE
    assert detail["evaluation"] == json.loads(props["evaluation"])
    assert detail["training"]["recipe"]["epochs"] == 5
    assert client.get("/models/nope").status_code == 404


def test_health(client):
    assert client.get("/health/live").json() == {"status": "ok", "detail": None}
    assert client.get("/health/ready").status_code == 200


def test_no_model_starts_but_is_not_ready(monkeypatch, tmp_path, images):
    with serve(monkeypatch, tmp_path) as client:
        assert client.get("/health/live").status_code == 200
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and "make train-export" in ready.json()["detail"]
        response = client.post("/predict", files=upload(encode(images[0])))
        assert response.status_code == 503 and "no .onnx files" in response.json()["detail"]


def test_broken_files_are_reported_and_do_not_take_others_down(monkeypatch, model_copy, images):
    (model_copy / "corrupt.onnx").write_bytes(b"\x08\x07garbage")
    foreign = onnx.load(model_copy / f"{SMALL}.onnx")
    del foreign.metadata_props[:]
    onnx.save(foreign, model_copy / "no-card.onnx")
    with serve(monkeypatch, model_copy) as client:
        failed = client.get("/models").json()["failed"]
        assert set(failed) == {"corrupt.onnx", "no-card.onnx"}
        assert "not an ONNX model" in failed["corrupt.onnx"]
        assert "model card" in failed["no-card.onnx"]
        assert client.get("/health/ready").status_code == 200
        assert client.post("/predict", files=upload(encode(images[0]))).status_code == 200


def test_model_that_loads_but_cannot_run_is_skipped(monkeypatch, model_copy):
    """Right signature and card, but inference fails: reported, the others still serve."""
    h = onnx.helper
    graph = h.make_graph(
        [
            h.make_node("Cast", ["images"], ["pixels"], to=onnx.TensorProto.FLOAT),
            h.make_node("Reshape", ["pixels", "shape"], ["probabilities"]),  # 3072 % 100 != 0
        ],
        "broken",
        [h.make_tensor_value_info("images", onnx.TensorProto.UINT8, ["batch", 32, 32, 3])],
        [h.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["batch", 100])],
        initializer=[h.make_tensor("shape", onnx.TensorProto.INT64, [2], [-1, 100])],
    )
    broken = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    broken.ir_version = 8
    card = onnx.load(model_copy / f"{SMALL}.onnx").metadata_props
    broken.metadata_props.extend(card)
    (model_copy / f"{SMALL}.onnx").unlink()
    onnx.save(broken, model_copy / "broken.onnx")
    with serve(monkeypatch, model_copy) as client:
        listing = client.get("/models").json()
        assert "warm-up inference failed" in listing["failed"]["broken.onnx"]
        assert [m["model_id"] for m in listing["models"]] == [LARGE]
        assert client.get("/health/ready").status_code == 200


def test_file_with_the_wrong_signature_is_refused(monkeypatch, tmp_path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "foreign",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 3, 32, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 3, 32, 32])],
    )
    foreign = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    foreign.ir_version = 8
    onnx.save(foreign, tmp_path / "foreign.onnx")
    with serve(monkeypatch, tmp_path) as client:
        failed = client.get("/models").json()["failed"]
        assert "not a CIFAR-100 export" in failed["foreign.onnx"]
        assert "foreign.onnx" in client.get("/health/ready").json()["detail"]


def test_metrics_count_requests_latency_and_batches(client, models_dir, images):
    client.post("/predict", files=upload(encode(images[0])))
    client.post("/predict", files=upload(b"junk"))
    text = client.get("/metrics").text
    model = f'model="{LARGE}"'
    version = f'version="{file_version(models_dir / f"{LARGE}.onnx")}"'
    assert f'http_requests_total{{{model},route="/predict",status="200",{version}}} 1.0' in text
    assert f'http_requests_total{{{model},route="/predict",status="422",{version}}} 1.0' in text
    assert (
        f'http_request_duration_seconds_count{{{model},route="/predict",status="200",{version}}}'
        in text
    )
    assert f"inference_batch_size_count{{{model},{version}}}" in text
    assert f"images_classified_total{{{model},{version}}} 1.0" in text
    assert f"inference_queue_seconds_count{{{model},{version}}} 1.0" in text
    assert f"model_version_loaded{{{model},{version}}} 1.0" in text


def test_the_tutorial_field_file_works_alone_and_beside_files(client, images):
    """`curl -F file=@cat.png` (the form most tutorials use) and `files` together."""
    one = client.post("/predict", files=[("file", ("cat.png", encode(images[0]), "image/png"))])
    assert one.status_code == 200, one.text
    assert [p["filename"] for p in one.json()["predictions"]] == ["cat.png"]
    both = client.post("/predict", files=[("file", ("a.png", encode(images[0]), "image/png")),
                                          *upload(encode(images[1]), name="b")])  # fmt: skip
    assert [p["filename"] for p in both.json()["predictions"]] == ["a.png", "b0"]


def test_docs_work_offline(client):
    for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = client.get(page).text
        assert "cdn." not in html and "fonts.googleapis" not in html
        src = html[html.index("/static-offline-docs/" + asset) :].split('"')[0]
        assert client.get(src).status_code == 200
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert "multipart/form-data" in predict["requestBody"]["content"]
    # What makes Swagger UI show a file picker for each image ("Try it out" can upload).
    body = spec["components"]["schemas"]["Body_predict_predict_post"]["properties"]["files"]
    assert body["type"] == "array" and body["items"] == {"type": "string", "format": "binary"}
    assert {"200", "404", "413", "422", "503"} <= set(predict["responses"])
    for path in ("/models", "/models/{model_id}", "/health/live", "/health/ready", "/metrics"):
        assert path in spec["paths"]


# --- devices -------------------------------------------------------------------------------


def test_device_cpu_and_auto_use_the_cpu_here(monkeypatch, models_dir):
    for device in ("cpu", "auto"):
        with serve(monkeypatch, models_dir, device=device) as client:
            devices = {m["serving"]["device"] for m in client.get("/models").json()["models"]}
            assert devices == {"cpu"}


def test_device_cuda_uses_cuda_or_refuses_to_start(monkeypatch, models_dir):
    """No silent fallback: with a working GPU every model runs on CUDA, without one the
    app does not start and says why."""
    if Path("/dev/nvidia0").exists() and "CUDAExecutionProvider" in ort.get_available_providers():
        with serve(monkeypatch, models_dir, device="cuda") as client:
            providers = {m["serving"]["provider"] for m in client.get("/models").json()["models"]}
            assert providers == {"CUDAExecutionProvider"}
        return
    with (
        pytest.raises(DeviceUnavailable, match="DEVICE=cuda but onnxruntime could not use CUDA"),
        serve(monkeypatch, models_dir, device="cuda"),
    ):
        pass


# --- concurrency -------------------------------------------------------------------------


@pytest.mark.parametrize("batching", ["true", "false"])
def test_concurrent_requests_get_their_own_answers(monkeypatch, models_dir, batching):
    labels = np.arange(24) * 4
    images = make_images(labels, seed=77)
    expected = onnx_probabilities(models_dir / f"{LARGE}.onnx", images)
    # The door off: 24 requests at once on a busy 2-CPU machine may wait longer than its
    # 50 ms; what is under test is that each gets its own answer, not admission.
    env = {"batching": batching, "batch_max_wait_ms": 50, "batch_max_size": 16,
           "max_queue_delay_ms": 0}  # fmt: skip
    results: dict[int, dict] = {}
    with serve(monkeypatch, models_dir, **env) as client:
        barrier = threading.Barrier(len(images))

        def call(i: int) -> None:
            barrier.wait()
            results[i] = client.post("/predict?top_k=100", files=upload(encode(images[i]))).json()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        metrics = client.get("/metrics").text
    for i, body in results.items():
        got = probabilities_of(body["predictions"][0])
        np.testing.assert_allclose([got[c] for c in range(100)], expected[i], rtol=1e-5, atol=1e-7)
    assert len(results) == len(images)
    version = file_version(models_dir / f"{LARGE}.onnx")
    batches = _metric(metrics, f'inference_batch_size_count{{model="{LARGE}",version="{version}"}}')
    if batching == "true":
        assert batches < len(images)  # some requests shared an onnxruntime call
    else:
        assert batches == len(images)  # one onnxruntime call per request


def _metric(text: str, name: str) -> float:
    """The value of the series `name` (its labels included, exactly as exposed): a
    missing series fails the test instead of reading as 0."""
    lines = [line.rpartition(" ") for line in text.splitlines()]
    values = [float(value) for series, _, value in lines if series == name]
    assert len(values) == 1, f"{len(values)} series {name!r} in /metrics"
    return values[0]


def connections_held(pid: int, port: int) -> int:
    """How many established TCP connections to local `port` process `pid` holds open,
    from /proc (its socket descriptors matched to /proc/net/tcp's rows)."""
    established = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                established.add(fields[9])  # its inode
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = fd.readlink().name
            held += target.startswith("socket:[") and target[8:-1] in established
    return held


def test_several_workers_share_connections_opened_at_once(models_dir):
    """With 2 workers, 32 keep-alive connections opened at once are spread over both (each
    worker listens on its own SO_REUSEPORT socket). With one shared socket the worker that
    woke first accepted all that were waiting, and a client with a few connections kept
    one worker busy and the other idle. Each worker holds at least 4 of the 32 (with a
    fair coin per connection, fewer happens about once in a million runs)."""
    with service_process(models_dir=models_dir, workers=2) as (port, process):
        connections = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(32)]
        for connection in connections:  # answered: accepted by a worker, and still open
            connection.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        for connection in connections:
            assert connection.recv(64).startswith(b"HTTP/1.1 200")
        workers = [pid for pid in process_tree(process.pid) if pid != process.pid]
        held = {pid: connections_held(pid, port) for pid in workers}
        for connection in connections:
            connection.close()
    assert sum(held.values()) == 32, held
    assert sorted(held.values())[-2] >= 4, held  # the two workers: 4 or more each


def test_several_workers_add_up_their_metrics(models_dir, tmp_path, images):
    """uvicorn --workers 2: /metrics counts every worker's requests, not one worker's. The
    door is off (MAX_QUEUE_DELAY_MS=0): on a busy machine it sheds some of these eight
    concurrent uploads, and what is under test is the counting (the door has tests of its
    own, over real sockets)."""
    prometheus_dir = tmp_path / "prometheus"
    with service_process(prometheus_dir, models_dir=models_dir, workers=2,
                         max_queue_delay_ms=0) as (port, _):  # fmt: skip
        body, content_type = multipart_body(encode(images[0]), "a.png")

        def post(_) -> int:  # a new connection each, eight at a time: both workers get some
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/predict",
                data=body,
                headers={"Content-Type": content_type},
            )
            return urllib.request.urlopen(request, timeout=30).status

        def pids() -> set[str]:
            # Histogram files appear with a worker's first request (counters exist from the
            # start: the door's refusal counters are bound when the app is built).
            return {p.stem.rsplit("_", 1)[-1] for p in prometheus_dir.glob("histogram_*.db")}

        sent = 0  # until both workers served some (the second may still be warming up)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            while len(pids()) < 2 and sent < 2000:
                assert list(pool.map(post, range(40))) == [200] * 40
                sent += 40
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert len(pids()) == 2  # both workers served requests
    version = file_version(models_dir / f"{LARGE}.onnx")
    assert _metric(text, f'images_classified_total{{model="{LARGE}",version="{version}"}}') == sent


class RecordingTransport:
    """What the server's protocol writes, as the transport saw it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.sent.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 7


def test_writes_in_one_turn_of_the_loop_leave_as_one_send():
    """uvicorn writes a response's head and body apart; the server's transport sends them
    together, in order, once the turn ends. A large write goes at once (flow control
    still sees it), close sends what is pending first, and what is pending when the
    client has gone is dropped, not raised. Everything else is the transport's own."""

    async def scenario() -> list:
        seen = []
        transport = RecordingTransport()
        joined = CoalescedTransport(transport, asyncio.get_running_loop())
        joined.write(b"HTTP/1.1 200 OK\r\n\r\n")
        joined.write(b"body")
        seen.append(list(transport.sent))  # nothing yet: the turn has not ended
        await asyncio.sleep(0)
        seen.append(list(transport.sent))
        transport.sent.clear()
        joined.write(b"head")
        joined.write(b"x" * CoalescedTransport.AT_ONCE)
        seen.append([len(data) for data in transport.sent])  # at once, head first
        joined.write(b"last")
        joined.close()
        seen.append((transport.sent[-1], transport.closed))
        closing = RecordingTransport()
        gone = CoalescedTransport(closing, asyncio.get_running_loop())
        gone.write(b"late")
        closing.closed = True  # the client left before the turn ended
        await asyncio.sleep(0)
        seen.append((closing.sent, gone.get_write_buffer_size()))
        return seen

    before, after, large, closed, dropped = asyncio.run(scenario())
    assert before == []
    assert after == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    assert large == [4 + CoalescedTransport.AT_ONCE]
    assert closed == (b"last", True)
    assert dropped == ([], 7)
