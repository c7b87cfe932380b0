"""BentoML serving the ONNX model: a peer in `python -m bench --peers`.

Written from BentoML's documentation (1.4): a `@bentoml.service` class that loads the
model in `__init__`, and one `@bentoml.api(batchable=True, ...)` method taking a list of
images, so BentoML's adaptive batching groups concurrent requests into one call. It
takes the same multipart form as the service's /predict (field `files`, one PNG).

Runs in its own virtual environment (bench/peers.py installs it), from the bench folder:
  bentoml serve peer_bentoml:Classifier --host 127.0.0.1 --port PORT
Environment: PEER_MODEL (the .onnx file), PEER_WORKERS, PEER_THREADS (onnxruntime
threads per worker), PEER_MAX_BATCH, PEER_MAX_LATENCY_MS.
"""

import os

import bentoml
import numpy as np
from PIL.Image import Image

WORKERS = int(os.environ.get("PEER_WORKERS", "1"))
THREADS = int(os.environ.get("PEER_THREADS", "1"))


@bentoml.service(
    workers=WORKERS,
    traffic={"timeout": 30},
    logging={"access": {"enabled": False}},  # as the service: no line per request
)
class Classifier:
    def __init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            os.environ["PEER_MODEL"], options, providers=["CPUExecutionProvider"]
        )

    @bentoml.api(
        batchable=True,
        max_batch_size=int(os.environ.get("PEER_MAX_BATCH", "64")),
        max_latency_ms=int(os.environ.get("PEER_MAX_LATENCY_MS", "1000")),
    )
    def predict(self, files: list[Image]) -> list[dict]:
        images = np.stack([np.asarray(image.convert("RGB")) for image in files])
        probabilities = self.session.run(["probabilities"], {"images": images})[0]
        return [top_k(row) for row in probabilities]


def top_k(probabilities: np.ndarray, k: int = 5) -> dict:
    top = np.argsort(-probabilities)[:k]
    return {"top_k": [{"class_id": int(i), "probability": float(probabilities[i])} for i in top]}
