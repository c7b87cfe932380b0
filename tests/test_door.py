"""The admission door of a real `python -m service` over real sockets.

The door closes when a request would wait longer than MAX_QUEUE_DELAY_MS, and it only
ever refuses while another inference request of the worker is in the system. The tests
hold one there for as long as they like, with nothing timed (bench/door.py says how):
the door is closed until they let it go, and open again after.
"""

import http.client
import json
import re
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from prometheus_client import CollectorRegistry, Counter

from bench.door import (
    Connection,
    closed_settings,
    held_closed,
    raw_request,
    scrape,
    v2_request,
)
from bench.load import multipart_body, pixel_images, png_bytes
from bench.servers import HOST, free_port, service_process
from service.admission import Admission, Door
from service.config import Settings
from service.http.door import GATE, Gate
from service.server import server_config
from training.processes import run_python

MODEL = "cifar100-5735844"  # the wider features: fewer images make a large answer
SETTINGS = closed_settings(MODEL)
DOOR_COUNTER = re.compile(r'^requests_shed_at_door_total\{route="([^"]+)"\} (\S+)$', re.M)
INFER = f"/v2/models/{MODEL}/infer"


def refused_at_door(text: str) -> dict[str, float]:
    return {route: float(value) for route, value in DOOR_COUNTER.findall(text)}


@pytest.fixture(scope="module")
def server(models_dir) -> Iterator[int]:
    with service_process(models_dir=models_dir, **SETTINGS) as (port, _):
        yield port


def inference_requests() -> dict[str, tuple[str, bytes]]:
    """One request for each inference route: (the door's label for it, the request)."""
    png = png_bytes(pixel_images(1)[0])
    predict, predict_type = multipart_body(png, "a.png")
    explain, explain_type = multipart_body(png, "a.png", field="file")
    image = pixel_images(1)
    return {
        "predict": ("/predict", raw_request("/predict", predict, {"Content-Type": predict_type})),
        "explain": ("/explain", raw_request("/explain", explain, {"Content-Type": explain_type})),
        "v2 infer": (INFER.replace(MODEL, "{model_name}"),
                     v2_request(INFER, image, ["probabilities"])),
        "v2 versioned infer": (INFER.replace(MODEL, "{model_name}"), v2_request(
            f"/v2/models/{MODEL}/versions/{{version}}/infer", image, ["probabilities"])),
        "v2 explain": ("/v2/models/{model_name}/explain",
                       v2_request(f"/v2/models/{MODEL}/explain", image, ["heat_map"])),
    }  # fmt: skip


# --- the tests ----------------------------------------------------------------------------


def test_every_inference_route_is_refused_at_the_closed_door_on_a_kept_alive_connection(
    server,
):
    """While the door is closed, each inference route is answered 503 + Retry-After in its
    API's error shape, without its body being needed and without closing the connection:
    the next request on the same connection (another route, then, once the door opens,
    inference) is answered. The refusal counter rises by exactly the refusals seen."""
    port = server
    version = json.loads(
        urllib_get(port, f"/v2/models/{MODEL}"))["versions"][0]  # fmt: skip
    before = refused_at_door(scrape(port))
    seen: dict[str, int] = {}
    with held_closed(port, MODEL):
        connection = Connection(port)  # opened now: an idle new connection meets HEADER_TIMEOUT
        for what, (label, request) in inference_requests().items():
            connection.send(request.replace(b"{version}", version.encode()))
            status, headers, body = connection.response()
            assert status == 503, (what, status, body[:200])
            assert headers["retry-after"] == "1", what
            assert "connection" not in headers, what  # kept alive
            key = "error" if label.startswith("/v2") else "detail"
            assert "MAX_QUEUE_DELAY_MS" in json.loads(body)[key], what
            seen[label] = seen.get(label, 0) + 1
        # The same connection, a route the door does not hold: answered at once.
        connection.send(raw_request("/models", b"", {}, method="GET"))
        status, _, body = connection.response()
        assert status == 200 and MODEL in body.decode()
        # Only the door refused: no request counted as answered 503 by the model.
        assert refused_at_door(scrape(port)) == {
            label: before.get(label, 0) + seen.get(label, 0) for label in before
        }
    # The held request has left: the door opens, and the same connection is answered.
    _, request = inference_requests()["v2 infer"]
    connection.send(request)
    status, _, body = connection.response()
    assert status == 200, body[:200]
    connection.close()
    assert seen == {"/predict": 1, "/explain": 1, "/v2/models/{model_name}/infer": 2,
                    "/v2/models/{model_name}/explain": 1}  # fmt: skip


def test_the_counter_rises_by_exactly_the_refusals_clients_saw(server):
    """Many clients, each on its own keep-alive connection (http.client), while the door
    is closed: every inference request refused, every other request answered, and the
    door's counter rises by the number of 503s they saw, route by route."""
    port = server
    before = refused_at_door(scrape(port))
    png = png_bytes(pixel_images(1)[0])
    form, form_type = multipart_body(png, "a.png")
    clients = [http.client.HTTPConnection(HOST, port, timeout=60) for _ in range(8)]
    statuses: list[int] = []
    with held_closed(port, MODEL):
        for round_ in range(3):
            for client in clients:
                client.request("POST", "/predict", form, {"Content-Type": form_type})
                response = client.getresponse()
                response.read()
                assert response.getheader("Retry-After") == "1"
                statuses.append(response.status)
                if round_ == 1:  # a request the door does not hold, on the same connection
                    client.request("GET", "/health/ready")
                    ready = client.getresponse()
                    ready.read()
                    assert ready.status == 200
    for client in clients:
        client.close()
    assert statuses == [503] * 24
    after = refused_at_door(scrape(port))
    assert after["/predict"] - before.get("/predict", 0) == 24
    assert {k: v for k, v in after.items() if k != "/predict"} == {
        k: v for k, v in before.items() if k != "/predict"
    }


