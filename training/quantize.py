"""The int8 twin of an exported float32 file, for CPUs (training/twins.py has what it
shares with the float16 one, training/float16.py).

It starts from what `python -m training export` wrote (`models/<id>.onnx`, uint8 images
in, its own preprocessing, a model card) and writes `<id>-int8.onnx` beside it, so the
service serves the twin next to the float model and a client picks one by name.

int8 (`quantize_int8`, and `export_int8` which gates it): static quantization with
onnxruntime's own tools. `quant_pre_process` optimises the graph and infers its shapes,
`quantize_static` runs it on calibration images to learn each activation's range and
writes QuantizeLinear/DequantizeLinear pairs around the layers that become int8
(onnxruntime's CPU provider fuses them into integer kernels when it loads the file).
What is quantized and how (INT8) was chosen by measurement on a model trained on real
photos (README, "int8 and float16"). Nodes stay float where int8 would change the
answer or gains nothing:
  - the familiarity head (its score, ranked against the validation images' scores): a
    rank, which rounding moves; it is a few small matmuls and the pixel statistics of the
    uint8 input beside the network (logarithms of spreads near 0, differences of a grey
    level: int8 would erase them). Kept by its names (familiarity.PREFIX) as well as by
    being off the probabilities' path: the graph optimisation before quantization may
    merge its Cast of the input with the network's;
  - the softmax: a uint8 probability is a step of 1/256, which ties near-equal classes
    and changes the top-1 class that the service answers;
  - the last two dense layers: the one that computes the features (the familiarity
    head whitens them, which magnifies int8 steps into rank changes: measured 0.087 mean
    shift of familiarity with it int8, 0.008 float) and the classifier (it decides
    between near-equal classes); together under 2 % of the compute.
`export_int8` writes the file only if its top-1 accuracy on the test split is within
ACCURACY_DROP_LIMIT of the float model's (onnxruntime on both, same images); it states
that accuracy and the top-1 agreement with the float model in the card. Calibration
reads training images only: the test split is what the promise is measured on.
"""

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from contract.classifier import content_version
from contract.modelcard import (
    FAMILIARITY_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    ModelCard,
)
from contract.selfcheck import SelfCheck, Tolerance
from training import familiarity, proof
from training.data import Cifar100
from training.twins import (
    Twin,
    ancestors,
    card_of,
    check_same_signature,
    export_twin,
    float_self_check,
    name_nodes,
    set_card,
    twin_card,
    write_twin,
)

# The int8 file's promise: top-1 accuracy at most this much below the float model's
# (absolute: 0.01 is one percentage point), measured on the test split.
ACCURACY_DROP_LIMIT = 0.01
CALIBRATION_IMAGES = 1000  # a seeded sample of the training split (see calibration_sample)
CALIBRATION_SEED = 0
CALIBRATION_BATCH = 100
# The familiarity output (a share in [0, 1]) is computed from the features, and the
# service refuses images below a floor on it when asked to. Mean shift on the test split,
# measured with the features layer float: 0.008 (large model, real photos), 0.014 (small
# model, real photos), 0.025 (the tests' small model, synthetic images); with it int8 as
# well, 0.087 on the large model, which this refuses.
INT8_MAX_FAMILIARITY_DIFF = 0.05  # mean over the test split
WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")  # the layers that carry the compute
KEPT_FLOAT = {
    "off_path": "computes the familiarity output only (its score ranked against the "
    "validation images' scores): a rank, which int8 rounding moves; cheap in float",
    "softmax": "the probabilities: uint8 steps of 1/256 would tie near-equal classes and "
    "change the top-1 class",
    "tail": "the last dense layers: the features layer (int8 steps in the features move the "
    "familiarity score, whose whitening magnifies them) and the classifier (it decides between "
    "near-equal classes); under 2 % of the compute",
}


