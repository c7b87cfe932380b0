"""The benchmark harness in smoke mode: a few requests per row, every row produced, every
run related to the ceiling windows next to it; the arithmetic on known numbers.
No timing is asserted: speed is for `make bench` to measure, not for tests to guess.
The peers mode installs packages, so only its pure parts are tested here."""

import asyncio
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import peers, profile
from bench.__main__ import build_parser
from bench.amplification import hostile_markdown
from bench.ceiling import BATCH_SIZES
from bench.driver import CONCURRENCY
from bench.grpc_load import build_requests as grpc_requests
from bench.int8 import int8_file, int8_name
from bench.load import (
    Tally,
    build_requests,
    http_request,
    pixel_images,
    read_response,
    read_response_headers,
    v2_body,
)
from bench.procfs import PeakGrowth, cpu_seconds, process_tree
from bench.run import (
    HEADLINE_CLIENTS,
    IMAGES_PER_REQUEST,
    OPEN_LOOP_LOADS,
    SMOKE,
    clients_for,
    headline,
    judge,
)
from bench.servers import service_env
from bench.steady import (
    Interleaved,
    Row,
    adjacent_ceiling,
    annotate,
    combine,
    goodput_of_capacity,
    ratio_windows,
)
from bench.tables import PATHS, to_markdown
from bench.targets import (
    CLOSED_SHARE,
    GOODPUT_LOADS,
    P99_MS,
    REFUSAL_P99_MS,
    judge_closed,
    judge_images,
    judge_open,
    met_line,
)
from contract.hardware import CPU_FLAGS, int8_kernels
from service.rpc import inference_pb2 as pb

SMOKE_MODEL = "cifar100-712868"


