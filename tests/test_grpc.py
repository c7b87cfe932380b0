"""The Open Inference Protocol over gRPC, driven by real clients against the real server
over a socket: NVIDIA's `tritonclient.grpc` and KServe's `InferenceGRPCClient` (each in an
environment of its own: their protobuf pins clash with ours), and a stub generated from
our own .proto for what those clients will not send (lying shapes, many inputs, huge
metadata, oversized messages). Same answers as REST and onnxruntime; every REST error
has its gRPC status, with the same message."""

import ast
import filecmp
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from bench.hostile import growth_bound
from bench.procfs import PeakGrowth
from bench.servers import free_port, service_process
from contract.classifier import file_version
from service.rpc import inference_pb2 as pb
from service.rpc.inference_pb2_grpc import GRPCInferenceServiceStub
from tests.service_helpers import live_server, onnx_probabilities
from tests.synthetic import CLASS_NAMES

LARGE, SMALL = "cifar100-5735844", "cifar100-712868"
ROOT = Path(__file__).resolve().parent.parent
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def server(models_dir):
    """(HTTP port, gRPC port) of one server with both."""
    grpc_port = free_port()
    with live_server(models_dir, max_images_per_request=8, grpc_port=grpc_port) as port:
        yield port, grpc_port


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        yield GRPCInferenceServiceStub(channel)


# Runs in tritonclient[grpc]'s own venv (the triton_grpc_python fixture): a list of calls
# from stdin, each answered with {"ok": ...} or {"error": [status, message]}.
TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, path = sys.argv[1], sys.argv[2]
images = np.load(path)
client = grpcclient.InferenceServerClient(url=url)