@dataclasses.dataclass(frozen=True)
class Int8Scheme:
    """How the float graph becomes int8. INT8 below is the measured choice, on a model
    trained on real photos (README, "int8 and float16"), against the alternatives:
      - calibration: Entropy kept the MinMax ranges (same file); Percentile (99.999)
        clipped activations and moved the features by 12 to 23 % of their range;
      - weights: uint8 weights ran at about 1.2x the float model (onnxruntime's fast x86
        kernels multiply u8 activations by s8 weights), int8 at 2.5 to 3x;
      - per channel or per tensor, QDQ or QOperator: the same accuracy and speed within
        the noise; per channel is the safer for weights whose channels differ in scale,
        and QDQ is the format onnxruntime recommends (it fuses the pairs itself);
      - float_layers 2: see the module's docstring (familiarity).
    """

    calibration: str = "MinMax"  # MinMax, Entropy or Percentile (onnxruntime's methods)
    per_channel: bool = True  # weight scales per output channel, else one per tensor
    quant_format: str = "QDQ"  # QDQ (Quantize/DequantizeLinear pairs) or QOperator
    weights: str = "int8"  # int8 or uint8
    activations: str = "uint8"  # uint8: onnxruntime's x86 kernels are u8 x s8
    float_layers: int = 2  # the last weighted layers on the probabilities' path kept float
    float_softmax: bool = True
    percentile: float = 99.999  # Percentile calibration only
    # 7-bit weights (and activations' ranges as usual). onnxruntime's x86 int8 kernels
    # without VNNI (AVX2, AVX-512 without VNNI) multiply u8 by s8 with VPMADDUBSW, which
    # adds two products into a saturating int16: 255 * 127 * 2 overflows it, 255 * 63 * 2
    # does not. VNNI and AMX accumulate in int32 and never saturate, so with 7-bit weights
    # every x86 CPU computes the same integers. The file is served on whatever CPU a user
    # has, not the one it was made on: measured on an AVX2 CPU, 8-bit weights moved
    # familiarity far past the gate (README, "int8 and float16").
    reduce_range: bool = True

    def __post_init__(self) -> None:
        if self.calibration not in ("MinMax", "Entropy", "Percentile"):
            raise ValueError(f"unknown calibration method {self.calibration!r}")
        if self.quant_format not in ("QDQ", "QOperator"):
            raise ValueError(f"unknown quantization format {self.quant_format!r}")
        if {self.weights, self.activations} - {"int8", "uint8"}:
            raise ValueError("weights and activations are int8 or uint8")
        if self.float_layers < 0:
            raise ValueError("float_layers cannot be negative")

    def describe(self) -> dict:
        """What the card says about it."""
        return {
            "format": self.quant_format,
            "activations": f"{self.activations}, one scale per tensor",
            "weights": f"{self.weights}, symmetric, "
            + ("one scale per output channel" if self.per_channel else "one scale per tensor")
            + (
                ", 7-bit range (no int16 saturation on CPUs without VNNI)"
                if self.reduce_range
                else ", full 8-bit range"
            ),
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
        }


INT8 = Int8Scheme()


# int8: the speed-only conversion (what the benchmark calls) and the gated export.


def int8_model_id(model_id: str) -> str:
    return f"{model_id}-int8"


def quantize_int8(source: Path, target: Path, calibration_images: np.ndarray) -> None:
    """Write `target`: the int8 twin of the exported float file `source`, calibrated on
    `calibration_images` (uint8 [N, 32, 32, 3]). For speed only: its accuracy is not
    measured, and the card says so (no evaluation). Its self-check still holds it to the
    float file's references: top-1 agreement as it showed on them, familiarity as the gate
    asks. `export_int8` is the gated version of this."""
    content = Path(source).read_bytes()
    float_check = float_self_check(content)
    proto = quantized_int8(
        content,
        calibration_images,
        calibration_note="given by the caller; accuracy not measured (speed only)",
    )
    got = proof.run(proto, float_check.images)[OUTPUT_NAME].argmax(1)
    shown = int((got != float_check.expected[OUTPUT_NAME].argmax(1)).sum())
    check = int8_self_check(content, float_check, shown, len(got))
    write_twin(proto, card_of(proto), None, Path(target), [],
               "the int8 model does not keep to the float model", check)  # fmt: skip


def export_int8(source: Path, target: Path, data: Cifar100) -> ModelCard:
    """Quantize `source`, calibrated on training images, and write `target` only if its
    top-1 accuracy on the test split is at most ACCURACY_DROP_LIMIT below the float
    model's, its familiarity moved at most INT8_MAX_FAMILIARITY_DIFF, and it keeps its
    self-check here; else ExportError and no file. Returns the card written."""
    return export_twin(source, target, data, INT8_TWIN)


