"""python -m bench's results as Markdown: per model, the targets met and not, the
ceilings (float, int8) and how the machine drifted, the closed loop, the many-image rows,
the open loop, and the headline sentences."""

from bench.ceiling import BATCH_SIZES
from bench.machine import machine_line
from bench.results import cell
from bench.targets import met_line

PATHS = {"png": "PNG, /predict", "v2-bytes": "PNG, /v2 BYTES binary",
         "v2": "tensor, /v2 binary", "grpc": "tensor, gRPC raw"}  # fmt: skip


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def with_spread(row: dict, key: str, as_percent: bool = False) -> str:
    """A row's median of `key`, with (min-max) over its runs when it ran more than once."""
    show = percent if as_percent else cell
    value = show(row.get(key))
    low_high = (row.get("spread") or {}).get(key)
    if row.get("runs", 1) > 1 and low_high:
        value += f" ({show(low_high[0])}-{show(low_high[1])})"
    return value


def to_markdown(results: dict) -> str:
    run = results["run"]
    smoke = " (a smoke run: not a measurement)" if run["smoke"] else ""
    lines = [machine_line(results["machine"]), ""]
    lines += [
        f"Run: {run['repeats']} runs of each judged row (64 clients, many images, open "
        f"loop, int8), the others once; {run['seconds']:g} s per load, "
        f"{run['window_seconds']:g} s ceiling windows between rows, "
        f"{run['ceiling_seconds']:g} s per batch size in the ceiling tables; the whole run "
        f"took {run['duration_s'] / 60:.1f} min{smoke}. "
        "Each run's share of the ceiling is to the mean of the ceiling windows just before "
        "and after it; a row shows its runs' median, (min-max) where it ran more than once, "
        "and counts summed over its runs.",
        "",
    ]  # fmt: skip
    lines += floor_lines(results.get("floor"))
    for model_id, r in results["models"].items():
        c = r["ceiling"]
        # Runs published before engines were compared name onnxruntime's provider instead.
        lines += [f"### {model_id} ({r['weights']}; ceiling: {c.get('way') or c['provider']})", ""]
        lines += targets_table(r["targets"])
        lines += ways_table(r)
        lines += ceiling_table(r)
        lines += drift_table(r["windows"])
        lines += closed_table(r)
        lines += images_table(r)
        lines += open_table(r["service"]["open"])
        lines += headline_lines(r)
    return "\n".join(lines)