def infer(model, count=None, shape=None, datatype="UINT8", outputs=None, version="",
          headers=None, request_id=""):
    array = images if count is None else images[:count]
    if datatype == "FP32":
        array = array.astype(np.float32)
    tensor = grpcclient.InferInput("images", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    if shape:
        tensor.set_shape(shape)
    asked = [grpcclient.InferRequestedOutput(o["name"], class_count=o.get("class_count", 0))
             for o in outputs] if outputs else None
    result = client.infer(model, [tensor], model_version=version, outputs=asked,
                          request_id=request_id, headers=headers)
    response = result.get_response(as_json=True)
    values = {}
    for output in response["outputs"]:
        array = result.as_numpy(output["name"])
        values[output["name"]] = ([[v.decode() for v in row] for row in array]
                                  if array.dtype == object else array.tolist())
    found = {k: response.get(k) for k in ("model_name", "model_version", "id")}
    return {"response": found, "outputs": values}

answers = []
for call in json.load(sys.stdin):
    name = call.pop("call")
    try:
        if name == "infer":
            value = infer(**call)
        elif name.startswith("get_"):
            value = getattr(client, name)(as_json=True, **call)
        else:
            value = getattr(client, name)(**call)
        answers.append({"ok": value})
    except InferenceServerException as err:
        answers.append({"error": [err.status(), err.message()]})
client.close()
print(json.dumps(answers))
"""


def triton_calls(
    python: Path, grpc_port: int, images: np.ndarray, calls: list[dict], tmp_path: Path
) -> list[dict]:
    np.save(tmp_path / "images.npy", images)
    found = subprocess.run(
        [python, "-c", TRITON_CLIENT, f"127.0.0.1:{grpc_port}", str(tmp_path / "images.npy")],
        input=json.dumps(calls),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert found.returncode == 0, found.stderr[-3000:]
    return json.loads(found.stdout)


def test_tritonclient_health_metadata_and_config(
    server, models_dir, images, triton_grpc_python, tmp_path
):
    version = file_version(models_dir / f"{LARGE}.onnx")
    calls = [
        {"call": "is_server_live"},
        {"call": "is_server_ready"},
        {"call": "get_server_metadata"},
        {"call": "is_model_ready", "model_name": LARGE},
        {"call": "is_model_ready", "model_name": LARGE, "model_version": version},
        {"call": "get_model_metadata", "model_name": LARGE},
        {"call": "get_model_metadata", "model_name": LARGE, "model_version": version},
        {"call": "get_model_config", "model_name": LARGE},
    ]
    live, ready, meta, model_ready, version_ready, model, pinned, config = (
        answer["ok"]
        for answer in triton_calls(triton_grpc_python, server[1], images, calls, tmp_path)
    )
    assert live is True and ready is True and model_ready is True and version_ready is True
    assert meta["name"] == "cifar100-classifier"
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    # The same metadata as REST (int64 fields are strings in protobuf's JSON form).
    http = triton_http.InferenceServerClient(url=f"127.0.0.1:{server[0]}")
    rest = http.get_model_metadata(LARGE)
    http.close()
    for found in (model, pinned):
        assert found["name"] == LARGE and found["versions"] == [version] == rest["versions"]
        assert found["platform"] == rest["platform"] == "onnxruntime_onnx"
        tensors = [
            {**t, "shape": [int(d) for d in t["shape"]]}
            for t in (*found["inputs"], *found["outputs"])
        ]
        assert tensors == [*rest["inputs"], *rest["outputs"]]
        assert tensors[0]["shape"] == [-1, 32, 32, 3]  # -1: the batch dimension
        assert tensors[1] == {"name": "image_files", "datatype": "BYTES", "shape": [-1, 1]}
    config = config["config"]
    assert config["name"] == LARGE and config["max_batch_size"] == 8  # MAX_IMAGES_PER_REQUEST
    assert config["input"] == [  # one or the other: both optional
        {"name": "images", "data_type": "TYPE_UINT8", "dims": ["32", "32", "3"], "optional": True},
        {"name": "image_files", "data_type": "TYPE_STRING", "dims": ["1"], "optional": True},
    ]
    assert {"name": "probabilities", "data_type": "TYPE_FP32", "dims": ["100"]} in config["output"]


def test_tritonclient_infers_as_onnxruntime_and_classifies(
    server, models_dir, images, triton_grpc_python, tmp_path
):
    outputs = [{"name": "probabilities"}, {"name": "features"}]
    calls = [
        *(
            {"call": "infer", "model": model, "outputs": outputs, "request_id": f"r-{model}"}
            for model in (LARGE, SMALL)
        ),
        {"call": "infer", "model": SMALL, "outputs": [{"name": "probabilities", "class_count": 3}]},
    ]
    large, small, top = (
        a["ok"] for a in triton_calls(triton_grpc_python, server[1], images, calls, tmp_path)
    )
    for model_id, answer in ((LARGE, large), (SMALL, small)):
        expected = onnx_probabilities(models_dir / f"{model_id}.onnx", images)
        probabilities = np.array(answer["outputs"]["probabilities"], dtype=np.float32)
        np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-7)
        assert np.array(answer["outputs"]["features"]).shape[0] == len(images)
        assert answer["response"] == {
            "model_name": model_id,
            "id": f"r-{model_id}",
            "model_version": file_version(models_dir / f"{model_id}.onnx"),
        }
    # Classification: "score:index:label", best first, as REST answers it.
    expected = onnx_probabilities(models_dir / f"{SMALL}.onnx", images)
    for row, probabilities in zip(top["outputs"]["probabilities"], expected, strict=True):
        best = np.argsort(-probabilities, kind="stable")[:3]
        assert [entry.split(":", 1)[1] for entry in row] == [f"{i}:{CLASS_NAMES[i]}" for i in best]
        assert abs(float(row[0].split(":")[0]) - probabilities[best[0]]) < 1e-5


def _rest_error(
    http_port: int,
    model: str,
    tensor_images: np.ndarray,
    shape=None,
    outputs=None,
    datatype="UINT8",
) -> tuple[str, str]:
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{http_port}")
    array = tensor_images.astype(np.float32) if datatype == "FP32" else tensor_images
    tensor = triton_http.InferInput("images", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=True)
    if shape:
        tensor.set_shape(shape)
    asked = [
        triton_http.InferRequestedOutput(o["name"], class_count=o.get("class_count", 0))
        for o in outputs or ()
    ]
    try:
        client.infer(model, [tensor], outputs=asked or None)
    except InferenceServerException as err:
        return err.status(), err.message()
    finally:
        client.close()
    raise AssertionError("REST accepted it")


BAD = [  # (the call's arguments, gRPC status, HTTP status)
    ({"model": "nope"}, "NOT_FOUND", "404"),
    ({"model": LARGE, "datatype": "FP32"}, "INVALID_ARGUMENT", "400"),
    ({"model": LARGE, "count": 1, "shape": [1, 32, 32, 4]}, "INVALID_ARGUMENT", "400"),
    ({"model": LARGE, "outputs": [{"name": "logits"}]}, "INVALID_ARGUMENT", "400"),
    (
        {"model": LARGE, "outputs": [{"name": "probabilities", "class_count": 101}]},
        "INVALID_ARGUMENT",
        "400",
    ),
    (
        {"model": LARGE, "outputs": [{"name": "features", "class_count": 2}]},
        "INVALID_ARGUMENT",
        "400",
    ),
]


def test_tritonclient_errors_are_status_codes_with_rests_messages(
    server, images, triton_grpc_python, tmp_path
):
    """Each bad request: its gRPC code, and the very message REST gives for the same
    tensors (checked against REST on the same server)."""
    many = np.concatenate([images, images])[:9]  # one above MAX_IMAGES_PER_REQUEST
    calls = [{"call": "infer", **arguments} for arguments, _, _ in BAD]
    answers = triton_calls(triton_grpc_python, server[1], images, calls, tmp_path)
    answers += triton_calls(
        triton_grpc_python, server[1], many, [{"call": "infer", "model": LARGE}], tmp_path
    )
    cases = [*BAD, ({"model": LARGE}, "INVALID_ARGUMENT", "413")]
    for (arguments, code, http_status), answer, sent in zip(
        cases, answers, [images] * len(BAD) + [many], strict=True
    ):
        assert "error" in answer, arguments
        status, message = answer["error"]
        assert status == f"StatusCode.{code}", (arguments, answer)
        count = arguments.get("count")
        rest_status, rest_message = _rest_error(
            server[0],
            arguments["model"],
            sent if count is None else sent[:count],
            arguments.get("shape"),
            arguments.get("outputs"),
            arguments.get("datatype", "UINT8"),
        )
        assert rest_status == http_status and message == rest_message, (arguments, message)
    # An unknown version, and raw bytes that do not fill the shape (REST words the latter
    # in its own binary extension's terms: binary_data_size).
    version, short = triton_calls(
        triton_grpc_python,
        server[1],
        images,
        [
            {"call": "infer", "model": LARGE, "version": "0123456789ab"},
            {"call": "infer", "model": LARGE, "count": 2, "shape": [1, 32, 32, 3]},
        ],
        tmp_path,
    )
    assert version["error"][0] == "StatusCode.NOT_FOUND"
    assert f"model {LARGE!r} has no version '0123456789ab'" in version["error"][1]
    assert short["error"] == [
        "StatusCode.INVALID_ARGUMENT",
        "input 'images' has 6144 raw bytes; shape [1, 32, 32, 3] of UINT8 needs 3072",
    ]


def test_keys_queue_bound_and_deadline_over_grpc(models_dir, images, triton_grpc_python, tmp_path):
    """UNAUTHENTICATED without the key; RESOURCE_EXHAUSTED (the queue bound, with a retry
    hint) and DEADLINE_EXCEEDED (REQUEST_TIMEOUT_SECONDS) as REST's 503 and 504."""
    grpc_port = free_port()
    settings = {
        "api_keys": KEY,
        "max_queue_images": 2,
        "max_images_per_request": 4,
        "request_timeout_seconds": 0.0001,
        "grpc_port": grpc_port,
    }
    with live_server(models_dir, **settings):
        bearer = {"authorization": f"Bearer {KEY}"}
        calls = [
            {"call": "is_server_ready"},  # health stays open, as over REST
            {"call": "is_model_ready", "model_name": LARGE},
            {"call": "infer", "model": LARGE, "count": 1},
            {
                "call": "infer",
                "model": LARGE,
                "count": 1,
                "headers": {"authorization": "Bearer wrong"},
            },
            {"call": "infer", "model": LARGE, "count": 3, "headers": bearer},
            {"call": "infer", "model": LARGE, "count": 1, "headers": bearer},
        ]
        ready, model_ready, no_key, wrong, shed, late = triton_calls(
            triton_grpc_python, grpc_port, images, calls, tmp_path
        )
        assert ready == {"ok": True}
        assert model_ready["error"][0] == "StatusCode.UNAUTHENTICATED"
        assert no_key["error"] == [
            "StatusCode.UNAUTHENTICATED",
            "send an API key as `Authorization: Bearer <token>`",
        ]
        assert wrong["error"] == ["StatusCode.UNAUTHENTICATED", "an API key was not accepted"]
        assert shed["error"][0] == "StatusCode.RESOURCE_EXHAUSTED"
        assert "images queued" in shed["error"][1]
        assert late["error"][0] == "StatusCode.DEADLINE_EXCEEDED"
        assert "before the request's deadline" in late["error"][1]
        # The retry hint travels as trailing metadata (tritonclient does not show it).
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            request = raw_request(images[:3])
            with pytest.raises(grpc.RpcError) as err:
                GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=bearer.items())
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ("retry-after", "1") in err.value.trailing_metadata()


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_not_ready_is_false_on_health_and_unavailable_on_infer(tmp_path, images, transport):
    """With no model loaded, on either transport: live, not ready (HTTP's health: a 4xx,
    the protocol's "false"), and inference refused as unavailable (503 / UNAVAILABLE)
    with the same message."""
    grpc_port = free_port()
    with live_server(tmp_path, grpc_port=grpc_port) as port:  # no models
        if transport == "http":
            client = triton_http.InferenceServerClient(url=f"127.0.0.1:{port}")
            assert client.is_server_live() and not client.is_server_ready()
            client.close()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{LARGE}/infer",
                                             data=b"{}", method="POST")  # fmt: skip
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(request, timeout=30)
            status, message = err.value.code, json.loads(err.value.read())["error"]
            assert status == 503
        else:
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = GRPCInferenceServiceStub(channel)
                assert stub.ServerLive(pb.ServerLiveRequest()).live
                assert not stub.ServerReady(pb.ServerReadyRequest()).ready
                with pytest.raises(grpc.RpcError) as err:
                    stub.ModelInfer(raw_request(images[:1]))
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                message = err.value.details()
        assert "no model loaded" in message


