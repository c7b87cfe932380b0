"""The benchmark harness in smoke mode: a few requests per row, every row produced.
No timing is asserted: speed is for `make bench` to measure, not for tests to guess.
The peers mode installs packages, so only its pure parts are tested here."""

import asyncio
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from bench import peers, profile
from bench.__main__ import build_parser
from bench.amplification import hostile_markdown
from bench.driver import CONCURRENCY
from bench.load import build_requests, http_request, read_response, v2_body
from bench.procfs import PeakGrowth, cpu_seconds, process_tree
from bench.run import BATCH_SIZES, OPEN_LOOP_LOADS, PATHS, to_markdown
from bench.servers import service_env
from training.models import MODEL_IDS


def test_smoke_run_produces_every_row(models_dir, tmp_path):
    command = [sys.executable, "-m", "bench", "--smoke", "--models-dir", str(models_dir)]
    command += ["--out", str(tmp_path), "--workers", "2", "--device", "cpu"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    machine = results["machine"]
    assert machine["workers"] == 2 and machine["cpu"] and machine["cpus_available"] >= 1
    assert "cpu_flags" in machine and machine["onnxruntime"]
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith("Machine: ")
    for model_id in MODEL_IDS:
        r = results["models"][model_id]
        assert r["weights"] == "trained weights"
        assert r["ceiling"]["provider"] == "CPUExecutionProvider"
        for session in ("all_cpus", "per_worker"):
            for batch in BATCH_SIZES:
                assert r["ceiling"][session][str(batch)]["images_per_s"] > 0
        assert r["ceiling"]["all_cpus"]["threads"] == machine["cpus_available"]
        closed = r["service"]["closed"]
        assert set(closed) == {f"{k}, batching {b}" for k in PATHS for b in ("on", "off")}
        for rows in (*closed.values(), r["naive"]):
            assert [row["concurrency"] for row in rows] == list(CONCURRENCY)
            for row in rows:
                assert row["requests"] >= 1 and row["errors"] == 0 and row["refused"] == 0
                assert "shed" in row
                assert row["client_cpu_s"] > 0  # the generator measures itself
        for rows in closed.values():  # and the harness measures the server's process group
            assert all(row["server_cpu_s"] > 0 for row in rows)
        for kind in PATHS:
            rows = r["service"]["open"][kind]
            assert [row["load"] for row in rows] == list(OPEN_LOOP_LOADS)
            for row in rows:
                assert row["sent"] >= 1 and row["rate"] > 0
                assert {"shed", "refused", "errors", "unsent", "p99_ms"} <= set(row)
        headline = r["at_64_clients"]
        for kind in PATHS:
            assert {"rps", "share_of_ceiling", "p99_ms", "failed"} <= set(headline[kind])
            assert headline[kind]["cpu_bound_share"] > 0
        assert f"### {model_id}" in markdown
    groups = len(MODEL_IDS) * len(CONCURRENCY)
    assert markdown.count("| service, batching on | PNG, /predict |") == groups
    assert markdown.count("| service, batching on | tensor, /v2 binary |") == groups
    assert markdown.count("| naive Keras |") == groups
    assert markdown.count("| tensor, /v2 binary | 120% |") == len(MODEL_IDS)
    assert markdown.count("CPU per answered request at 64 clients") == len(MODEL_IDS)


def test_markdown_puts_peers_beside_the_service():
    row = {"rps": 10.0, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0, "shed": 0, "refused": 0}
    rows = [{"concurrency": c, "requests": 5, **row, "errors": 0} for c in CONCURRENCY]
    open_rows = [{"load": x, "rate": 5.0, "sent": 5, "unsent": 0, **row, "errors": 0}
                 for x in OPEN_LOOP_LOADS]  # fmt: skip
    batches = {b: {"images_per_s": 100.0, "p50_ms": 1.0, "p99_ms": 1.0} for b in BATCH_SIZES}
    ceiling = {
        "provider": "CPUExecutionProvider", "images_per_s": 100.0,
        "all_cpus": {"threads": 2, **batches}, "per_worker": {"threads": 1, **batches},
    }  # fmt: skip
    headline = {k: {"rps": 10.0, "share_of_ceiling": 0.1, "p99_ms": 3.0, "failed": 0}
                for k in PATHS}  # fmt: skip
    headline["png"]["over_naive"] = 1.0
    headline["peers_rps"] = {"BentoML 1.4.40": 10.0}
    results = {
        "machine": {
            "cpu": "test CPU", "cpu_flags": [], "cpus_available": 2, "cores": 2,
            "onnxruntime": "1", "python": "3", "workers": 2, "onnx_threads": 1,
            "load_average_start": [0.1, 0, 0], "load_average_end": [0.2, 0, 0],
        },
        "models": {
            "m": {
                "weights": "trained weights", "ceiling": ceiling, "naive": rows,
                "service": {"closed": {"png, batching on": rows, "v2, batching on": rows},
                            "open": {"png": open_rows, "v2": open_rows}},
                "peers": {"BentoML 1.4.40": {"settings": "s", "rows": rows},
                          "LitServe 0.2.19": {"settings": "s", "rows": rows}},
                "at_64_clients": headline,
            }
        },
    }  # fmt: skip
    markdown = to_markdown(results)
    assert markdown.count("| BentoML 1.4.40 (s) | PNG, /predict |") == len(CONCURRENCY)
    assert markdown.count("| LitServe 0.2.19 (s) | PNG, /predict |") == len(CONCURRENCY)
    assert "BentoML 1.4.40 10.0 req/s" in markdown


def test_peers_are_pinned_and_started_from_their_own_environments(tmp_path):
    assert [p.name for p in peers.PEERS] == ["BentoML 1.4.40", "LitServe 0.2.19"]
    for peer in peers.PEERS:
        packages = [*map(peers.pinned, peer.packages), *peers.common_packages()]
        assert all("==" in package for package in packages)
        assert any(package.startswith("onnxruntime==") for package in packages)
        command = peer.command(tmp_path / "venv", 8123)
        assert command[0].startswith(str(tmp_path / "venv" / "bin"))
        env = peers.peer_env(peer, tmp_path / "m.onnx", 8123, 2, 1)
        assert env["PEER_WORKERS"] == "2" and env["PEER_THREADS"] == "1"
        assert env["PEER_MAX_BATCH"] == "64"
        assert (peers.BENCH / f"peer_{peer.key}.py").exists()


def test_top1_check_accepts_ties_and_bentoml_lists():
    expected = np.array([[0.1, 0.7, 0.2], [0.5, 0.5 - 1e-7, 0.0]], dtype=np.float32)
    answers = [{"top_k": [{"class_id": 1}]}, [{"top_k": [{"class_id": 1}]}]]
    assert peers.count_top1_matches(expected, answers) == 2
    assert peers.count_top1_matches(expected, [{"top_k": [{"class_id": 2}]}] * 2) == 0


def test_responses_are_read_with_a_length_or_in_chunks():
    async def read(raw: bytes):
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        first = await read_response(reader)
        return first, await reader.read()

    fixed = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokNEXT"
    assert asyncio.run(read(fixed)) == ((200, True), b"NEXT")
    chunked = (
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\nNEXT"
    )
    assert asyncio.run(read(chunked)) == ((503, False), b"NEXT")


@pytest.mark.parametrize("kind", ["png", "v2"])
def test_requests_are_prebuilt_http(kind):
    requests = build_requests(kind, "127.0.0.1", "/x")
    assert len(requests) == 64 and len(set(requests)) == 64
    head, _, body = requests[0].partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head


def test_v2_body_has_a_json_header_then_raw_pixels():
    images = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
    body, length = v2_body(images)
    header = json.loads(body[:length])
    assert header["inputs"][0]["shape"] == [2, 32, 32, 3]
    assert header["inputs"][0]["parameters"]["binary_data_size"] == images.nbytes
    assert body[length:] == images.tobytes()


def test_profile_charges_each_sample_to_the_innermost_known_part():
    raw = (
        "process 1:python;thread (0x1);run (asyncio/events.py:80);"
        "predict (service/routes/predict.py:60);open (PIL/Image.py:3400) 3\n"
        "process 1:python;thread (0x1);run (asyncio/events.py:80);"
        "predict (service/routes/predict.py:60) 1\n"
        "process 1:python;thread (0x1);<module> (<string>:1) 1\n"
    )
    counts = profile.charge(raw)
    assert counts == {
        "image decoding (Pillow)": 3,
        "service code": 1,
        "other (interpreter, other libraries)": 1,
    }
    parts = {"service code": 100.0, profile.UNSEEN: 300.0}
    result = {"rps": 1.0, "p99_ms": 1.0, "server_cpu_us_per_request": 400.0, "parts_us": parts}
    markdown = profile.to_markdown({"model": "m", "cpus_available": 2, "paths": {"png": result}})
    assert "| service code | 100 (25%) |" in markdown


@pytest.mark.parametrize(
    ("argv", "mode"),
    [([], "run"), (["--peers"], "run"), (["run", "--peers"], "run"), (["faults"], "faults"),
     (["profile", "--seconds", "3"], "profile")],
)  # fmt: skip
def test_the_command_line_runs_a_mode_by_name_and_run_without_one(argv, mode):
    args = build_parser().parse_args(argv)
    assert (args.mode or "run") == mode
    assert args.peers is ("--peers" in argv)
    if mode != "run":  # the one-model options, each mode with its own default duration
        assert args.model and args.out and args.models_dir
        assert args.seconds == {"faults": 8.0, "profile": 3.0}[mode]


def test_our_server_gets_its_settings_by_name_and_a_misspelt_one_is_an_error():
    env = service_env(workers=2, batching=False, models_dir="m", cors_origins=["http://a"])
    assert env == {
        "WEB_CONCURRENCY": "2", "BATCHING": "false", "MODELS_DIR": "m",
        "CORS_ORIGINS": '["http://a"]',
    }  # fmt: skip
    with pytest.raises(ValueError, match="not a service setting"):
        service_env(worker=2)


def test_requests_are_framed_by_length_unless_the_caller_frames_them():
    get = http_request("/v2", "h", b"", {}, method="GET")
    assert get.startswith(b"GET /v2 HTTP/1.1\r\n") and b"Content-Length: 0\r\n" in get
    chunked = http_request("/x", "h", b"0\r\n\r\n", {"Transfer-Encoding": "chunked"})
    assert b"Content-Length" not in chunked and chunked.endswith(b"\r\n\r\n0\r\n\r\n")


def test_peak_growth_sees_a_spike_already_freed_in_a_child_process():
    spike = (
        "import sys, time\n"
        "sys.stdin.readline()\n"
        "x = bytearray(64 << 20)\n"
        "x[::4096] = b'1' * len(x[::4096])\n"
        "del x\n"
        "print('done', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spike!r}])"
    parent = subprocess.Popen(
        [sys.executable, "-c", launcher], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while len(process_tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        with PeakGrowth(parent.pid) as peak:  # the child is measured as part of the tree
            parent.stdin.write("go\n")
            parent.stdin.flush()
            assert parent.stdout.readline() == "done\n"
        assert peak.method == "VmHWM" and 60 <= peak.mib < 100
        assert cpu_seconds(parent.pid) > 0
    finally:
        parent.kill()
        parent.wait()


def test_hostile_table_names_the_worst_ratios_and_undocumented_statuses():
    def row(case, sent, status, expected, received, cpu, rss):
        return {
            "case": case, "bytes_sent": sent, "status": status, "expected": expected,
            "as_documented": status in expected, "bytes_received": received,
            "cpu_seconds_per_request": cpu, "rss_growth_mib": rss, "rss_method": "VmHWM",
            "rss_per_byte_sent": round(rss * 2**20 / sent, 2),
            "received_per_byte_sent": round(received / sent, 2),
        }  # fmt: skip

    rows = [
        row("small", 1000, 400, [400], 300, 0.01, 0.0),
        row("inflating", 2**20, 200, [200, 422], 100, 0.5, 8.0),
        row("echoing", 2000, 500, [400], 40_000, 0.02, 0.0),
        row("swelling", 2**20, 400, [400], 300, 0.01, 100.0),  # above 4 x 1 MiB + 48 MiB
    ]
    markdown = hostile_markdown(rows)
    assert "| inflating | 1,048,576 | 200 (200/422) | 100 | 0.5 | 8.0 | 8.0 | 0.0 |" in markdown
    assert "| echoing | 2,000 | 500 (400) **not documented** |" in markdown
    assert "peak RSS growth 100.0 bytes per byte sent (swelling)" in markdown
    assert "answer 20.0 bytes per byte sent (echoing)" in markdown
    assert "Statuses not documented: echoing." in markdown
    assert "| swelling | 1,048,576 | 400 (400) **RSS above the bound** |" in markdown
    assert "above it: swelling." in markdown and "8.0" in markdown  # inflating is within
