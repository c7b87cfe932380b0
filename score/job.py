"""The score job: inputs -> Parquet shards, on Ray Data, resumable.

The inputs are cut into shards of `shard_size` images in a fixed order; shard n is
`part-<n>.parquet` in the output folder, written whole (to a temporary name, then
renamed) as soon as its last row is back. A rerun with the same settings scores only the
shards not written yet, so a killed job resumes where it stopped; `_job.json` records
the settings, and a rerun with other settings (another model version, top-k, input list)
is refused instead of mixing two kinds of rows in one folder.

Ray: `ray.init()` starts a local Ray on this machine, or joins the cluster RAY_ADDRESS
names (`ray job submit` sets it). The images go through a pool of `Scorer` actors
(score/scorer.py), one onnxruntime session each, as many as the cluster has CPUs (or
GPUs) for; the answers come back to this process, which writes the shards.
"""

import hashlib
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from contract.classifier import Classifier
from contract.columns import SCORE_INPUT_SCHEMA
from contract.errors import ContractError
from contract.trust import TrustedKeys
from score.inputs import Inputs
from score.scorer import Options, Scorer
from service.catalog import Served, default_version

MANIFEST = "_job.json"


class JobError(Exception):
    """The job cannot run as asked: one line for the user, no traceback."""


@dataclass(frozen=True)
class Resources:
    actors: int | None  # None: as many as the cluster has room for
    cpus_per_actor: int
    gpus_per_actor: int  # 0: CPU only; else the CUDA provider, one session per GPU actor


def find_model(models_dir: Path, model: str, trusted: TrustedKeys | None = None) -> Classifier:
    """`model` as a file, or the newest version (the service's rule) of the model with that
    id among MODELS_DIR's *.onnx files; with `trusted` (TRUSTED_KEYS), only files whose
    signature verifies, as the service loads them."""
    if model.endswith(".onnx") and Path(model).is_file():
        try:
            return Classifier(Path(model), "cpu", 1, 1, trusted=trusted)
        except ContractError as err:
            raise JobError(err.message) from None
    found: dict[str, Served] = {}
    refused: list[str] = []
    for path in sorted(Path(models_dir).glob("*.onnx")):
        if not path.is_file():  # a FIFO or a device would block the read
            continue
        try:
            candidate = Classifier(path, "cpu", 1, 1, trusted=trusted)
        except ContractError as err:  # not ours, broken or not signed: the service skips it
            refused.append(err.message)
            continue
        except Exception:  # onnxruntime's own errors: skipped as well
            continue
        if candidate.model_id == model:
            found[candidate.version] = Served(candidate, batcher=None)
    if not found:
        # With TRUSTED_KEYS, the files refused may be the one meant: say why they were.
        why = f"; refused: {'; '.join(refused[:3])}" if refused and trusted is not None else ""
        raise JobError(
            f"no model {model!r} in {models_dir} (a *.onnx file whose card names it{why})"
        )
    return found[default_version(found)].model


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def check_manifest(output: Path, settings: dict) -> None:
    """Write the job's settings, or check that the folder's are the same ones."""
    if output.exists() and not output.is_dir():
        raise JobError(f"--output {output} is a file, not a folder for the shards")
    manifest = output / MANIFEST
    if manifest.exists():
        try:
            before = json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            raise JobError(
                f"{manifest} is not a job's record ({err}); use another --output"
            ) from None
        if before != settings:
            changed = sorted(
                k for k in settings.keys() | before.keys() if before.get(k) != settings.get(k)
            )
            raise JobError(
                f"{output} holds the shards of another job (it differs in {', '.join(changed)});"
                " use another --output folder, or empty this one"
            )
        return
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(manifest, lambda tmp: tmp.write_text(json.dumps(settings, indent=2) + "\n"))


