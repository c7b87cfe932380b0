"""Keras model -> self-describing ONNX file, checked against Keras before it is written.

tf2onnx.convert.from_keras does not understand Keras 3 models, so we convert a
tf.function with an explicit input signature instead. The graph takes uint8 images
(the model's own first layer scales them) and returns three outputs:
    probabilities  [batch, 100]  what the service uses
    features       [batch, n]    the penultimate activations, for the report's feature map
    familiarity    [batch, 1]    how like the training data the image is: a strangeness score
                                 (training/scores/) of its pixels and features, calibrated on
                                 the validation images (training/familiarity.py)
The first two are checked against Keras, the third against familiarity.py's NumPy
reference, before anything is written; the model card lists the outputs the file has and
says how familiarity was calibrated. The file carries its own proof: reference test images,
its outputs for them and the parity tolerances (training/proof.py), which the service
checks wherever it loads the file and the export checks before writing it.
"""

import contextlib
import dataclasses
from collections.abc import Iterator

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx
from google.protobuf.message import DecodeError

from contract.modelcard import (
    FAMILIARITY_NAME,
    FEATURES_NAME,
    INPUT_NAME,
    NUM_CLASSES,
    OUTPUT_NAME,
    ModelCard,
)
from training import bfloat16, familiarity, proof, scores
from training.atomic import write_bytes
from training.errors import ExportError
from training.models import build_model
from training.scores.base import Inputs

OPSET = 17
MAX_ABS_DIFF = 1e-4
EXPECTED_OUTPUTS = (OUTPUT_NAME, FEATURES_NAME, FAMILIARITY_NAME)


def export(
    model: keras.Model,
    card: ModelCard,
    path,
    parity_images: np.ndarray,
    *,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    reference_images: np.ndarray | None = None,
    reference_labels: np.ndarray | None = None,
    familiarity_score: str = scores.DEFAULT,
) -> onnx.ModelProto:
    """Convert, fit familiarity (`familiarity_score`, one of training.scores.SCORES) on the
    training images and calibrate it on the validation images, check parity on
    `parity_images`, store the self-check (its reference images drawn from
    `reference_images`, by default `parity_images`) with a bfloat16 promise measured on
    `reference_images` when their `reference_labels` are given (the test split;
    training/bfloat16.py), check it, then write `path` atomically."""
    model = float32_twin(model)
    fitted = fit_familiarity(model, train_images, train_labels, val_images, familiarity_score)
    proto = to_onnx(model)
    familiarity.add_to_graph(proto, fitted)
    onnx.checker.check_model(proto)
    # The card states what the file has, read from the graph itself, and the training
    # class mix it was fitted on (what the traffic report compares traffic with).
    card = dataclasses.replace(
        card,
        outputs=[output.name for output in proto.graph.output],
        familiarity=fitted.card,
        training_class_counts=np.bincount(
            np.asarray(train_labels, np.int64), minlength=NUM_CLASSES
        ).tolist(),
    )
    onnx.helper.set_model_props(proto, card.to_metadata())
    proto.doc_string = (
        f"CIFAR-100 classifier {card.model_id}: uint8 NHWC images in, probabilities out"
    )
    check_parity(proto, model, parity_images, fitted)
    candidates = parity_images if reference_images is None else reference_images
    check = proof.float32_check(proto, candidates, fitted, probabilities_tolerance=MAX_ABS_DIFF,
                                features_tolerance=MAX_ABS_DIFF)  # fmt: skip
    if reference_labels is not None:
        check = bfloat16.with_promise(proto, check, candidates, reference_labels)
    proof.attach(proto, proof.checked(proto, check))
    write_bytes(path, proto.SerializeToString())
    return proto


def to_onnx(model: keras.Model) -> onnx.ModelProto:
    two_outputs = _with_features(model)

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8, name=INPUT_NAME)])
    def serve(images):
        probabilities, features = two_outputs(images, training=False)
        return {OUTPUT_NAME: probabilities, FEATURES_NAME: features}

    proto, _ = tf2onnx.convert.from_function(
        serve, input_signature=serve.input_signature, opset=OPSET
    )
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(proto)
    return proto


def fit_familiarity(
    model: keras.Model,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    score: str = scores.DEFAULT,
) -> familiarity.Familiarity:
    """Familiarity fitted on the training images and the features Keras computes for them
    (float32, on the CPU, as the parity reference is), calibrated on the validation
    images and theirs."""
    return familiarity.fit(
        training_features(model, train_images, train_labels),
        Inputs(val_images, keras_reference(model, val_images)[1]),
        score,
    )


def training_features(
    model: keras.Model, images: np.ndarray, labels: np.ndarray
) -> scores.Training:
    """What a score is fitted on: these images, their features and labels, and the
    classifier layer that turns features into logits."""
    kernel, bias = model.get_layer("predictions").get_weights()
    features = keras_reference(model, images)[1]
    return scores.Training(features, np.asarray(labels), kernel, bias, images=images)