# --- our own stub: the protocol's other forms, and hostile messages ------------------------


def raw_request(images: np.ndarray, model: str = LARGE, **fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **fields)
    request.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    request.raw_input_contents.append(images.tobytes())
    return request


def test_contents_json_equivalent_equals_raw_and_onnxruntime(stub, models_dir, images):
    """uint_contents (the protocol's typed form, JSON's counterpart) and raw bytes give
    the same answer, onnxruntime's; min_familiarity is honoured as over REST."""
    typed = pb.ModelInferRequest(model_name=SMALL, id="c-1")
    tensor = typed.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    tensor.contents.uint_contents.extend(images.ravel().tolist())
    expected = onnx_probabilities(models_dir / f"{SMALL}.onnx", images)
    for request in (typed, raw_request(images, SMALL)):
        response = stub.ModelInfer(request)
        (output,) = response.outputs
        assert output.name == "probabilities" and list(output.shape) == [len(images), 100]
        values = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(-1, 100)
        np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-7)
    assert stub.ModelInfer(typed).id == "c-1"
    strict = raw_request(images, SMALL)
    strict.parameters["min_familiarity"].double_param = 1.0  # nothing is that familiar
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(strict)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unlike the images the model was trained on" in err.value.details()


def test_answers_are_the_datatypes_and_bytes_rest_sends(server, stub, images):
    """Every output over gRPC: the datatype REST names, as many raw bytes as its shape and
    datatype need, and the very values /v2 answers over HTTP for the same tensors."""
    request = raw_request(images, SMALL)
    for name in ("probabilities", "features", "familiarity"):
        request.outputs.add(name=name)
    response = stub.ModelInfer(request)
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{server[0]}")
    tensor = triton_http.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=True)
    asked = [triton_http.InferRequestedOutput(o.name, binary_data=True) for o in request.outputs]
    rest = client.infer(SMALL, [tensor], outputs=asked)
    client.close()
    described = {o["name"]: o for o in rest.get_response()["outputs"]}
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        http = described[output.name]
        assert output.datatype == http["datatype"] == "FP32", output
        assert list(output.shape) == http["shape"]
        assert len(raw) == 4 * int(np.prod(http["shape"]))  # 4 bytes a float32
        values = np.frombuffer(raw, "<f4").reshape(http["shape"])
        np.testing.assert_array_equal(values, rest.as_numpy(output.name))


