"""The hostile corpus (bench/hostile.py) against a real `python -m service` on loopback.

Every case must get one of its documented statuses, and the server's peak resident
memory may grow by at most GROWTH_PER_BYTE times the bytes the request sent plus
GROWTH_CONSTANT (peak RSS is read from /proc, reset before each case through
/proc/PID/clear_refs). A bound with headroom, not a timing.
"""

import http.client
import time
from pathlib import Path

import numpy as np
import pytest

from bench.hostile import Case, cases
from bench.servers import service_process

GROWTH_PER_BYTE = 4
GROWTH_CONSTANT = 48 << 20
MODEL = "cifar100-712868"


def send(port: int, case: Case, timeout: float = 60) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(case.method, case.path, body=case.body, headers=case.headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


def current_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


@pytest.fixture(scope="module")
def server(models_dir):
    with service_process(models_dir=models_dir, log_json=False, default_model=MODEL) as (
        port,
        process,
    ):
        # Warm up with the largest legitimate requests first, so onnxruntime's arena and
        # the allocator's pools are at their working size before anything is measured.
        big = np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
        for case in legitimate(big):
            assert send(port, case)[0] == 200
        yield port, process.pid


def legitimate(images: np.ndarray) -> list[Case]:
    from bench.hostile import png_with, predict, v2, v2_body

    return [
        predict("ok-png", [png_with(image, []) for image in images], {200}, ""),
        v2("ok-v2", f"/v2/models/{MODEL}/infer", v2_body(images=len(images)), {200}, ""),
    ]


@pytest.mark.parametrize("case", cases(MODEL), ids=lambda c: c.name)
def test_each_hostile_request_gets_its_status_and_bounded_memory(server, case):
    port, pid = server
    time.sleep(0.05)  # let the previous request's memory settle before the baseline
    baseline = current_rss(pid)
    reset_peak(pid)
    status, body = send(port, case)
    growth = peak_rss(pid) - baseline
    assert status in case.expected, (status, body[:300])
    if status >= 400:
        assert body.startswith(b"{") and len(body) < 4096, body[:300]  # a message, not a dump
    assert len(body) <= len(case.body) + 64 * 1024, "the answer is larger than the question"
    bound = GROWTH_PER_BYTE * len(case.body) + GROWTH_CONSTANT
    assert growth <= bound, f"peak RSS grew {growth >> 20} MiB for {len(case.body):,} bytes"
    assert send(port, legitimate(np.zeros((1, 32, 32, 3), np.uint8))[0])[0] == 200  # still up