@pytest.fixture(scope="module")
def smoke_run(models_dir, tmp_path_factory):
    """`python -m bench --smoke --int8 quantize` on one model (its int8 twin quantized on
    the fly, as no `<id>-int8.onnx` lies beside it), on a tiny budget."""
    models = tmp_path_factory.mktemp("models")
    float_file = models / f"{SMOKE_MODEL}.onnx"
    float_file.write_bytes((models_dir / float_file.name).read_bytes())
    out = tmp_path_factory.mktemp("bench-results")
    command = [sys.executable, "-m", "bench", "--smoke", "--models-dir", str(models)]
    command += ["--models", SMOKE_MODEL, "--out", str(out), "--workers", "2", "--device", "cpu"]
    command += ["--int8", "quantize"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    return out, results, results["models"][SMOKE_MODEL]


def test_smoke_run_produces_every_row(smoke_run):
    out, results, r = smoke_run
    machine = results["machine"]
    assert machine["workers"] == 2 and machine["cpu"] and machine["cpus_available"] >= 1
    assert "cpu_flags" in machine and machine["onnxruntime"] and machine["int8_kernels"]
    assert results["run"]["repeats"] == SMOKE["repeats"] and results["run"]["duration_s"] > 0
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("Machine: ")
    assert r["weights"] == "trained weights"
    # Every way this CPU offers the float file, each timed with its promise; the ceiling
    # is the fastest that holds it, and the service's own choice is recorded beside it.
    offered = {w["way"]: w for w in r["ceiling"]["ways"]}
    assert {"onnxruntime float32 on the CPU", "openvino float32 on the CPU"} <= set(offered)
    held = [w for w in offered.values() if w["promise"] == "held"]
    assert r["ceiling"]["way"] == max(held, key=lambda w: w["images_per_s"])["way"]
    assert all(w["self_check_seconds"] > 0 for w in held)
    assert r["service"]["serving"]["engine"] in ("onnxruntime", "openvino")
    assert {w["way"] for w in r["int8"]["ceiling"]["ways"]} == {
        "onnxruntime int8 on the CPU", "openvino int8 on the CPU"}  # fmt: skip
    floor = results["floor"]
    assert set(floor) == set(PATHS) and all(row["rps"] > 0 for row in floor.values())
    for kind in PATHS:  # the judged one-image rows carry their bound: min(ceiling, floor)
        (judged,) = [x for x in r["service"]["closed"][f"{kind}, batching on"]
                     if x["concurrency"] == HEADLINE_CLIENTS]  # fmt: skip
        if kind in ("v2", "png"):
            assert judged["bound"] == min(judged["ceiling"], floor[kind]["rps"])
            assert judged["share_of_bound"] == pytest.approx(
                judged["images_per_s"] / judged["bound"], abs=1e-4
            )
    for session in ("all_cpus", "per_worker"):
        for batch in BATCH_SIZES:
            assert r["ceiling"][session][str(batch)]["images_per_s"] > 0
    assert r["ceiling"]["all_cpus"]["threads"] == machine["cpus_available"]
    assert r["ceiling"]["best_batch"] in BATCH_SIZES
    closed = r["service"]["closed"]
    assert set(closed) == {f"{k}, batching {b}" for k in PATHS for b in ("on", "off")}
    for name, rows in (*closed.items(), ("naive", r["naive"])):
        assert [row["concurrency"] for row in rows] == list(CONCURRENCY)
        for row in rows:
            # the 64-client row with batching on is judged: repeated; the others once
            judged = name.endswith("batching on") and row["concurrency"] == HEADLINE_CLIENTS
            assert row["runs"] == len(row["each"]) == (SMOKE["repeats"] if judged else 1)
            assert row["requests"] >= 1 and row["errors"] == 0 and row["refused"] == 0
            assert "shed" in row and "shed_p99_ms" in row
            assert all(run["client_cpu_s"] > 0 for run in row["each"])  # measured itself
    for rows in closed.values():  # and the harness measures the server's process group
        assert all(run["server_cpu_s"] > 0 for row in rows for run in row["each"])
    images = r["service"]["images"]
    assert [(x["images_per_request"], x["concurrency"]) for x in images] == [
        (n, clients_for(n, 2)) for n in IMAGES_PER_REQUEST
    ]
    for row in images:  # images/s is requests times images, and judged on it
        assert row["runs"] == SMOKE["repeats"] and row["errors"] == 0 and row["requests"] >= 1
        for run in row["each"]:
            assert run["images_per_s"] == pytest.approx(
                run["rps"] * run["images_per_request"], 0.01
            )
    for kind in PATHS:
        rows = r["service"]["open"][kind]
        assert [row["load"] for row in rows] == list(OPEN_LOOP_LOADS)
        for row in rows:
            assert row["runs"] == SMOKE["repeats"] and row["sent"] >= 1
            assert {"shed", "shed_p50_ms", "shed_without_retry_after", "refused", "errors",
                    "unsent", "p99_ms", "goodput_of_capacity"} <= set(row)  # fmt: skip
    h = r["at_64_clients"]
    for kind in PATHS:
        assert {"rps", "share_of_ceiling", "share_spread", "p99_ms", "failed"} <= set(h[kind])
        assert h[kind]["cpu_bound_share"] > 0
    assert f"### {SMOKE_MODEL}" in markdown
    assert markdown.count("| service, batching on | PNG, /predict |") == len(CONCURRENCY)
    assert markdown.count("| service, batching on | tensor, /v2 binary |") == len(
        CONCURRENCY
    ) + len(IMAGES_PER_REQUEST)
    assert markdown.count("| naive Keras | PNG, /predict |") == len(CONCURRENCY)
    assert markdown.count("| service, batching on | tensor, gRPC raw |") == len(CONCURRENCY)
    assert markdown.count("| tensor, /v2 binary | 200% |") == 1
    assert markdown.count("| tensor, gRPC raw | 200% |") == 1
    assert "CPU per answered request at 64 clients" in markdown


def test_smoke_run_relates_every_run_to_the_ceiling_windows_next_to_it(smoke_run):
    _, _, r = smoke_run
    rows = [
        *(row for rows in r["service"]["closed"].values() for row in rows),
        *r["service"]["images"],
        *(row for rows in r["service"]["open"].values() for row in rows),
        *r["naive"],
        *r["int8"]["service"]["images"],
    ]
    for row in rows:
        for run in row["each"]:
            before, after = run["ceiling_before"], run["ceiling_after"]
            assert before > 0 and after > 0
            assert run["ceiling"] == pytest.approx((before + after) / 2, abs=0.1)
            expected = run["images_per_s"] / run["ceiling"]
            assert run["share_of_ceiling"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
        shares = [run["share_of_ceiling"] for run in row["each"]]
        assert row["share_of_ceiling"] == pytest.approx(statistics.median(shares), abs=1e-4)
        assert row["spread"]["share_of_ceiling"] == [min(shares), max(shares)]
    # The windows are interleaved: each set of windows, in the order taken, is the
    # ceiling before its first row's first run, then the one after each run in turn.
    windows = {w["label"]: [x["images_per_s"] for x in w["windows"]] for w in r["windows"]}
    naive_runs = [row["each"][0] for row in r["naive"]]  # one pass, in order
    assert windows["naive Keras"] == [naive_runs[0]["ceiling_before"]] + [
        run["ceiling_after"] for run in naive_runs
    ]
    for label, values in windows.items():
        assert len(values) >= 2 and all(v > 0 for v in values), label


def test_smoke_run_offers_the_configured_share_of_the_measured_capacity(smoke_run):
    _, _, r = smoke_run
    for kind in PATHS:
        (capacity,) = [row for row in r["service"]["closed"][f"{kind}, batching on"]
                       if row["concurrency"] == HEADLINE_CLIENTS]  # fmt: skip
        for row in r["service"]["open"][kind]:
            assert row["rate"] == pytest.approx(capacity["rps"] * row["load"], abs=0.1)
            for run in row["each"]:
                assert run["goodput_of_capacity_raw"] == pytest.approx(
                    run["rps"] / capacity["rps"], abs=1e-4
                )
                assert run["goodput_of_capacity"] == pytest.approx(
                    run["share_of_ceiling"] / capacity["share_of_ceiling"], abs=1e-4
                )


def test_smoke_run_measures_the_int8_file_beside_the_float_one(smoke_run):
    out, _, r = smoke_run
    int8 = r["int8"]
    assert int8["weights"].startswith("int8, quantized here from the float file")
    for batch in BATCH_SIZES:
        assert int8["ceiling"]["all_cpus"][str(batch)]["images_per_s"] > 0
    ratio = int8["ratio_to_float"]
    assert ratio["n"] == len(ratio["ratios"]) == SMOKE["repeats"]
    assert ratio["min"] <= ratio["median"] <= ratio["max"] and ratio["min"] > 0
    labels = {w["label"]: w for w in r["windows"]}
    # n int8 windows, each between two float windows
    assert labels["int8 ceiling, alternating with float"]["count"] == SMOKE["repeats"]
    assert labels["float ceiling, alternating with int8"]["count"] == SMOKE["repeats"] + 1
    service = int8["service"]
    for kind in PATHS:
        (row,) = service["closed"][f"{kind}, batching on"]
        assert row["concurrency"] == HEADLINE_CLIENTS and row["runs"] == SMOKE["repeats"]
        assert row["requests"] >= 1 and row["errors"] == 0
    assert [x["images_per_request"] for x in service["images"]] == list(IMAGES_PER_REQUEST)
    # the int8 rows are held to the int8 session's windows, the float rows to the float's
    int8_windows = labels["service on the int8 file, batching on"]
    assert int8_windows["file"] == int8_name(SMOKE_MODEL)
    assert int8_windows["batch"] == int8["ceiling"]["best_batch"]
    assert labels["service, batching on"]["file"] == f"{SMOKE_MODEL}.onnx"
    # the service answered the int8 file under the id its card gives (`<id>-int8`)
    assert service["model_id"] == f"{SMOKE_MODEL}-int8"
    first = service["closed"]["png, batching on"][0]["each"][0]
    assert first["ceiling_before"] == int8_windows["windows"][0]["images_per_s"]
    markdown = (out / "results.md").read_text()
    assert "int8/float **" in markdown and "| service on int8, batching on |" in markdown


def test_smoke_run_judges_every_target_and_draws_the_curve(smoke_run):
    out, results, r = smoke_run
    verdicts = r["targets"]
    rows = {(v["target"], v["row"]) for v in verdicts}
    for kind, bound in P99_MS.items():
        for load in OPEN_LOOP_LOADS:
            row = f"{PATHS[kind]}, open loop at {load:.0%}"
            assert (f"answered p99 <= {bound:g} ms", row) in rows
            assert (("goodput >= 90% of capacity", row) in rows) is (load in GOODPUT_LOADS)
    assert sum("images/s >= 90% of the ceiling" in v["target"] for v in verdicts) == 2 * len(
        IMAGES_PER_REQUEST
    )  # float and int8
    for kind, bound in CLOSED_SHARE.items():  # the 64-client rows
        target = f"images/s >= {bound:.0%} of min(ceiling, floor)"
        assert (target, f"{PATHS[kind]}, 64 clients") in rows
    for v in verdicts:
        assert v["runs"] == SMOKE["repeats"] and v["met"] in (True, False, None)
    markdown = (out / "results.md").read_text()
    assert met_line(verdicts) in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| answered p99 <=")]
    assert len(table) == len(PATHS) * len(OPEN_LOOP_LOADS)
    assert all(line.endswith(("| met |", "| **not met** |")) for line in table)
    # The curve: a real picture with something drawn on it; a smoke run never replaces
    # the published one.
    assert results["run"]["curve"] == [str(out / "latency-curve.png")]
    assert not (out / "published").exists()
    picture = (out / "latency-curve.png").read_bytes()
    assert picture.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(picture)) as image:
        assert image.width >= 800 and image.height >= 300
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50  # lines, text, markers: not blank
        blue = np.array(image.convert("RGB"))
        # every path is drawn: matplotlib's tab:blue, tab:orange and tab:green pixels
        assert ((blue == (31, 119, 180)).all(axis=-1)).sum() > 100
        assert ((blue == (255, 127, 14)).all(axis=-1)).sum() > 100
        assert ((blue == (44, 160, 44)).all(axis=-1)).sum() > 100


def test_an_int8_file_beside_the_model_is_measured_alone_in_its_folder(tmp_path):
    models, work = tmp_path / "models", tmp_path / "work"
    models.mkdir()
    float_file = models / "m.onnx"
    float_file.write_bytes(b"float")
    assert int8_file(models, work, "m", float_file, "auto") is None  # none beside: none
    (models / int8_name("m")).write_bytes(b"int8 bytes")
    path, source = int8_file(models, work, "m", float_file, "auto")
    assert (
        path.read_bytes() == b"int8 bytes" and source == "int8, m-int8.onnx from the models folder"
    )
    assert list(path.parent.iterdir()) == [path]  # served alone: the service serves a folder
    # one beside is used as it is, not quantized again; off is off
    assert int8_file(models, work, "m", float_file, "quantize")[0].read_bytes() == b"int8 bytes"
    assert int8_file(models, work, "m", float_file, "off") is None


def test_ceiling_ratios_are_taken_to_the_windows_either_side():
    # the mean of the windows either side; the one before alone at the end
    assert adjacent_ceiling(800.0, 1200.0) == 1000.0
    assert adjacent_ceiling(900.0, None) == 900.0
    run = {"rps": 250.0, "images_per_request": 2, "requests": 500, "server_cpu_s": 1.0,
           "client_cpu_s": 0.25, "seconds": 2.0}  # fmt: skip
    a = annotate(run, 800.0, 1200.0, ceiling_threads=2)
    assert a["ceiling"] == 1000.0 and a["images_per_s"] == 500.0
    assert a["share_of_ceiling"] == 0.5
    assert a["server_cpu_ms"] == 2.0 and a["client_cpu_ms"] == 0.5  # per answered request
    assert a["client_cpu_share"] == 0.0625  # 0.25 CPU-seconds over 2 s on 2 CPUs
    # 2 threads x 1000 ms / 1000 images/s = 2 ms per image; a request of 2 images costs
    # 2.5 ms of server and generator CPU, 1.25 ms per image: the share is bound by 160%
    assert a["ceiling_cpu_ms_per_image"] == 2.0 and a["cpu_bound_share"] == 1.6


def test_goodput_is_held_to_the_ceiling_next_to_it():
    capacity = {"rps": 400.0, "share_of_ceiling": 0.5}  # 400 req/s at a ceiling of 800
    # The machine slowed to a ceiling of 600; 330 req/s answered is 55% of it: 1.1x the
    # capacity's share, though only 82.5% of its req/s.
    run = annotate({"rps": 330.0, "requests": 330}, 600.0, 600.0, ceiling_threads=2)
    held = goodput_of_capacity(run, capacity)
    assert held["goodput_of_capacity_raw"] == 0.825
    assert held["goodput_of_capacity"] == 1.1


def test_runs_combine_into_medians_spreads_and_sums():
    runs = [
        {"concurrency": 64, "images_per_request": 1, "rps": r, "p99_ms": p, "errors": e,
         "share_of_ceiling": s, "requests": 10}
        for r, p, e, s in ((100.0, 90.0, 0, 0.5), (300.0, 30.0, 1, 0.7), (200.0, 60.0, 0, 0.6))
    ]  # fmt: skip
    row = combine(runs)
    assert row["concurrency"] == 64 and row["runs"] == 3 and row["each"] == runs
    assert row["rps"] == 200.0 and row["p99_ms"] == 60.0 and row["share_of_ceiling"] == 0.6
    assert row["spread"]["rps"] == [100.0, 300.0] and row["spread"]["p99_ms"] == [30.0, 90.0]
    assert row["errors"] == 1 and row["requests"] == 30  # counts: over all runs
    with pytest.raises(ValueError, match="different rows"):
        combine([runs[0], {**runs[1], "concurrency": 8}])


class ScriptedWindows:
    """Ceiling windows that return known values in turn, to check which window each
    run is compared with."""

    def __init__(self, values):
        self.values = list(values)
        self.taken = 0

    def measure(self):
        self.taken += 1
        return self.values.pop(0)


def test_rows_run_in_passes_between_windows_shared_by_neighbours():
    windows = ScriptedWindows([100.0, 200.0, 300.0, 400.0, 500.0])
    order = []

    def load(name):
        order.append(name)
        return {"concurrency": name, "rps": 30.0, "requests": 30}

    rows = [Row(lambda: load(1), 1), Row(lambda: load(64), 3)]
    once, judged = Interleaved(windows, 2).run_passes(rows)
    # passes: [1, 64], [64], [64]; one window before the first run and one after each
    assert order == [1, 64, 64, 64] and windows.taken == 5
    assert once["runs"] == 1 and judged["runs"] == 3
    assert [(r["ceiling_before"], r["ceiling_after"]) for r in judged["each"]] == [
        (200.0, 300.0), (300.0, 400.0), (400.0, 500.0)
    ]  # fmt: skip
    assert once["each"][0]["share_of_ceiling"] == 0.2  # 30 / mean(100, 200)
    assert judged["share_of_ceiling"] == 0.0857  # 30 / 350, the median run
    assert judged["spread"]["share_of_ceiling"] == [0.0667, 0.12]  # 30/450, 30/250


def test_int8_over_float_is_each_int8_window_over_the_float_windows_around_it():
    float_windows = ScriptedWindows([1000.0, 1200.0, 800.0])
    int8_windows = ScriptedWindows([1650.0, 1500.0])
    ratio = ratio_windows(int8_windows, float_windows, pairs=2)
    assert ratio["ratios"] == [1.5, 1.5]  # 1650 / 1100, 1500 / 1000
    assert ratio["median"] == 1.5 and ratio["n"] == 2


def test_many_image_rows_keep_the_images_in_flight_and_every_worker_busy():
    assert clients_for(8, 2) == 8  # 64 images in flight
    assert clients_for(32, 2) == 4  # 128: two requests a worker, else a worker idles
    assert clients_for(32, 1) == 2 and clients_for(1, 2) == 64


def test_targets_are_judged_on_the_median():
    def row(load, p99, goodput, shed=0, shed_p99=None, without=0):
        return {"load": load, "p99_ms": p99, "goodput_of_capacity": goodput, "shed": shed,
                "shed_p99_ms": shed_p99, "shed_without_retry_after": without, "runs": 3,
                "spread": {"p99_ms": p99 and [p99 - 5, p99 + 50]}}  # fmt: skip

    (p99,) = judge_open("v2", "v2", row(0.5, 99.0, 0.5))
    assert p99["met"] and p99["value"] == 99.0 and p99["spread"] == [94.0, 149.0]
    assert not judge_open("v2", "v2", row(0.5, 101.0, 0.5))[0]["met"]
    assert judge_open("png", "png", row(0.5, 149.0, 0.5))[0]["met"]
    p99, goodput = judge_open("png", "png", row(1.2, 10.0, 0.89))
    assert not goodput["met"] and goodput["target"] == "goodput >= 90% of capacity"
    _, goodput, refusals = judge_open("png", "png", row(2.0, 10.0, 0.95, 40, 12.0))
    assert goodput["met"] and refusals["met"]
    *_, refusals = judge_open("png", "png", row(2.0, 10.0, 0.95, 40, 12.0, without=1))
    assert not refusals["met"]  # a 503 that does not say when to come back
    *_, refusals = judge_open("png", "png", row(2.0, 10.0, 0.95, 40, REFUSAL_P99_MS + 1))
    assert not refusals["met"]
    assert judge_open("v2", "v2", row(0.5, None, 0.0))[0]["met"] is False  # none answered
    many = {"images_per_request": 32, "concurrency": 4, "share_of_ceiling": 0.9, "runs": 3}
    assert judge_images("v2", many)["met"]
    assert not judge_images("v2", {**many, "share_of_ceiling": 0.89})["met"]
    closed = {"concurrency": 64, "share_of_bound": 0.74, "runs": 3}
    assert not judge_closed("v2", "v2", closed)["met"] and judge_closed("png", "png", closed)["met"]
    assert judge_closed("v2", "v2", closed)["target"] == "images/s >= 75% of min(ceiling, floor)"
    assert met_line([{"met": True}, {"met": False}, {"met": None}]) == "1 of 2 targets met"


def test_refusals_are_timed_and_checked_for_retry_after():
    async def outcomes(raw: bytes):
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        tally = Tally()
        for seconds in (0.002, 0.004, 0.1):
            status, headers, _ = await read_response_headers(reader)
            tally.record(status, seconds, headers)
        return tally.summary(1.0)

    with_retry = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\ncontent-length: 0\r\n\r\n"
    without = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    summary = asyncio.run(outcomes(with_retry + without + ok))
    assert summary["shed"] == 2 and summary["shed_without_retry_after"] == 1
    assert summary["shed_p50_ms"] == 3.0 and summary["requests"] == 1
    assert summary["p99_ms"] == 100.0


def test_machine_names_the_int8_kernels_its_flags_allow():
    assert int8_kernels({"avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_tile",
                         "amx_int8"}) == "AMX"  # fmt: skip
    assert int8_kernels({"avx2", "avx512bw", "avx512_vnni"}) == "AVX-512 VNNI"
    assert int8_kernels({"avx2", "avx_vnni"}) == "AVX-VNNI"
    assert int8_kernels({"avx2"}) == "AVX2 (no VNNI)"
    assert int8_kernels(set()) == "none of AVX2/AVX-512/AMX"
    assert {"avx_vnni", "avx512_vnni", "amx_int8", "avx2"} <= set(CPU_FLAGS)


def test_markdown_puts_peers_and_int8_beside_the_service():
    def rows(clients, images=1, repeats=1):
        load = {"rps": 10.0, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0, "shed": 0,
                "shed_p50_ms": None, "shed_p99_ms": None, "shed_without_retry_after": 0,
                "refused": 0, "errors": 0, "requests": 50,
                "images_per_request": images}  # fmt: skip
        return [
            combine([annotate({"concurrency": c, **load}, 90.0, 110.0, 2)] * repeats)
            for c in clients
        ]

    open_rows = [
        combine([{"load": x, "rate": 5.0, "sent": 5, "unsent": 0, "goodput_of_capacity": 0.9,
                  "goodput_of_capacity_raw": 0.8, **rows([64])[0]["each"][0]}] * 3)
        for x in OPEN_LOOP_LOADS
    ]  # fmt: skip
    batches = {b: {"images_per_s": 100.0, "p50_ms": 1.0, "p99_ms": 1.0} for b in BATCH_SIZES}
    way = {
        "way": "openvino bfloat16 on the CPU",
        "engine": "openvino",
        "precision": "bfloat16",
        "device": "cpu",
        "instructions": "AMX",
        "promise": "held",
        "self_check_seconds": 0.1,
        "threads": 2,
        "batches": batches,
        "best_batch": 128,
        "images_per_s": 100.0,
    }
    ceiling = {
        "ways": [way, {**way, "way": "onnxruntime float32 on the CPU", "engine": "onnxruntime",
                       "precision": "float32", "instructions": "AVX-512",
                       "images_per_s": 30.0}],
        "not_offered": [], "way": way["way"], "instructions": "AMX",
        "images_per_s": 100.0, "best_batch": 128,
        "all_cpus": {"threads": 2, **batches}, "per_worker": {"threads": 1, **batches},
    }  # fmt: skip
    model = {
        "weights": "trained weights", "ceiling": ceiling, "naive": rows(CONCURRENCY),
        "service": {"serving": {"engine": "openvino", "precision": "bfloat16", "device": "cpu",
                                "instructions": "AMX"},
                    "closed": {f"{kind}, batching on": rows(CONCURRENCY, repeats=3)
                               for kind in PATHS},
                    "images": [*rows([8], 8, 3), *rows([4], 32, 3)],
                    "open": {kind: open_rows for kind in PATHS}},
        "peers": {"BentoML 1.4.40": {"settings": "s", "rows": rows(CONCURRENCY)},
                  "LitServe 0.2.19": {"settings": "s", "rows": rows(CONCURRENCY)}},
        "int8": {"weights": "int8, m-int8.onnx from the models folder",
                 "ceiling": {**ceiling, "images_per_s": 150.0},
                 "ratio_to_float": {"ratios": [1.4, 1.5, 1.6], "median": 1.5, "min": 1.4,
                                    "max": 1.6, "n": 3},
                 "service": {"closed": {f"{kind}, batching on": rows([64], repeats=3)
                                        for kind in PATHS},
                             "images": [*rows([8], 8, 3), *rows([4], 32, 3)]}},
        "windows": [{"label": "service, batching on", "file": "m.onnx", "batch": 128, "count": 3,
                     "median": 100.0, "min": 90.0, "max": 110.0, "windows": []}],
    }  # fmt: skip
    model["at_64_clients"] = headline(model)
    # The floor below the ceiling on /v2 (50 req/s: judged against it), above it on PNG.
    model["targets"] = judge(model, {"v2": 50.0, "png": 500.0, "grpc": 40.0})
    results = {
        "machine": {
            "cpu": "test CPU", "cpu_flags": [], "cpus_available": 2, "cores": 2,
            "onnxruntime": "1", "python": "3", "workers": 2, "onnx_threads": 1,
            "int8_kernels": "AVX2 (no VNNI)",
            "load_average_start": [0.1, 0, 0], "load_average_end": [0.2, 0, 0],
        },
        "run": {"seconds": 5.0, "window_seconds": 1.0, "ceiling_seconds": 2.0, "repeats": 3,
                "duration_s": 600.0, "smoke": False},
        "models": {"m": model},
    }  # fmt: skip
    markdown = to_markdown(results)
    assert markdown.count("| BentoML 1.4.40 (s) | PNG, /predict |") == len(CONCURRENCY)
    assert markdown.count("| LitServe 0.2.19 (s) | PNG, /predict |") == len(CONCURRENCY)
    assert "BentoML 1.4.40 10.0 req/s" in markdown
    assert "int8/float **1.50x** (1.40-1.60), from 3 int8 windows" in markdown
    # 64 clients on each path, and the two many-image rows
    assert markdown.count("| service on int8, batching on |") == len(PATHS) + 2
    # 10 req/s of 1 image against a ceiling of 100 (mean of 90 and 110): 10%, 3 runs
    assert (
        "| service, batching on | tensor, /v2 binary | 64 | 1 | 3 | 10.0 (10.0-10.0) " in markdown
    )
    assert "| service, batching on | tensor, /v2 binary | 4 | 32 | 3 | 10.0 (10.0-10.0) | 320.0 " \
        "| 320% (320%-320%) |" in markdown  # fmt: skip
    assert "the whole run took 10.0 min." in markdown
    assert "; int8 kernels: AVX2 (no VNNI))" in markdown
    # p99 3 ms at 20 offered rates (5 a path), goodput 90% at 8, and the 32-image rows
    # (320%, float and int8) met; the 8-image rows (80%) and the 64-client rows (10%, /v2
    # and /predict) not; no 503s, so no refusals
    assert "30 of 34 targets met" in markdown
    # the judged one-image rows against the lower of ceiling and floor: 10 of 50 on /v2
    assert "| 20% of 50.0 (ceiling 100.0, floor 50.0) |" in markdown
    assert "| 10% of 100.0 (ceiling 100.0, floor 500.0) |" in markdown
    assert "| float | openvino | bfloat16 | AMX | 100.0 | 128 | held | 0.10 |" in markdown
    assert "the service serves float: openvino bfloat16 (AMX)" in markdown
    assert "raw tensors over gRPC 10.0 req/s" in markdown
    assert "![latency-throughput curve](published/latency-curve.png)" in markdown


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


def test_grpc_requests_are_prebuilt_messages_of_raw_pixels():
    requests = grpc_requests("m", images_per_request=2)
    assert len(requests) == 64 and len(set(requests)) == 64
    message = pb.ModelInferRequest.FromString(requests[0])
    assert message.model_name == "m" and list(message.inputs[0].shape) == [2, 32, 32, 3]
    assert message.raw_input_contents[0] == pixel_images(66)[:2].tobytes()
    assert [o.name for o in message.outputs] == ["probabilities"]


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
     (["profile", "--seconds", "3"], "profile"),
     (["faults", "--model", "cifar100-712868"], "faults")],
)  # fmt: skip
def test_the_command_line_runs_a_mode_by_name_and_run_without_one(argv, mode):
    args = build_parser().parse_args(argv)
    assert (args.mode or "run") == mode
    assert args.peers is ("--peers" in argv)
    if mode != "run":  # the one-model options, each mode with its own default duration
        assert args.model and args.out and args.models_dir
        assert args.seconds == {"faults": 8.0, "profile": 3.0}[mode]


