"""Keras model -> self-describing ONNX file, checked against Keras before it is written.

tf2onnx.convert.from_keras does not understand Keras 3 models, so we convert a
tf.function with an explicit input signature instead. The graph takes uint8 images
(the model's own first layer scales them) and returns two outputs:
    probabilities  [batch, 100]  what the service uses
    features       [batch, n]    the penultimate activations, for the report's feature map
Both are checked against Keras before anything is written, and the model card lists the
outputs the file has.
"""

import dataclasses

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx
from google.protobuf.message import DecodeError

from service.modelcard import FEATURES_NAME, INPUT_NAME, OUTPUT_NAME, ModelCard
from training.atomic import write_bytes
from training.errors import ExportError
from training.models import build_model

OPSET = 17
MAX_ABS_DIFF = 1e-4


def export(model: keras.Model, card: ModelCard, path, parity_images: np.ndarray) -> onnx.ModelProto:
    """Convert, check parity on `parity_images`, then write `path` atomically."""
    model = float32_twin(model)
    proto = to_onnx(model)
    # The card states what the file has, read from the graph itself.
    card = dataclasses.replace(card, outputs=[output.name for output in proto.graph.output])
    onnx.helper.set_model_props(proto, card.to_metadata())
    proto.doc_string = (
        f"CIFAR-100 classifier {card.model_id}: uint8 NHWC images in, probabilities out"
    )
    check_parity(proto, model, parity_images)
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


def check_parity(proto: onnx.ModelProto, model: keras.Model, images: np.ndarray) -> None:
    """Fail unless the graph has both outputs and onnxruntime agrees with Keras on both:
    probabilities to MAX_ABS_DIFF and on every top-1 class, features to MAX_ABS_DIFF
    relative to their largest value (they are unbounded activations)."""
    names = sorted(output.name for output in proto.graph.output)
    if names != sorted([OUTPUT_NAME, FEATURES_NAME]):
        raise ExportError(
            f"the graph's outputs are {names}, expected {OUTPUT_NAME} and {FEATURES_NAME}; "
            "not writing the file"
        )
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_probs, onnx_features = session.run([OUTPUT_NAME, FEATURES_NAME], {INPUT_NAME: images})
    keras_probs, keras_features = _with_features(model).predict(images, verbose=0)
    diff = float(np.abs(onnx_probs - keras_probs).max())
    scale = max(1.0, float(np.abs(keras_features).max()))
    features_diff = float(np.abs(onnx_features - keras_features).max()) / scale
    top1_mismatch = int((onnx_probs.argmax(1) != keras_probs.argmax(1)).sum())
    print(
        f"Parity on {len(images)} images: max |onnx - keras| = {diff:.2e} (probabilities), "
        f"{features_diff:.2e} (features, relative)",
        flush=True,
    )
    if diff > MAX_ABS_DIFF or top1_mismatch or features_diff > MAX_ABS_DIFF:
        raise ExportError(
            f"ONNX output differs from Keras: max abs diff {diff:.2e} on probabilities, "
            f"{features_diff:.2e} on features (limit {MAX_ABS_DIFF:.0e}), "
            f"{top1_mismatch} top-1 mismatches; not writing the file"
        )


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
