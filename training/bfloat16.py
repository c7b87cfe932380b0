"""The bfloat16 promise of an exported float32 file: how far its outputs may move when an
engine computes it in bfloat16 (OpenVINO on CPUs with AMX or AVX-512 BF16), measured at
export and checked wherever the file is served that way (contract/classifier.py).

bfloat16 keeps float32's range with an 8-bit significand. OpenVINO's CPU plugin, asked
for bfloat16, rounds the inputs of every convolution and matrix product (weights and
activations) to it and accumulates in float32. The export measures what that does to this
file on the test split with an emulation that performs exactly that rounding inside
onnxruntime (`emulated`), so the measurement and the promise are the same on whatever CPU
the file is exported; where the exporting CPU computes bfloat16 itself, the reference
images also go through OpenVINO in bfloat16 and must keep the promise there.

The familiarity head is no exception: a score's matrix products are rounded like the
network's (with the pixel score, the whitening of the image statistics, whose inputs are
already float32 statistics, not pixels). Its elementwise arithmetic (the statistics'
differences, means and logarithms) stays float32 in the emulation, as in the rest of the
graph; what OpenVINO does with those is what the run on a bfloat16 CPU checks.

The limits were decided by measurement on models trained on real photos (docs/engines.md,
"The bfloat16 promise", has the table): top-1 agreement 98.3 to 99.4 %, probabilities
moved by at most 0.011, features by 0.5 % of their largest value, familiarity by 0.004 to
0.026 on average; the limits allow several times that, familiarity the least, since
whitening the features magnifies their rounding. A file outside them is still written,
without the promise: it is then never served in bfloat16.
"""

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contract.engines import Way, open_engine, openvino_has
from contract.modelcard import FAMILIARITY_NAME, FEATURES_NAME, OUTPUT_NAME, ModelCard
from contract.selfcheck import Promise, SelfCheck, Tolerance
from training import proof
from training.twins import compare_outputs

BFLOAT16_MIN_AGREEMENT = 0.97  # top-1 agreement with the float32 file
BFLOAT16_MAX_ABS_DIFF = 0.05  # probabilities
BFLOAT16_MAX_FEATURES_DIFF = 0.025  # features, relative to their largest value
BFLOAT16_MAX_FAMILIARITY_DIFF = 0.05  # mean over the images
ROUNDED_OPS = ("Conv", "MatMul", "Gemm")  # what OpenVINO computes in bfloat16


def with_promise(
    proto: onnx.ModelProto, check: SelfCheck, images: np.ndarray, labels: np.ndarray
) -> SelfCheck:
    """`check` with a bfloat16 promise when the file keeps the limits in bfloat16 on
    `images` (the test split, `labels` its classes); else `check` as it is, and why not
    printed."""
    card = ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
    reference = proof.run(proto, images)
    comparison = compare_outputs(proof.run(emulated(proto), images), reference, labels, card)
    measured = {
        "method": "every convolution and matrix product's inputs (weights and activations) "
        "rounded to bfloat16, float32 accumulation (onnxruntime, CPU provider)",
        "test_images": comparison["images"],
        **{key: comparison[key] for key in MEASURES if key in comparison},
        "limits": LIMITS,
        "measured_on": proof.where("the bfloat16 emulation"),
    }
    problems = [
        f"{key} {comparison[key]:.4g} (limit {limit:g})"
        for key, limit in LIMITS.items()
        if key in comparison
        and not (comparison[key] >= limit if key == "top1_agreement" else comparison[key] <= limit)
    ]
    promised = dataclasses.replace(
        check,
        precisions={**check.precisions, "bfloat16": Promise(tolerances(check), measured)},
    )
    if not problems and openvino_has("BF16"):  # this CPU computes bfloat16: try it for real
        engine = open_engine(proto.SerializeToString(), Way("openvino", "bfloat16", "cpu"),
                             name=card.model_id, threads=0)  # fmt: skip
        names = list(check.expected)
        outputs = dict(zip(names, engine.run(names, check.images), strict=True))
        real = check.failures(outputs, promised.precisions["bfloat16"].tolerances)
        measured["openvino"] = {**engine.describe(), "reference_images": len(check.images),
                                "kept": not real}  # fmt: skip
        problems += [f"in OpenVINO bfloat16 here, {problem}" for problem in real]
    print(
        f"{card.model_id} in bfloat16 (emulated) on {comparison['images']} test images: top-1 "
        f"agreement {comparison['top1_agreement']:.4f}, probabilities moved by up to "
        f"{comparison['probabilities_max_abs_difference']:.2e}"
        + (f"; no bfloat16 promise: {'; '.join(problems)}" if problems else ""),
        flush=True,
    )
    return check if problems else promised