def calibrated_int8(content: bytes, data: Cifar100) -> onnx.ModelProto:
    """The int8 graph of `content`, calibrated on a seeded sample of the training split."""
    calibration = calibration_sample(data.train.images)
    return quantized_int8(
        content,
        calibration,
        calibration_note=f"training split: {len(calibration)} of its {len(data.train)} images, "
        f"drawn at random with seed {CALIBRATION_SEED}",
    )


def summary(card: ModelCard, comparison: dict) -> str:
    moved = comparison.get(f"{FAMILIARITY_NAME}_mean_abs_difference")
    return (
        f"{card.model_id} on {comparison['images']} test images: top-1 "
        f"{comparison['top1_accuracy']:.4f} (float32 {comparison['float32_top1_accuracy']:.4f}, "
        f"limit -{comparison['limits']['top1_accuracy_drop']:g}), top-1 agreement with float32 "
        f"{comparison['top1_agreement']:.4f}"
        + ("" if moved is None else f", familiarity moved by {moved:.4f} on average")
    )


def measured_self_check(source: bytes, float_check: SelfCheck, comparison: dict) -> SelfCheck:
    """`int8_self_check` at the disagreement rate the gate measured on the test split."""
    disagreements = round((1 - comparison["top1_agreement"]) * comparison["images"])
    return int8_self_check(source, float_check, disagreements, comparison["images"])


def int8_self_check(
    source: bytes, float_check: SelfCheck, disagreements: int, images: int
) -> SelfCheck:
    """The int8 file's promise on the float file's reference images, wherever it loads:
    familiarity within the gate's mean difference, and no more top-1 disagreements with
    the float model than a file disagreeing at the rate measured (`disagreements` of
    `images`, its 99.9 % upper bound) shows but once in a million."""
    references = len(float_check.images)
    rate = proof.upper_rate(disagreements, images)
    tolerances = [
        Tolerance(
            OUTPUT_NAME, "top1_disagreements", proof.disagreement_bound(references, rate),
            f"top-1 agreement with the float model measured on {images} images "
            f"({images - disagreements} agreed)",
        ),
    ]  # fmt: skip
    if FAMILIARITY_NAME in float_check.expected:
        tolerances.append(Tolerance(FAMILIARITY_NAME, "mean_abs", INT8_MAX_FAMILIARITY_DIFF,
                                    "the int8 gate's limit"))  # fmt: skip
    return proof.twin_check(float_check, content_version(source), tolerances)


def int8_problems(comparison: dict) -> list[str]:
    """What breaks the int8 file's promise (`comparison`'s limits), in words."""
    limits = comparison["limits"]
    problems = []
    accuracy, reference = comparison["top1_accuracy"], comparison["float32_top1_accuracy"]
    # In whole images, not float shares: 0.51 - 0.50 is 0.010000000000000009, which a
    # float comparison would refuse as more than a 0.01 drop.
    images = comparison["images"]
    dropped = round(reference * images) - round(accuracy * images)
    if not dropped <= limits["top1_accuracy_drop"] * images + 1e-9:
        problems.append(
            f"its top-1 accuracy on the test split is {accuracy:.4f}, {reference - accuracy:.4f} "
            f"below the float model's {reference:.4f}: more than the "
            f"{limits['top1_accuracy_drop']:g} it may lose"
        )
    key = f"{FAMILIARITY_NAME}_mean_abs_difference"
    if key in comparison and not comparison[key] <= limits[key]:
        problems.append(
            f"its familiarity output moved by {comparison[key]:.4f} on average (at most "
            f"{limits[key]:g}): the features it is computed from lost too much"
        )
    return problems


def calibration_sample(
    images: np.ndarray, count: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED
) -> np.ndarray:
    """`count` of `images` (all of them if fewer), drawn at random with a fixed seed: the
    same file every time from the same data, and every class in proportion."""
    if len(images) <= count:
        return images
    index = np.sort(np.random.default_rng(seed).choice(len(images), count, replace=False))
    return images[index]


class CalibrationImages(CalibrationDataReader):
    """What quantize_static reads: the images as the graph's input, a batch at a time."""

    def __init__(self, images: np.ndarray, batch_size: int = CALIBRATION_BATCH):
        if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3) or not len(images):
            raise ValueError(f"expected uint8 [N, 32, 32, 3] images, got {images.dtype} "
                             f"{images.shape}")  # fmt: skip
        self.batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position == len(self.batches):
            return None
        self.position += 1
        return {INPUT_NAME: self.batches[self.position - 1]}

    def __len__(self) -> int:
        return len(self.batches)