def test_undecodable_messages_are_invalid_argument_counted_and_logged(server, stub, caplog):
    """Bytes that are not the RPC's message: INVALID_ARGUMENT from our code (not grpcio's
    UNKNOWN), counted in /metrics like any other refusal."""
    with grpc.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        for method in ("ModelInfer", "ModelMetadata"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            with pytest.raises(grpc.RpcError) as err:
                call(b"\xff\xff\xff\xff", timeout=30)  # a field tag with no end
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is not a valid inference." in err.value.details()
    text = urllib.request.urlopen(f"http://127.0.0.1:{server[0]}/metrics", timeout=30).read()
    assert any('"/inference.GRPCInferenceService/ModelInfer"' in line
               and 'status="INVALID_ARGUMENT"' in line and line.startswith("http_requests_total")
               for line in text.decode().splitlines())  # fmt: skip


def test_client_text_in_status_messages_is_cut(stub, images):
    """A 300 KB model name is answered NOT_FOUND with a message of a few hundred
    characters (a client with gRPC's default limits reads it), marked as cut."""
    name = "m" * 300_000
    for call, request in ((stub.ModelInfer, raw_request(images[:1], model=name)),
                          (stub.ModelReady, pb.ModelReadyRequest(name=name))):  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "(cut: 300,000 characters)" in err.value.details()
        assert len(err.value.details()) < 1000


def bytes_request(files: list[bytes], framed: bool, model: str = SMALL) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="image_files", datatype="BYTES", shape=[len(files)])
    if framed:  # as tritonclient sends BYTES: raw contents, each with its 4-byte length
        request.raw_input_contents.append(b"".join(len(f).to_bytes(4, "little") + f for f in files))
    else:
        tensor.contents.bytes_contents.extend(files)
    return request


