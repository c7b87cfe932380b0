"""What every twin of an exported float32 file shares (`training/quantize.py` writes the
int8 one, `training/float16.py` the float16 one): the data as the float model saw it, the
graph helpers both conversions use, the measurement against the float model that gates
each, and the twin's own card and file.

A twin keeps the float file's inputs and outputs (names, types, order), so the service,
Triton and the report take it as they take the float file; it has its own model id,
`<id>-int8` or `<id>-float16`, and its card says what it was converted from and how.
"""

import dataclasses
import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx

from contract.classifier import content_version
from contract.modelcard import FEATURES_NAME, OUTPUT_NAME, ModelCard
from contract.selfcheck import SelfCheck
from training import proof
from training.atomic import write_bytes
from training.data import Cifar100, without_classes
from training.errors import ExportError
from training.evaluate import compute_metrics, known_test_images
from training.proof import run

PRECISIONS = ("float32", "int8", "float16")


def as_trained(data: Cifar100, card: ModelCard) -> Cifar100:
    """`data` as the float model saw it: without the classes its recipe held out of
    training, in the training split (no calibration on classes it never learned) and in
    the test split (scored like its own evaluation, over the classes it knows)."""
    recipe = card.training.get("recipe")
    held_out = tuple(recipe.get("held_out_classes") or ()) if isinstance(recipe, dict) else ()
    if not held_out:
        return data
    known = without_classes(data, held_out)
    return dataclasses.replace(known, test=data.test.take(known_test_images(data, held_out)))


def ancestors(graph: onnx.GraphProto, outputs: Iterable[str]) -> set[str]:
    """The names of the nodes that `outputs` are computed from."""
    producer = {name: node for node in graph.node for name in node.output}
    found: set[str] = set()
    pending = list(outputs)
    while pending:
        node = producer.get(pending.pop())
        if node is not None and node.name not in found:
            found.add(node.name)
            pending.extend(node.input)
    return found


def name_nodes(proto: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name (from its first output): the quantization and
    float16 tools pick the nodes they leave alone by name, and the familiarity head's
    nodes have none."""
    taken = {node.name for node in proto.graph.node if node.name}
    for node in proto.graph.node:
        if not node.name:
            name, n = node.output[0], 1
            while name in taken:
                name, n = f"{node.output[0]}#{n}", n + 1
            node.name = name
            taken.add(name)


# The export of a twin: one sequence, what differs between twins in a Twin.


@dataclasses.dataclass(frozen=True)
class Twin:
    """What makes one twin: its conversion, its gate's limits on the test split (each
    measure of `compare_outputs` its limit), what breaks them in words, its promise on the
    float file's reference images, and the message when it is not written."""

    convert: Callable[[bytes, Cifar100], onnx.ModelProto]  # float file, data -> twin
    limits: dict[str, float]
    problems: Callable[[dict], list[str]]  # comparison with limits -> broken, in words
    self_check: Callable[[bytes, SelfCheck, dict], SelfCheck]  # float file, its check, comparison
    summary: Callable[[ModelCard, dict], str]  # what is printed of the comparison
    broken: str


def export_twin(source: Path, target: Path, data: Cifar100, twin: Twin) -> ModelCard:
    """Convert `source` and write `target` only if it keeps to the float model within the
    twin's limits on the test split (onnxruntime's CPU provider, both files) and keeps its
    own self-check here; else ExportError and no file. Returns the card written."""
    content = Path(source).read_bytes()
    float_check = float_self_check(content)
    data = as_trained(data, card_of(onnx.load_from_string(content)))
    proto = twin.convert(content, data)
    card = card_of(proto)
    comparison = compare_with_float(content, proto, data)
    comparison["limits"] = dict(twin.limits)
    print(twin.summary(card, comparison), flush=True)
    check = twin.self_check(content, float_check, comparison)
    return write_twin(proto, card, comparison, target, twin.problems(comparison), twin.broken,
                      check)  # fmt: skip


# Measuring a twin against the float model.


def compare_with_float(source: bytes, twin: onnx.ModelProto, data: Cifar100) -> dict:
    """The twin's test-split metrics, the float model's top-1 accuracy on the same images,
    their top-1 agreement and how far the other outputs moved: what the card records."""
    reference = run(source, data.test.images)
    outputs = run(twin, data.test.images)
    return compare_outputs(outputs, reference, data.test.fine, card_of(twin))


