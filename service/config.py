"""Service settings, read from the environment once (`get_settings()` is cached)."""

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings

MIB = 1 << 20


class Settings(BaseSettings):
    models_dir: Path = Field(Path("models"), description="every *.onnx file here is served")
    reports_dir: Path = Field(Path("reports"), description="reports/<id>/ from `make report`")
    default_model: str | None = Field(None, description="model id; else the largest model")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA if it works, else CPU; cuda: CUDA or fail at startup"
    )

    max_upload_bytes: int = Field(MIB, gt=0, description="per image")
    max_images_per_request: int = Field(64, gt=0)
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="refused before decoding")

    batching: bool = Field(True, description="micro-batch concurrent requests per model")
    batch_max_size: int = Field(64, gt=0, description="images per onnxruntime call")
    batch_max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits to fill")

    workers: int = Field(
        1,
        ge=1,
        validation_alias=AliasChoices("WEB_CONCURRENCY", "WORKERS"),
        description="uvicorn worker processes (uvicorn reads WEB_CONCURRENCY too)",
    )
    intra_op_threads: int = Field(0, ge=0, description="0: the CPUs available, shared by workers")
    inter_op_threads: int = Field(1, ge=1)

    log_level: str = "INFO"
    log_json: bool = Field(True, description="one JSON object per log line")

    @property
    def max_request_bytes(self) -> int:
        """The whole multipart body: every image at its limit, plus room for the framing."""
        return self.max_upload_bytes * self.max_images_per_request + 64 * 1024

    @property
    def onnx_threads(self) -> int:
        # Each worker process has its own sessions: split the CPUs, do not oversubscribe.
        return self.intra_op_threads or max(1, available_cpus() // self.workers)


@lru_cache
def get_settings() -> Settings:
    return Settings()


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 quota (`--cpus`)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus
