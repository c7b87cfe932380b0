"""An exported file's proof of itself: reference images, the outputs they must give, and
how far each output may move, carried in the file and checked wherever it loads.

A number measured on one machine is a fact about that machine. The export measures its
file on the CPU it ran on, but the file is served on whatever CPU or GPU a user has,
where onnxruntime takes other kernels (AVX2, AVX-512, VNNI, AMX, CUDA). So the export
stores a few dozen real test images in the file (metadata key `self_check`) with the
outputs it promises for them, and the service runs them through the session it has just
built, on its provider and this CPU, before the file is served (`Classifier.warm_up`).
A file that disagrees beyond its tolerance is refused with the output, the worst
difference and the tolerance. The export runs the same check on what it writes.

What each file promises (training/proof.py writes it):
  - the float32 export: what onnxruntime computed at export, to the parity tolerances
    the export held it to against Keras; and, where the export measured it, a promise
    for each other precision an engine may compute it in (`precisions`: bfloat16), to
    the limits that measurement was held to;
  - a twin (int8, float16): the float32 file's outputs for the same images, to the
    tolerances of the twin's own gate.
Wherever the file loads, the loader runs the references through the engine and precision
that will serve it and holds them to that precision's promise (contract/classifier.py).

This module is NumPy only, like contract/modelcard.py: the training side writes the same
structure that the service reads.
"""

import base64
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contract.modelcard import IMAGE_SIZE

METADATA_KEY = "self_check"
FORMAT_VERSION = 1

# How an output may differ from its reference, over the reference images:
#   max_abs             the largest |got - expected|
#   max_relative        the largest |got - expected| over max(1, the largest |expected|):
#                       for unbounded activations such as the features
#   mean_abs            the mean |got - expected|: a promise on average (int8)
#   top1_disagreements  how many images' top-1 class differs (probabilities only)
#   outside_bounds      how many values lie outside per-value [low, high] bounds stored
#                       with the reference: for a rank, which rounding moves by a whole
#                       step where another value lies within the rounding band
KINDS = ("max_abs", "max_relative", "mean_abs", "top1_disagreements", "outside_bounds")


