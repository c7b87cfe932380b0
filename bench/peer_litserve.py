"""LitServe serving the ONNX model: a peer in `python -m bench --peers`.

Written from LitServe's documentation (0.2): a `LitAPI` with setup, decode_request,
predict and encode_response; batching with `max_batch_size` and `batch_timeout`, so
`predict` gets the decoded images of concurrent requests stacked. It takes the same
multipart form as the service's /predict (field `files`, one PNG).

Runs in its own virtual environment (bench/peers.py installs it):
  python peer_litserve.py
Environment: PEER_MODEL (the .onnx file), PEER_PORT, PEER_WORKERS (workers_per_device),
PEER_THREADS (onnxruntime threads per worker), PEER_MAX_BATCH, PEER_BATCH_TIMEOUT (s).
"""

import io
import os

import litserve as ls
import numpy as np
from PIL import Image


class ClassifierAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("PEER_THREADS", "1"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            os.environ["PEER_MODEL"], options, providers=["CPUExecutionProvider"]
        )

    def decode_request(self, request) -> np.ndarray:
        image = Image.open(io.BytesIO(request["files"].file.read()))
        return np.asarray(image.convert("RGB"))

    def predict(self, images: np.ndarray) -> np.ndarray:  # stacked: uint8 [N, 32, 32, 3]
        return self.session.run(["probabilities"], {"images": images})[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, probabilities: np.ndarray) -> dict:
        top = np.argsort(-probabilities)[:5]
        return {
            "top_k": [{"class_id": int(i), "probability": float(probabilities[i])} for i in top]
        }


if __name__ == "__main__":
    api = ClassifierAPI(
        max_batch_size=int(os.environ.get("PEER_MAX_BATCH", "64")),
        batch_timeout=float(os.environ.get("PEER_BATCH_TIMEOUT", "0.002")),
    )
    server = ls.LitServer(
        api, accelerator="cpu", workers_per_device=int(os.environ.get("PEER_WORKERS", "1"))
    )
    server.run(
        host="127.0.0.1",
        port=int(os.environ["PEER_PORT"]),
        generate_client_file=False,
        log_level="warning",
    )
