"""python -m bench score: the score job's images/s against the machine's ceiling.

The job (`python -m score`, as a user runs it) scores the same images twice over: as
32x32 PNG files (read and decoded by the actors: decode included) and as a cifar-100-python
folder (pixels handed over: decode excluded), each between two ceiling windows of the
fastest engine and precision whose promise holds here, on every CPU (bench/ceiling.py, at
the job's batch size), so each row is a share of the ceiling of the minutes it ran in;
the target is SHARE of it. Rows: local Ray (`ray.init()`, one node,
every CPU) and a two-node cluster on this same machine (bench/raycluster.py, the CPUs
split between the nodes): the same CPUs either way, so the second row shows what a second
node costs, not what it adds. A row's images/s is the job's own steady rate (from its
first answers to its last shard: Ray's start and the actors' warm-up excluded).
Writes <out>/score.{json,md}; prints the Markdown.
"""

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from bench.ceiling import Windows, ceiling_session, measure_table
from bench.modelfiles import model_files
from bench.raycluster import ROOT, base_env, local_cluster
from bench.results import cell, write
from bench.steady import Interleaved
from service.config import Settings, available_cpus
from training import data
from training.synthetic import write_cifar100

RATE = re.compile(r"score: ([\d,]+)/([\d,]+) images \([^)]*\), ([\d,.]+) images/s")
BATCH = Settings.model_fields["batch_max_size"].default  # the job's default batch size
SHARE = 0.8  # the target: images/s at least this share of the ceiling next to them


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(seconds=3.0)  # per ceiling window
    parser.add_argument("--images", type=int, default=20_000, help="per row (a multiple of 100)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, every row")


def main(args: argparse.Namespace) -> int:
    images = 200 if args.smoke else max(100, args.images // 100 * 100)
    seconds = 0.2 if args.smoke else args.seconds
    cpus = available_cpus()
    results: dict = {
        "model": args.model,
        "cpus_available": cpus,
        "images": images,
        "batch": BATCH,
        "rows": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-score-") as scratch:
        work = Path(scratch)
        path, weights = model_files(args.models_dir, work, [args.model])[args.model]
        results["weights"] = weights
        cifar = write_cifar100(work / "cifar", train_per_class=1, test_per_class=images // 100)
        pngs = work / "pngs"
        pngs.mkdir()
        for i, pixels in enumerate(data.test_split(cifar).images):
            Image.fromarray(pixels).save(pngs / f"{i:06d}.png")
        ceiling = measure_table(path, Settings(device="cpu"), seconds / 4)
        results["ceiling_way"] = ceiling["way"]
        ceiling_model = ceiling_session(path, "cpu", ceiling)
        windows = Windows(ceiling_model, BATCH, seconds, f"{ceiling['way']}, all CPUs")
        rows = Interleaved(windows, cpus)
        job = [
            "--model",
            str(path),
            "--shard-size",
            str(max(BATCH, images // 10)),
            "--progress-seconds",
            "0",
        ]
        local = base_env() | {"RAY_TMPDIR": str(work / "ray")}  # no other Ray to join
        for name, source in (("decode included", pngs), ("decode excluded", cifar)):
            out = work / f"out-local-{len(results['rows'])}"
            run = [*job, "--input", str(source), "--output", str(out)]
            results["rows"][f"1 node, {name}"] = rows.measure(lambda run=run: score(run, local))
        if cpus >= 2:
            halves = [cpus // 2, cpus - cpus // 2]
            with local_cluster(halves) as cluster:
                run = [*job, "--input", str(pngs), "--output", str(work / "out-cluster")]
                name = f"2 nodes ({halves[0]}+{halves[1]} CPUs), decode included"
                results["rows"][name] = rows.measure(lambda: score(run, cluster))
        results["ceiling_windows"] = windows.summary()
    write(results, args.out, "score", to_markdown)
    return 0


def score(args: list[str], env: dict) -> dict:
    """One run of `python -m score`: its steady images/s, as the run dict bench/steady.py
    annotates (every image a request of one)."""
    run = subprocess.run(
        [sys.executable, "-m", "score", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if run.returncode != 0:
        raise RuntimeError(f"python -m score failed:\n{run.stderr[-3000:]}")
    done, total, rate = RATE.findall(run.stderr)[-1]
    assert done == total, run.stderr[-2000:]
    images = int(total.replace(",", ""))
    return {"rps": float(rate.replace(",", "")), "requests": images, "images_per_request": 1}


def to_markdown(results: dict) -> str:
    lines = [
        f"# Score job against the ceiling: {results['model']} ({results['weights']})",
        "",
        f"{results['images']:,} images of 32x32 per row, batch {results['batch']}, "
        f"{results['cpus_available']} CPU(s) available; the ceiling: {results['ceiling_way']} "
        f"on every CPU, the fastest way whose promise holds here; target: at least "
        f"{SHARE:.0%} of it.",
        "",
        "| row | images/s | ceiling images/s | share of ceiling | target |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name, row in results["rows"].items():
        lines.append(
            f"| {name} | {cell(row['images_per_s'])} | {cell(row['ceiling'])} | "
            f"{cell(row['share_of_ceiling'])} | "
            f"{'met' if row['share_of_ceiling'] >= SHARE else '**not met**'} |"
        )
    return "\n".join(lines) + "\n"