def tolerances(check: SelfCheck) -> list[Tolerance]:
    """The limits as the file's promise on its reference images: top-1 agreement as a
    binomial bound (a file keeping BFLOAT16_MIN_AGREEMENT exceeds it once in a million)."""
    why = "the bfloat16 limit measured at export"
    kept = [
        Tolerance(OUTPUT_NAME, "max_abs", BFLOAT16_MAX_ABS_DIFF, why),
        Tolerance(OUTPUT_NAME, "top1_disagreements",
                  proof.disagreement_bound(len(check.images), 1 - BFLOAT16_MIN_AGREEMENT),
                  f"top-1 agreement of at least {BFLOAT16_MIN_AGREEMENT:.0%}"),
        Tolerance(FEATURES_NAME, "max_relative", BFLOAT16_MAX_FEATURES_DIFF, why),
        Tolerance(FAMILIARITY_NAME, "mean_abs", BFLOAT16_MAX_FAMILIARITY_DIFF, why),
    ]  # fmt: skip
    return [t for t in kept if t.output in check.expected]


MEASURES = (
    "top1_agreement", "top1_accuracy", "float32_top1_accuracy",
    "probabilities_max_abs_difference", "features_max_relative_difference",
    f"{FAMILIARITY_NAME}_mean_abs_difference", f"{FAMILIARITY_NAME}_max_abs_difference",
)  # fmt: skip
LIMITS = {
    "top1_agreement": BFLOAT16_MIN_AGREEMENT,
    "probabilities_max_abs_difference": BFLOAT16_MAX_ABS_DIFF,
    "features_max_relative_difference": BFLOAT16_MAX_FEATURES_DIFF,
    f"{FAMILIARITY_NAME}_mean_abs_difference": BFLOAT16_MAX_FAMILIARITY_DIFF,
}


def emulated(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` whose convolutions and matrix products take their inputs rounded
    to bfloat16 and store their outputs in bfloat16 (round to nearest, ties to even, as
    OpenVINO converts): weights rounded in place, activations through a Cast to bfloat16
    and back. The graph's own outputs keep float32, as OpenVINO returns them."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
    weights = {init.name: init for init in graph.initializer}
    nodes = []

    def rounded(name: str) -> str:
        narrow, back = f"{name}/bfloat16#{len(nodes)}", f"{name}/rounded#{len(nodes)}"
        nodes.append(helper.make_node("Cast", [name], [narrow], to=TensorProto.BFLOAT16))
        nodes.append(helper.make_node("Cast", [narrow], [back], to=TensorProto.FLOAT))
        return back

    outputs = {output.name for output in graph.output}
    renamed: dict[str, str] = {}  # an output of a rounded op -> its rounded copy
    for node in graph.node:
        for k, name in enumerate(node.input):
            node.input[k] = renamed.get(name, name)
        if node.op_type not in ROUNDED_OPS:
            nodes.append(node)
            continue
        for k, name in enumerate(node.input[:2]):  # data and weights, not the bias
            if name in weights:
                values = to_bfloat16(numpy_helper.to_array(weights[name]))
                weights[name].CopyFrom(numpy_helper.from_array(values, name))
            else:
                node.input[k] = rounded(name)
        nodes.append(node)
        for name in node.output:  # stored in bfloat16 for the next op
            if name not in outputs:
                renamed[name] = rounded(name)
    del graph.node[:]
    graph.node.extend(nodes)
    return copy


def to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32).reshape(np.shape(values))
