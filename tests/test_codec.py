"""The v2 tensor codec (service/codec.py), property-based: whatever the bytes and the
header length, decoding gives a client error (400/413) or a correct tensor, never any
other exception; and an answer is never larger than a stated function of the request.
"""

import json
import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.codec import MAX_HEADER_BYTES, InferenceRequest, decode_request, max_request_bytes
from service.errors import InvalidTensor, TooManyImages
from service.outputs import InferenceResponse, encode_response, output_tensors, requested_outputs

MAX_IMAGES = 4
WIDTHS = {"probabilities": 100, "features": 256}
NAMES = [f"class_{i}" for i in range(100)]
# What one image may cost in an answer, per output asked: each float as JSON text (at
# most 24 characters and a comma), or the top-k strings "0.123456:99:class_99" quoted.
PER_VALUE = 26
PER_LABEL = 8 + 1 + 2 + 1 + max(map(len, NAMES)) + 3

json_scalars = (
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats() | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
shapes = st.lists(st.integers(-1, 40), min_size=0, max_size=5) | st.just([1, 32, 32, 3])
tensors = st.fixed_dictionaries(
    {"name": st.sampled_from(["images", "x"]), "datatype": st.sampled_from(["UINT8", "FP32"])},
    optional={"shape": shapes, "data": json_values | st.lists(st.integers(0, 255), max_size=8),
              "parameters": st.dictionaries(st.sampled_from(["binary_data_size", "y"]),
                                            st.integers(0, 5000) | json_scalars)},
)  # fmt: skip
outputs = st.lists(
    st.fixed_dictionaries(
        {"name": st.sampled_from([*WIDTHS, "logits"])},
        optional={"parameters": st.dictionaries(
            st.sampled_from(["binary_data", "classification", "z"]),
            st.booleans() | st.integers(-2, 200) | json_scalars, max_size=2)},
    ),
    max_size=10,
)  # fmt: skip
requests = st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=2) | json_values},
    optional={"id": json_scalars, "outputs": outputs | json_values,
              "parameters": st.dictionaries(st.text(max_size=20), json_scalars, max_size=20)},
)  # fmt: skip


def decode(body: bytes, header_length: int | None):
    try:
        return decode_request(body, header_length, MAX_IMAGES)
    except (InvalidTensor, TooManyImages):
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=2048), header_length=st.none() | st.integers(0, 4096))
def test_any_bytes_give_a_client_error_or_a_tensor(body, header_length):
    decoded = decode(body, header_length)
    if decoded is not None:
        _, images = decoded
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        assert 1 <= len(images) <= MAX_IMAGES


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests, binary=st.binary(max_size=64), as_binary=st.booleans())
def test_any_json_request_gives_a_client_error_or_a_correct_tensor(request, binary, as_binary):
    header = json.dumps(request).encode()
    body, length = (header + binary, len(header)) if as_binary else (header, None)
    decoded = decode(body, length)
    if decoded is None:
        return
    _, images = decoded
    (tensor,) = request["inputs"]
    assert tensor["name"] == "images" and tensor["datatype"] == "UINT8"
    assert list(images.shape) == tensor["shape"]
    if as_binary and binary:  # the pixels are the bytes after the header, as they were sent
        assert images.tobytes() == binary
    else:
        assert np.array_equal(images.ravel(), np.asarray(tensor["data"]).ravel())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    count=st.integers(0, MAX_IMAGES + 1),
    field=st.sampled_from(["name", "datatype", "shape", "data", "parameters", "none"]),
    value=json_values,
    nested=st.booleans(),
)
def test_valid_requests_with_one_field_changed_decode_exactly_or_are_refused(
    count, field, value, nested
):
    """Near the valid region, where random requests rarely land: the tensor decoded is
    exactly the data sent, or the request is refused."""
    data = np.random.default_rng(count).integers(0, 256, (max(count, 1), 32, 32, 3)).tolist()
    tensor = {"name": "images", "datatype": "UINT8", "shape": [count, 32, 32, 3],
              "data": data if nested else np.ravel(data).tolist()}  # fmt: skip
    if field != "none":
        tensor[field] = value
    decoded = decode(json.dumps({"inputs": [tensor]}).encode(), None)
    if decoded is not None:
        assert field in ("none", "parameters") and 1 <= count <= MAX_IMAGES
        assert np.array_equal(decoded[1], np.asarray(data, dtype=np.uint8))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(count=st.integers(1, MAX_IMAGES), asked=outputs, binary_output=st.booleans(),
       request_id=st.none() | st.text(max_size=256))  # fmt: skip
