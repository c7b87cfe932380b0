"""The service on a bad day: slow and hostile clients, overload, expensive images, broken
files and shutdown. Real servers over real sockets where the behaviour is a socket's;
every assertion is about a status, a bound or nothing lost, never about a duration."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import onnx
import pytest

from bench.door import scrape
from bench.load import V2_HEADER, http_request, multipart_body, multipart_form, v2_body, v2_request
from bench.servers import service_process
from contract.classifier import file_version
from service.decoding import DecodeSlots
from service.errors import Overloaded, status_of
from tests.service_helpers import encode, live_server, serve, upload

LARGE, SMALL = "cifar100-5735844", "cifar100-712868"


def read_reply(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    conn.settimeout(60)  # a bound on the test, not a timing assertion
    reply = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := conn.recv(65536):
            reply += chunk
    return reply


# --- slow and hostile clients, over a real socket -------------------------------------


def test_headers_that_never_finish_get_408_and_the_connection_closes(models_dir):
    with live_server(models_dir, header_timeout_seconds=1) as port:
        # Nothing at all after connecting, and a head dribbled without its final line.
        for prefix in (b"", b"GET /health/live HTTP/1.1\r\nHost: x\r\n"):
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall(prefix)
                reply = read_reply(conn)  # returns only once the server closed it
            assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
            assert b"did not arrive within 1 s" in reply


def test_a_kept_alive_connection_gets_the_header_limit_on_every_request(models_dir):
    with live_server(models_dir, header_timeout_seconds=1) as port:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            conn.settimeout(30)
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
            conn.sendall(b"GET /health/live HTTP/1.1\r\n")  # second request: head never ends
            reply = read_reply(conn)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]


def test_an_oversized_head_gets_431(models_dir):
    with live_server(models_dir, max_header_bytes=4096) as port:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192)
            reply = read_reply(conn)
        assert reply.startswith(b"HTTP/1.1 431"), reply[:80]
        assert b"above 4,096 bytes" in reply
        # The same head in one chunk, complete: counted before the parser sees it.
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192
                         + b"\r\n\r\n")  # fmt: skip
            reply = read_reply(conn)
        assert reply.startswith(b"HTTP/1.1 431"), reply[:80]
        # A normal request with a few headers is still fine.
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(
                b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Ok: " + b"a" * 1000 + b"\r\n\r\n"
            )
            conn.settimeout(30)
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_body_shorter_than_its_length_gets_408_not_a_hang(models_dir, images):
    body, content_type = multipart_body(encode(images[0]), "a.png")
    with live_server(models_dir, body_timeout_seconds=1) as port:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            head = (
                f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body) + 100}\r\n\r\n"
            )
            conn.sendall(head.encode() + body)  # 100 bytes short, forever
            reply = read_reply(conn)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
        assert b"no body data for 1 s" in reply and b"connection: close" in reply.lower()


def test_a_body_trickled_in_gets_408_at_the_requests_deadline(models_dir, images):
    body, content_type = multipart_body(encode(images[0]), "a.png")
    with live_server(models_dir, body_timeout_seconds=5) as port:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(
                f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                f"X-Request-Timeout: 1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            )
            conn.settimeout(0.2)
            reply = b""
            for byte in body:  # one byte every 0.2 s: never silent for 5 s, never done
                with contextlib.suppress(OSError):
                    conn.sendall(bytes([byte]))
                with contextlib.suppress(TimeoutError):
                    reply += conn.recv(65536)
                if reply:
                    break
            reply += read_reply(conn)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
        assert b"within the request's 1 s" in reply


def test_bodies_in_flight_share_one_budget_and_beyond_it_requests_are_shed(models_dir, images):
    body, content_type = multipart_body(encode(images[0]), "a.png")
    head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            "Content-Length: {}\r\n\r\n")  # fmt: skip
    with live_server(models_dir, max_body_bytes_in_flight=len(body) + 1000) as port:
        with socket.create_connection(("127.0.0.1", port)) as first:
            first.sendall(head.format(len(body)).encode() + body[:100])  # reserved, under way
            with socket.create_connection(("127.0.0.1", port)) as second:
                second.sendall(head.format(len(body)).encode())
                refused = read_reply(second)
            assert refused.startswith(b"HTTP/1.1 503"), refused[:80]
            assert b"retry-after: 1" in refused.lower() and b"MAX_BODY_BYTES_IN_FLIGHT" in refused
            first.sendall(body[100:])
            first.settimeout(30)
            assert first.recv(65536).startswith(b"HTTP/1.1 200")
        # The first request's reservation was released: the same request is taken now.
        with socket.create_connection(("127.0.0.1", port)) as third:
            third.sendall(head.format(len(body)).encode() + body)
            third.settimeout(30)
            assert third.recv(65536).startswith(b"HTTP/1.1 200")


# --- expensive images -------------------------------------------------------------------


def solid_png(side: int) -> bytes:
    return encode(np.full((side, side, 3), 90, np.uint8))


def test_decoding_work_is_bounded_per_request_before_any_decoding(monkeypatch, models_dir):
    """The amplification request (64 solid 4096x4096 PNGs, 58 KB each) is refused from
    the headers; a request within the pixel budget is decoded and answered."""
    with serve(monkeypatch, models_dir) as client:
        huge = solid_png(4096)
        response = client.post("/predict?resize=true", files=upload(*[huge] * 64))
        assert response.status_code == 413
        assert "above the limit of 4,194,304 when resizing" in response.json()["detail"]
        big = solid_png(2048)  # at the per-image limit: 5 of them exceed the request budget
        response = client.post("/predict?resize=true", files=upload(*[big] * 5))
        assert response.status_code == 413
        assert "would decode to 20,971,520 pixels" in response.json()["detail"]
        assert "limit is 16,777,216 per request" in response.json()["detail"]
        response = client.post("/predict?resize=true", files=upload(*[big] * 4))
        assert response.status_code == 200, response.text


def test_a_large_jpeg_counts_at_its_reduced_decode_size(monkeypatch, models_dir):
    """A 12-megapixel photo is fine as a JPEG (decoded at 1/8 scale), refused as a PNG."""
    rng = np.random.default_rng(0)
    photo = np.kron(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), np.ones((100, 100, 1)))
    photo = photo.astype(np.uint8)  # 3000x4000
    with serve(monkeypatch, models_dir) as client:
        jpeg = client.post("/predict?resize=true", files=upload(encode(photo, "JPEG")))
        assert jpeg.status_code == 200, jpeg.text
        png = client.post("/predict?resize=true", files=upload(encode(photo, "PNG")))
        assert png.status_code == 413


def test_concurrent_large_decodes_beyond_the_slots_are_shed():
    """DecodeSlots on its own: with its one slot taken, the next request is a 503 with
    Retry-After at once, not a queue of CPU work; the slot frees when the decode ends."""

    async def scenario():
        slots = DecodeSlots(1)
        started, release = threading.Event(), threading.Event()

        def slow_decode():
            started.set()
            release.wait(30)
            return "decoded"

        first = asyncio.ensure_future(slots.run(slow_decode))
        while not started.is_set():
            await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="already decoding") as shed:
            await slots.run(lambda: "never")
        status = status_of(shed.value)
        assert status.http == 503 and status.headers == {"Retry-After": "1"}
        release.set()
        assert await first == "decoded"
        assert await slots.run(lambda: "again") == "again" and slots.busy == 0

    asyncio.run(scenario())


# --- load shedding, deadlines, the batch cap ----------------------------------------------


def test_a_request_that_cannot_fit_the_queue_is_shed_with_retry_after(
    monkeypatch, models_dir, images
):
    with serve(monkeypatch, models_dir, max_queue_images=2) as client:
        response = client.post("/predict", files=upload(*map(encode, images[:3])))
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "images queued (the limit is 2)" in response.json()["detail"]
        assert client.post("/predict", files=upload(encode(images[0]))).status_code == 200
        metrics = client.get("/metrics").text
    version = file_version(models_dir / f"{LARGE}.onnx")
    shed = f'images_dropped_total{{model="{LARGE}",reason="shed",version="{version}"}} 3.0'
    assert shed in metrics


def test_a_request_past_its_deadline_gets_504(monkeypatch, models_dir, images):
    with serve(monkeypatch, models_dir) as client:
        files = upload(encode(images[0]))
        response = client.post("/predict", files=files, headers={"X-Request-Timeout": "1e-9"})
        assert response.status_code == 504 and "deadline" in response.json()["detail"]
        for bad in ("0", "-1", "soon", "nan", "inf"):
            response = client.post("/predict", files=files, headers={"X-Request-Timeout": bad})
            assert response.status_code == 400, bad
        ok = client.post("/predict", files=files, headers={"X-Request-Timeout": "30"})
        assert ok.status_code == 200


def test_batch_max_size_caps_every_onnxruntime_call(monkeypatch, models_dir, images):
    """10 images with BATCH_MAX_SIZE=4: three calls of 4, 4 and 2, never more."""
    with serve(monkeypatch, models_dir, batch_max_size=4) as client:
        many = upload(*[encode(images[i % len(images)]) for i in range(10)])
        response = client.post("/predict", files=many)
        assert response.status_code == 200 and len(response.json()["predictions"]) == 10
        metrics = client.get("/metrics").text
    buckets = {
        line.split('le="')[1].split('"')[0]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('inference_batch_size_bucket{le="') and LARGE in line
    }
    assert buckets["2.0"] == 1 and buckets["4.0"] == 3 and buckets["+Inf"] == 3


def test_a_dead_batcher_makes_the_service_unready_instead_of_hanging(
    monkeypatch, models_dir, images
):
    with serve(monkeypatch, models_dir) as client:
        catalog = client.app.state.plane.catalog
        for served in catalog.served():
            client.portal.call(served.batcher._task.cancel)  # the loop ends, as if killed
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and "batcher" in ready.json()["detail"]
        response = client.post("/predict", files=upload(encode(images[0])))
        assert response.status_code == 503 and "batcher" in response.json()["detail"]


# --- files that must not stall or leak ----------------------------------------------------


def test_a_fifo_among_the_models_does_not_block_startup(monkeypatch, model_copy, images):
    os.mkfifo(model_copy / "x.onnx")
    (model_copy / "dangling.onnx").symlink_to(model_copy / "nowhere.onnx")
    with serve(monkeypatch, model_copy) as client:
        failed = client.get("/models").json()["failed"]
        assert failed == {"x.onnx": "not a regular file", "dangling.onnx": "not a regular file"}
        assert client.post("/predict", files=upload(encode(images[0]))).status_code == 200


def test_model_ids_that_could_name_paths_are_refused(monkeypatch, model_copy, tmp_path):
    model = onnx.load(model_copy / f"{SMALL}.onnx")
    for prop in model.metadata_props:
        if prop.key == "model_id":
            prop.value = ".."
    onnx.save(model, model_copy / "evil.onnx")
    with serve(monkeypatch, model_copy, reports_dir=tmp_path / "reports") as client:
        failed = client.get("/models").json()["failed"]
        assert "model id '..' is not allowed" in failed["evil.onnx"]
        assert client.get("/models/../report/secret.json").status_code == 404


def test_reports_are_served_from_inside_reports_dir_only(monkeypatch, models_dir, tmp_path):
    reports = tmp_path / "reports"
    (reports / SMALL).mkdir(parents=True)
    (reports / SMALL / "index.html").write_text("<h1>report</h1>")
    (tmp_path / "secret.json").write_text('{"secret": true}')
    (reports / SMALL / "leak.json").symlink_to(tmp_path / "secret.json")
    with serve(monkeypatch, models_dir, reports_dir=reports) as client:
        assert client.get(f"/models/{SMALL}/report/index.html").text == "<h1>report</h1>"
        leak = client.get(f"/models/{SMALL}/report/leak.json")
        assert leak.status_code == 404 and "secret" not in leak.text


def with_card_field(source, target, key: str, value: str) -> None:
    """A copy of the model file `source` whose card has `key` set to the raw text `value`."""
    model = onnx.load(source)
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
    onnx.save(model, target)


BROKEN_CARDS = {
    "names-not-a-list.onnx": ("class_names", "5"),
    "training-a-list.onnx": ("training", "[]"),
    "float-superclasses.onnx": ("fine_to_coarse", json.dumps([0.5] * 100)),
    "deep-json.onnx": ("evaluation", "[" * 100_000 + "]" * 100_000),
}


def test_a_card_of_the_wrong_types_is_skipped_and_the_good_models_still_load(
    monkeypatch, model_copy, images
):
    for name, (key, value) in BROKEN_CARDS.items():
        with_card_field(model_copy / f"{SMALL}.onnx", model_copy / name, key, value)
    with serve(monkeypatch, model_copy) as client:
        listed = client.get("/models").json()
        assert set(listed["failed"]) == set(BROKEN_CARDS)
        assert "class_names must be a list" in listed["failed"]["names-not-a-list.onnx"]
        assert "training must be a dict" in listed["failed"]["training-a-list.onnx"]
        assert "fine_to_coarse[...] must be a int" in listed["failed"]["float-superclasses.onnx"]
        assert "unreadable field" in listed["failed"]["deep-json.onnx"]
        assert {m["model_id"] for m in listed["models"]} == {SMALL, LARGE}
        assert client.post("/predict", files=upload(encode(images[0]))).status_code == 200


def test_a_broken_file_does_not_stop_polling_for_the_files_after_it(
    monkeypatch, model_copy, tmp_path
):
    spare = tmp_path / "spare"
    spare.mkdir()
    (model_copy / f"{LARGE}.onnx").rename(spare / f"{LARGE}.onnx")
    with serve(monkeypatch, model_copy, model_poll_seconds=0.1) as client:
        # "a-" sorts before the good file: the poll meets the broken one first.
        with_card_field(
            model_copy / f"{SMALL}.onnx", model_copy / "a-broken.onnx", "class_names", "5"
        )
        (spare / f"{LARGE}.onnx").rename(model_copy / f"z-{LARGE}.onnx")
        deadline = time.monotonic() + 30
        while LARGE not in {m["model_id"] for m in client.get("/models").json()["models"]}:
            assert time.monotonic() < deadline, client.get("/models").json()
            time.sleep(0.1)
        assert "class_names" in client.get("/models").json()["failed"]["a-broken.onnx"]


@pytest.mark.parametrize("keys", [{"api_keys": ","}, {"api_keys": " , "}, {"api_keys_file": "#"}])
def test_a_key_setting_with_no_key_in_it_stops_startup_instead_of_serving_open(
    monkeypatch, models_dir, tmp_path, keys
):
    if "api_keys_file" in keys:
        (tmp_path / "keys").write_text("# only a comment\n\n")
        keys = {"api_keys_file": tmp_path / "keys"}
    with pytest.raises(ValueError, match="holds no key"), serve(monkeypatch, models_dir, **keys):
        pass


def test_with_keys_set_open_health_does_not_name_the_failed_files(monkeypatch, tmp_path):
    (tmp_path / "secret-name.onnx").write_bytes(b"\x08\x07garbage")
    with serve(monkeypatch, tmp_path, api_keys="k") as client:
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and "secret-name" not in ready.text
        assert "1 file(s) failed" in ready.json()["detail"]
        listed = client.get("/models", headers={"Authorization": "Bearer k"}).json()
        assert "secret-name.onnx" in listed["failed"]


def test_every_file_served_says_nosniff_no_framing_and_html_has_the_policy(
    monkeypatch, models_dir, tmp_path
):
    reports = tmp_path / "reports"
    (reports / SMALL).mkdir(parents=True)
    (reports / SMALL / "index.html").write_text("<h1>report</h1>")
    with serve(monkeypatch, models_dir, reports_dir=reports) as client:
        for path in ("/", "/static/index.html", f"/models/{SMALL}/report/index.html",
                     "/static/app.js"):  # fmt: skip
            response = client.get(path)
            assert response.status_code == 200, path
            assert response.headers["x-content-type-options"] == "nosniff", path
            assert response.headers["x-frame-options"] == "DENY", path
            has_policy = "frame-ancestors 'none'" in response.headers.get(
                "content-security-policy", ""
            )
            assert has_policy == path.endswith(("/", ".html")), path


def test_failures_show_file_names_and_short_reasons_only(monkeypatch, model_copy):
    (model_copy / "corrupt.onnx").write_bytes(b"\x08\x07garbage")
    with serve(monkeypatch, model_copy) as client:
        failed = client.get("/models").json()["failed"]
        assert failed == {"corrupt.onnx": "not an ONNX model (it cannot be parsed)"}
        assert str(model_copy) not in client.get("/models").text


# --- the API contract ---------------------------------------------------------------------


def test_metrics_label_route_templates_and_one_bucket_for_unknown_paths(client):
    for path in ("/openapi.json", "/docs", "/nope", "/nope/again", f"/models/{SMALL}"):
        client.get(path)
    metrics = client.get("/metrics").text
    assert 'route="/openapi.json",status="200"' in metrics
    assert 'route="/docs",status="200"' in metrics
    assert 'route="/models/{model_id}",status="200"' in metrics
    assert 'http_requests_total{model="",route="unmatched",status="404",version=""} 2.0' in metrics


def test_empty_uploads_are_refused_and_the_schema_says_so(client):
    spec = client.get("/openapi.json").json()
    fields = spec["components"]["schemas"]["Body_predict_predict_post"]["properties"]
    assert {"files", "file"} <= set(fields)  # either may carry the images, so neither is
    operation = spec["paths"]["/predict"]["post"]  # required: the operation says so
    assert "at least one image" in operation["description"]
    response = client.post("/predict", data={"other": "x"}, files=[("x", ("a", b"1"))])
    assert response.status_code == 422
    assert "at least one image" in response.json()["detail"]


# --- shutdown -------------------------------------------------------------------------------


def test_sigterm_drains_then_finishes_what_is_in_flight(models_dir, images):
    """SIGTERM: readiness 503 at once while requests are still served (with Connection:
    close); a request whose upload is under way is still answered; then the process exits."""
    body, content_type = multipart_body(encode(images[0]), "a.png")
    settings = {"models_dir": models_dir, "shutdown_drain_seconds": 3,
                "graceful_shutdown_seconds": 30}  # fmt: skip
    with service_process(**settings) as (port, process):
        slow = socket.create_connection(("127.0.0.1", port))
        head = (
            f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        slow.sendall(head.encode() + body[:100])  # an upload in flight
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # let the signal land; not an assertion
        with pytest.raises(urllib.error.HTTPError) as ready:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=10)
        assert ready.value.code == 503 and b"shutting down" in ready.value.read()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/predict", data=body, headers={"Content-Type": content_type}
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # still served
            assert response.status == 200 and response.headers["Connection"] == "close"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # after the drain, new connections are refused
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except ConnectionRefusedError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the server kept accepting connections after the drain")
        slow.sendall(body[100:])  # the upload that was in flight all along is answered
        reply = read_reply(slow)
        slow.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply[:80]
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["predictions"]
        assert process.wait(timeout=60) is not None  # it exits by itself


def abandoned_request(kind: str) -> bytes:
    """One request of 64 noise images, closing its connection once answered."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    if kind == "v2":
        body, header_length = v2_body(pixels)
        headers = {"Content-Type": "application/octet-stream", V2_HEADER: str(header_length)}
        path = f"/v2/models/{LARGE}/infer"
    else:
        body, content_type = multipart_form([(f"{i}.png", encode(p)) for i, p in enumerate(pixels)])
        headers, path = {"Content-Type": content_type}, "/predict"
    return http_request(path, "x", body, {**headers, "Connection": "close"})


