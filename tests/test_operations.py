"""Operating the service: versions, reload while serving, request ids, access logs, access
control and CORS, all through the real app (and a real server where it matters)."""

import concurrent.futures
import hashlib
import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import onnx
import pytest

from bench.load import multipart_body
from contract.classifier import file_version
from service.dataplane import DataPlane
from service.logs import JsonFormatter
from tests.service_helpers import encode, live_server, serve, upload
from tests.synthetic import make_images

LARGE, SMALL = "cifar100-5735844", "cifar100-712868"


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return make_images(np.array([5, 50, 95]), seed=8)


def retrained(source, target, trained_at: str) -> None:
    """Another version of the same model: same id, different card, so different bytes."""
    model = onnx.load(source)
    for prop in model.metadata_props:
        if prop.key == "training":
            training = json.loads(prop.value)
            training["trained_at"] = trained_at
            prop.value = json.dumps(training)
    onnx.save(model, target)


# --- versions ---------------------------------------------------------------------------


def test_two_files_of_one_model_are_two_versions_newest_by_default(monkeypatch, model_copy, images):
    old = file_version(model_copy / f"{LARGE}.onnx")
    retrained(
        model_copy / f"{LARGE}.onnx", model_copy / "large-retrained.onnx", "2099-01-01T00:00:00Z"
    )
    new = file_version(model_copy / "large-retrained.onnx")
    with serve(monkeypatch, model_copy) as client:
        listing = client.get("/models").json()
        versions = {m["version"]: m for m in listing["models"] if m["model_id"] == LARGE}
        assert set(versions) == {old, new} and listing["failed"] == {}
        assert versions[new]["default"] and not versions[old]["default"]
        assert versions[new]["trained_at"] == "2099-01-01T00:00:00Z"
        files = upload(encode(images[0]))
        assert client.post("/predict", files=files).json()["model_version"] == new
        response = client.post(f"/predict?version={old}", files=files)
        assert response.json()["model_version"] == old
        assert client.get(f"/models/{LARGE}?version={old}").json()["version"] == old
        missing = client.post("/predict?version=0000", files=files)
        assert missing.status_code == 404 and "no version '0000'" in missing.json()["detail"]
        meta = client.get(f"/v2/models/{LARGE}").json()
        assert meta["versions"] == sorted([old, new])
        body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                            "data": images[0].ravel().tolist()}]}  # fmt: skip
        reply = client.post(f"/v2/models/{LARGE}/versions/{old}/infer", json=body).json()
        assert reply["model_version"] == old


def test_the_same_bytes_under_two_names_are_served_once(monkeypatch, model_copy):
    (model_copy / "copy.onnx").write_bytes((model_copy / f"{SMALL}.onnx").read_bytes())
    with serve(monkeypatch, model_copy) as client:
        listing = client.get("/models").json()
        assert [m["model_id"] for m in listing["models"]].count(SMALL) == 1
        assert "the same file as" in listing["failed"]["copy.onnx"]


# --- reload without restart -----------------------------------------------------------------


def listing(base: str) -> dict:
    return json.loads(urllib.request.urlopen(f"{base}/models", timeout=30).read())


