"""A Ray cluster of several nodes on this machine, for the score job's tests and benchmark.

`ray start --head` and then `ray start --address` for each other node, each with its
share of the CPUs, on free loopback ports, in a private temporary folder (its sockets, its
logs and its `ray_current_cluster`, so no other `ray.init()` on the machine finds it).
Each `ray start` runs with `--block` in a process group of its own: ending that group
ends the node and everything it started, and nothing else (never `ray stop`, which stops
every Ray of the user's on the machine).
"""

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from training.processes import ROOT, run_python

RAY = Path(sys.executable).with_name("ray")
# A loopback address, but not 127.0.0.1: Ray swaps "127.0.0.1" and "localhost" for the
# machine's outward address (to be reachable from other hosts), and these nodes must talk
# over loopback only. The whole 127.0.0.0/8 is loopback on Linux.
NODE_IP = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((NODE_IP, 0))
        return sock.getsockname()[1]


def base_env() -> dict[str, str]:
    """The environment for nodes and drivers: this checkout importable by every worker
    (first on the path), no usage report sent, no RAY_ADDRESS inherited."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return env | {"PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}


@contextlib.contextmanager
def local_cluster(
    cpus_per_node: list[int], start_timeout: float = 120.0, object_store_bytes: int = 100_000_000
) -> Iterator[dict[str, str]]:
    """A running cluster of len(cpus_per_node) nodes; yields the environment a driver
    joins it with (RAY_ADDRESS set). Stopped on exit, whatever happened."""
    # Short: Ray's Unix socket paths live under it and have a length limit.
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    # Ray's token authentication, with a token of this cluster's own, passed to its nodes
    # and drivers (a driver that names an address does not read ~/.ray/auth_token).
    env = base_env() | {
        "RAY_TMPDIR": str(temp),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    address = f"{NODE_IP}:{free_port()}"
    processes: list[subprocess.Popen] = []
    log = (temp / "nodes.log").open("w")
    try:
        for i, cpus in enumerate(cpus_per_node):
            node = [
                RAY,
                "start",
                "--block",
                f"--num-cpus={cpus}",
                "--disable-usage-stats",
                f"--object-store-memory={object_store_bytes}",
                f"--node-ip-address={NODE_IP}",
            ]
            if i == 0:
                node += [
                    "--head",
                    f"--port={address.split(':')[1]}",
                    f"--temp-dir={temp}",
                    "--include-dashboard=false",
                    f"--ray-client-server-port={free_port()}",
                ]
            else:
                node += [f"--address={address}"]
            processes.append(
                subprocess.Popen(
                    node,
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            wait_for_nodes(address, env, processes, start_timeout, temp / "nodes.log")
        yield env | {"RAY_ADDRESS": address}
    finally:
        for process in reversed(processes):
            stop(process)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_nodes(
    address: str, env: dict, processes: list[subprocess.Popen], timeout: float, log: Path
) -> None:
    """Until the cluster counts one live node per process; TimeoutError (with the nodes'
    output) when it does not in `timeout` seconds, or as soon as a node has exited."""
    count = len(processes)
    ask = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            break
        try:
            run = run_python("-c", ask, address, env=env, timeout=60, check=False)
        except subprocess.TimeoutExpired:
            continue
        if run.returncode == 0 and run.stdout.split()[-1:] == [str(count)]:
            return
        time.sleep(1)
    raise TimeoutError(
        f"the Ray cluster did not reach {count} node(s) in {timeout:g} s, or a node exited; "
        "its nodes said:\n" + log.read_text()[-3000:]
    )


def stop(process: subprocess.Popen) -> None:
    """End one `ray start --block` and what it started: its own process group."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
