"""The baseline many people write first: Keras inside the route, one predict per request.

`uvicorn --factory bench.naive:create_app` with NAIVE_MODEL=<model id>. Same request
format as the service (multipart field `files`), same architecture, untrained weights
(speed does not depend on them).
"""

import io
import os

import numpy as np
from fastapi import FastAPI, UploadFile
from PIL import Image

from training.models import build_model


def create_app() -> FastAPI:
    model = build_model(os.environ["NAIVE_MODEL"])
    app = FastAPI()

    @app.get("/health/ready")
    def ready() -> dict:
        return {"status": "ready"}

    @app.post("/predict")
    def predict(files: list[UploadFile]) -> dict:
        image = Image.open(io.BytesIO(files[0].file.read())).convert("RGB")
        probabilities = model.predict(np.asarray(image)[None], verbose=0)[0]
        top = np.argsort(-probabilities)[:5]
        return {
            "top_k": [{"class_id": int(i), "probability": float(probabilities[i])} for i in top]
        }

    return app
