"""`python -m bench faults` in smoke mode: every row of the table produced, on loopback,
in seconds. Nothing timed is asserted; what must hold whatever the speed is."""

import json
import subprocess
import sys

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
    assert rows["overload"]["sent"] >= 1 and "shed" in rows["overload"]
    assert rows["slow clients"]["opened"] >= 200 and rows["slow clients"]["normal_requests"] >= 1
    assert rows["soak"]["rss_start_mib"] > 0 and rows["soak"]["rss_end_mib"] > 0
    assert rows["amplification"]["statuses"] == [413]  # refused from the headers
    assert rows["largest accepted"]["statuses"] == [200]
    assert rows["SIGTERM under load"]["lost"] == 0
    assert rows["SIGTERM under load"]["shutdown_seconds"] is not None
    assert rows["slow upload during SIGTERM"]["upload_status"] == 200
    markdown = (tmp_path / "faults.md").read_text()
    assert all(f"| {fault} |" in markdown for fault in FAULTS)
