"""The Open Inference Protocol (v2), driven by NVIDIA's own client (`tritonclient[http]`)
against the real server over a socket: metadata, readiness, JSON and binary tensors,
the classification extension and every error case. Top-1 through /v2 equals /predict
equals onnxruntime on the same images."""

import base64
import json
import subprocess
import urllib.request

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from bench.load import multipart_form
from contract.classifier import file_version
from tests.service_helpers import encode, live_server, onnx_probabilities
from tests.synthetic import CLASS_NAMES

LARGE, SMALL = "cifar100-5735844", "cifar100-712868"


@pytest.fixture(scope="module")
def server(models_dir):
    with live_server(models_dir, max_images_per_request=8) as port:
        yield port


@pytest.fixture(scope="module")
def client(server):
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server}")
    yield client
    client.close()


def images_input(images: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def test_server_and_model_metadata_and_health(client, models_dir):
    assert client.is_server_live() and client.is_server_ready()
    server = client.get_server_metadata()
    assert server["name"] == "cifar100-classifier"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    version = file_version(models_dir / f"{LARGE}.onnx")
    for kwargs in ({}, {"model_version": version}):
        assert client.is_model_ready(LARGE, **kwargs)
        meta = client.get_model_metadata(LARGE, **kwargs)
        assert meta["name"] == LARGE and meta["versions"] == [version]
        assert meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [
            {"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]},
            {"name": "image_files", "datatype": "BYTES", "shape": [-1, 1]},
        ]
        outputs = {o["name"]: o for o in meta["outputs"]}
        assert outputs["probabilities"] == {
            "name": "probabilities",
            "datatype": "FP32",
            "shape": [-1, 100],
        }
        assert outputs["features"]["datatype"] == "FP32" and outputs["features"]["shape"][0] == -1


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model_id", [LARGE, SMALL])
def test_infer_equals_onnxruntime_and_predict(client, server, models_dir, images, model_id, binary):
    result = client.infer(
        model_id,
        [images_input(images, binary)],
        outputs=[
            triton.InferRequestedOutput("probabilities", binary_data=binary),
            triton.InferRequestedOutput("features", binary_data=binary),
        ],
    )
    probabilities = result.as_numpy("probabilities")
    expected = onnx_probabilities(models_dir / f"{model_id}.onnx", images)
    assert probabilities.shape == (len(images), 100) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-7)
    assert result.as_numpy("features").shape[0] == len(images)
    response = result.get_response()
    assert response["model_name"] == model_id
    assert response["model_version"] == file_version(models_dir / f"{model_id}.onnx")
    # The same images through /predict: the same top-1.
    top1 = [int(np.argmax(row)) for row in probabilities]
    assert top1 == [int(np.argmax(row)) for row in expected]
    assert top1 == predict_top1(server, model_id, images)


def predict_top1(port: int, model_id: str, images: np.ndarray) -> list[int]:
    body, content_type = multipart_form([(f"{i}.png", encode(im)) for i, im in enumerate(images)])
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict?model={model_id}",
        data=body,
        headers={"Content-Type": content_type},
    )
    body = json.loads(urllib.request.urlopen(request, timeout=30).read())
    return [p["top_k"][0]["class_id"] for p in body["predictions"]]


def test_only_probabilities_unless_features_are_asked(client, images):
    result = client.infer(LARGE, [images_input(images[:2], binary=True)])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_classification_extension_names_our_classes(client, models_dir, images, binary):
    result = client.infer(
        LARGE,
        [images_input(images, binary=True)],
        outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)],
    )
    labels = result.as_numpy("probabilities")
    assert labels.shape == (len(images), 3)
    expected = onnx_probabilities(models_dir / f"{LARGE}.onnx", images)
    for row, probs in zip(labels, expected, strict=True):
        entries = [(v.decode() if isinstance(v, bytes) else v).split(":") for v in row]
        best = np.argsort(-probs, kind="stable")[:3]
        assert [int(index) for _, index, _ in entries] == best.tolist()
        assert [label for _, _, label in entries] == [CLASS_NAMES[i] for i in best]
        assert [float(score) for score, _, _ in entries] == pytest.approx(probs[best], abs=1e-6)


def test_nested_json_data_is_accepted(server, images):
    body = {
        "id": "abc",
        "inputs": [
            {"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3],
             "data": images[:1].tolist()}
        ],
    }  # fmt: skip
    status, reply = post(server, f"/v2/models/{LARGE}/infer", json.dumps(body).encode())
    assert status == 200 and reply["id"] == "abc"
    assert reply["outputs"][0]["shape"] == [1, 100] and len(reply["outputs"][0]["data"]) == 100


