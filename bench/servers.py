"""Servers under test, each in its own process on a free loopback port, stopped whole.

Ours is always `python -m service` with its settings in the environment (the guards it
starts with are the ones users get); the naive baseline and the peers are other programs,
started by the command they document."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pydantic import AliasChoices

from service.config import Settings

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _env_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    return alias.choices[0] if isinstance(alias, AliasChoices) else field.upper()


def _all_env_names(field: str) -> set[str]:
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return {choice.upper() for choice in alias.choices if isinstance(choice, str)}
    return {field.upper()}


SETTING_NAMES = set().union(*map(_all_env_names, Settings.model_fields))


def service_env(**settings: object) -> dict[str, str]:
    """`Settings` field values (`workers=2`, `batching=False`) as the environment variables
    `python -m service` reads; a name that is not a setting is an error, not ignored."""
    env = {}
    for field, value in settings.items():
        if field not in Settings.model_fields:
            raise ValueError(f"{field!r} is not a service setting")
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, list | dict):
            value = json.dumps(value)
        env[_env_name(field)] = str(value)
    return env


@contextlib.contextmanager
def service_process(
    metrics_dir: Path | None = None,
    ready_path: str = "/health/ready",
    source: Path | None = None,
    **settings: object,
) -> Iterator[tuple[int, subprocess.Popen]]:
    """`python -m service` with `settings` (and nothing inherited that names a setting) on
    a free loopback port, once `ready_path` answers; yields (port, process), so a caller
    can signal it. `metrics_dir`: PROMETHEUS_MULTIPROC_DIR, needed for /metrics with
    several workers; `ready_path="/health/live"` for a server that will never be ready;
    `source`: a folder holding another version's `service` package, run instead of this
    one (a before/after comparison in one run)."""
    port = free_port()
    settings.setdefault("grpc_port", 0)  # gRPC where asked for (a free port), else off
    env = service_env(host=HOST, port=port, log_level="WARNING", **settings)
    if metrics_dir is not None:
        Path(metrics_dir).mkdir(parents=True, exist_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    inherited = {k: v for k, v in os.environ.items() if k.upper() not in SETTING_NAMES}
    command = [sys.executable, "-m", "service"]
    if source is not None:  # `python -m` puts the working folder first on the path
        inherited["PYTHONPATH"] = str(source)
    with server_process(command, env, port, ready_path, cwd=source, inherit=inherited) as process:
        # Ready is one worker answering; with several, each listens once its models are
        # loaded (service/server.py), and a connection opened before lands on the first.
        wait_for_listeners(port, int(settings.get("workers", 1)), process)
        yield port, process


def listeners(port: int) -> int:
    """How many sockets listen on `port` (TCP, IPv4 and IPv6), from /proc/net."""
    count = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                fields = row.split()
                count += int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A"
    return count


def wait_for_listeners(
    port: int, count: int, process: subprocess.Popen, timeout: float = 300
) -> None:
    deadline = time.monotonic() + timeout
    while listeners(port) < count:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{count} workers never all listened on port {port}")
        time.sleep(0.05)


@contextlib.contextmanager
def uvicorn_process(app_args: list[str], env: dict[str, str]) -> Iterator[int]:
    """`python -m uvicorn APP_ARGS` on a free loopback port, ready; yields the port. For
    the naive baseline (bench/naive.py), never for our service."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", *app_args, "--host", HOST]
    command += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    with server_process(command, env, port):
        yield port


@contextlib.contextmanager
def server_process(
    command: list[str],
    env: dict[str, str],
    port: int,
    ready_path: str = "/health/ready",
    timeout: float = 120,
    cwd: Path | None = None,
    inherit: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen]:
    """`command` with `env` over `inherit` (default: this process's environment), once
    `ready_path` answers on `port`; on exit SIGTERM, then SIGKILL to its process group."""
    # Its own process group: whatever it spawns (workers, peers' helpers) is stopped with it.
    base = os.environ if inherit is None else inherit
    process = subprocess.Popen(command, env={**base, **env}, cwd=cwd, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {command} did not become ready")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://{HOST}:{port}{ready_path}", timeout=1)
                break
            time.sleep(0.2)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with contextlib.suppress(ProcessLookupError):  # what it left behind
            os.killpg(process.pid, signal.SIGKILL)