def write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with tmp.open("rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Progress:
    """Images done, images/s and the time left, on stderr: one line updated in place on a
    terminal, a line every `every` seconds otherwise (logs). The rate is counted from the
    first answers, so Ray's start and the actors' warm-up do not drag it down."""

    def __init__(self, total: int, every: float) -> None:
        self.total, self.every, self.done = total, every, 0
        self.first: tuple[float, int] | None = None  # when the first answers came, how many
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def add(self, images: int) -> None:
        self.done += images
        now = time.monotonic()
        if self.first is None:
            self.first = (now, self.done)
        if self.done < self.total and now - self.last < self.every:
            return
        self.last = now
        since, counted = self.first
        rate = (self.done - counted) / (now - since) if now > since else 0.0
        eta = (
            time.strftime("%H:%M:%S", time.gmtime((self.total - self.done) / rate)) if rate else "?"
        )
        line = (
            f"score: {self.done:,}/{self.total:,} images ({self.done / self.total:.1%}), "
            f"{rate:,.1f} images/s, ETA {eta}"
        )
        end = "\r" if self.tty and self.done < self.total else "\n"
        print(line, end=end, file=sys.stderr, flush=True)


def run(
    inputs: Inputs,
    output: Path,
    model: Classifier,
    options: dict,
    resources: Resources,
    shard_size: int,
    progress_every: float = 5.0,
    trusted_keys: Path | None = None,
) -> dict:
    """Score every input not yet in `output`; a summary of what was done. `trusted_keys`:
    each actor verifies the model file it loads against them, as the driver did."""
    settings = {
        "model_id": model.model_id,
        "model_version": model.version,
        "inputs": len(inputs.paths),
        "inputs_sha256": hashlib.sha256("\n".join(inputs.paths).encode()).hexdigest(),
        "shard_size": shard_size,
        **options,
    }
    check_manifest(output, settings)
    for stale in output.glob(".part-*.tmp"):  # a write a kill interrupted
        stale.unlink(missing_ok=True)
    shards = range((len(inputs.paths) + shard_size - 1) // shard_size)
    todo = [s for s in shards if not (output / shard_name(s)).exists()]
    summary = {
        "images": len(inputs.paths),
        "shards": len(shards),
        "already_written": len(shards) - len(todo),
        "errors": 0,
    }
    print(
        f"score: {model.model_id} {model.version}, {len(inputs.paths):,} images in "
        f"{len(shards)} shard(s) of {shard_size}; {summary['already_written']} already "
        f"written in {output}",
        file=sys.stderr,
        flush=True,
    )
    if not todo:
        return summary
    expected = {s: min(shard_size, len(inputs.paths) - s * shard_size) for s in todo}
    progress = Progress(sum(expected.values()), progress_every)
    pending: dict[int, list[pa.Table]] = defaultdict(list)
    counts: dict[int, int] = defaultdict(int)
    written: set[int] = set()
    for table in ray_errors_as_job_errors(
        stream(inputs, todo, shard_size, model, options, resources, trusted_keys)
    ):
        for shard in set(table["shard"].to_pylist()) - written:
            part = table.filter(pc.equal(table["shard"], shard))
            pending[shard].append(part)
            counts[shard] += part.num_rows
            if counts[shard] < expected[shard]:
                continue
            # Each input once, in input order (a batch that Ray ran twice, after an actor
            # was restarted, comes back twice).
            rows = pa.concat_tables(pending[shard])
            _, first = np.unique(rows["index"].to_numpy(), return_index=True)
            if len(first) == expected[shard]:
                del pending[shard]
                written.add(shard)
                rows = rows.take(first).drop(["shard"])
                summary["errors"] += rows.num_rows - rows["error"].null_count
                write_atomic(
                    output / shard_name(shard), lambda tmp, rows=rows: pq.write_table(rows, tmp)
                )
        progress.add(table.num_rows)
    if pending:  # Ray returned fewer rows than it was given: never write a short shard
        raise JobError(f"shards {sorted(pending)} came back incomplete; rerun to resume")
    return summary


def stream(
    inputs: Inputs,
    todo: list[int],
    shard_size: int,
    model: Classifier,
    options: dict,
    resources: Resources,
    trusted_keys: Path | None = None,
):
    """The answers for shards `todo`, as tables, in whatever order the actors finish."""
    import ray
    import ray.data

    ray.init(ignore_reinit_error=True, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts images; Ray's would interleave
    blocks = [input_block(inputs, shard, shard_size) for shard in todo]
    dataset = ray.data.from_arrow(blocks)  # one block per shard
    cluster = ray.cluster_resources()
    if resources.gpus_per_actor:
        room = int(cluster.get("GPU", 0) // resources.gpus_per_actor)
        if not room:
            raise JobError("--gpus-per-actor is set but the Ray cluster has no GPU")
    else:
        room = int(cluster.get("CPU", 1) // resources.cpus_per_actor)
    actors = max(1, min(resources.actors or room, len(inputs.paths)))
    nodes = sum(node["Alive"] for node in ray.nodes())
    print(
        f"score: {actors} actor(s), {resources.cpus_per_actor} CPU(s) and "
        f"{resources.gpus_per_actor} GPU(s) each, on a Ray cluster of {nodes} node(s) with "
        f"{cluster.get('CPU', 0):g} CPU(s) and {cluster.get('GPU', 0):g} GPU(s)",
        file=sys.stderr,
        flush=True,
    )
    scorer_options = Options(
        model_path=str(model.path.resolve()),
        model_version=model.version,
        device="cuda" if resources.gpus_per_actor else "cpu",
        threads=resources.cpus_per_actor,
        trusted_keys=str(trusted_keys) if trusted_keys else None,
        **options,
    )
    answers = dataset.map_batches(
        Scorer,
        fn_constructor_kwargs={"options": scorer_options},
        batch_size=options["batch_size"],
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=resources.cpus_per_actor,
        num_gpus=resources.gpus_per_actor,
    )
    yield from answers.iter_batches(batch_size=None, batch_format="pyarrow")


def ray_errors_as_job_errors(tables):
    """`tables`, with Ray's failures (an actor that cannot start, a lost cluster) as one
    JobError line: the innermost cause's last line, not Ray's nested tracebacks. Files'
    own faults never get here: each is its row's error."""
    import ray.exceptions

    try:
        yield from tables
    except (ray.exceptions.RayError, ConnectionError) as err:
        cause: BaseException = err
        while (inner := getattr(cause, "cause", None) or cause.__cause__) not in (None, cause):
            cause = inner
        if isinstance(cause, ContractError):
            text = cause.message
        else:
            lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
            text = lines[-1] if lines else type(cause).__name__
        raise JobError(f"the Ray job failed: {text[:300]}") from None


def input_block(inputs: Inputs, shard: int, shard_size: int) -> pa.Table:
    rows = range(shard * shard_size, min((shard + 1) * shard_size, len(inputs.paths)))
    pixels = [None] * len(rows)
    if inputs.pixels is not None:
        pixels = [inputs.pixels[i].tobytes() for i in rows]
    return pa.table(
        {
            "shard": [shard] * len(rows),
            "index": list(rows),
            "path": [inputs.paths[i] for i in rows],
            "pixels": pixels,
        },
        schema=SCORE_INPUT_SCHEMA,
    )