def quantized_int8(
    source: bytes,
    calibration_images: np.ndarray,
    scheme: Int8Scheme = INT8,
    *,
    calibration_note: str,
    calibration_cache: Path | None = None,
) -> onnx.ModelProto:
    """The int8 graph of the float file `source` (its bytes), with its card: the model id
    `<id>-int8`, how it was quantized and from which file, and no evaluation yet.
    `calibration_cache` (a JSON file) keeps the ranges across calls with the same
    calibration method: the measurement of the schemes, not the export, uses it."""
    float_proto = onnx.load_from_string(source)
    card = card_of(float_proto)
    name_nodes(float_proto)
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        folder = Path(tmp)
        onnx.save(float_proto, folder / "float.onnx")
        # Shape inference and onnxruntime's basic graph optimisations (constant folding,
        # fusions), as the quantization tools ask. Symbolic shape inference is for
        # transformers' dynamic shapes (and needs sympy): every shape here is known.
        quant_pre_process(folder / "float.onnx", folder / "prepared.onnx", skip_symbolic_shape=True)
        prepared = onnx.load(folder / "prepared.onnx")
        kept_float = float_nodes(prepared.graph, scheme)
        quantize_static(
            folder / "prepared.onnx",
            folder / "int8.onnx",
            CalibrationImages(calibration_images),
            quant_format=getattr(QuantFormat, scheme.quant_format),
            per_channel=scheme.per_channel,
            reduce_range=scheme.reduce_range,
            activation_type=_QUANT_TYPES[scheme.activations],
            weight_type=_QUANT_TYPES[scheme.weights],
            nodes_to_exclude=list(kept_float),
            calibrate_method=getattr(CalibrationMethod, scheme.calibration),
            extra_options={"CalibPercentile": scheme.percentile},
            calibration_cache_path=calibration_cache,
        )
        proto = onnx.load(folder / "int8.onnx")
    check_same_signature(float_proto, proto)
    calibration = {"method": scheme.calibration, "images": len(calibration_images)}
    if scheme.calibration == "Percentile":
        calibration["percentile"] = scheme.percentile
    quantization = {
        "tool": f"onnxruntime {ort.__version__}: quant_pre_process, quantize_static",
        **scheme.describe(),
        "calibration": {**calibration, "source": calibration_note},
        "kept_float": kept_float_card(prepared.graph, kept_float),
    }
    twin = twin_card(card, int8_model_id(card.model_id), "int8", source, quantization=quantization)
    set_card(proto, twin)
    return proto


_QUANT_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}


def float_nodes(graph: onnx.GraphProto, scheme: Int8Scheme) -> dict[str, str]:
    """The nodes that stay float, each with its reason (a KEPT_FLOAT key)."""
    on_path = ancestors(graph, [OUTPUT_NAME])
    kept = {
        node.name: "off_path"
        for node in graph.node
        if node.name not in on_path or node.name.startswith(familiarity.PREFIX)
    }
    path = [node for node in graph.node if node.name in on_path]  # graph order: topological
    if scheme.float_softmax:
        kept.update({node.name: "softmax" for node in path if node.op_type == "Softmax"})
    weighted = [i for i, node in enumerate(path) if node.op_type in WEIGHTED_OPS]
    if scheme.float_layers:
        start = weighted[-min(scheme.float_layers, len(weighted))]
        kept.update({node.name: "tail" for node in path[start:] if node.name not in kept})
    return kept


def kept_float_card(graph: onnx.GraphProto, kept: dict[str, str]) -> list[dict]:
    """The card's list: which nodes stayed float and why, grouped by reason."""
    ops = {node.name: node.op_type for node in graph.node}
    return [
        {"why": why, "nodes": [f"{name} ({ops[name]})" for name in kept if kept[name] == reason]}
        for reason, why in KEPT_FLOAT.items()
        if reason in kept.values()
    ]


LIMITS = {
    "top1_accuracy_drop": ACCURACY_DROP_LIMIT,
    f"{FAMILIARITY_NAME}_mean_abs_difference": INT8_MAX_FAMILIARITY_DIFF,
}
INT8_TWIN = Twin(
    convert=calibrated_int8,
    limits=LIMITS,
    problems=lambda comparison: int8_problems(comparison),
    self_check=measured_self_check,
    summary=summary,
    broken="the int8 model does not keep to the float model",
)
