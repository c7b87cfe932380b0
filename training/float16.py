"""The float16 twin of an exported float32 file, for GPUs (tensor cores).

onnxconverter-common's convert_float_to_float16 on the network, with the uint8 input's
cast and the familiarity head kept float32 (its squared distances approach float16's
largest value, and its pixel statistics take logarithms of spreads near 0); written
only if it matches the float model within FLOAT16_* on the test split, run on
onnxruntime's CPU provider. Not measured on a GPU.
"""

import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from contract.classifier import content_version
from contract.modelcard import FAMILIARITY_NAME, FEATURES_NAME, OUTPUT_NAME, ModelCard
from contract.selfcheck import SelfCheck, Tolerance
from training import proof
from training.data import Cifar100
from training.twins import (
    Twin,
    ancestors,
    card_of,
    check_same_signature,
    export_twin,
    name_nodes,
    set_card,
    twin_card,
)

# float16 parity with the float model on the test split. float16 keeps 11 significant
# bits (a relative rounding of 5e-4 per value), and the error grows through the layers:
# measured on the real-photo model (1,180 test images), at most 1.1e-3 on probabilities,
# 4.2e-4 of the features' largest value, 0.006 on familiarity (3 of 500 validation
# ranks), and 1 top-1 change. The limits allow about 5 times that; a top-1 class can only
# change where two classes are within float16's rounding, which the floor allows for.
FLOAT16_MAX_ABS_DIFF = 5e-3  # probabilities
FLOAT16_MAX_FEATURES_DIFF = 2e-3  # features, relative to their largest value
FLOAT16_MAX_FAMILIARITY_DIFF = 0.03
FLOAT16_MIN_AGREEMENT = 0.995  # top-1 agreement with the float model


def float16_model_id(model_id: str) -> str:
    return f"{model_id}-float16"


LIMITS = {
    "probabilities_max_abs_difference": FLOAT16_MAX_ABS_DIFF,
    "features_max_relative_difference": FLOAT16_MAX_FEATURES_DIFF,
    f"{FAMILIARITY_NAME}_max_abs_difference": FLOAT16_MAX_FAMILIARITY_DIFF,
    "top1_agreement": FLOAT16_MIN_AGREEMENT,
}


def export_float16(source: Path, target: Path, data: Cifar100) -> ModelCard:
    """Convert `source` to float16 and write `target` only if it matches the float model
    on the test split (LIMITS, on onnxruntime's CPU provider) and keeps its self-check
    here; else ExportError."""
    return export_twin(source, target, data, FLOAT16)


def summary(card: ModelCard, comparison: dict) -> str:
    return (
        f"{card.model_id} on {comparison['images']} test images: max |float16 - float32| = "
        + ", ".join(
            f"{comparison[key]:.2e} ({key.split('_')[0]})"
            for key in comparison["limits"]
            if key.endswith("difference") and key in comparison
        )
        + f"; top-1 agreement {comparison['top1_agreement']:.4f}, top-1 "
        f"{comparison['top1_accuracy']:.4f} (float32 {comparison['float32_top1_accuracy']:.4f})"
    )


def float16_self_check(source: bytes, float_check: SelfCheck, comparison: dict) -> SelfCheck:
    return proof.twin_check(float_check, content_version(source),
                            float16_tolerances(len(float_check.images), float_check))  # fmt: skip


def float16_tolerances(references: int, float_check: SelfCheck) -> list[Tolerance]:
    """The float16 gate's limits, as the file's promise on its reference images wherever
    it loads (a GPU's tensor cores included); top-1 agreement as a binomial bound."""
    gate = "the float16 gate's limit"
    tolerances = [
        Tolerance(OUTPUT_NAME, "max_abs", FLOAT16_MAX_ABS_DIFF, gate),
        Tolerance(OUTPUT_NAME, "top1_disagreements",
                  proof.disagreement_bound(references, 1 - FLOAT16_MIN_AGREEMENT),
                  f"top-1 agreement of at least {FLOAT16_MIN_AGREEMENT:.1%}"),
        Tolerance(FEATURES_NAME, "max_relative", FLOAT16_MAX_FEATURES_DIFF, gate),
        Tolerance(FAMILIARITY_NAME, "max_abs", FLOAT16_MAX_FAMILIARITY_DIFF, gate),
    ]  # fmt: skip
    return [t for t in tolerances if t.output in float_check.expected]


