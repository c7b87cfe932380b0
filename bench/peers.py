"""The servers users would pick instead, in the same run: `python -m bench --peers`.

Each peer is installed, pinned, from the package registry into its own virtual
environment under the results folder (never into the project's), serves the same ONNX
file with the same thread budget as the service (workers x onnxruntime threads = the
CPUs available) and its own documented batching, is checked to return the same top-1
as onnxruntime on real-looking images, then loaded with the same generator as the
service (PNG in the same multipart form; fixed-length and chunked responses read).
The servers are bench/peer_bentoml.py and bench/peer_litserve.py.
"""

import argparse
import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.load import multipart_body, pixel_images, png_bytes
from bench.servers import free_port, server_process
from service.config import available_cpus

BENCH = Path(__file__).resolve().parent
MAX_BATCH = 64  # as the service's BATCH_MAX_SIZE
VERIFY_IMAGES = 16


@dataclass(frozen=True)
class Peer:
    name: str
    packages: tuple[str, ...]
    ready_path: str
    settings: dict[str, str] = field(default_factory=dict)  # env for the peer server

    @property
    def key(self) -> str:
        return self.name.split()[0].lower()

    def command(self, venv: Path, port: int) -> list[str]:
        if self.key == "bentoml":
            return [
                str(venv / "bin" / "bentoml"), "serve", "peer_bentoml:Classifier",
                "--working-dir", str(BENCH), "--host", "127.0.0.1", "--port", str(port),
            ]  # fmt: skip
        return [str(venv / "bin" / "python"), str(BENCH / "peer_litserve.py")]

    def describe(self) -> str:
        return ", ".join(f"{k.removeprefix('PEER_').lower()} {v}" for k, v in self.settings.items())


PEERS = (
    Peer(
        "BentoML 1.4.40",
        ("bentoml==1.4.40",),
        "/readyz",
        {"PEER_MAX_BATCH": str(MAX_BATCH), "PEER_MAX_LATENCY_MS": "1000"},
    ),
    Peer(
        "LitServe 0.2.19",
        ("litserve==0.2.19", "python-multipart"),  # LitServe reads forms with it
        "/health",
        {"PEER_MAX_BATCH": str(MAX_BATCH), "PEER_BATCH_TIMEOUT": "0.002"},
    ),
)


def common_packages() -> list[str]:
    """The same onnxruntime (CPU build), numpy and Pillow versions as the project's."""
    return [
        f"onnxruntime=={ort.__version__.split('+')[0]}",
        f"numpy=={metadata.version('numpy')}",
        f"pillow=={metadata.version('pillow')}",
    ]


def pinned(package: str) -> str:
    """`package` at the project's version when it has it (python-multipart)."""
    if "==" in package:
        return package
    try:
        return f"{package}=={metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return package


def install_all(folder: Path) -> dict[str, Path]:
    """A virtual environment per peer under `folder` (kept between runs): name -> venv."""
    venvs = {}
    for peer in PEERS:
        venv = Path(folder).resolve() / f"{peer.key}-venv"
        packages = [*map(pinned, peer.packages), *common_packages()]
        stamp = venv / "bench-installed.txt"
        if not stamp.exists() or stamp.read_text().split() != packages:
            print(f"installing {' '.join(packages)} into {venv}", flush=True)
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
            subprocess.run([*pip, "--upgrade", "pip"], check=True)
            subprocess.run([*pip, *packages], check=True)
            stamp.write_text("\n".join(packages))
        venvs[peer.name] = venv
    return venvs


def peer_env(peer: Peer, model: Path, port: int, workers: int, threads: int) -> dict[str, str]:
    return {
        "PEER_MODEL": str(model), "PEER_PORT": str(port), "PEER_WORKERS": str(workers),
        "PEER_THREADS": str(threads), "BENTOML_HOME": str(model.parent / "bentoml-home"),
        "BENTOML_DO_NOT_TRACK": "True", "LITSERVE_DISABLE_TELEMETRY": "1", **peer.settings,
    }  # fmt: skip


def measure_all(
    venvs: dict[str, Path],
    model: Path,
    args: argparse.Namespace,
    measure_rows: Callable[[str, dict], list[dict]],
) -> dict:
    """Each peer: start, verify top-1, load it (`measure_rows(name, target)`: the rows at
    every client count, between ceiling windows), stop."""
    threads = max(1, available_cpus() // args.workers)
    results = {}
    for peer in PEERS:
        port = free_port()
        env = peer_env(peer, model, port, args.workers, threads)
        command = peer.command(venvs[peer.name], port)
        print(f"  peer {peer.name}: {' '.join(command)}", flush=True)
        with server_process(command, env, port, peer.ready_path, 300, cwd=BENCH):
            matched = verify_top1(port, model)
            target = {"port": port, "kind": "png", "path": "/predict", "field": "files"}
            rows = measure_rows(peer.name, target)
        settings = f"{args.workers} workers x {threads} threads, {peer.describe()}"
        results[peer.name] = {"settings": settings, "top1_matches": matched, "rows": rows}
    return results


def verify_top1(port: int, model: Path) -> str:
    """The peer's top-1 on real-looking PNGs is onnxruntime's (ties within 1e-5 allowed);
    raises otherwise. Returns "matched/total"."""
    pixels = pixel_images(VERIFY_IMAGES, seed=1)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = session.run(["probabilities"], {"images": pixels})[0]
    answers = []
    for i, image in enumerate(pixels):
        body, content_type = multipart_body(png_bytes(image), f"verify{i}.png")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/predict", body, {"Content-Type": content_type}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answers.append(json.loads(response.read()))
    matched = count_top1_matches(expected, answers)
    if matched != len(pixels):
        raise RuntimeError(f"peer on port {port}: top-1 matched {matched}/{len(pixels)}")
    return f"{matched}/{len(pixels)}"


def count_top1_matches(expected: np.ndarray, answers: list[dict]) -> int:
    """How many answers ({"top_k": [{"class_id", ...}, ...]}) name a class whose
    onnxruntime probability is the highest (within 1e-5: untrained weights tie)."""
    matched = 0
    for row, answer in zip(expected, answers, strict=True):
        if isinstance(answer, list):  # BentoML: a batchable API answers a list per request
            answer = answer[0]
        top = answer["top_k"][0]["class_id"]
        matched += bool(row[top] >= row.max() - 1e-5)
    return matched
