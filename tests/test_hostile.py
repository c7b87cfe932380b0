"""The hostile corpus (bench/hostile.py) against a real `python -m service` on loopback,
over HTTP (/predict, /v2 with tensors and with BYTES) and over gRPC.

Every case must get one of its documented statuses; the server's peak resident memory
may grow by at most `growth_bound(bytes sent)` (peak RSS from /proc, reset before each
case through /proc/PID/clear_refs: bench/procfs.py), and its answer may not be longer
than the request plus ANSWER_SLACK. A bound with headroom, not a timing. The requests are
measured by the same code as `python -m bench faults`' amplification table.
"""

import grpc
import numpy as np
import pytest

from bench.amplification import measure, request_bytes, warm_up
from bench.hostile import (
    ANSWER_SLACK,
    Case,
    GrpcCase,
    cases,
    growth_bound,
    grpc_cases,
    png_with,
    predict,
)
from bench.procfs import PeakGrowth
from bench.servers import free_port, service_process

MODEL = "cifar100-712868"
PLAIN = predict("plain", [png_with(np.zeros((32, 32, 3), np.uint8), [])], {200}, "a 32x32 PNG")


@pytest.fixture(scope="module")
def server(models_dir):
    grpc_port = free_port()
    with service_process(models_dir=models_dir, log_json=False, default_model=MODEL,
                         grpc_port=grpc_port) as (port, process):  # fmt: skip
        # The largest legitimate requests first, so onnxruntime's arena and the allocator's
        # pools are at their working size before anything is measured.
        warm_up(port, MODEL)
        yield port, process.pid, grpc_port


@pytest.mark.parametrize("case", cases(MODEL), ids=lambda c: c.name)
def test_each_hostile_request_gets_its_status_and_bounded_memory(server, case: Case):
    port, pid, _ = server
    row = measure(port, pid, request_bytes(case))
    (status,) = row["statuses"]
    assert status in case.expected, row
    assert row["bytes_received"] <= row["bytes_sent"] + ANSWER_SLACK, row
    growth = row["rss_growth_mib"] * 2**20
    assert growth <= growth_bound(row["bytes_sent"]), row
    assert measure(port, pid, request_bytes(PLAIN))["statuses"] == [200]  # still serving


@pytest.mark.parametrize("case", grpc_cases(MODEL), ids=lambda c: c.name)
def test_each_hostile_grpc_message_gets_its_status_and_bounded_memory(server, case: GrpcCase):
    """Over gRPC the same bounds: its documented status code with a message of a few
    hundred characters at most (a client with gRPC's default limits reads it), peak memory
    growth within growth_bound(bytes sent), and the server still serving."""
    port, pid, grpc_port = server
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with PeakGrowth(pid) as peak, pytest.raises(grpc.RpcError) as err:
            call(case.message, timeout=120)
    assert err.value.code().name in case.expected, (case.name, err.value)
    assert len(err.value.details()) < 1000, case.name
    assert peak.mib * 2**20 <= growth_bound(len(case.message)), (case.name, peak.mib)
    assert measure(port, pid, request_bytes(PLAIN))["statuses"] == [200]  # still serving