@pytest.mark.parametrize("kind", ["predict", "v2"])
def test_requests_whose_client_left_are_dropped_before_they_are_computed(models_dir, kind):
    """20 requests of 64 images queue behind each other (8 images per onnxruntime call);
    19 clients hang up at once. Their queued work is skipped and counted, never computed:
    through /predict's routes and through the /v2 route the middleware answers itself."""
    request = abandoned_request(kind)
    # The door off: 20 uploads of 64 PNGs at once are parsed slowly on a busy machine, and
    # a request whose headers waited 50 ms would be refused before it could queue (the
    # door has its tests; this one is about work whose client left).
    with live_server(models_dir, batch_max_size=8, max_queue_images=4096,
                     max_queue_delay_ms=0) as port:  # fmt: skip
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        for conn in conns:
            conn.sendall(request)
        deadline = time.monotonic() + 60
        while in_flight(port) < 10:  # hang up once most of them wait in the queue
            assert time.monotonic() < deadline, "the requests never queued"
        for conn in conns[1:]:
            conn.close()
        assert read_reply(conns[0]).startswith(b"HTTP/1.1 200")  # the one that stayed
        conns[0].close()
        text = scrape(port)
    dropped = [line for line in text.splitlines() if 'reason="abandoned"' in line]
    assert dropped and float(dropped[0].split()[-1]) >= 64  # at least one whole request
    assert 'status="499"' in text
    computed = sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("images_classified_total{")
    )
    assert computed < 20 * 64


def test_a_v2_client_gone_mid_body_is_a_499_and_the_next_request_is_answered(models_dir):
    """A client that sends half its body and hangs up: no answer to send, the request is
    counted as 499 (the client's doing), not as a server error, and the server goes on."""
    pixels = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    request = v2_request(f"/v2/models/{LARGE}/infer", "x", pixels)
    with live_server(models_dir) as port:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(request[: len(request) - 2000])
            conn.shutdown(socket.SHUT_WR)  # gone before the rest
            assert read_reply(conn) == b""
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(request.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"))
            assert read_reply(conn).startswith(b"HTTP/1.1 200")
        text = scrape(port)
    infer = [line for line in text.splitlines()
             if line.startswith("http_requests_total{") and "/infer" in line]  # fmt: skip
    assert any('status="499"' in line for line in infer), infer
    assert any('status="200"' in line for line in infer), infer
    assert not any('status="500"' in line for line in infer), infer


def in_flight(port: int) -> float:
    text = scrape(port)
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("inference_requests_in_flight{")
    )
