"""Helpers for the service tests: encode images, run the real app with given settings."""

import contextlib
import io
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
from fastapi.testclient import TestClient
from PIL import Image

from service.config import get_settings
from service.main import create_app
from service.modelcard import INPUT_NAME, OUTPUT_NAME


def encode(image: np.ndarray | Image.Image, fmt: str = "PNG", **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def upload(*images: bytes, name: str = "img") -> list:
    return [
        ("files", (f"{name}{i}", data, "application/octet-stream")) for i, data in enumerate(images)
    ]


@contextlib.contextmanager
def serve(monkeypatch, models_dir, **env: str) -> Iterator[TestClient]:
    """The real app, lifespan included, with settings from the environment."""
    monkeypatch.setenv("MODELS_DIR", str(models_dir))
    monkeypatch.setenv("LOG_JSON", "false")
    for key, value in env.items():
        monkeypatch.setenv(key.upper(), str(value))
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as client:
            yield client
    finally:
        get_settings.cache_clear()


def onnx_probabilities(path, images: np.ndarray) -> np.ndarray:
    """What the exported file says, asked directly."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
