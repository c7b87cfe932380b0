"""The latency-throughput curve of the open loop: one PNG for the run.

Per model, two panels against the offered load (share of the closed-loop capacity at 64
clients, measured in the same run): the answered requests' p50 and p99 (from the
scheduled arrival, log scale) with each path's p99 target, and goodput (answered req/s)
as a share of the capacity, with the 90 % target drawn where it applies (120 % and
200 %). Every path on each panel; a bar from min to max over a point's repeats.
"""

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, and no GUI toolkit to import
import matplotlib.pyplot as plt

from bench.tables import PATHS as NAMES
from bench.targets import GOODPUT_LOADS, GOODPUT_SHARE, P99_MS

COLOURS = {"png": "tab:orange", "v2": "tab:blue", "grpc": "tab:green", "v2-bytes": "tab:red"}
PNG = {"metadata": {"Software": None}}  # no version stamp


def draw(models: dict[str, dict], title: str) -> bytes:
    """The curve of every model with open-loop rows ({model id: {kind: rows}}), as PNG."""
    models = {m: paths for m, paths in models.items() if paths}
    fig, axes = plt.subplots(
        len(models), 2, figsize=(12, 4.6 * len(models)), squeeze=False, constrained_layout=True
    )
    for (model_id, paths), (latency, goodput) in zip(models.items(), axes, strict=True):
        loads = sorted({100 * r["load"] for rows in paths.values() for r in rows})
        for kind, rows in paths.items():
            colour, name = COLOURS[kind], NAMES[kind]
            for key, style in (("p50_ms", "--"), ("p99_ms", "-")):
                _with_spread(latency, rows, key, 1, colour, style, f"{name}: {key[:3]}")
            bound = P99_MS[kind]
            label = f"{name}: p99 target {bound:g} ms"
            latency.axhline(bound, color=colour, linestyle=":", linewidth=1, label=label)
            _with_spread(goodput, rows, "goodput_of_capacity", 100, colour, "-", name)
        latency.set(xlabel="offered load, % of capacity", ylabel="answered latency, ms (log)")
        latency.set(yscale="log", title=f"{model_id}: latency from the scheduled arrival")
        top = max(loads, default=100)
        ideal = "every request answered, up to capacity"
        goodput.plot([0, 100, top], [0, 100, 100], color="grey", linewidth=1, label=ideal)
        judged = [100 * load for load in GOODPUT_LOADS if 100 * load in loads]
        if judged:
            label = f"target: {GOODPUT_SHARE:.0%} of capacity"
            goodput.hlines(100 * GOODPUT_SHARE, min(judged), max(judged), color="black",
                           linestyle=":", label=label)  # fmt: skip
        goodput.set(xlabel="offered load, % of capacity")
        goodput.set(ylabel="goodput, % of capacity (held to the ceiling)")
        goodput.set(ylim=(0, None), title=f"{model_id}: answered req/s")
        for ax in (latency, goodput):
            ax.set_xticks(loads)
            ax.set_xlim(0, top * 1.05)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, **PNG)
    plt.close(fig)
    return buffer.getvalue()


def _with_spread(
    ax, rows: list[dict], key: str, scale: float, colour: str, style: str, label: str
) -> None:
    """A line through the rows' medians of `key` (times `scale`) against the offered
    load, and a bar from min to max where a row ran more than once."""
    points = [r for r in rows if r.get(key) is not None]
    if not points:
        return
    x = [100 * r["load"] for r in points]
    y = [scale * r[key] for r in points]
    low_high = [(r.get("spread") or {}).get(key) or (r[key], r[key]) for r in points]
    below = [max(0.0, yi - scale * lo) for yi, (lo, _) in zip(y, low_high, strict=True)]
    above = [max(0.0, scale * hi - yi) for yi, (_, hi) in zip(y, low_high, strict=True)]
    ax.errorbar(x, y, yerr=[below, above], color=colour, linestyle=style, marker="o",
                markersize=4, capsize=3, label=label)  # fmt: skip


def write(models: dict[str, dict], title: str, *paths: Path) -> None:
    """The curve written to each of `paths` (folders made as needed)."""
    picture = draw(models, title)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(picture)
