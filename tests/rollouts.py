"""Versions of one small model that disagree on some images, for the rollout and shadow
tests: no training, a few hundred parameters each (tests/test_classifier.py's graph, with
weights that make the answer depend on an image's colour)."""

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from contract import selfcheck
from contract.classifier import file_version
from contract.modelcard import INPUT_NAME, OUTPUT_NAME
from contract.selfcheck import SelfCheck, Tolerance
from tests.test_classifier import tiny_model
from training.synthetic import make_images

MODEL = "tiny"
ADMIN = "admin-token"  # ADMIN_KEYS in these tests


def tiny_version(path: Path, nudge: float, broken: bool = False) -> str:
    """Write a version of `MODEL` to `path`, its answer the top of a linear function of the
    image's mean colour, its weights nudged by `nudge` (0: the reference); its version.
    `broken`: its self-check is the reference's, so it fails whenever `nudge` changes the
    answers, and the service refuses to load the file."""
    model = _weights(nudge)
    reference = _weights(0.0) if broken else model
    model.metadata_props.add(key=selfcheck.METADATA_KEY, value=_self_check(reference))
    path.write_bytes(model.SerializeToString())
    return file_version(path)


def _weights(nudge: float) -> onnx.ModelProto:
    """The graph and card of tests/test_classifier.py's tiny model, with new weights and no
    self-check."""
    model = onnx.load_from_string(tiny_model(MODEL, 0))
    conv_w, conv_b = np.zeros((4, 3, 3, 3)), np.zeros(4)
    for channel in range(3):  # features: the mean of each channel, and of its darkness
        conv_w[channel, channel, 1, 1] = 1.0
    conv_w[3, :, 1, 1], conv_b[3] = -1.0, 1.5
    dense = np.random.default_rng(0).normal(0, 10, (4, 100))
    dense += np.random.default_rng(1).normal(0, nudge, (4, 100))
    new = {"conv_w": conv_w, "conv_b": conv_b, "dense_w": dense}
    for init in model.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name].astype(np.float32), init.name))
    kept = [p for p in model.metadata_props if p.key != selfcheck.METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    return model


def _self_check(model: onnx.ModelProto) -> str:
    """What an export stores: the file's own outputs for a few images."""
    references = make_images(np.arange(4), seed=0)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    probabilities = session.run([OUTPUT_NAME], {INPUT_NAME: references})[0]
    return SelfCheck(references, {OUTPUT_NAME: probabilities},
                     [Tolerance(OUTPUT_NAME, "max_abs", 1e-5)]).to_metadata()  # fmt: skip


def coloured_images(count: int, seed: int) -> np.ndarray:
    """uint8 [count, 32, 32, 3]: a random colour each, with noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (count, 1, 1, 3))
    return np.clip(base + rng.integers(-30, 31, (count, 32, 32, 3)), 0, 255).astype(np.uint8)


def top_classes(path: Path, images: np.ndarray) -> np.ndarray:
    """The file's own answer, asked of onnxruntime directly."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0].argmax(axis=1)


def call(base: str, method: str, path: str, body: dict | None = None,
         token: str | None = ADMIN, headers: dict | None = None) -> tuple[int, dict]:  # fmt: skip
    """(status, JSON) of one HTTP call."""
    sent = {**(headers or {})}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        sent["Content-Type"] = "application/json"
    request = urllib.request.Request(base + path, data=data, headers=sent, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def v2_body(images: np.ndarray) -> dict:
    return {"inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": list(images.shape),
                        "data": images.ravel().tolist()}]}  # fmt: skip


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def metrics_of(base: str) -> str:
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        return response.read().decode()
