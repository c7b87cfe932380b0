"""Keras model -> self-describing ONNX file, checked against Keras before it is written.

tf2onnx.convert.from_keras does not understand Keras 3 models, so we convert a
tf.function with an explicit input signature instead. The graph takes uint8 images
(the model's own first layer scales them) and returns two outputs:
    probabilities  [batch, 100]  what the service uses
    features       [batch, n]    the penultimate activations, for the report's feature map
"""

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx

from service.modelcard import INPUT_NAME, OUTPUT_NAME, ModelCard
from training.atomic import write_bytes

OPSET = 17
FEATURES_NAME = "features"
MAX_ABS_DIFF = 1e-4


class ExportError(Exception):
    """The converted graph does not reproduce the Keras model; nothing was written."""


def export(model: keras.Model, card: ModelCard, path, parity_images: np.ndarray) -> onnx.ModelProto:
    """Convert, check parity on `parity_images`, then write `path` atomically."""
    proto = to_onnx(model)
    onnx.helper.set_model_props(proto, card.to_metadata())
    proto.doc_string = (
        f"CIFAR-100 classifier {card.model_id}: uint8 NHWC images in, probabilities out"
    )
    check_parity(proto, model, parity_images)
    write_bytes(path, proto.SerializeToString())
    return proto


def to_onnx(model: keras.Model) -> onnx.ModelProto:
    # Both outputs from one graph: the input of the last layer is the penultimate features
    # (dropout is the identity at inference).
    two_outputs = keras.Model(
        model.inputs, [model.outputs[0], model.get_layer("predictions").input]
    )

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
    """Fail unless onnxruntime and Keras agree to MAX_ABS_DIFF and on every top-1 class."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (onnx_probs,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})
    keras_probs = model.predict(images, verbose=0)
    diff = float(np.abs(onnx_probs - keras_probs).max())
    top1_mismatch = int((onnx_probs.argmax(1) != keras_probs.argmax(1)).sum())
    print(f"Parity on {len(images)} images: max |onnx - keras| = {diff:.2e}", flush=True)
    if diff > MAX_ABS_DIFF or top1_mismatch:
        raise ExportError(
            f"ONNX output differs from Keras: max abs diff {diff:.2e} (limit {MAX_ABS_DIFF:.0e}), "
            f"{top1_mismatch} top-1 mismatches; not writing the file"
        )