def test_under_a_real_overload_the_door_refuses_some_and_answers_others(server):
    """64 closed-loop clients of 8 images through /v2 (the bench's load generator, which
    waits as Retry-After says): live batches measure the rate, requests queue, and the
    door refuses some of them; every refusal carries Retry-After and is counted."""
    port = server
    before = refused_at_door(scrape(port))
    load = run_python(
        "-m", "bench.load", "--port", str(port), "--kind", "v2", "--path", INFER,
        "--images", "8", "--concurrency", "64", "--duration", "3", "--requests", "3000",
        timeout=300,
    )  # fmt: skip
    stats = json.loads(load.stdout)
    assert stats["shed"] > 0 and stats["requests"] > 0, stats
    assert stats["shed_without_retry_after"] == 0 and stats["errors"] == 0, stats
    after = refused_at_door(scrape(port))
    label = "/v2/models/{model_name}/infer"
    assert after[label] - before.get(label, 0) == stats["shed"]


def test_while_draining_refusals_and_answers_say_connection_close(models_dir):
    """After SIGTERM the server drains: a refusal at the door, like every other answer,
    says `Connection: close` and the server closes the connection after it; once the door
    opens, an answered inference request says the same."""
    settings = {**SETTINGS, "shutdown_drain_seconds": 120, "graceful_shutdown_seconds": 5}
    with service_process(models_dir=models_dir, **settings) as (port, process):
        with held_closed(port, MODEL):
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 60  # a bound on the test, not a timing assertion
            while urllib_status(port, "/health/ready") != 503:  # the signal has landed
                assert time.monotonic() < deadline, "readiness never turned 503"
                time.sleep(0.05)
            _, request = inference_requests()["predict"]
            connection = Connection(port)
            connection.send(request)
            status, headers, _ = connection.response()
            assert status == 503 and headers["retry-after"] == "1"
            assert headers["connection"] == "close"
            assert connection.closed_by_server()
            connection = Connection(port)
            connection.send(raw_request("/models", b"", {}, method="GET"))
            status, headers, _ = connection.response()
            assert status == 200 and headers["connection"] == "close"
            assert connection.closed_by_server()
        connection = Connection(port)
        connection.send(request)
        status, headers, body = connection.response()
        assert status == 200, body[:200]
        assert headers["connection"] == "close"
        assert connection.closed_by_server()


def test_the_server_protocol_refuses_before_any_asgi_code_runs():
    """The refusal is written by the server's HTTP protocol as soon as the head is
    parsed: the app (a recording ASGI app behind the service's own uvicorn setup, handing
    the protocol a Gate in its lifespan state) never sees the refused request, nor its
    body, which may still be arriving; the same connection then serves the next request,
    and the door's counter counts the refusals. A client that says close is closed."""
    admission = Admission(max_delay=0.001, in_system=1, images_per_second=1.0)  # waits 1 s
    refused = Counter("refused", "", ["route"], registry=CollectorRegistry())
    gate = Gate(Door(admission, refused), threading.Event())
    seen: list[tuple[str, str, bytes]] = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await receive()
            scope["state"][GATE] = gate
            await send({"type": "lifespan.startup.complete"})
            await receive()
            return await send({"type": "lifespan.shutdown.complete"})
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        seen.append((scope["method"], scope["path"], body))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    config = server_config(Settings(), app, host=HOST, port=port, workers=1, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60  # a bound on the test, not a timing assertion
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        connection = Connection(port)
        head = raw_request("/predict", b"0123456789", {})  # its body sent in two parts
        connection.send(head[:-6])
        status, headers, body = connection.response()
        assert status == 503 and headers["retry-after"] == "1", body
        assert "MAX_QUEUE_DELAY_MS" in json.loads(body)["detail"]
        assert seen == []  # answered with four of its ten body bytes still to come
        connection.send(head[-6:] + raw_request("/v2/models/m/infer", b"{}", {}))
        status, _, body = connection.response()
        assert status == 503 and "MAX_QUEUE_DELAY_MS" in json.loads(body)["error"]
        connection.send(raw_request("/models", b"", {}, method="GET"))
        assert connection.response()[0] == 200
        assert seen == [("GET", "/models", b"")]  # the refused bodies reached nobody
        admission.in_system = 0  # the door opens: the same connection's next one goes in
        connection.send(raw_request("/predict", b"abc", {}))
        assert connection.response()[0] == 200
        assert seen[-1] == ("POST", "/predict", b"abc")
        connection.close()
        admission.in_system = 1
        connection = Connection(port)
        connection.send(raw_request("/predict", b"abc", {}, close=True))
        status, headers, _ = connection.response()
        assert status == 503 and headers["connection"] == "close"
        assert connection.closed_by_server()
        connection.close()
        counted = {s.labels["route"]: s.value for m in refused.collect() for s in m.samples
                   if s.name == "refused_total"}  # fmt: skip
        assert counted == {"/predict": 2, "/v2/models/{model_name}/infer": 1}
        assert len(seen) == 2
    finally:
        server.should_exit = True
        thread.join(60)


def urllib_get(port: int, path: str) -> bytes:
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    connection.request("GET", path)
    body = connection.getresponse().read()
    connection.close()
    return body


def urllib_status(port: int, path: str) -> int:
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status
