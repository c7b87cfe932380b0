"""The two CNNs of the original experiments, layer for layer (summaries: tests/test_models.py).

Both take uint8 images and scale them in their first layer, so the exported ONNX graph
carries its own preprocessing and nothing else in the project ever scales pixels.
The scaling layer has no weights: parameter counts and every other layer's output shape
match the original Keras summaries, and Keras 2 weight files load in layer order.
The summaries do not give dropout rates: they are settings of the training recipe
(training/train.py), measured by `python -m training ablate`; dropout has no weights.
"""

from pathlib import Path

import h5py
import keras
from keras import layers

from training.errors import WeightsError

MODEL_IDS = ("cifar100-712868", "cifar100-5735844")
# What the original experiments reached: validation accuracy after 48 epochs.
ORIGINAL_ACCURACY = {"cifar100-712868": 0.37, "cifar100-5735844": 0.54}


def build_model(
    model_id: str, conv_dropout: float = 0.0, dense_dropout: float = 0.0
) -> keras.Model:
    """A fresh, uncompiled model for one of MODEL_IDS, with these dropout rates after the
    conv blocks and after the dense layers."""
    if model_id == "cifar100-712868":
        return build_712868(conv_dropout, dense_dropout)
    if model_id == "cifar100-5735844":
        return build_5735844(conv_dropout, dense_dropout)
    raise ValueError(f"unknown model id {model_id!r}; choose one of {', '.join(MODEL_IDS)}")


def build_712868(conv_dropout: float = 0.0, dense_dropout: float = 0.0) -> keras.Model:
    """conv30 + conv14 + conv7 + conv3 + fc128: 0.37 validation accuracy after 48 epochs.

    Its first two convolutions are unpadded (32 -> 30 -> 28), so the last pooling
    floors 7 to 3 and the dense layers see 3 x 3 x 256 = 2304 values."""
    return _cnn("cifar100-712868", "valid", 128, conv_dropout, dense_dropout)


def build_5735844(conv_dropout: float = 0.0, dense_dropout: float = 0.0) -> keras.Model:
    """conv32 + conv16 + conv8 + conv4 + fc1024 + fc1024: 0.54 after 48 epochs.

    Same layers, padded throughout (4 x 4 x 256 = 4096 values into the dense layers) and
    1024-wide dense layers: eight times the parameters, almost all in the first dense."""
    return _cnn("cifar100-5735844", "same", 1024, conv_dropout, dense_dropout)


def _cnn(
    name: str, first_padding: str, dense_units: int, conv_dropout: float, dense_dropout: float
) -> keras.Model:
    """The layer sequence both originals share, as in their Keras summaries."""
    return keras.Sequential(
        [
            keras.Input(shape=(32, 32, 3), dtype="uint8", name="images"),
            layers.Rescaling(1 / 255, name="scale"),  # the one place pixels become [0, 1]
            layers.Conv2D(32, 3, padding=first_padding, activation="relu"),
            layers.Conv2D(64, 3, padding=first_padding, activation="relu"),
            layers.MaxPooling2D(),
            layers.Dropout(conv_dropout),
            layers.Conv2D(128, 3, padding="same"),
            layers.Activation("relu"),
            layers.MaxPooling2D(),
            layers.Dropout(conv_dropout),
            layers.Conv2D(256, 3, padding="same"),
            layers.Activation("relu"),
            layers.MaxPooling2D(),
            layers.Dropout(conv_dropout),
            layers.Flatten(),
            layers.Dense(dense_units, activation="relu"),
            layers.Dropout(dense_dropout),
            layers.Dense(dense_units, activation="relu"),
            layers.Dropout(dense_dropout),
            # float32 even under mixed precision: a float16 softmax would round the
            # probabilities that the export must reproduce.
            layers.Dense(100, activation="softmax", name="predictions", dtype="float32"),
        ],
        name=name,
    )


def load_original_weights(path: Path) -> keras.Model:
    """A Keras 2 HDF5 file of the original runs, in the architecture it fits.

    Both layouts Keras 2 writes are read: `model.save` (and `ModelCheckpoint` by default),
    which keeps the weights under `model_weights` beside the config and optimizer, and
    `model.save_weights`, weights only. Layer names do not matter (the originals are
    `conv2d_1`, `dense_1`, ...). The file need not name its architecture, so we count its
    weights: 712,868 or 5,735,844 parameters. Keras loads them layer by layer in order,
    checking every shape.
    """
    try:
        with h5py.File(path, "r") as f:
            group = (
                f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
            )
            sizes: list[int] = []
            group.visititems(
                lambda _, item: sizes.append(item.size) if isinstance(item, h5py.Dataset) else None
            )
    except OSError as err:
        raise WeightsError(f"{path} is not a readable HDF5 file: {err}") from None
    count = sum(sizes)
    for model_id in MODEL_IDS:
        model = build_model(model_id)
        if model.count_params() == count:
            try:
                model.load_weights(path)
            except ValueError as err:
                raise WeightsError(f"{path} does not fit {model_id}: {err}") from None
            return model
    raise WeightsError(
        f"{path} holds {count:,} parameters; the original models have 712,868 and 5,735,844"
    )