def post(port: int, path: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def tensor(shape, datatype="UINT8", name="images", data=None) -> dict:
    count = int(np.prod(shape)) if all(isinstance(d, int) and d > 0 for d in shape) else 0
    return {"name": name, "datatype": datatype, "shape": shape, "data": data or [0] * count}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"not json", 400, "not valid JSON"),
        (b"[]", 400, "'inputs' list"),
        ({"inputs": [tensor([1, 32, 32, 3], "FP32")]}, 400, "datatype UINT8"),
        ({"inputs": [tensor([1, 32, 32, 1])]}, 400, "shape [N, 32, 32, 3]"),
        ({"inputs": [tensor([0, 32, 32, 3])]}, 400, "shape [N, 32, 32, 3]"),
        ({"inputs": [tensor([1, 32, 32, 3], name="x")]}, 400, "one input named 'images'"),
        ({"inputs": [tensor([1, 32, 32, 3], data=[1, 2, 3])]}, 400, "3 values for shape"),
        ({"inputs": [tensor([1, 32, 32, 3], data=[300] * 3072)]}, 400, "within 0..255"),
        ({"inputs": [tensor([1, 32, 32, 3], data=["a"] * 3072)]}, 400, "integers only"),
        ({"inputs": [tensor([9, 32, 32, 3])]}, 413, "at most 8"),
        (
            {"inputs": [tensor([1, 32, 32, 3])], "outputs": [{"name": "logits"}]},
            400,
            "unknown output 'logits'",
        ),
        (
            {
                "inputs": [tensor([1, 32, 32, 3])],
                "outputs": [{"name": "probabilities", "parameters": {"classification": 0}}],
            },
            400,
            "classification must be an integer",
        ),
    ],
)
def test_bad_requests_get_the_protocols_error_shape(server, body, status, message):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, reply = post(server, f"/v2/models/{LARGE}/infer", data)
    assert got == status and set(reply) == {"error"} and message in reply["error"], reply


def test_binary_data_must_match_its_declared_size(server):
    header = json.dumps(
        {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                     "parameters": {"binary_data_size": 3072}}]}
    ).encode()  # fmt: skip
    length = {"Inference-Header-Content-Length": str(len(header))}
    status, reply = post(server, f"/v2/models/{LARGE}/infer", header + b"\0" * 100, length)
    assert status == 400 and "binary_data_size is 3072 and 100 bytes follow" in reply["error"]
    status, reply = post(
        server, f"/v2/models/{LARGE}/infer", header, {"Inference-Header-Content-Length": "999999"}
    )
    assert status == 400 and "Inference-Header-Content-Length" in reply["error"]


def test_unknown_models_and_versions_are_404_in_the_protocols_shape(client, images):
    for call, message in (
        (lambda: client.get_model_metadata("nope"), "unknown model 'nope'"),
        (lambda: client.get_model_metadata(LARGE, model_version="0000"), "no version '0000'"),
        (lambda: client.infer("nope", [images_input(images[:1], binary=True)]), "unknown model"),
    ):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "404" and message in err.value.message()
    assert not client.is_model_ready("nope")


def test_v2_shares_the_limits_of_predict(models_dir, images):
    """Same queue bound and images per request: one data plane, whatever the protocol;
    and a body limit of its own, the largest valid v2 request of that many images."""
    with live_server(models_dir, max_queue_images=2, max_images_per_request=4) as port:
        client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
        with pytest.raises(InferenceServerException) as shed:
            client.infer(LARGE, [images_input(images[:3], binary=True)])
        assert shed.value.status() == "503" and "images queued" in shed.value.message()
        # at most 64 KiB + 4 images x 3,072 values x 10 bytes: 16 images of JSON are above
        body = json.dumps({"inputs": [tensor([16, 32, 32, 3], data=[255] * 16 * 3072)]}).encode()
        status, reply = post(port, f"/v2/models/{LARGE}/infer", body)
        assert status == 413 and "request body is above" in reply["error"]
        client.close()


# Runs in the kserve SDK's own venv (the kserve_python fixture): KServe's client against
# our /v2, health through its JSON bodies, inference in JSON and in binary.
KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

base, model, path = sys.argv[1], sys.argv[2], sys.argv[3]
images = np.load(path)

async def main():
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
    found = {"live": await client.is_server_live(base),
             "ready": await client.is_server_ready(base),
             "model_ready": await client.is_model_ready(base, model)}
    for binary in (False, True):
        tensor = InferInput("images", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images, binary_data=binary)
        request = InferRequest(model_name=model, infer_inputs=[tensor], request_id="k-1")
        response = await client.infer(base, request, model_name=model)
        found[f"binary={binary}"] = response.outputs[0].as_numpy().tolist()
    await client.close()
    print(json.dumps(found))