@pytest.mark.parametrize("framed", [False, True], ids=["bytes_contents", "raw contents"])
def test_encoded_images_over_grpc_are_answered_as_predict_answers_them(server, stub, images,
                                                                       framed):  # fmt: skip
    from tests.test_v2 import encoded, predict_probabilities

    files = encoded(images)[:3]  # PNG, JPEG, WebP, all 32x32
    expected = predict_probabilities(server[0], SMALL, files).astype(np.float32)
    response = stub.ModelInfer(bytes_request(files, framed))
    (output,) = response.outputs
    assert output.datatype == "FP32" and list(output.shape) == [3, 100]
    found = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(3, 100)
    np.testing.assert_array_equal(found, expected)
    with pytest.raises(grpc.RpcError) as err:  # not an image: /predict's 422 words
        stub.ModelInfer(bytes_request([b"hello"], framed))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 1: not an image we can read" in err.value.details()


def hostile_cases(images: np.ndarray) -> list[tuple[str, pb.ModelInferRequest, str]]:
    one = images[:1]
    lying = raw_request(one)
    lying.inputs[0].shape[:] = [4, 32, 32, 3]  # says 4 images, carries one
    huge_shape = raw_request(one)
    huge_shape.inputs[0].shape[:] = [1, 32, 32, 3 * 10**9]
    negative = raw_request(one)
    negative.inputs[0].shape[:] = [-1, 32, 32, 3]
    many_inputs = raw_request(one)
    for _ in range(2000):  # as many as fit in the largest message of 8 images
        many_inputs.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 3])
    both = raw_request(one)
    both.inputs[0].contents.uint_contents.extend([1, 2, 3])
    too_big_values = pb.ModelInferRequest(model_name=LARGE)
    tensor = too_big_values.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 3])
    tensor.contents.uint_contents.extend([256] * 3072)
    floats = pb.ModelInferRequest(model_name=LARGE)
    tensor = floats.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 3])
    tensor.contents.fp32_contents.extend([0.5] * 3072)
    parameters = raw_request(one)
    for i in range(1000):
        parameters.parameters[f"p{i}"].int64_param = i
    many_outputs = raw_request(one)
    for _ in range(1000):
        many_outputs.outputs.add(name="probabilities")
    no_input = pb.ModelInferRequest(model_name=LARGE)
    return [
        ("lying shape", lying, "3072 raw bytes; shape [4, 32, 32, 3] of UINT8 needs 12288"),
        ("huge shape", huge_shape, "must have shape [N, 32, 32, 3]"),
        ("negative batch", negative, "must have shape [N, 32, 32, 3]"),
        ("many inputs", many_inputs, "raw_input_contents has 1 entries for 2001 inputs"),
        ("contents and raw", both, "has both contents and raw contents"),
        ("values above 255", too_big_values, "UINT8 values must be within 0..255"),
        ("floats", floats, "UINT8 values go in uint_contents or raw_input_contents"),
        ("many parameters", parameters, "at most 16 parameters"),
        ("many outputs", many_outputs, "invalid inference request: outputs"),
        ("no input", no_input, "an 'inputs' list of one input"),
    ]


