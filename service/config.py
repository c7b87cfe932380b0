"""Service settings, read from the environment once (`get_settings()` is cached)."""

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings

from contract import classifier, occlusion

MIB = 1 << 20


class Settings(BaseSettings):
    models_dir: Path = Field(Path("models"), description="every *.onnx file here is served")
    reports_dir: Path = Field(Path("reports"), description="reports/<id>/ from `make report`")
    default_model: str | None = Field(None, description="model id; else the largest model")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA if it works, else CPU; cuda: CUDA or fail at startup"
    )
    engine: Literal["auto", "onnxruntime", "openvino"] = Field(
        "auto",
        description="what computes each file: auto, the fastest way this machine offers whose "
        "promise the file's self-check confirms here (on a GPU onnxruntime; on the CPU OpenVINO "
        "in bfloat16 where the CPU has it, else onnxruntime); onnxruntime or openvino (CPU "
        "only) to insist: a file whose promise that engine cannot keep is not served",
    )
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="what a float32 file is computed in: auto (bfloat16 where the CPU has it "
        "and the file promises it, else float32), float32, or bfloat16 (refused where it "
        "cannot be kept). int8 and float16 twins are files of their own, computed in their "
        "own precision",
    )

    max_upload_bytes: int = Field(MIB, gt=0, description="per image")
    max_images_per_request: int = Field(
        64, gt=0, description="images one request may carry (an explanation counts its copies)"
    )
    max_image_pixels: int = Field(
        2048 * 2048,
        gt=0,
        description="pixels one image may decode to (JPEGs count at their reduced decode "
        "size with resize=true); larger headers are refused before decoding",
    )
    max_request_pixels: int = Field(
        4096 * 4096, gt=0, description="pixels all images of one request may decode to"
    )
    max_body_bytes_in_flight: int = Field(
        128 * MIB,
        gt=0,
        description="request bodies being received or held at once (per worker); beyond it "
        "new requests are shed (503): bounds memory and the spool in /tmp across connections",
    )
    max_large_decodes: int = Field(
        2, gt=0, description="requests decoding images other than 32x32 at once; more: 503"
    )

    batching: bool = Field(True, description="micro-batch concurrent requests per model")
    batch_max_size: int = Field(
        classifier.MAX_BATCH_SIZE, gt=0, description="images per onnxruntime call"
    )
    batch_max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits to fill")
    max_queue_images: int = Field(
        128,
        gt=0,
        description="images waiting per model version and worker; beyond it requests are shed "
        "(503). Two full batches: on a 2-CPU box about 0.1 s of work, which bounds the wait",
    )
    min_familiarity: float = Field(
        0.0,
        ge=0,
        le=1,
        description="refuse (422) images whose familiarity is below this (the share of "
        "validation images stranger than it); 0: off. Requests may set their own",
    )
    explain_patch: int = Field(
        occlusion.PATCH,
        ge=1,
        le=32,
        description="/explain: side of the grey square slid over the image",
    )
    explain_stride: int = Field(
        occlusion.STRIDE, ge=1, le=32, description="/explain: step between positions"
    )
    max_queue_delay_ms: float = Field(
        50.0,
        ge=0,
        description="inference requests whose expected wait (time since arrival + the "
        "requests ahead x this worker's measured seconds per request) is above this are "
        "refused at the door (503 + Retry-After), before the body is read; 0: off",
    )
    request_timeout_seconds: float = Field(
        30.0, gt=0, description="deadline per request (X-Request-Timeout may shorten it): 504"
    )

    host: str = Field("0.0.0.0", description="address the HTTP server listens on")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (REST, /v2, the page)")
    grpc_port: int = Field(
        8081,
        ge=0,
        le=65535,
        description="the Open Inference Protocol over gRPC (inference.GRPCInferenceService) "
        "on this port, beside HTTP; 0: off. Each worker listens on it (SO_REUSEPORT)",
    )
    max_header_bytes: int = Field(64 * 1024, gt=0, description="request line + headers: 431")
    header_timeout_seconds: float = Field(10.0, gt=0, description="to send the headers: 408")
    body_timeout_seconds: float = Field(30.0, gt=0, description="between two body reads: 408")
    keep_alive_seconds: int = Field(5, ge=1, description="idle keep-alive connections close")
    shutdown_drain_seconds: float = Field(
        2.0, ge=0, description="after SIGTERM: readiness 503, still serving, before closing"
    )
    graceful_shutdown_seconds: int = Field(
        20, ge=1, description="then: in-flight requests get this long to finish"
    )
    trusted_keys: Path | None = Field(
        None,
        description="a PEM public key (EC P-256) or a folder of them (two while keys rotate): "
        "only .onnx files whose signature bundle beside them (<file>.onnx.sig) one of these "
        "keys verifies for the bytes loaded are served; the others are listed as failed with "
        "the reason. Unset or empty: files are served unverified (/models says so)",
    )
    model_load_timeout_seconds: float = Field(60.0, gt=0, description="per file")
    model_poll_seconds: float = Field(
        0, ge=0, description="0: off; else reload MODELS_DIR this often (added, replaced, removed)"
    )

    workers: int = Field(
        1,
        ge=1,
        validation_alias=AliasChoices("WEB_CONCURRENCY", "WORKERS"),
        description="uvicorn worker processes (uvicorn reads WEB_CONCURRENCY too)",
    )
    intra_op_threads: int = Field(0, ge=0, description="0: the CPUs available, shared by workers")
    inter_op_threads: int = Field(
        1, ge=1, description="onnxruntime threads running independent nodes at once"
    )

    api_keys: str = Field(
        "",
        description="comma-separated bearer tokens for /predict, /models and /v2; "
        "empty (and no API_KEYS_FILE): open",
    )
    api_keys_file: Path | None = Field(None, description="one hex SHA-256 of a token a line")
    metrics_token: str = Field("", description="bearer token for /metrics; empty: open")
    admin_keys: str = Field(
        "",
        description="comma-separated bearer tokens for the admin routes (/v1/models/{id}/rollout"
        "...), distinct from API_KEYS; empty: those routes answer 403",
    )
    rollout_file: Path | None = Field(
        None,
        description="the rollouts (a candidate version per model, shadow or canary, and the "
        "version pinned as serving), as JSON: read at startup and on every reload "
        "(MODEL_POLL_SECONDS), written by the admin routes. Default: rollout.json in "
        "MODELS_DIR; a relative path is read from MODELS_DIR",
    )
    shadow_queue_images: int = Field(
        256,
        gt=0,
        description="images copied to shadow candidates and not yet computed (per worker); "
        "beyond it, and whenever the door is refusing live requests, copies are dropped "
        "(counted), never waited for",
    )
    cors_origins: list[str] = Field(
        [], description='origins allowed to call the API from a browser, as JSON: ["https://..."]'
    )

    payload_log: Path | None = Field(
        None,
        description="a folder for sampled payload logs (Parquet shards of the 32x32 pixels the "
        "model saw and its answer; no uploads, addresses or keys); unset or empty: off",
    )
    payload_sample: float = Field(
        0.1, gt=0, le=1, description="share of answered images logged (PAYLOAD_LOG set)"
    )
    payload_shard_bytes: int = Field(
        16 * MIB, gt=0, description="a shard is written when its images reach this (uncompressed)"
    )
    payload_shard_seconds: float = Field(
        300.0, gt=0, description="... or when its first image is this old"
    )
    payload_max_bytes: int = Field(
        1024 * MIB,
        gt=0,
        description="the payload folder's shards are kept under this: the oldest are deleted",
    )
    payload_queue_images: int = Field(
        1024,
        gt=0,
        description="sampled images waiting for the payload writer; beyond it they are dropped "
        "(counted), never waited for",
    )

    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    log_json: bool = Field(True, description="one JSON object per log line")

    @field_validator("payload_log", "trusted_keys", "rollout_file", mode="before")
    @classmethod
    def _empty_is_off(cls, value: object) -> object:
        # PAYLOAD_LOG= would otherwise be Path("."): logging into the working directory;
        # TRUSTED_KEYS= the working directory's files as keys.
        return None if value == "" else value

    @property
    def max_request_bytes(self) -> int:
        """The whole multipart body: every image at its limit, plus room for the framing."""
        return self.max_upload_bytes * self.max_images_per_request + 64 * 1024

    @property
    def rollout_path(self) -> Path:
        """ROLLOUT_FILE, in MODELS_DIR unless it is absolute."""
        return self.models_dir / (self.rollout_file or "rollout.json")

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