def float16_problems(comparison: dict) -> list[str]:
    """Where the float16 outputs leave `comparison`'s limits, in words."""
    problems = []
    for key, limit in comparison["limits"].items():
        if key not in comparison:  # a file without familiarity
            continue
        value = comparison[key]
        if key == "top1_agreement" and not value >= limit:
            problems.append(f"top-1 agreement {value:.4f} (at least {limit:g})")
        elif key != "top1_agreement" and not value <= limit:  # not <=: a NaN fails too
            problems.append(f"{key} {value:.2e} (limit {limit:g})")
    return problems


def converted_float16(source: bytes) -> onnx.ModelProto:
    """The float16 graph of the float file `source`, with its card (`<id>-float16`).

    Only the network is converted: the nodes that the probabilities are computed from.
    The rest (the familiarity head, every node named under familiarity.PREFIX) is never
    given to the converter: it stays float32 and reads the float32 `features` output and
    the uint8 input. Its squared distances reach the thousands in a thousand dimensions,
    near float16's largest value (65504), the converter would clamp its stored validation
    distances to 1e4, and its pixel statistics take logarithms of spreads near 0 and
    differences of one grey level, which float16 would move by whole ranks.
    convert_float_to_float16 needs two things done around it:
      - `features` is an output and also the last layer's input; under keep_io_types the
        converter casts the output to float32 and leaves the layer reading that float32
        tensor beside its float16 weights (onnxruntime refuses such a graph). So the
        network gets an internal name for it and an Identity to the output.
      - it does not retarget Cast nodes: the uint8 -> float Cast of the input would still
        say float while its output became float16. That Cast is kept float32 by name
        (node_block_list), and the converter casts its output to float16.
    """
    # Imported here: the converter is a training dependency, and the int8 path and the
    # benchmark need none of it.
    from onnxconverter_common import float16

    proto = onnx.load_from_string(source)
    card = card_of(proto)
    name_nodes(proto)
    graph = proto.graph
    network = ancestors(graph, [OUTPUT_NAME])
    body = [node for node in graph.node if node.name in network]
    head = [node for node in graph.node if node.name not in network]
    produced = {name for node in body for name in node.output}
    body_outputs = [output for output in graph.output if output.name in produced]
    for output in body_outputs:
        if any(output.name in node.input for node in body):
            internal = f"{output.name}/float16"
            for node in body:
                node.input[:] = [internal if n == output.name else n for n in node.input]
                node.output[:] = [internal if n == output.name else n for n in node.output]
            body.append(helper.make_node("Identity", [internal], [output.name], name=internal))
    read = {name for node in body for name in node.input}
    network_model = helper.make_model(
        helper.make_graph(
            body,
            graph.name,
            list(graph.input),
            body_outputs,
            [tensor for tensor in graph.initializer if tensor.name in read],
        ),
        opset_imports=list(proto.opset_import),
        ir_version=proto.ir_version,
    )
    float_casts = [
        node.name
        for node in body
        if node.op_type == "Cast"
        and helper.get_attribute_value(node.attribute[0]) == TensorProto.FLOAT
    ]
    with warnings.catch_warnings():
        # It warns for each weight below float16's smallest normal value (set to 1e-7
        # instead); the parity gate measures what such rounding does to the outputs.
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(
            network_model, keep_io_types=True, node_block_list=float_casts
        )
    converted.graph.node.extend(head)
    converted.graph.initializer.extend(t for t in graph.initializer if t.name not in read)
    # The outputs in the source's order, with the source's types (float32 throughout).
    order = [output.name for output in graph.output]
    del converted.graph.output[:]
    converted.graph.output.extend(sorted(graph.output, key=lambda o: order.index(o.name)))
    onnx.checker.check_model(converted)
    check_same_signature(proto, converted)
    details = {
        "tool": "onnxconverter-common convert_float_to_float16(keep_io_types=True)",
        "kept_float32": [
            {
                "why": "the uint8 -> float Cast of the input (the converter does not retarget "
                "Cast nodes; its output is cast to float16 after it)",
                "nodes": float_casts,
            },
            {
                "why": "computes the familiarity output only: squared Mahalanobis distances "
                "near float16's largest value, logarithms of pixel spreads near 0",
                "nodes": [node.name for node in head],
            },
        ],
        "tested_on": f"onnxruntime {ort.__version__} CPUExecutionProvider (the parity gate); "
        "not measured on a GPU",
    }
    twin = twin_card(card, float16_model_id(card.model_id), "float16", source, float16=details)
    set_card(converted, twin)
    return converted


FLOAT16 = Twin(
    convert=lambda content, data: converted_float16(content),
    limits=LIMITS,
    problems=lambda comparison: float16_problems(comparison),
    self_check=float16_self_check,
    summary=summary,
    broken="the float16 graph differs from the float32 one",
)