def test_the_run_takes_service_settings_by_field_name_but_not_its_own():
    args = build_parser().parse_args(["--setting", "max_queue_delay_ms=80", "--setting",
                                      "batch_max_wait_ms=1"])  # fmt: skip
    assert args.setting == [("max_queue_delay_ms", "80"), ("batch_max_wait_ms", "1")]
    for wrong in ("max_queue_delay=80", "max_queue_delay_ms", "workers=4", "batching=false"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--setting", wrong])


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


def test_closed_loop_clients_wait_as_retry_after_says():
    """A client told 503 + Retry-After: 1 waits before its next request (within the run):
    over 0.5 s against a server that always sheds, each of two clients sends once."""
    import asyncio

    from bench.load import closed_loop

    async def scenario() -> tuple[dict, int]:
        seen = 0

        async def shed(reader, writer) -> None:
            nonlocal seen
            while await reader.readuntil(b"\r\n\r\n"):
                seen += 1
                body = b'{"detail":"shed"}'
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                await writer.drain()

        server = await asyncio.start_server(shed, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        async with server:
            result = await closed_loop("127.0.0.1", port, [request], 2, 0.5, 1000)
        return result, seen

    result, seen = asyncio.run(scenario())
    assert seen == 2 and result["shed"] == 2


def test_the_floor_mode_measures_every_target_against_the_bare_asgi_app(tmp_path):
    """`python -m bench floor` on its trivial model, with this checkout compared to itself:
    every target answered with no error, its server CPU per request measured from /proc,
    and each ratio taken within a round (the bare ASGI app's own is 1)."""
    source = tmp_path / "source"
    source.mkdir()
    for package in ("contract", "service"):  # what `python -m service` imports of ours
        (source / package).symlink_to(Path(package).resolve())
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bench", "floor", "--seconds", "0.5", "--rounds", "2",
               "--concurrency", "4", "--out", str(out), "--compare", str(source)]  # fmt: skip
    subprocess.run(command, check=True, timeout=900)
    results = json.loads((out / "floor.json").read_text())
    targets = results["targets"]
    assert list(targets) == [
        "asgi floor", "starlette floor", "fastapi floor", "grpc floor", "service /v2 binary",
        "service /predict PNG", "service gRPC raw", "service /v2 refused at the door",
        "compared /v2 binary", "compared /predict PNG", "compared gRPC raw",
        "compared /v2 refused at the door",
    ]  # fmt: skip
    for name, row in targets.items():
        assert row["errors"] == 0 and len(row["runs"]) == 2, name
        assert all(r["server_cpu_s"] > 0 for r in row["runs"]), name
        assert all(r["requests"] > 0 for r in row["runs"]) != ("refused" in name), name
        per_request = sorted(
            1000 * r["server_cpu_s"] / (r["requests"] + r["shed"] + r["refused"])
            for r in row["runs"]
        )
        assert row["min"] == pytest.approx(per_request[0], rel=0.05), name  # ms rounding
    assert targets["asgi floor"]["x_asgi_floor"] == 1.0
    assert all(r["shed"] > 0 for r in targets["service /v2 refused at the door"]["runs"])
    assert "service_x_compared" in targets["compared /v2 binary"]
    assert "service_x_compared" in targets["compared /v2 refused at the door"]
    assert "| service /v2 binary |" in (out / "floor.md").read_text()


def test_the_shadow_mode_compares_every_copy_of_the_same_answers_or_sheds_it(tmp_path):
    """`python -m bench shadow` on its trivial model: the candidate is the same weights
    under another card, so every copy it compares agrees; no live request failed, and the
    ratios of both latencies and the throughput are there."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bench", "shadow", "--model", "trivial", "--seconds",
               "1", "--pairs", "1", "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, timeout=600)
    results = json.loads((out / "shadow.json").read_text())
    ((pair),) = results["pairs"]
    assert pair["off"]["errors"] == pair["on"]["errors"] == 0
    assert results["images_compared"] > 0 and results["candidate_errors"] == 0
    assert results["images_agreed"] == results["images_compared"]
    assert set(results["median_ratios"]) == {"p50_ms", "p99_ms", "rps"}
    assert "| 1 |" in (out / "shadow.md").read_text()