def test_hostile_messages_are_refused_with_a_message(stub, images):
    """Each answered INVALID_ARGUMENT at once, bounded by the message's size: never a
    crash, a hang or an allocation its shape asks for."""
    for name, request, message in hostile_cases(images):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value)
        assert message in err.value.details(), (name, err.value.details())
    assert stub.ServerReady(pb.ServerReadyRequest()).ready  # and the server is fine


@pytest.fixture(scope="module")
def grpc_process(models_dir, images):
    """`python -m service` with gRPC, warmed up with its largest legitimate calls (so
    onnxruntime's arena is at its working size before anything is measured)."""
    grpc_port = free_port()
    settings = {"models_dir": models_dir, "log_json": False, "grpc_port": grpc_port}
    with (
        service_process(**settings) as (_, process),
        grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
    ):
        stub = GRPCInferenceServiceStub(channel)
        largest = np.resize(images, (64, 32, 32, 3))
        for _ in range(4):
            stub.ModelInfer(raw_request(largest), timeout=120)
        yield stub, process.pid


def test_hostile_messages_cost_memory_bounded_by_their_size(grpc_process, images):
    """The REST corpus's bound (bench/hostile.py): the server's peak memory grows by at
    most growth_bound(bytes sent) for each hostile message, and it still serves."""
    stub, pid = grpc_process
    oversized = raw_request(images[:1])
    oversized.raw_input_contents[0] = bytes(8 << 20)  # refused by gRPC: above its bound
    cases = [(name, request) for name, request, _ in hostile_cases(images)]
    for name, request in [*cases, ("oversized", oversized)]:
        with PeakGrowth(pid) as peak, pytest.raises(grpc.RpcError):
            stub.ModelInfer(request, timeout=120)
        assert peak.mib * 2**20 <= growth_bound(request.ByteSize()), (name, peak.mib)
    assert len(stub.ModelInfer(raw_request(images[:1]), timeout=60).outputs) == 1


def test_oversized_messages_and_metadata_are_refused_by_grpc_itself(server, images):
    """Above the largest valid inference message (the codec's bound for
    MAX_IMAGES_PER_REQUEST), gRPC refuses it before our code reads it; metadata above
    MAX_HEADER_BYTES likewise; the connection serves the next call."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_metadata_size", 1 << 24)]
    with grpc.insecure_channel(f"127.0.0.1:{server[1]}", options=options) as channel:
        stub = GRPCInferenceServiceStub(channel)
        request = raw_request(images[:1])
        request.raw_input_contents[0] = bytes(4 << 20)  # 4 MiB
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(
                raw_request(images[:1]), metadata=[("x-huge", "a" * 200_000)], timeout=30
            )
        assert err.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)
        # Every call above MAX_HEADER_BYTES, not some at random: the limit the docs name.
        for size in (65_600, 70_000, 80_000):
            with pytest.raises(grpc.RpcError) as err:
                stub.ServerLive(pb.ServerLiveRequest(), metadata=[("x-huge", "a" * size)])
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "65536" in err.value.details()
        assert len(stub.ModelInfer(raw_request(images[:1]), timeout=30).outputs) == 1


def test_request_ids_metrics_and_access_log_are_per_rpc(server, stub, images):
    """The caller's x-request-id comes back (trailing metadata); /metrics counts each RPC
    by its name and gRPC status, beside the HTTP routes."""
    _, call = stub.ModelInfer.with_call(
        raw_request(images[:2]), metadata=[("x-request-id", "grpc-abc")]
    )
    assert ("x-request-id", "grpc-abc") in call.trailing_metadata()
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(raw_request(images[:1], model="nope"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{server[0]}/metrics", timeout=30).read()
    lines = text.decode().splitlines()
    infer = '"/inference.GRPCInferenceService/ModelInfer"'
    assert any(
        line.startswith("http_requests_total{")
        and infer in line
        and f'model="{LARGE}"' in line
        and 'status="OK"' in line
        for line in lines
    )
    assert any(infer in line and 'status="NOT_FOUND"' in line for line in lines)


# --- KServe's own client -----------------------------------------------------------------

# Runs in the kserve SDK's venv: its gRPC client, health, inference in the typed
# (contents) and raw forms, and an unknown model.
KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

url, model, path = sys.argv[1], sys.argv[2], sys.argv[3]
images = np.load(path)

async def main():
    client = InferenceGRPCClient(url, timeout=60, retries=0)
    found = {"live": await client.is_server_live(), "ready": await client.is_server_ready(),
             "model_ready": await client.is_model_ready(model)}
    for binary in (False, True):
        if binary:
            tensor = InferInput("images", list(images.shape), "UINT8")
            tensor.set_data_from_numpy(images, binary_data=True)
        else:
            tensor = InferInput("images", list(images.shape), "UINT8",
                                data=images.ravel().tolist())
        request = InferRequest(model_name=model, infer_inputs=[tensor], request_id="k-1")
        response = await client.infer(request)
        found[f"binary={binary}"] = response.outputs[0].as_numpy().tolist()
        found["id"] = response.id
    try:
        await client.infer(InferRequest(model_name="nope", infer_inputs=[tensor]))
        found["unknown"] = None
    except Exception as err:
        found["unknown"] = [str(getattr(err, "code", lambda: "")()), str(err)]
    await client.close()
    print(json.dumps(found))

asyncio.run(main())
"""


