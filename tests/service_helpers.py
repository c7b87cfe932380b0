"""Helpers for the service tests: encode images, run the real app with given settings."""

import contextlib
import io
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from contract.modelcard import INPUT_NAME, OUTPUT_NAME
from service.config import get_settings
from service.main import create_app
from service.server import server_config


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
def environment(**env: str) -> Iterator[None]:
    """Settings from these variables (upper-cased) for the duration, then as before."""
    saved = dict(os.environ)
    os.environ.update({key.upper(): str(value) for key, value in env.items()})
    get_settings.cache_clear()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()


@contextlib.contextmanager
def live_server(models_dir, **env: str) -> Iterator[int]:
    """The app behind our real server (service.server.server_config: its protocol limits
    included) on a loopback port, in a thread; yields the port. Signals need a process:
    see bench's service_process."""
    env.setdefault("grpc_port", "0")  # gRPC where a test asks for it, else off
    with environment(models_dir=models_dir, log_json="false", **env):
        settings = get_settings()
        config = server_config(
            settings, create_app(settings), host="127.0.0.1", port=0, workers=1,
            log_level="error",
        )  # fmt: skip
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 60
            while not server.started:
                assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
                time.sleep(0.02)
            yield server.servers[0].sockets[0].getsockname()[1]
        finally:
            server.should_exit = True
            thread.join(timeout=30)


@contextlib.contextmanager
def serve(monkeypatch, models_dir, **env: str) -> Iterator[TestClient]:
    """The real app, lifespan included, with settings from the environment."""
    monkeypatch.setenv("MODELS_DIR", str(models_dir))
    monkeypatch.setenv("LOG_JSON", "false")
    monkeypatch.setenv("GRPC_PORT", "0")  # an in-process app: HTTP only, unless asked
    for key, value in env.items():
        monkeypatch.setenv(key.upper(), str(value))
    get_settings.cache_clear()
    try:
        with TestClient(create_app(get_settings())) as client:
            yield client
    finally:
        get_settings.cache_clear()


def onnx_probabilities(path, images: np.ndarray) -> np.ndarray:
    """What the exported file says, asked directly."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


def png_16_bit(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB or RGBA PNG, written by hand (Pillow cannot write one)."""
    height, width, channels = pixels.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 16, 2 if channels == 3 else 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )  # fmt: skip