def check_parity(
    proto: onnx.ModelProto,
    model: keras.Model,
    images: np.ndarray,
    fitted: familiarity.Familiarity,
) -> None:
    """Fail unless the graph has all three outputs, onnxruntime agrees with Keras on the
    probabilities and features (see `parity_failure`), and its familiarity is what the
    NumPy reference computes from the same images and features (familiarity.parity_failure)."""
    names = sorted(output.name for output in proto.graph.output)
    if names != sorted(EXPECTED_OUTPUTS):
        raise ExportError(
            f"the graph's outputs are {names}, expected {', '.join(EXPECTED_OUTPUTS)}; "
            "not writing the file"
        )
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_probs, onnx_features, onnx_familiarity = session.run(
        list(EXPECTED_OUTPUTS), {INPUT_NAME: images}
    )
    keras_probs, keras_features = keras_reference(model, images)
    if problem := parity_failure(onnx_probs, onnx_features, keras_probs, keras_features):
        raise ExportError(f"ONNX output differs from Keras: {problem}; not writing the file")
    # On the images and the graph's own features: those are held to Keras's just above, so
    # this checks the familiarity head alone (its constants and ops), to its own rounding.
    inputs = Inputs(images, onnx_features)
    if problem := familiarity.parity_failure(fitted, inputs, onnx_familiarity):
        raise ExportError(
            f"ONNX familiarity differs from the reference: {problem}; not writing the file"
        )


def parity_failure(
    onnx_probs: np.ndarray,
    onnx_features: np.ndarray,
    keras_probs: np.ndarray,
    keras_features: np.ndarray,
) -> str | None:
    """What is wrong, or None: probabilities must agree to MAX_ABS_DIFF and on every top-1
    class, features to MAX_ABS_DIFF relative to their largest value (they are unbounded
    activations). Each check catches what the others let through: a top-1 flip between two
    near-equal classes moves no probability by much, and the features come from layers the
    softmax can hide."""
    diff = float(np.abs(onnx_probs - keras_probs).max())
    scale = max(1.0, float(np.abs(keras_features).max()))
    features_diff = float(np.abs(onnx_features - keras_features).max()) / scale
    top1_mismatch = int((onnx_probs.argmax(1) != keras_probs.argmax(1)).sum())
    print(
        f"Parity on {len(onnx_probs)} images: max |onnx - keras| = {diff:.2e} (probabilities), "
        f"{features_diff:.2e} (features, relative), {top1_mismatch} top-1 mismatches",
        flush=True,
    )
    if diff > MAX_ABS_DIFF or top1_mismatch or features_diff > MAX_ABS_DIFF:
        return (
            f"max abs diff {diff:.2e} on probabilities, {features_diff:.2e} on features "
            f"(limit {MAX_ABS_DIFF:.0e}), {top1_mismatch} top-1 mismatches"
        )
    return None


def keras_reference(model: keras.Model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keras's probabilities and features in full float32 on the CPU, whatever device the
    model was trained on: on Ampere and newer GPUs TensorFlow computes float32 matmuls and
    convolutions in TF32 by default (10-bit mantissas), which alone moves these outputs
    by several times MAX_ABS_DIFF and would fail the gate for every GPU-trained model."""
    with full_float32(), tf.device("/CPU:0"):
        probabilities, features = _with_features(model).predict(images, batch_size=256, verbose=0)
    return np.asarray(probabilities), np.asarray(features)


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """TF32 off for a block (a process-wide TensorFlow switch); its setting comes back after."""
    previous = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        yield
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(previous)


def float32_twin(model: keras.Model) -> keras.Model:
    """The model in float32: a mixed-precision model's weights are float32 already, so a
    float32 copy computes what the float32 ONNX graph computes."""
    if all(layer.dtype_policy.compute_dtype == "float32" for layer in model.layers):
        return model
    twin = build_model(model.name)
    twin.set_weights(model.get_weights())
    return twin


def exported_card(path) -> ModelCard | None:
    """The model card of an exported file; None when there is no file or no card of ours."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
        return ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
    except (OSError, ValueError, DecodeError):  # missing, damaged, or not one of ours
        return None


def exported_outputs(path) -> list[str]:
    """The output names of an exported file's graph (what it has, whatever its card says:
    cards written before they listed outputs read as probabilities only)."""
    return [output.name for output in onnx.load(str(path), load_external_data=False).graph.output]


def _with_features(model: keras.Model) -> keras.Model:
    """The model with a second output: the input of its last layer (dropout is the
    identity at inference, so these are the penultimate activations)."""
    return keras.Model(model.inputs, [model.outputs[0], model.get_layer("predictions").input])