asyncio.run(main())
"""


def test_kserves_own_client_reads_health_and_infers(server, models_dir, images, kserve_python,
                                                    tmp_path):  # fmt: skip
    np.save(tmp_path / "images.npy", images)
    found = subprocess.run(
        [kserve_python, "-c", KSERVE_CLIENT, f"http://127.0.0.1:{server}", LARGE,
         str(tmp_path / "images.npy")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr[-2000:]
    result = json.loads(found.stdout)
    assert result["live"] is True and result["ready"] is True and result["model_ready"] is True
    expected = onnx_probabilities(models_dir / f"{LARGE}.onnx", images)
    for binary in (False, True):
        np.testing.assert_allclose(result[f"binary={binary}"], expected, atol=1e-6)


# --- encoded images: the BYTES input ----------------------------------------------------


def predict_probabilities(port: int, model_id: str, files: list[bytes], resize=False) -> np.ndarray:
    """/predict's answer for these files: every class's probability, in class order."""
    body, content_type = multipart_form([(f"{i}.img", data) for i, data in enumerate(files)])
    url = f"http://127.0.0.1:{port}/predict?model={model_id}&top_k=100&resize={str(resize).lower()}"
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
    return np.array([[c["probability"] for c in sorted(p["top_k"], key=lambda c: c["class_id"])]
                     for p in answer["predictions"]])  # fmt: skip


def encoded(images: np.ndarray) -> list[bytes]:
    """The images as the files a user has: PNG, JPEG and WebP, and one twice the size."""
    large = np.repeat(np.repeat(images[3], 2, axis=0), 2, axis=1)
    return [encode(images[0]), encode(images[1], "JPEG", quality=90),
            encode(images[2], "WEBP", lossless=True), encode(large)]  # fmt: skip


@pytest.mark.parametrize("form", ["tritonclient binary", "json base64", "json [N, 1]"])
def test_encoded_images_as_bytes_are_answered_as_predict_answers_them(client, server, images,
                                                                       form):  # fmt: skip
    """PNG, JPEG and WebP files in the `image_files` input, binary (tritonclient) or
    base64 in JSON: the very probabilities /predict gives for the same bytes (resized
    like /predict?resize=true when asked)."""
    files = encoded(images)
    expected = predict_probabilities(server, SMALL, files, resize=True)
    if form == "tritonclient binary":
        tensor = triton.InferInput("image_files", [len(files)], "BYTES")
        tensor.set_data_from_numpy(np.array(files, dtype=object), binary_data=True)
        result = client.infer(SMALL, [tensor], parameters={"resize": True})
        found = result.as_numpy("probabilities")
        assert result.get_response()["outputs"][0]["datatype"] == "FP32"
    else:
        shape = [len(files)] if form == "json base64" else [len(files), 1]
        body = {"inputs": [{"name": "image_files", "datatype": "BYTES", "shape": shape,
                            "data": [base64.b64encode(f).decode() for f in files]}],
                "parameters": {"resize": True}}  # fmt: skip
        status, reply = post(server, f"/v2/models/{SMALL}/infer", json.dumps(body).encode())
        assert status == 200, reply
        found = np.array(reply["outputs"][0]["data"]).reshape(len(files), 100)
    np.testing.assert_array_equal(found, expected.astype(np.float32))


def framed(*elements: bytes) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def files_request(data=None, shape=None, binary: bytes | None = None) -> tuple[bytes, dict]:
    tensor = {"name": "image_files", "datatype": "BYTES", "shape": shape or [1]}
    if binary is None:
        tensor["data"] = data
        return json.dumps({"inputs": [tensor]}).encode(), {}
    tensor["parameters"] = {"binary_data_size": len(binary)}
    head = json.dumps({"inputs": [tensor]}).encode()
    return head + binary, {"Inference-Header-Content-Length": str(len(head))}


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ({"data": ["not base64!"]}, 400, "base64 strings"),
        ({"data": [1, 2, 3]}, 400, "one base64 string per image"),
        ({"data": [base64.b64encode(b"hello").decode()]}, 422, "image 1: not an image"),
        ({"data": ["AAAA", "AAAA"]}, 400, "2 strings for shape [1]"),
        ({"shape": [1, 32, 32, 3], "data": ["AAAA"]}, 400, "shape [N] or [N, 1]"),
        ({"binary": framed(b"abc") + b"x"}, 400, "4-byte little-endian length"),
        ({"binary": (99).to_bytes(4, "little") + b"abc"}, 400, "says 99 bytes"),
        ({"binary": framed(b"a", b"b"), "shape": [1]}, 400, "found 1 and 5 bytes more"),
        ({"binary": framed(b"\0" * 20_000)}, 413, "the limit is 10,000 per image"),
        ({"shape": [9], "data": ["AAAA"] * 9}, 413, "at most 8"),
    ],
)
def test_bad_encoded_images_are_refused_as_predict_refuses_them(files_server, case, status,
                                                                message):  # fmt: skip
    body, headers = files_request(**case)
    got, reply = post(files_server, f"/v2/models/{LARGE}/infer", body, headers)
    assert got == status and message in reply["error"], reply


@pytest.fixture(scope="module")
def files_server(models_dir):
    with live_server(models_dir, max_images_per_request=8, max_upload_bytes=10_000) as port:
        yield port


def test_client_text_in_errors_is_cut(server):
    """A 50 KB model name (the request line fits in MAX_HEADER_BYTES) comes back as a
    few hundred characters, marked as cut."""
    name = "m" * 50_000
    status, reply = post(server, f"/v2/models/{name}/infer", b"{}")
    assert status == 404 and "(cut: 50,000 characters)" in reply["error"]
    assert len(reply["error"]) < 1000
