"""The contract between training and serving: what an exported ONNX file carries.

Training writes a ModelCard into the file's `metadata_props`; the service reads it back.
This module is the only place that knows the key names, so the two sides cannot drift.
It imports neither TensorFlow nor onnxruntime (NumPy for the one sum both sides do).
"""

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

FORMAT_VERSION = "1"
INPUT_NAME = "images"  # uint8 [batch, 32, 32, 3], RGB, unscaled: the graph scales it
OUTPUT_NAME = "probabilities"  # float32 [batch, 100], softmax over the fine classes
FEATURES_NAME = "features"  # float32 [batch, width]: the penultimate layer's activations
# float32 [batch, 1]: the share of validation images less like the training data than this
# one (Mahalanobis score of the features; 0.01: stranger than 99 % of the validation set).
FAMILIARITY_NAME = "familiarity"
IMAGE_SIZE = 32
NUM_CLASSES = 100
NUM_SUPERCLASSES = 20
MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_JSON_FIELDS = ("class_names", "superclass_names", "fine_to_coarse", "training", "evaluation")
# Fields older files lack: left out of the metadata when None, read back when present.
_OPTIONAL_FIELDS = ("familiarity", "training_class_counts")


@dataclass(frozen=True)
class ModelCard:
    model_id: str
    class_names: list[str]
    superclass_names: list[str]
    fine_to_coarse: list[int]  # superclass index of each fine class
    parameter_count: int
    training: dict[str, Any] = field(default_factory=dict)  # recipe, or where weights came from
    evaluation: dict[str, Any] | None = None  # test-set numbers; None if never evaluated
    # The graph's outputs: OUTPUT_NAME and FEATURES_NAME (penultimate activations, which
    # the report needs). The export writes what the graph it made has; this default is
    # only for a card built before its graph.
    outputs: list[str] = field(default_factory=lambda: [OUTPUT_NAME, FEATURES_NAME])
    # How the familiarity output was calibrated (images, method); None: the file has none.
    familiarity: dict[str, Any] | None = None
    # How many training images each fine class had (superclass counts follow from
    # fine_to_coarse): what the traffic report compares the served class mix with, so it
    # needs the model file, not the dataset. None: exported before the card carried them.
    training_class_counts: list[int] | None = None

    def __post_init__(self) -> None:
        # A card comes from a file anyone may drop into MODELS_DIR: check every type, so a
        # wrong one is this file's ValueError, never another error later, elsewhere.
        _expect(self.model_id, str, "model_id")
        _expect(self.parameter_count, int, "parameter_count")
        _expect_list(self.class_names, str, "class_names")
        _expect_list(self.superclass_names, str, "superclass_names")
        _expect_list(self.fine_to_coarse, int, "fine_to_coarse")
        _expect_list(self.outputs, str, "outputs")
        _expect(self.training, dict, "training")
        for name in ("evaluation", "familiarity"):
            if getattr(self, name) is not None:
                _expect(getattr(self, name), dict, name)
        if self.training_class_counts is not None:
            _expect_list(self.training_class_counts, int, "training_class_counts")
            if (
                len(self.training_class_counts) != NUM_CLASSES
                or min(self.training_class_counts) < 0
            ):
                raise ValueError(
                    f"training_class_counts must be {NUM_CLASSES} counts, none negative"
                )
        # The id names URLs (/models/{id}, /v2/models/{id}) and folders (reports/{id}/):
        # a strict pattern keeps "..", slashes and odd bytes out of both.
        if not MODEL_ID_PATTERN.fullmatch(self.model_id):
            raise ValueError(
                f"model id {self.model_id!r} is not allowed: letters, digits, '.', '_' and "
                "'-', starting with a letter or digit, at most 64 characters"
            )
        if len(self.class_names) != NUM_CLASSES:
            raise ValueError(f"expected {NUM_CLASSES} class names, got {len(self.class_names)}")
        if len(self.superclass_names) != NUM_SUPERCLASSES:
            raise ValueError(
                f"expected {NUM_SUPERCLASSES} superclass names, got {len(self.superclass_names)}"
            )
        if len(self.fine_to_coarse) != NUM_CLASSES or not all(
            0 <= c < NUM_SUPERCLASSES for c in self.fine_to_coarse
        ):
            raise ValueError("fine_to_coarse must map each of the 100 classes to one of 20")

    def to_metadata(self) -> dict[str, str]:
        """The card as ONNX metadata_props: strings only, structured values as JSON."""
        props = {"format_version": FORMAT_VERSION}
        for key, value in asdict(self).items():
            if value is None and key in _OPTIONAL_FIELDS:
                continue
            structured = key in (*_JSON_FIELDS, "outputs", *_OPTIONAL_FIELDS)
            props[key] = json.dumps(value) if structured else str(value)
        return props

    @classmethod
    def from_metadata(cls, props: dict[str, str]) -> "ModelCard":
        """Read a card back; ValueError with a readable reason if the file is not one of ours."""
        if props.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                "no CIFAR-100 model card in the ONNX metadata "
                f"(format_version={props.get('format_version')!r}, expected {FORMAT_VERSION!r})"
            )
        try:
            values: dict[str, Any] = {k: json.loads(props[k]) for k in _JSON_FIELDS}
            values["model_id"] = props["model_id"]
            values["parameter_count"] = int(props["parameter_count"])
            values["outputs"] = json.loads(props["outputs"])
            for key in _OPTIONAL_FIELDS:  # files exported before they existed have none
                if key in props:
                    values[key] = json.loads(props[key])
        except KeyError as missing:
            raise ValueError(f"model card is missing {missing}") from None
        except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"model card has an unreadable field: {err}") from None
        return cls(**values)


def _expect(value: Any, kind: type, name: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"model card field {name} must be a {kind.__name__}")


def _expect_list(values: Any, kind: type, name: str) -> None:
    _expect(values, list, name)
    for value in values:
        _expect(value, kind, f"{name}[...]")


def superclass_probabilities(probabilities: np.ndarray, fine_to_coarse: list[int]) -> np.ndarray:
    """[N, 100] fine probabilities -> [N, 20]: each superclass's summed fine probability.
    What the service answers as the superclass, and what training scores it by."""
    to_coarse = np.zeros((len(fine_to_coarse), max(fine_to_coarse) + 1), dtype=probabilities.dtype)
    to_coarse[np.arange(len(fine_to_coarse)), fine_to_coarse] = 1
    return probabilities @ to_coarse
