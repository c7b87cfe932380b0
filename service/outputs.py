"""The Open Inference Protocol's answer: the outputs a request asks for (checked before
any work), the classification extension's top-k, and the one encoder both transports
send it with (`encode_response`: HTTP's JSON and binary outputs; `encode_message`:
gRPC's protobuf, the same bytes after HTTP's JSON). Knows nothing of HTTP, gRPC or of
models."""

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from contract.modelcard import OUTPUT_NAME
from service.codec import InferenceRequest, OutputParameters, RequestedOutput
from service.errors import InvalidTensor


def requested_outputs(request: InferenceRequest, widths: dict[str, int]) -> list[RequestedOutput]:
    """The outputs to send back (default: probabilities), checked against the model's
    outputs and their widths before any work is done: known, asked once, and top-k
    only of the probabilities, with k at most their width."""
    asked = request.outputs if request.outputs is not None else [RequestedOutput(name=OUTPUT_NAME)]
    names = [output.name for output in asked]
    if unknown := [name for name in names if name not in widths]:
        raise InvalidTensor(f"unknown output {unknown[0]!r}; this model has {sorted(widths)}")
    if len(set(names)) != len(names):
        raise InvalidTensor(f"each output may be asked once; asked {names}")
    for output in asked:
        k = output.parameters.classification if output.parameters else None
        if k is not None and output.name != OUTPUT_NAME:
            raise InvalidTensor(f"classification applies to {OUTPUT_NAME!r} only")
        if k is not None and k > widths[output.name]:
            raise InvalidTensor(
                f"classification must be an integer from 1 to {widths[output.name]}"
            )
    return asked


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """One output of an answer, as every transport sends it."""

    name: str
    datatype: str  # FP32, INT32 or BYTES
    values: np.ndarray
    binary: bool = False  # over HTTP, sent as raw bytes after the JSON (gRPC: always raw)

    def raw(self) -> bytes:
        """Row-major little-endian bytes; BYTES as 4-byte lengths and their bytes."""
        if self.datatype == "BYTES":
            return bytes_tensor(self.values)
        return self.values.astype("<i4" if self.datatype == "INT32" else "<f4").tobytes()


@dataclass(frozen=True, slots=True)
class InferenceResponse:
    """The protocol's answer, before any transport encodes it."""

    model_name: str
    model_version: str
    id: str | None
    outputs: list[OutputTensor]


def output_tensors(
    request: InferenceRequest,
    asked: list[RequestedOutput],
    outputs: dict[str, np.ndarray],
    class_names: list[str],
) -> list[OutputTensor]:
    """The outputs `requested_outputs` accepted, top-k applied where asked."""
    binary_default = request.parameters is not None and request.parameters.binary_data_output
    tensors = []
    for output in asked:
        options = output.parameters or OutputParameters()
        values, datatype = outputs[output.name], "FP32"
        if options.classification is not None:
            values, datatype = classify(class_names, values, options.classification), "BYTES"
        binary = options.binary_data if options.binary_data is not None else binary_default
        tensors.append(OutputTensor(output.name, datatype, values, binary))
    return tensors


def explanation_tensors(
    heat_map: np.ndarray, class_index: int, probability: float
) -> list[OutputTensor]:
    """An explanation as outputs: the heat map FP32 [1, 32, 32], the class explained
    INT32 [1] and its probability FP32 [1]."""
    return [
        OutputTensor("heat_map", "FP32", heat_map.round(6)[np.newaxis]),
        OutputTensor("class", "INT32", np.array([class_index], dtype=np.int32)),
        OutputTensor("probability", "FP32", np.array([probability])),
    ]


def encode_response(response: InferenceResponse) -> tuple[bytes, int | None]:
    """The HTTP body: JSON, then the binary outputs' bytes; and the JSON's length when
    binary outputs follow it."""
    described, blobs = [], []
    for output in response.outputs:
        values = output.values
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype,
                                 "shape": list(values.shape)}  # fmt: skip
        if output.binary:
            blob = output.raw()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = values.ravel().tolist()
        described.append(entry)
    body: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": described,
    }
    if response.id is not None:
        body["id"] = response.id
    head = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def encode_message(response: InferenceResponse) -> bytes:
    """The gRPC answer: a serialized `inference.ModelInferResponse` (service/rpc/
    inference.proto), every output's bytes in `raw_output_contents` (what tritonclient
    reads; the same bytes HTTP sends after its JSON). Written field by field, in field
    order as protobuf's own serializer does: a handful of strings and one blob per
    output, no message objects built and copied for them."""
    parts = [_text(1, response.model_name), _text(2, response.model_version)]
    if response.id:
        parts.append(_text(3, response.id))
    for output in response.outputs:
        shape = b"".join(map(_varint, output.values.shape))
        tensor = _text(1, output.name) + _text(2, output.datatype) + _delimited(3, shape)
        parts.append(_delimited(5, tensor))
    parts += [_delimited(6, output.raw()) for output in response.outputs]
    return b"".join(parts)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _delimited(number: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2): string, bytes, message or packed list."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _text(number: int, text: str) -> bytes:
    return _delimited(number, text.encode()) if text else b""


def top_classes(values: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k largest values along the last axis, best first (ties: the
    lower index first): the one top-k of /predict and the classification extension."""
    return np.argsort(-values, axis=-1, kind="stable")[..., :k]


def classify(names: list[str], values: np.ndarray, k: int) -> np.ndarray:
    """Triton's classification extension: the top k as "score:index:label"."""
    best = top_classes(values, k)
    return np.array(
        [
            [f"{row[i]:.6f}:{i}:{names[i]}" for i in top]
            for row, top in zip(values, best, strict=True)
        ],
        dtype=object,
    )


def bytes_tensor(values: np.ndarray) -> bytes:
    """BYTES in binary: each element as a 4-byte little-endian length, then its bytes."""
    parts = []
    for value in values.ravel():
        encoded = str(value).encode()
        parts.append(len(encoded).to_bytes(4, "little") + encoded)
    return b"".join(parts)