def test_an_answer_is_bounded_by_the_images_and_outputs_asked(
    count, asked, binary_output, request_id
):
    body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [count, 32, 32, 3],
                        "parameters": {"binary_data_size": count * 3072}}],
            "outputs": asked, "parameters": {"binary_data_output": binary_output}}  # fmt: skip
    if request_id is not None:
        body["id"] = request_id
    header = json.dumps(body).encode()
    decoded = decode(header + bytes(count * 3072), len(header))
    if decoded is None:  # malformed outputs are refused before any work
        return
    parsed, _ = decoded
    try:
        chosen = requested_outputs(parsed, WIDTHS)
    except InvalidTensor:
        return
    assert len({o.name for o in chosen}) == len(chosen) <= len(WIDTHS)
    rng = np.random.default_rng(0)
    results = {name: rng.random((count, width), dtype=np.float32) for name, width in WIDTHS.items()}
    tensors = output_tensors(parsed, chosen, results, NAMES)
    content, head = encode_response(InferenceResponse("m", "v", parsed.id, tensors))
    bound = (
        512
        + len((request_id or "").encode()) * 6
        + count * sum(WIDTHS[o.name] * max(PER_VALUE, PER_LABEL) for o in chosen)
    )
    assert len(content) <= bound
    if head is not None:
        assert json.loads(content[:head])["model_name"] == "m"


def test_the_body_limit_is_the_largest_valid_request():
    """A 64-image request with every value spelt out fits; the limit is not far above."""
    images = np.full((64, 32, 32, 3), 255, np.uint8)
    flat = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [64, 32, 32, 3],
                        "data": images.ravel().tolist()}]}  # fmt: skip
    nested = {"inputs": [{**flat["inputs"][0], "data": images.tolist()}]}
    for request in (flat, nested):
        body = json.dumps(request).encode()
        assert len(body) <= max_request_bytes(64)
        assert decode_request(body, None, 64)[1].shape == (64, 32, 32, 3)
    assert max_request_bytes(64) <= 3 * len(json.dumps(nested)) + MAX_HEADER_BYTES
    assert math.isclose(max_request_bytes(64) / (1 << 20), 1.94, abs_tol=0.01)


def test_the_openapi_schema_is_the_model_that_validates():
    schema = InferenceRequest.model_json_schema()
    assert schema["additionalProperties"] is False
    assert schema["properties"]["outputs"]["anyOf"][0]["maxItems"] == 8


@settings(max_examples=60, deadline=None)
@given(
    images=st.integers(1, 70),
    request_id=st.text(max_size=300),
    asked=st.lists(
        st.sampled_from(["probabilities", "features", "top"]), min_size=1, max_size=3, unique=True
    ),
)
def test_the_grpc_answer_is_what_protobuf_itself_writes(images, request_id, asked):
    """encode_message writes protobuf by hand: parsed by protobuf, it is the answer, and
    it is byte for byte what protobuf's own serializer writes for the same message."""
    from service.outputs import OutputTensor, encode_message
    from service.rpc import inference_pb2 as pb

    rng = np.random.default_rng(images)
    values = {"probabilities": rng.random((images, 100), dtype=np.float32),
              "features": rng.random((images, 256), dtype=np.float32)}  # fmt: skip
    outputs = []
    for name in asked:
        if name == "top":
            labels = np.array([[f"0.5:{i}:{NAMES[i]}" for i in range(3)]] * images, dtype=object)
            outputs.append(OutputTensor("probabilities", "BYTES", labels))
        else:
            outputs.append(OutputTensor(name, "FP32", values[name]))
    response = InferenceResponse("cifar100-712868", "0123456789ab", request_id or None, outputs)
    encoded = encode_message(response)
    parsed = pb.ModelInferResponse.FromString(encoded)
    assert (parsed.model_name, parsed.model_version, parsed.id) == (
        "cifar100-712868", "0123456789ab", request_id)  # fmt: skip
    expected = pb.ModelInferResponse(model_name="cifar100-712868", model_version="0123456789ab",
                                      id=request_id)  # fmt: skip
    for output, found, raw in zip(outputs, parsed.outputs, parsed.raw_output_contents,
                                  strict=True):  # fmt: skip
        assert (found.name, found.datatype, list(found.shape)) == (
            output.name, output.datatype, list(output.values.shape))  # fmt: skip
        if output.datatype == "FP32":  # the values, as little-endian float32
            assert found.datatype == "FP32" and len(raw) == output.values.size * 4
            np.testing.assert_array_equal(
                np.frombuffer(raw, "<f4").reshape(-1, output.values.shape[1]), output.values
            )
        expected.outputs.add(name=output.name, datatype=output.datatype, shape=output.values.shape)
        expected.raw_output_contents.append(output.raw())
    assert encoded == expected.SerializeToString()
