"""The targets a run is judged against, each on the median of a row's runs.

Closed loop at 64 clients, one image a request: at least 75 % on /v2 binary, 65 % on
/predict (PNG decoding is its own cost), of the lower of the ceiling measured next to it
and the serving path's floor (bench/bounds.py: the same path serving a model that costs
nothing). Open loop,
at every offered rate: the answered requests' p99 (from the scheduled arrival) at most
100 ms on /v2 and over gRPC, 150 ms on /predict and /v2 BYTES (PNG files); at 120 % and
200 % of capacity, goodput (answered req/s) at least 90 % of the capacity; refusals fast:
every 503 with a Retry-After, and their p99 at most REFUSAL_P99_MS (a number of ours for
"fast"). /v2 binary with 8 and 32 images per request: at least 90 % of the ceiling
measured next to it, in images/s.
"""

# gRPC carries /v2's tensors; /v2 BYTES /predict's PNGs (decoded by the same code).
P99_MS = {"v2": 100.0, "png": 150.0, "grpc": 100.0, "v2-bytes": 150.0}
GOODPUT_LOADS = (1.2, 2.0)
GOODPUT_SHARE = 0.9
REFUSAL_P99_MS = 50.0
MULTI_IMAGE_SHARE = 0.9
CLOSED_SHARE = {"v2": 0.75, "png": 0.65}  # of the ceiling, at 64 clients


def judge_closed(kind: str, label: str, r: dict) -> dict:
    """The 64-client closed-loop row's verdict: its share of the lower of the adjacent
    ceiling and the path's floor (bench/bounds.py `bounded`)."""
    share = r.get("share_of_bound")
    bound = CLOSED_SHARE[kind]
    return verdict(f"images/s >= {bound:.0%} of min(ceiling, floor)", f"{label}, "
                   f"{r['concurrency']} clients", share, share is not None and share >= bound,
                   r)  # fmt: skip


def verdict(target: str, row: str, value: float | None, met: bool | None, r: dict,
            key: str | None = None) -> dict:  # fmt: skip
    """One judged target: `met` None where it does not apply (no 503s to judge)."""
    return {
        "target": target,
        "row": row,
        "value": value,
        "spread": (r.get("spread") or {}).get(key) if key else None,
        "runs": r["runs"],
        "met": met,
    }


def judge_open(kind: str, label: str, r: dict) -> list[dict]:
    """An open-loop row's verdicts: p99 of the answered, goodput (at 120 and 200 %),
    refusals."""
    row = f"{label}, open loop at {r['load']:.0%}"
    bound = P99_MS[kind]
    p99 = r.get("p99_ms")
    verdicts = [
        verdict(f"answered p99 <= {bound:g} ms", row, p99, p99 is not None and p99 <= bound,
                r, "p99_ms"),
    ]  # fmt: skip
    if any(abs(r["load"] - load) < 1e-9 for load in GOODPUT_LOADS):
        share = r.get("goodput_of_capacity")
        verdicts.append(
            verdict(f"goodput >= {GOODPUT_SHARE:.0%} of capacity", row, share,
                    share is not None and share >= GOODPUT_SHARE, r, "goodput_of_capacity")
        )  # fmt: skip
    if r["shed"]:
        shed_p99 = r.get("shed_p99_ms")
        fast = shed_p99 is not None and shed_p99 <= REFUSAL_P99_MS
        verdicts.append(
            verdict(f"503s with Retry-After, p99 <= {REFUSAL_P99_MS:g} ms", row, shed_p99,
                    fast and r["shed_without_retry_after"] == 0, r, "shed_p99_ms")
        )  # fmt: skip
    return verdicts


def judge_images(label: str, r: dict) -> dict:
    """A many-images-per-request row's verdict: images/s against the adjacent ceiling."""
    share = r.get("share_of_ceiling")
    return verdict(
        f"images/s >= {MULTI_IMAGE_SHARE:.0%} of the ceiling",
        f"{label}, {r['images_per_request']} images x {r['concurrency']} clients",
        share,
        share is not None and share >= MULTI_IMAGE_SHARE,
        r,
        "share_of_ceiling",
    )


def met_line(verdicts: list[dict]) -> str:
    """'N of M targets met' over those that apply."""
    judged = [v for v in verdicts if v["met"] is not None]
    met = sum(v["met"] for v in judged)
    return f"{met} of {len(judged)} targets met"
