"""`python -m bench faults` in smoke mode: every row of the table produced, on loopback,
in seconds. Nothing timed is asserted; what must hold whatever the speed is: overload is
shed and still served, slow connections are cut with 408 while a normal client is
served, nothing accepted is lost and everything answered after SIGTERM is a 200; every
hostile case is answered and measured (its documented status is tests/test_hostile.py's
to check)."""

import json
import subprocess
import sys

from bench.hostile import cases

FAULTS = [
    "overload", "slow clients", "soak", "amplification", "largest accepted", "ordinary",
    "SIGTERM under load", "slow upload during SIGTERM",
]  # fmt: skip


def test_faults_smoke_run_produces_every_row(models_dir, tmp_path):
    command = [sys.executable, "-m", "bench", "faults", "--smoke"]
    command += ["--models-dir", str(models_dir), "--out", str(tmp_path), "--workers", "2"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    results = json.loads((tmp_path / "faults.json").read_text())
    rows = {row["fault"]: row for row in results["rows"]}
    assert list(rows) == FAULTS

    overload = rows["overload"]  # shed with 503s, yet still serving: some of each
    assert overload["sent"] >= 1 and overload["requests"] >= 1 and overload["shed"] >= 1
    assert overload["refused"] == 0 and overload["errors"] == 0

    slow = rows["slow clients"]  # both kinds cut with a 408, none reset; the normal client served
    assert slow["opened"] >= 200
    assert slow["answered_408_by_kind"]["headers"] >= 1
    assert slow["answered_408_by_kind"]["body"] >= 1
    assert slow["closed_other"] == 0
    assert slow["normal_requests"] >= 1 and slow["normal_failed"] == 0

    soak = rows["soak"]
    assert soak["rss_start_mib"] > 0 and soak["rss_end_mib"] > 0
    assert soak["requests"] >= 1 and soak["failed"] == 0 and "shed" in soak

    amplification = rows["amplification"]  # refused from the headers, body or not
    assert amplification["statuses"] == [413] and amplification["bytes_sent"] > 3_000_000
    assert rows["largest accepted"]["statuses"] == [200]
    assert rows["ordinary"]["statuses"] == [200]
    for name in ("amplification", "largest accepted", "ordinary"):
        assert rows[name]["cpu_seconds_per_request"] >= 0 and rows[name]["rss_growth_mib"] >= 0

    sigterm = rows["SIGTERM under load"]  # drained: served (200) after SIGTERM, nothing lost
    assert sigterm["lost"] == 0
    assert sigterm["answered_before"] >= 1 and sigterm["answered_after"] >= 1
    assert sigterm["failed_after"] == 0
    assert sigterm["shutdown_seconds"] is not None
    upload = rows["slow upload during SIGTERM"]
    assert upload["upload_status"] == 200 and upload["shutdown_seconds"] is not None

    hostile = results["hostile"]
    assert [row["case"] for row in hostile] == [case.name for case in cases(results["model"])]
    for row in hostile:
        assert row["status"] is not None and row["bytes_sent"] >= 1
        assert row["cpu_seconds_per_request"] >= 0 and row["rss_growth_mib"] >= 0

    markdown = (tmp_path / "faults.md").read_text()
    assert all(f"| {fault} |" in markdown for fault in FAULTS)
    assert all(f"| {row['case']} | {row['bytes_sent']:,} |" in markdown for row in hostile)
    assert "Worst ratios: peak RSS growth" in markdown