def test_kserves_own_grpc_client(server, models_dir, images, kserve_python, tmp_path):
    np.save(tmp_path / "images.npy", images)
    found = subprocess.run(
        [
            kserve_python,
            "-c",
            KSERVE_CLIENT,
            f"127.0.0.1:{server[1]}",
            LARGE,
            str(tmp_path / "images.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert found.returncode == 0, found.stderr[-3000:]
    result = json.loads(found.stdout)
    assert result["live"] is True and result["ready"] is True and result["model_ready"] is True
    expected = onnx_probabilities(models_dir / f"{LARGE}.onnx", images)
    for binary in (False, True):
        np.testing.assert_allclose(result[f"binary={binary}"], expected, rtol=1e-5, atol=1e-7)
    assert result["id"] == "k-1"
    assert "NOT_FOUND" in result["unknown"][0] and "unknown model 'nope'" in result["unknown"][1]


# --- how it runs --------------------------------------------------------------------------


def test_sigterm_drains_grpc_like_http(models_dir, images):
    """SIGTERM: ServerReady false at once while calls are still answered, then the
    process stops and exits by itself."""
    grpc_port = free_port()
    settings = {
        "models_dir": models_dir,
        "shutdown_drain_seconds": 3,
        "graceful_shutdown_seconds": 10,
        "grpc_port": grpc_port,
    }
    with service_process(**settings) as (_, process):
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30  # a bound on waiting for the signal to land
            while stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready:
                assert time.monotonic() < deadline, "still ready 30 s after SIGTERM"
                time.sleep(0.05)
            assert len(stub.ModelInfer(raw_request(images[:1]), timeout=30).outputs) == 1
        assert process.wait(timeout=60) is not None  # it exits by itself


def test_the_generated_code_is_current(grpc_tools_python, tmp_path):
    """The committed inference_pb2*.py are what grpcio-tools writes from the .proto."""
    subprocess.run(
        [
            grpc_tools_python,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "service/rpc/inference.proto"),
        ],
        check=True,
        timeout=120,
    )
    for name in ("inference_pb2.py", "inference_pb2_grpc.py"):
        assert filecmp.cmp(
            tmp_path / "service/rpc" / name, ROOT / "service/rpc" / name, shallow=False
        ), f"regenerate {name} (see service/rpc/inference.proto)"


CORE = sorted(  # every module of the service that is not a transport, and the contract
    [f"service/{p.stem}.py" for p in (ROOT / "service").glob("*.py")
     if p.stem not in ("main", "server", "__main__", "__init__")]
    + [f"contract/{p.stem}.py" for p in (ROOT / "contract").glob("*.py")]
)  # fmt: skip
TRANSPORTS = (
    "fastapi",
    "starlette",
    "uvicorn",
    "grpc",
    "service.http",
    "service.routes",
    "service.rpc",
    "service.main",
    "service.server",
)


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_transport(module):
    """Adding a transport is one adapter: the core imports nothing of HTTP or gRPC."""
    tree = ast.parse((ROOT / module).read_text())
    for node in ast.walk(tree):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        )
        for name in names:
            assert not any(name == t or name.startswith(t + ".") for t in TRANSPORTS), (
                f"{module} imports {name}"
            )