def wait_for(what: str, condition, timeout: float = 60):
    """Poll `condition` until it returns something true (returned), for at most `timeout`."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.02)
    return result


def versions_of(models: dict, model_id: str) -> list[str]:
    return [m["version"] for m in models["models"] if m["model_id"] == model_id]


def test_models_are_swapped_added_and_removed_under_load_with_no_failed_request(
    model_copy, tmp_path, images
):
    body, content_type = multipart_body(encode(images[0]), "a.png")
    old = file_version(model_copy / f"{LARGE}.onnx")
    retrained(model_copy / f"{LARGE}.onnx", tmp_path / "new.onnx", "2099-01-01T00:00:00Z")
    new = file_version(tmp_path / "new.onnx")
    with live_server(model_copy, model_poll_seconds=0.1) as port:
        base = f"http://127.0.0.1:{port}"
        answered: list[str] = []  # every answer's model version or failure, as it comes
        stop = threading.Event()

        shed: list[str] = []  # 503s, each to be retried as its Retry-After says

        def client() -> list[str]:
            """One client's outcomes: a 200's model version, else what went wrong (an
            error status, a reset, a timeout: any of them is a failed request). Loading a
            version takes CPU from serving (a session, its warm-up and its self-check), so
            the door may refuse a request for a moment: 503 with Retry-After, which this
            client honours as a well-behaved one does, retrying the same request."""
            outcomes = []
            while not stop.is_set():
                request = urllib.request.Request(
                    f"{base}/predict?model={LARGE}", data=body,
                    headers={"Content-Type": content_type},
                )  # fmt: skip
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        outcome = json.loads(response.read())["model_version"]
                except urllib.error.HTTPError as err:
                    retry_after = err.headers.get("Retry-After")
                    if err.code == 503 and retry_after is not None:
                        shed.append(retry_after)
                        stop.wait(float(retry_after))
                        continue
                    outcome = f"HTTP {err.code}: {err.read()[:200]!r}"
                except (OSError, http.client.HTTPException) as err:  # reset, timeout, ...
                    outcome = f"{type(err).__name__}: {err}"
                outcomes.append(outcome)
                answered.append(outcome)
            return outcomes

        def answered_by(version: str, at_least: int, after: int = 0) -> bool:
            return answered[after:].count(version) >= at_least

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(client) for _ in range(4)]
            try:
                wait_for("load on the old version", lambda: answered_by(old, 8))
                os.replace(tmp_path / "new.onnx", model_copy / f"{LARGE}.onnx")  # atomic swap
                wait_for("the swap", lambda: versions_of(listing(base), LARGE) == [new])
                (model_copy / "broken.onnx").write_bytes(b"not onnx")
                (model_copy / f"{SMALL}.onnx").unlink()
                after = wait_for("the removal and the broken file", lambda: (
                    m if "broken.onnx" in (m := listing(base))["failed"] and len(m["models"]) == 1
                    else None
                ))  # fmt: skip
                assert after["models"][0]["version"] == new
                since = len(answered)  # the load goes on after the catalog settled
                wait_for("load on the new version", lambda: answered_by(new, 8, after=since))
            finally:
                stop.set()
            outcomes = [outcome for future in clients for outcome in future.result(timeout=60)]
        metrics = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    failed = [outcome for outcome in outcomes if outcome not in (old, new)]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed[:5]}"
    assert len(shed) < len(outcomes), (len(shed), len(outcomes))  # a moment, not the run
    assert len(outcomes) == len(answered) and {old, new} <= set(outcomes)
    assert f'model_version_loaded{{model="{LARGE}",version="{old}"}} 0.0' in metrics
    assert f'model_version_loaded{{model="{LARGE}",version="{new}"}} 1.0' in metrics
    in_flight = [line for line in metrics.splitlines()
                 if line.startswith("inference_requests_in_flight{")]  # fmt: skip
    assert in_flight and all(line.endswith(" 0.0") for line in in_flight), in_flight


def test_a_request_whose_version_is_swapped_while_its_body_arrives_is_answered(
    monkeypatch, model_copy, tmp_path, images
):
    """The version is looked up when the request starts (404 before the body is read) and
    again when its images are handed over: one swapped out in between has stopped taking
    requests, so the newest answers instead of a 503 from the departed batcher."""
    old = file_version(model_copy / f"{LARGE}.onnx")
    retrained(model_copy / f"{LARGE}.onnx", tmp_path / "new.onnx", "2099-01-01T00:00:00Z")
    new = file_version(tmp_path / "new.onnx")
    body = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
                                   "shape": [1, 32, 32, 3],
                                   "data": images[0].ravel().tolist()}]}).encode()  # fmt: skip
    looked_up: list = []  # every version the data plane chose, in order
    lookup = DataPlane.model

    def spy(self, record, model_id, version):
        served = lookup(self, record, model_id, version)
        looked_up.append(served)
        return served

    monkeypatch.setattr(DataPlane, "model", spy)
    with live_server(model_copy, model_poll_seconds=0.1) as port:
        base = f"http://127.0.0.1:{port}"
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                f"POST /v2/models/{LARGE}/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body[:100]
            )
            # The route has looked up the old version and awaits the rest of the body.
            first = wait_for("the route's lookup", lambda: looked_up and looked_up[0])
            assert first.version == old
            os.replace(tmp_path / "new.onnx", model_copy / f"{LARGE}.onnx")
            wait_for("the swap", lambda: versions_of(listing(base), LARGE) == [new])
            # The old version's batcher has drained and stopped.
            wait_for("the old batcher to stop", lambda: not first.batcher.alive)
            sock.sendall(body[100:])
            reply = sock.makefile("rb").read().decode()
    head, _, payload = reply.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), reply
    assert json.loads(payload)["model_version"] == new
    assert [served.version for served in looked_up] == [old, new]  # looked up again


def test_a_broken_replacement_keeps_the_old_version_serving(model_copy, images):
    old = file_version(model_copy / f"{SMALL}.onnx")
    with live_server(model_copy, model_poll_seconds=0.1) as port:
        base = f"http://127.0.0.1:{port}"
        (model_copy / "tmp").write_bytes(b"\x08\x07garbage")
        os.replace(model_copy / "tmp", model_copy / f"{SMALL}.onnx")
        models = wait_for("the broken file refused", lambda: (
            m if f"{SMALL}.onnx" in (m := listing(base))["failed"] else None
        ))  # fmt: skip
        served = {m["model_id"]: m["version"] for m in models["models"]}
        assert served[SMALL] == old  # still serving the version it had
        body, content_type = multipart_body(encode(images[0]), "a.png")
        request = urllib.request.Request(
            f"{base}/predict?model={SMALL}", data=body, headers={"Content-Type": content_type}
        )
        assert (
            json.loads(urllib.request.urlopen(request, timeout=30).read())["model_version"] == old
        )


# --- request ids and access logs ---------------------------------------------------------------


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_request_ids_are_returned_on_every_response_and_logged(monkeypatch, models_dir, images):
    with serve(monkeypatch, models_dir) as client:
        records = Records()
        logging.getLogger("service.access").addHandler(records)
        try:
            given = client.post("/predict", files=upload(encode(images[0])),
                                headers={"X-Request-ID": "trace-42"})  # fmt: skip
            made = client.post("/predict", files=upload(b"junk"))
            odd = client.get("/models/nope", headers={"X-Request-ID": "bad id\twith spaces"})
        finally:
            logging.getLogger("service.access").removeHandler(records)
    assert given.headers["x-request-id"] == "trace-42"
    assert made.status_code == 422 and len(made.headers["x-request-id"]) == 32
    assert odd.status_code == 404 and odd.headers["x-request-id"] != "bad id\twith spaces"
    lines = [json.loads(JsonFormatter().format(r)) for r in records.records]
    first = next(line for line in lines if line["request_id"] == "trace-42")
    assert first["method"] == "POST" and first["route"] == "/predict" and first["status"] == 200
    assert first["model"] == LARGE and first["version"] == file_version(
        models_dir / f"{LARGE}.onnx"
    )
    assert first["images"] == 1 and first["queue_ms"] >= 0 and first["inference_ms"] > 0
    assert first["total_ms"] >= first["inference_ms"]
    assert {line["request_id"] for line in lines} >= {made.headers["x-request-id"]}
    assert next(line for line in lines if line["status"] == 404)["route"] == "/models/{model_id}"


def test_uvicorn_lines_go_through_the_json_formatter(monkeypatch, models_dir):
    with serve(monkeypatch, models_dir, log_json="true"):
        handlers = logging.getLogger("uvicorn").handlers
        assert handlers and isinstance(handlers[0].formatter, JsonFormatter)
        assert logging.getLogger("uvicorn.error").propagate
        assert logging.getLogger("uvicorn.access").disabled


# --- access control ---------------------------------------------------------------------------


def test_api_keys_protect_prediction_and_models_but_not_health(
    monkeypatch, models_dir, images, tmp_path
):
    digests = tmp_path / "keys"
    digests.write_text(f"# ops team\n{hashlib.sha256(b'from-file').hexdigest()}\n")
    env = {"api_keys": "alpha-key,beta-key", "api_keys_file": digests, "metrics_token": "m3tr1cs"}
    with serve(monkeypatch, models_dir, **env) as client:
        files = upload(encode(images[0]))
        refused = ["", "Bearer wrong", "alpha-key", "Bearer alpha-ke", "Bearer alpha-keyx"]
        for headers in [{"Authorization": value} if value else {} for value in refused]:
            response = client.post("/predict", files=files, headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"] == "Bearer"
        for token in ("alpha-key", "beta-key", "from-file"):
            auth = {"Authorization": f"Bearer {token}"}
            assert client.post("/predict", files=files, headers=auth).status_code == 200
            assert client.get("/models", headers=auth).status_code == 200
        assert client.get("/models").status_code == 401
        assert client.post(f"/v2/models/{LARGE}/infer", json={}).json()["error"].startswith("send")
        for open_path in ("/health/live", "/health/ready", "/v2/health/ready", "/v2"):
            assert client.get(open_path).status_code == 200, open_path
        assert client.get("/metrics").status_code == 401
        assert (
            client.get("/metrics", headers={"Authorization": "Bearer alpha-key"}).status_code == 401
        )
        assert (
            client.get("/metrics", headers={"Authorization": "Bearer m3tr1cs"}).status_code == 200
        )


def test_a_request_without_a_key_is_refused_before_its_body_is_read(tmp_path):
    """Headers announcing a 5 MB upload, no body: the answer is 401 at once, not after the
    server has waited for (and parsed) the upload of a client it will refuse."""
    with (
        live_server(tmp_path, api_keys="alpha-key") as port,  # no model needed to refuse
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
    ):
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000000\r\n\r\n"
        )
        reply = sock.makefile("rb").read().decode()  # the server closes: body unread
    assert reply.startswith("HTTP/1.1 401"), reply
    assert "www-authenticate: Bearer" in reply and '"detail":"an API key was not accepted"' in reply


def test_a_malformed_keys_file_stops_startup(monkeypatch, models_dir, tmp_path):
    (tmp_path / "keys").write_text("not-hex\n")
    with (
        pytest.raises(ValueError, match="API_KEYS_FILE"),
        serve(monkeypatch, models_dir, api_keys_file=tmp_path / "keys"),
    ):
        pass


def test_cors_only_for_the_configured_origins(monkeypatch, models_dir):
    preflight = {"Origin": "https://page.example", "Access-Control-Request-Method": "POST"}
    with serve(monkeypatch, models_dir) as client:  # default: no CORS at all
        assert (
            "access-control-allow-origin"
            not in client.options("/predict", headers=preflight).headers
        )
    with serve(monkeypatch, models_dir, cors_origins='["https://page.example"]') as client:
        allowed = client.options("/predict", headers=preflight)
        assert allowed.headers["access-control-allow-origin"] == "https://page.example"
        other = client.options("/predict", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
