"""The self-check each exported file carries (contract/selfcheck.py reads and runs it).

The float32 export stores REFERENCE_IMAGES test images, what onnxruntime computes for
them on the exporting machine, and the parity tolerances the export held the file to.
A twin (int8, float16) stores the same images with the float32 file's outputs and the
tolerances of its own gate: wherever it loads, it must still keep to the float model as
its gate measured it did.

Every file is checked here, on onnxruntime's CPU provider, before it is written, by the
same `SelfCheck.run` the service calls at load.
"""

import datetime
import math
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort

from contract import hardware, selfcheck
from contract.modelcard import FAMILIARITY_NAME, FEATURES_NAME, INPUT_NAME, OUTPUT_NAME
from contract.selfcheck import SelfCheck, Tolerance
from training import familiarity
from training.errors import ExportError
from training.scores.base import Inputs

REFERENCE_IMAGES = 64  # ~200 KB of images and outputs in the file; ~20 ms to run on 2 CPUs
REFERENCE_SEED = 0
# A twin's top-1 disagreements with the float model on the references are a binomial
# count; a correct twin exceeds the bound with at most this probability.
FALSE_REFUSAL = 1e-6


def float32_check(
    proto: onnx.ModelProto,
    candidates: np.ndarray,
    fitted: familiarity.Familiarity,
    *,
    probabilities_tolerance: float,
    features_tolerance: float,
) -> SelfCheck:
    """The float32 export's self-check: REFERENCE_IMAGES of `candidates` (test images,
    drawn at random with a fixed seed) with the file's own outputs for them.

    Probabilities and features keep the export's parity tolerances against Keras; the
    same graph on another CPU differs by far less. Familiarity is a rank against the
    validation distances, which rounding moves by a whole 1/V where a validation distance
    lies within the rounding band: each image gets the lowest and highest rank that band
    allows (`familiarity.rank_bounds`, as the export's own parity check), and none may
    leave it."""
    order = np.random.default_rng(REFERENCE_SEED).permutation(len(candidates))
    images = candidates[order[:REFERENCE_IMAGES]]
    outputs = run(proto, images)
    # The score reads the images and the file's own features for them, as the graph does.
    lowest, highest = familiarity.rank_bounds(fitted, Inputs(images, outputs[FEATURES_NAME]))
    bounds = {
        FAMILIARITY_NAME: (
            (lowest - familiarity.MEAN_ATOL).astype(np.float32)[:, None],
            (highest + familiarity.MEAN_ATOL).astype(np.float32)[:, None],
        )
    }
    tolerances = [
        Tolerance(OUTPUT_NAME, "max_abs", probabilities_tolerance,
                  "the export's parity with Keras"),
        Tolerance(FEATURES_NAME, "max_relative", features_tolerance,
                  "the export's parity with Keras"),
        Tolerance(FAMILIARITY_NAME, "outside_bounds", 0,
                  "the ranks float32 rounding of each image's score allows"),
    ]  # fmt: skip
    return SelfCheck(images=images, expected=outputs, tolerances=tolerances,
                     source=where("this file"), bounds=bounds)  # fmt: skip


def twin_check(
    float_check: SelfCheck, float_version: str, tolerances: list[Tolerance]
) -> SelfCheck:
    """A twin's self-check: the float32 file's reference images and outputs, with the
    twin's own `tolerances` against them."""
    return SelfCheck(
        images=float_check.images,
        expected=float_check.expected,
        tolerances=tolerances,
        source={"file": f"the float32 file, version {float_version}", **float_check.source},
    )


def disagreement_bound(images: int, rate: float) -> int:
    """The most top-1 disagreements among `images` references that a file disagreeing with
    the float model at `rate` exceeds with probability at most FALSE_REFUSAL: the smallest
    k with P(Binomial(images, rate) > k) <= FALSE_REFUSAL."""
    for k in range(images + 1):
        if 1 - binomial_cdf(k, images, rate) <= FALSE_REFUSAL:
            return k
    return images


def upper_rate(disagreements: int, images: int, confidence: float = 0.999) -> float:
    """Clopper-Pearson upper bound on a disagreement rate measured as `disagreements` of
    `images`: what the file may have, not merely what it showed. The rate p at which
    seeing at most `disagreements` has probability 1 - confidence (bisection: the
    binomial CDF falls as p grows)."""
    if disagreements >= images:
        return 1.0
    low, high = disagreements / images, 1.0
    for _ in range(100):
        middle = (low + high) / 2
        if binomial_cdf(disagreements, images, middle) > 1 - confidence:
            low = middle
        else:
            high = middle
    return high


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (n in the thousands)."""
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= n else 0.0
    terms = [
        math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
        + j * math.log(p) + (n - j) * math.log1p(-p)
        for j in range(min(k, n) + 1)
    ]  # fmt: skip
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def problems(proto: onnx.ModelProto, check: SelfCheck) -> list[str]:
    """`check` run on `proto` here (onnxruntime's CPU provider): each broken promise."""
    return check.run(lambda images: run(proto, images))


def checked(proto: onnx.ModelProto, check: SelfCheck) -> SelfCheck:
    """ExportError naming each promise `proto` breaks here, else `verified(check)`."""
    if broken := problems(proto, check):
        raise ExportError(
            "the file does not keep its own promise on this machine: " + "; ".join(broken)
        )
    return verified(check)


def verified(check: SelfCheck) -> SelfCheck:
    """`check`, with this machine added to where it was verified."""
    return replace(check, verified_on=[*check.verified_on, where("verified")])


def read(proto: onnx.ModelProto) -> SelfCheck | None:
    try:
        return selfcheck.read({p.key: p.value for p in proto.metadata_props})
    except ValueError as err:
        raise ExportError(str(err)) from None


def attach(proto: onnx.ModelProto, check: SelfCheck) -> None:
    """Store `check` in the file's metadata, replacing any earlier one."""
    kept = [p for p in proto.metadata_props if p.key != selfcheck.METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=selfcheck.METADATA_KEY, value=check.to_metadata())


def run(model: onnx.ModelProto | bytes, images: np.ndarray, batch: int = 256) -> dict:
    """Every output of `model` for `images`, on onnxruntime's CPU provider, in batches."""
    content = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    session = ort.InferenceSession(content, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    parts = [session.run(names, {INPUT_NAME: images[i : i + batch]})
             for i in range(0, len(images), batch)]  # fmt: skip
    return {name: np.concatenate([part[k] for part in parts]) for k, name in enumerate(names)}


def where(what: str) -> dict[str, object]:
    """This machine, runtime and time: where a number was computed or checked."""
    return {
        "what": what,
        **hardware.cpu(),
        "onnxruntime": ort.__version__,
        "provider": "CPUExecutionProvider",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