def targets_table(verdicts: list[dict]) -> list[str]:
    lines = [
        f"**Targets**, each judged on the median of its runs: {met_line(verdicts)}.",
        "",
        "| target | row | median | min-max | runs | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        as_percent = "%" in v["target"]
        show = percent if as_percent else cell
        low_high = f"{show(v['spread'][0])}-{show(v['spread'][1])}" if v["spread"] else "-"
        verdict = {True: "met", False: "**not met**", None: "-"}[v["met"]]
        lines.append(
            f"| {v['target']} | {v['row']} | {show(v['value'])} | {low_high} | {v['runs']} "
            f"| {verdict} |"
        )
    return [*lines, ""]


def ways_table(r: dict) -> list[str]:
    """Every engine and precision this machine offers each file, on every CPU: its best
    images/s and whether the file's promise holds there; the service judged against the
    fastest that holds."""
    if "ways" not in r["ceiling"]:  # a run published before engines were compared
        return []
    lines = [
        "Engines and precisions on this machine, every CPU (the ceiling: the fastest whose "
        "promise holds); the service serves "
        + ", ".join(
            f"{name}: {s['engine']} {s['precision']} ({s.get('instructions') or s['device']})"
            for name, s in served(r).items()
        )
        + ".",
        "",
        "| file | engine | precision | instructions | images/s | at batch | promise | "
        "self-check s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in (("float", r["ceiling"]), ("int8", (r.get("int8") or {}).get("ceiling"))):
        for way in (c or {}).get("ways", []):
            held = "held" if way["promise"] == "held" else f"**not held**: {way['promise']}"
            lines.append(
                f"| {name} | {way['engine']} | {way['precision']} | {way['instructions']} | "
                f"{way['images_per_s']} | {way['best_batch']} | {held} | "
                f"{seconds(way.get('self_check_seconds'))} |"
            )
        lines += [f"| {name} | - | - | - | - | - | not offered: {why} | - |"
                  for why in (c or {}).get("not_offered", [])]  # fmt: skip
    return [*lines, ""]


def served(r: dict) -> dict[str, dict]:
    """What the service computed each file with, as it said (GET /models/{id})."""
    out = {"float": r["service"].get("serving")}
    if r.get("int8") and r["int8"].get("service"):
        out["int8"] = r["int8"]["service"].get("serving")
    return {name: s for name, s in out.items() if s}


def floor_lines(floor: dict | None) -> list[str]:
    """The serving path's floor: the service on a model that costs nothing."""
    if not floor:
        return []
    return [
        "Floor (the service serving a trivial model, 64 clients, median of "
        f"{next(iter(floor.values()))['runs']} runs): "
        + ", ".join(f"{PATHS[kind]} {row['rps']} req/s" for kind, row in floor.items())
        + "; a one-image row is judged against the lower of this and its ceiling.",
        "",
    ]


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ceiling_table(r: dict) -> list[str]:
    """The ceiling's way alone: the float file's sessions, and the int8 file's beside them."""
    c, int8 = r["ceiling"], r.get("int8")
    way = c.get("way") or c["provider"]
    head = (
        f"| {way}: batch | float, {c['all_cpus']['threads']} threads (all CPUs): "
        f"images/s | p50 ms | p99 ms | float, {c['per_worker']['threads']} thread(s) (one "
        "worker): images/s | p50 ms | p99 ms |"
    )
    if int8:
        head += " int8, all CPUs: images/s | p50 ms | p99 ms | int8, one worker: images/s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for b in BATCH_SIZES:
        sessions = [c["all_cpus"][b], c["per_worker"][b]]
        if int8:
            sessions += [int8["ceiling"]["all_cpus"][b], int8["ceiling"]["per_worker"][b]]
        cells = [f"{x['images_per_s']} | {x['p50_ms']} | {x['p99_ms']}" for x in sessions]
        if int8:
            cells[-1] = str(sessions[-1]["images_per_s"])
        lines.append(f"| {b} | {' | '.join(cells)} |")
    lines.append("")
    lines.append(
        f"Ceiling (the all-CPU session's best): {c['images_per_s']} images/s at batch "
        f"{c['best_batch']}; the windows between rows run it at that batch."
    )
    if int8:
        ratio = int8["ratio_to_float"]
        lines.append(
            f"int8 ({int8['weights']}): {int8['ceiling']['images_per_s']} images/s at batch "
            f"{int8['ceiling']['best_batch']}; int8/float **{ratio['median']:.2f}x** "
            f"({ratio['min']:.2f}-{ratio['max']:.2f}), from {ratio['n']} int8 windows each "
            "between two float windows."
        )
    elif r.get("int8_refused"):  # quantized here, and its own gate refused it
        lines.append(f"No int8 rows: {r['int8_refused']}")
    return [*lines, ""]


def drift_table(windows: list[dict]) -> list[str]:
    """Every set of ceiling windows: how far the machine moved while the rows ran."""
    lines = [
        "Ceiling windows (the all-CPU session between rows, while the server idled): how "
        "the machine's speed moved over the run.",
        "",
        "| windows between | file | batch | windows | median images/s | min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {w['label']} | {w['file']} | {w['batch']} | {w['count']} | {cell(w['median'])} "
        f"| {cell(w['min'])} | {cell(w['max'])} |"
        for w in windows
    ]
    return [*lines, ""]


CLOSED_HEAD = [
    "| server | request | clients | images/request | runs | answered req/s | images/s "
    "| of ceiling | p50 ms | p95 ms | p99 ms | shed (503) | refused (4xx) | errors "
    "| CPU ms/request: server | load generator | of min(ceiling, floor) |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def closed_line(label: str, request: str, x: dict) -> str:
    return (
        f"| {label} | {request} | {x['concurrency']} | {x.get('images_per_request', 1)} "
        f"| {x['runs']} | {with_spread(x, 'rps')} | {cell(x.get('images_per_s'))} "
        f"| {with_spread(x, 'share_of_ceiling', as_percent=True)} | {cell(x['p50_ms'])} "
        f"| {cell(x['p95_ms'])} | {with_spread(x, 'p99_ms')} | {x['shed']} | {x['refused']} "
        f"| {x['errors']} | {cell(x.get('server_cpu_ms'))} | {cell(x.get('client_cpu_ms'))} "
        f"| {bound_cell(x)} |"
    )


def bound_cell(x: dict) -> str:
    """A judged one-image row's bound: its share of min(ceiling, floor), and both."""
    if x.get("bound") is None:
        return "-"
    return (f"{percent(x['share_of_bound'])} of {cell(x['bound'])} (ceiling "
            f"{cell(x.get('ceiling'))}, floor {cell(x.get('floor_rps'))})")  # fmt: skip


def closed_table(r: dict) -> list[str]:
    """The service (batching on and off, float and int8), the peers and the naive server."""
    lines = [
        "Closed loop (N clients, one request in flight each); of ceiling: images/s over the "
        "ceiling windows next to each run.",
        "",
        *CLOSED_HEAD,
    ]
    groups = []
    for name, rows in r["service"]["closed"].items():
        kind, batching = name.split(", ")
        groups.append((f"service, {batching}", PATHS[kind], rows))
    if r.get("int8") and r["int8"].get("service"):
        for name, rows in r["int8"]["service"]["closed"].items():
            kind, batching = name.split(", ")
            groups.append((f"service on int8, {batching}", PATHS[kind], rows))
    for name, peer in (r.get("peers") or {}).items():
        groups.append((f"{name} ({peer['settings']})", PATHS["png"], peer["rows"]))
    groups.append(("naive Keras", PATHS["png"], r["naive"]))
    for label, request, rows in groups:
        lines += [closed_line(label, request, x) for x in rows]
    return [*lines, ""]


def images_table(r: dict) -> list[str]:
    """/v2 binary with many images a request, float and int8: images/s against the ceiling
    next to each run (the int8 rows against the int8 ceiling)."""
    groups = [("service, batching on", r["service"]["images"])]
    if r.get("int8") and r["int8"].get("service"):
        groups.append(("service on int8, batching on", r["int8"]["service"]["images"]))
    lines = [
        "Many images a request (/v2 binary): clients enough for 64 images in flight, and two "
        "requests a worker at least; of ceiling: images/s over the (float or int8) ceiling "
        "windows next to each run.",
        "",
        *CLOSED_HEAD,
    ]
    for label, rows in groups:
        lines += [closed_line(label, PATHS["v2"], x) for x in rows]
    return [*lines, ""]


def open_table(paths: dict) -> list[str]:
    lines = [
        "Open loop (Poisson arrivals at a share of the path's 64-client capacity above; "
        "latency from the scheduled arrival), batching on. Goodput: answered req/s; of "
        "capacity: its share of the ceiling next to it over the capacity's share of its "
        "own (what goodput / capacity, raw, would be if the machine held still). 503 ms: how "
        "fast the refusals came back. Generator: the load generator's CPU over the run, as a "
        "share of all the CPUs (it runs on the same ones as the server).",
        "",
        "| request | offered | offered req/s | runs | sent | goodput req/s | of capacity "
        "| of capacity, raw | p50 ms | p99 ms | shed (503) | 503 p50 ms | 503 p99 ms "
        "| 503 without Retry-After | refused (4xx) | errors | unsent | generator CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, rows in paths.items():
        lines += [
            f"| {PATHS[kind]} | {x['load']:.0%} | {x['rate']} | {x['runs']} | {x['sent']} "
            f"| {with_spread(x, 'rps')} | {with_spread(x, 'goodput_of_capacity', True)} "
            f"| {percent(x['goodput_of_capacity_raw'])} | {cell(x['p50_ms'])} "
            f"| {with_spread(x, 'p99_ms')} | {x['shed']} "
            f"| {cell(x['shed_p50_ms'])} | {with_spread(x, 'shed_p99_ms')} "
            f"| {x['shed_without_retry_after']} | {x['refused']} | {x['errors']} "
            f"| {x['unsent']} | {percent(x.get('client_cpu_share'))} |"
            for x in rows
        ]
    return [*lines, "", "![latency-throughput curve](published/latency-curve.png)", ""]


def headline_lines(r: dict) -> list[str]:
    h = r["at_64_clients"]
    v2, png, rpc = h["v2"], h["png"], h.get("grpc")

    def share(x: dict) -> str:
        low, high = x["share_spread"] or (None, None)
        spread = f", {percent(low)}-{percent(high)} over {x['runs']} runs" if x["runs"] > 1 else ""
        return f"{percent(x['share_of_ceiling'])} of the ceiling next to it{spread}"

    sentence = (
        f"At 64 clients: binary tensors through /v2 {v2['rps']} req/s ({share(v2)}, p99 "
        f"{v2['p99_ms']} ms, {v2['failed']} not answered 200); PNG through /predict "
        f"{png['rps']} req/s ({share(png)}, p99 {png['p99_ms']} ms, {png['failed']} not "
        f"answered 200), {png['over_naive']}x the naive server with as many workers"
    )
    if rpc:
        sentence += (
            f"; raw tensors over gRPC {rpc['rps']} req/s ({share(rpc)}, p99 {rpc['p99_ms']} "
            f"ms, {rpc['failed']} not answered OK)"
        )
    if files := h.get("v2-bytes"):
        sentence += (
            f"; PNG as /v2 BYTES {files['rps']} req/s ({share(files)}, p99 "
            f"{files['p99_ms']} ms, {files['failed']} not answered 200)"
        )
    if h.get("peers_rps"):
        sentence += "; peers (PNG): " + ", ".join(
            f"{name} {rps} req/s" for name, rps in h["peers_rps"].items()
        )
    lines = ["", sentence + ".", ""]
    if v2.get("cpu_bound_share") and png.get("cpu_bound_share"):
        lines += [
            f"CPU per answered request at 64 clients (medians): /v2 {v2['server_cpu_ms']} ms "
            f"in the server + {v2['client_cpu_ms']} ms in the load generator, /predict "
            f"{png['server_cpu_ms']} + {png['client_cpu_ms']} ms, against "
            f"{v2['ceiling_cpu_ms_per_image']} ms per image at the ceiling next to them: "
            f"sharing the CPUs, the share of the ceiling is bound by "
            f"{v2['cpu_bound_share']:.0%} (/v2) and {png['cpu_bound_share']:.0%} (/predict) "
            "at these costs per request.",
            "",
        ]
    return lines