@dataclass(frozen=True)
class Tolerance:
    output: str
    kind: str
    limit: float
    why: str = ""  # where the number comes from, for the card and the error

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown tolerance kind {self.kind!r} (one of {', '.join(KINDS)})")
        if not (isinstance(self.limit, int | float) and math.isfinite(self.limit)):
            raise ValueError(f"tolerance of {self.output} must be a finite number")

    def measure(
        self,
        got: np.ndarray,
        expected: np.ndarray,
        bounds: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> float:
        """How far `got` is from `expected` (or from `bounds`, for outside_bounds), in
        this tolerance's terms (NaN counts as infinitely far, or outside)."""
        got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
        if self.kind == "outside_bounds":
            if bounds is None:
                raise ValueError(f"no bounds stored for {self.output}")
            low, high = bounds
            return float((~((low <= got) & (got <= high))).sum())
        if self.kind == "top1_disagreements":
            return float((got.argmax(axis=1) != expected.argmax(axis=1)).sum())
        difference = np.abs(got - expected)
        difference[~np.isfinite(difference)] = np.inf
        if self.kind == "mean_abs":
            return float(difference.mean())
        worst = float(difference.max())
        if self.kind == "max_relative":
            return worst / max(1.0, float(np.abs(expected).max()))
        return worst


@dataclass(frozen=True)
class Promise:
    """What a file promises when an engine computes it in another precision than its own
    (a float32 file in bfloat16): its tolerances against the same references, and how
    the export measured the limits (engine, CPU, images, what it found)."""

    tolerances: list[Tolerance]
    measured: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tolerances:
            raise ValueError("a precision's promise without tolerances would promise nothing")


@dataclass(frozen=True)
class SelfCheck:
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    expected: dict[str, np.ndarray]  # output name -> [N, ...]
    tolerances: list[Tolerance]
    # Where `expected` was computed (file, runtime, provider, CPU), and where this file
    # was checked against it before it was written: facts about those machines.
    source: dict[str, Any] = field(default_factory=dict)
    verified_on: list[dict[str, Any]] = field(default_factory=list)
    # output name -> (low, high), each shaped like its expected values (outside_bounds)
    bounds: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # precision -> its promise, for the precisions the file may be computed in besides its
    # own (whose promise is `tolerances`)
    precisions: dict[str, Promise] = field(default_factory=dict)

    def __post_init__(self) -> None:
        images = self.images
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (
            IMAGE_SIZE, IMAGE_SIZE, 3,
        ) or not len(images):  # fmt: skip
            raise ValueError(f"reference images must be uint8 [N, 32, 32, 3], got "
                             f"{images.dtype} {images.shape}")  # fmt: skip
        for name, values in self.expected.items():
            if len(values) != len(images):
                raise ValueError(f"{len(values)} expected {name} for {len(images)} images")
        for name, (low, high) in self.bounds.items():
            if name not in self.expected or not (
                low.shape == high.shape == self.expected[name].shape
            ):
                raise ValueError(f"bounds for {name} do not match its reference")
        every = [*self.tolerances, *(t for p in self.precisions.values() for t in p.tolerances)]
        for tolerance in every:
            if tolerance.output not in self.expected:
                raise ValueError(f"a tolerance for {tolerance.output}, which has no reference")
            if tolerance.kind == "outside_bounds" and tolerance.output not in self.bounds:
                raise ValueError(f"no bounds stored for {tolerance.output}")
        if not self.tolerances:
            raise ValueError("no tolerances: it would promise nothing")

    @property
    def outputs(self) -> list[str]:
        """The outputs the check runs, in a stable order."""
        return sorted({t.output for t in self.tolerances})

    def failures(
        self, got: dict[str, np.ndarray], tolerances: list[Tolerance] | None = None
    ) -> list[str]:
        """Each broken promise, in words (output, the worst difference, the tolerance);
        empty when every output is within its tolerance. `tolerances`: a precision's
        promise (`precisions[...].tolerances`); by default the file's own."""
        problems = []
        for tolerance in self.tolerances if tolerances is None else tolerances:
            values = got.get(tolerance.output)
            expected = self.expected[tolerance.output]
            if values is None:
                problems.append(f"it has no output {tolerance.output}, which it promises")
                continue
            if np.shape(values) != expected.shape:
                problems.append(f"{tolerance.output} has shape {np.shape(values)}, its "
                                f"reference {expected.shape}")  # fmt: skip
                continue
            measured = tolerance.measure(values, expected, self.bounds.get(tolerance.output))
            if not measured <= tolerance.limit:
                problems.append(
                    _sentence(tolerance, measured, len(self.images))
                    + f", at most {_number(tolerance.limit)}"
                    + (f" ({tolerance.why})" if tolerance.why else "")
                )
        return problems

    def run(
        self,
        model: Callable[[np.ndarray], dict[str, np.ndarray]],
        tolerances: list[Tolerance] | None = None,
    ) -> list[str]:
        """Run the reference images through `model` (images -> outputs by name) and
        return `failures` against `tolerances` (by default the file's own)."""
        return self.failures(model(self.images), tolerances)

    def to_metadata(self) -> str:
        return json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "images": _encode(self.images),
                "expected": {name: _encode(values) for name, values in self.expected.items()},
                "tolerances": [vars(t) for t in self.tolerances],
                "source": self.source,
                "verified_on": self.verified_on,
                "bounds": {
                    name: [_encode(low), _encode(high)] for name, (low, high) in self.bounds.items()
                },
                "precisions": {
                    name: {"tolerances": [vars(t) for t in p.tolerances], "measured": p.measured}
                    for name, p in self.precisions.items()
                },
            }
        )

    @classmethod
    def from_metadata(cls, text: str) -> "SelfCheck":
        """Read it back; ValueError with a readable reason for anything malformed."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"unknown format {data.get('format_version')!r}"
                                 if isinstance(data, dict) else "not an object")  # fmt: skip
            return cls(
                images=_decode(data["images"]),
                expected={str(k): _decode(v) for k, v in data["expected"].items()},
                tolerances=[Tolerance(**t) for t in data["tolerances"]],
                source=dict(data.get("source") or {}),
                verified_on=list(data.get("verified_on") or []),
                bounds={
                    str(name): (_decode(low), _decode(high))
                    for name, (low, high) in (data.get("bounds") or {}).items()
                },
                precisions={
                    str(name): Promise(
                        tolerances=[Tolerance(**t) for t in promise["tolerances"]],
                        measured=dict(promise.get("measured") or {}),
                    )
                    for name, promise in (data.get("precisions") or {}).items()
                },
            )
        except KeyError as missing:
            raise ValueError(f"its self-check is missing {missing}") from None
        except (TypeError, AttributeError, RecursionError, ValueError) as err:
            raise ValueError(f"its self-check is unreadable: {err}") from None

    def card(self) -> dict[str, Any]:
        """What /models shows of it: no arrays, the promise in words."""
        return {
            "images": len(self.images),
            "tolerances": [vars(t) for t in self.tolerances],
            "source": self.source,
            "verified_on": self.verified_on,
            "precisions": {
                name: {"tolerances": [vars(t) for t in p.tolerances], "measured": p.measured}
                for name, p in self.precisions.items()
            },
        }


def read(metadata: dict[str, str]) -> SelfCheck | None:
    """The self-check in a file's metadata, None when it has none."""
    text = metadata.get(METADATA_KEY)
    return None if text is None else SelfCheck.from_metadata(text)


def _encode(values: np.ndarray) -> dict[str, Any]:
    values = np.ascontiguousarray(values)
    if values.dtype not in (np.uint8, np.float32):
        raise ValueError(f"only uint8 and float32 arrays are stored, not {values.dtype}")
    return {
        "dtype": values.dtype.str,  # byte order included: '<f4', '|u1'
        "shape": list(values.shape),
        "data": base64.b64encode(values.tobytes()).decode("ascii"),
    }


def _decode(stored: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(stored["dtype"])
    if dtype not in (np.dtype("|u1"), np.dtype("<f4")):
        raise ValueError(f"arrays are uint8 or little-endian float32, not {stored['dtype']!r}")
    shape = tuple(int(n) for n in stored["shape"])
    raw = base64.b64decode(stored["data"], validate=True)
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{len(raw)} bytes for an array of shape {shape}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _sentence(tolerance: Tolerance, measured: float, images: int) -> str:
    name, value = tolerance.output, _number(measured)
    return {
        "max_abs": f"{name} differ by up to {value} on {images} reference images",
        "max_relative": f"{name} differ by up to {value} of their largest value on {images} "
        "reference images",
        "mean_abs": f"{name} differ by {value} on average over {images} reference images",
        "top1_disagreements": f"the top-1 class of {name} differs on {value} of {images} "
        "reference images",
        "outside_bounds": f"{name} of {value} of {images} reference images lie outside the "
        "values their reference allows",
    }[tolerance.kind]


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.0f}" if value == int(value) and abs(value) < 1e6 else f"{value:.3g}"