def compare_outputs(outputs: dict, reference: dict, labels: np.ndarray, card: ModelCard) -> dict:
    """`compare_with_float` on outputs computed elsewhere (another CPU, an emulator)."""
    metrics = compute_metrics(
        outputs[OUTPUT_NAME], labels, card.fine_to_coarse, card.class_names,
        card.superclass_names,
    )  # fmt: skip
    float_top1 = reference[OUTPUT_NAME].argmax(axis=1)
    comparison = {
        **metrics,
        "split": "test",
        "float32_top1_accuracy": float((float_top1 == labels).mean()),
        "top1_agreement": float((outputs[OUTPUT_NAME].argmax(axis=1) == float_top1).mean()),
        "probabilities_max_abs_difference": max_abs(outputs, reference, OUTPUT_NAME),
    }
    if FEATURES_NAME in reference:
        scale = max(1.0, float(np.abs(reference[FEATURES_NAME]).max()))
        comparison["features_max_relative_difference"] = (
            max_abs(outputs, reference, FEATURES_NAME) / scale
        )
    for name in sorted(set(reference) - {OUTPUT_NAME, FEATURES_NAME}):  # familiarity
        comparison[f"{name}_max_abs_difference"] = max_abs(outputs, reference, name)
        comparison[f"{name}_mean_abs_difference"] = float(
            np.abs(outputs[name] - reference[name]).mean()
        )
    return comparison


def max_abs(outputs: dict, reference: dict, name: str) -> float:
    return float(np.abs(outputs[name].astype(np.float64) - reference[name]).max())


# The twin's file and card.


def card_of(proto: onnx.ModelProto) -> ModelCard:
    try:
        return ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
    except ValueError as err:
        raise ExportError(f"not an exported model of ours: {err}") from None


def twin_card(
    card: ModelCard, model_id: str, precision: str, source: bytes, **details: dict
) -> ModelCard:
    """The float model's card for its twin: the new id, and in `training` the precision,
    which file it was converted from and how. No evaluation until one is measured."""
    training = {
        **card.training,
        "precision": precision,
        "converted_from": {
            "model_id": card.model_id,
            "version": content_version(source),  # as the service names versions
            "sha256": hashlib.sha256(source).hexdigest(),
        },
        **details,
    }
    return dataclasses.replace(card, model_id=model_id, training=training, evaluation=None)


def set_card(proto: onnx.ModelProto, card: ModelCard) -> None:
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, card.to_metadata())
    precision = card.training["precision"]
    proto.doc_string = (
        f"CIFAR-100 classifier {card.model_id} ({precision}): uint8 NHWC images in, "
        "probabilities out"
    )


def float_self_check(content: bytes) -> SelfCheck:
    """The float32 file's self-check, verified here first: a twin's references are that
    file's, and a twin measured against a file that fails here would prove nothing."""
    check = proof.read(onnx.load_from_string(content))
    if check is None:
        raise ExportError(
            "the float32 file carries no self-check (its reference images and outputs): "
            "export it again with `python -m training export` before converting it"
        )
    try:
        return proof.checked(onnx.load_from_string(content), check)
    except ExportError as err:
        raise ExportError(f"the float32 file: {err}") from None


def write_twin(
    proto: onnx.ModelProto,
    card: ModelCard,
    evaluation: dict | None,
    target: Path,
    problems: list[str],
    broken: str,
    check: SelfCheck,
) -> ModelCard:
    """The twin's gate, then its file: ExportError (`broken`, then `problems`, then the
    promises of `check` it breaks here) and nothing written when it breaks the float
    model's promise; else `target`, with `evaluation` in its card and `check` inside."""
    problems = problems or [
        f"on its reference images, {problem}" for problem in proof.problems(proto, check)
    ]
    if problems:
        raise ExportError(f"{broken}: {'; '.join(problems)}; not writing {Path(target).name}")
    card = dataclasses.replace(card, evaluation=evaluation)
    set_card(proto, card)
    proof.attach(proto, proof.verified(check))
    write_bytes(Path(target), proto.SerializeToString())
    return card


def check_same_signature(source: onnx.ModelProto, twin: onnx.ModelProto) -> None:
    """The twin takes and returns what the float file does (names, types, order): a
    drop-in file for the service and Triton."""

    def signature(proto: onnx.ModelProto) -> list:
        return [
            (value.name, value.type.tensor_type.elem_type)
            for value in [*proto.graph.input, *proto.graph.output]
        ]

    if signature(source) != signature(twin):
        raise ExportError(
            f"the converted graph's inputs and outputs {signature(twin)} differ from the "
            f"float file's {signature(source)}; not writing it"
        )
