"""The benchmark harness in smoke mode: a few requests per row, every row produced.
No timing is asserted: speed is for `make bench` to measure, not for tests to guess."""

import json
import subprocess
import sys

from bench.__main__ import BATCH_SIZES, CONCURRENCY
from training.models import MODEL_IDS


def test_smoke_run_produces_every_row(models_dir, tmp_path):
    command = [sys.executable, "-m", "bench", "--smoke", "--models-dir", str(models_dir)]
    command += ["--out", str(tmp_path), "--workers", "2", "--device", "cpu"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["machine"]["workers"] == 2 and results["machine"]["cpu"]
    markdown = (tmp_path / "results.md").read_text()
    for model_id in MODEL_IDS:
        r = results["models"][model_id]
        assert r["weights"] == "trained weights"
        assert r["ceiling"]["provider"] == "CPUExecutionProvider"
        for batch in BATCH_SIZES:
            assert r["ceiling"][str(batch)]["images_per_s"] > 0
        for rows in (r["service"]["batching on"], r["service"]["batching off"], r["naive"]):
            assert [row["concurrency"] for row in rows] == list(CONCURRENCY)
            for row in rows:
                assert row["requests"] >= 1 and row["errors"] == 0
        assert set(r["at_64_clients"]) >= {"service_share_of_ceiling", "service_p99_ms"}
        assert f"### {model_id}" in markdown
    assert markdown.count("| service, batching on |") == len(MODEL_IDS) * len(CONCURRENCY)
    assert markdown.count("| naive Keras |") == len(MODEL_IDS) * len(CONCURRENCY)
