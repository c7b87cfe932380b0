"""Genuine Keras 2 HDF5 files of the original architectures, written by Keras 2 itself
(the `tf-keras` package, imported as `tf_keras`), with the layer names of the original
summaries (`conv2d_1`, `dense_1`, ...)."""

import warnings

import numpy as np
import tf_keras

from tests.originals import ORIGINAL_SUMMARIES

# How each original layer was built, by the type in its name.
_FIRST_PADDING = {"cifar100-712868": "valid", "cifar100-5735844": "same"}


def build_keras2_model(model_id: str, seed: int = 0) -> tf_keras.Model:
    """The original Sequential model in Keras 2, float inputs in [0, 1] as the notebook fed it."""
    tf_keras.utils.set_random_seed(seed)
    layers, convs = [], 0
    for name, shape, _ in ORIGINAL_SUMMARIES[model_id]:
        kind = name.rsplit("_", 1)[0]
        if kind == "conv2d":
            convs += 1
            padding = _FIRST_PADDING[model_id] if convs <= 2 else "same"
            # The first two convolutions carry their relu; the others are followed by an
            # Activation layer, as in the summaries.
            activation = "relu" if convs <= 2 else None
            layers.append(
                tf_keras.layers.Conv2D(
                    shape[-1], 3, padding=padding, activation=activation, name=name
                )
            )
        elif kind == "activation":
            layers.append(tf_keras.layers.Activation("relu", name=name))
        elif kind == "max_pooling2d":
            layers.append(tf_keras.layers.MaxPooling2D(name=name))
        elif kind == "dropout":
            layers.append(tf_keras.layers.Dropout(0.25, name=name))
        elif kind == "flatten":
            layers.append(tf_keras.layers.Flatten(name=name))
        elif kind == "dense":
            layers.append(tf_keras.layers.Dense(shape[0], activation="relu", name=name))
        else:
            assert name == "predictions", name
            layers.append(tf_keras.layers.Dense(100, activation="softmax", name=name))
    model = tf_keras.Sequential([tf_keras.Input((32, 32, 3)), *layers], name=model_id)
    assert [layer.name for layer in model.layers] == [n for n, _, _ in ORIGINAL_SUMMARIES[model_id]]
    return model


def write_keras2_file(path, model_id: str, layout: str, seed: int = 0) -> tf_keras.Model:
    """Write `path` as Keras 2 does: layout "save" is `model.save` (what ModelCheckpoint
    writes by default: config, weights under `model_weights`, optimizer state), "weights"
    is `model.save_weights`. Returns the Keras 2 model, for comparisons."""
    model = build_keras2_model(model_id, seed)
    if layout == "save":
        # Compiled and stepped once, so the file carries optimizer weights too.
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        rng = np.random.default_rng(seed)
        model.fit(rng.random((4, 32, 32, 3)), rng.integers(0, 100, 4), verbose=0)
        with warnings.catch_warnings():  # "legacy format": the point here
            warnings.simplefilter("ignore", UserWarning)
            model.save(path, save_format="h5")
    else:
        model.save_weights(path, save_format="h5")
    return model
