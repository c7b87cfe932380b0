"""One exported ONNX model behind an onnxruntime session. Knows nothing of HTTP.

A file is accepted only if it is one of ours: uint8 [batch, 32, 32, 3] in,
probabilities [batch, 100] out, and a model card in its metadata.
"""

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.errors import DeviceUnavailable, InvalidModel
from service.modelcard import (
    IMAGE_SIZE,
    INPUT_NAME,
    NUM_CLASSES,
    NUM_SUPERCLASSES,
    OUTPUT_NAME,
    ModelCard,
)

log = logging.getLogger(__name__)
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class Classifier:
    def __init__(self, path: Path, device: str, intra_op_threads: int, inter_op_threads: int):
        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle onnxruntime threads spin by default, burning the CPU that the event loop
        # needs to parse the next requests; let them sleep instead.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                self.path, sess_options=options, providers=requested_providers(device)
            )
        except Exception as err:  # onnxruntime raises its own types for bad files
            # The short reason is shown to clients; onnxruntime's text goes to the log.
            raise InvalidModel(f"{self.path.name}: onnxruntime cannot load it") from err
        if device == "cuda" and self.session.get_providers()[0] != CUDA:
            raise DeviceUnavailable(
                f"DEVICE=cuda but onnxruntime could not use CUDA for {self.path.name} "
                f"(it fell back to {self.session.get_providers()}); check the NVIDIA driver, "
                "CUDA 13 and cuDNN 9 (what onnxruntime-gpu 1.31 needs), or set DEVICE=auto or cpu"
            )
        self._check_signature()
        try:
            self.card = ModelCard.from_metadata(self.session.get_modelmeta().custom_metadata_map)
        except ValueError as err:
            raise InvalidModel(f"{self.path.name}: {err}") from None
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.output_widths = {o.name: o.shape[-1] for o in self.session.get_outputs()}
        self.version = file_version(self.path)
        # When the weights were trained, as the card says (else the file's time): the
        # newest version of a model is its default.
        self.trained_at = str(self.card.training.get("trained_at") or "") or time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.path.stat().st_mtime)
        )
        # Summing fine probabilities within each superclass is a matrix product.
        self.to_superclasses = np.zeros((NUM_CLASSES, NUM_SUPERCLASSES), dtype=np.float32)
        self.to_superclasses[np.arange(NUM_CLASSES), self.card.fine_to_coarse] = 1
        self.ready = False

    @property
    def model_id(self) -> str:
        return self.card.model_id

    @property
    def provider(self) -> str:
        """The execution provider actually in use, e.g. CUDAExecutionProvider."""
        return self.session.get_providers()[0]

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, 32, 32, 3] -> float32 [N, 100] probabilities."""
        return self.run(images)[OUTPUT_NAME]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the graph, by name: probabilities, and features where the file
        has them (the graph computes them anyway; asking costs one copy)."""
        if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"expected uint8 [N, 32, 32, 3], got {images.dtype} {images.shape}")
        outputs = self.session.run(self.output_names, {INPUT_NAME: images})
        return dict(zip(self.output_names, outputs, strict=True))

    def superclass_probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        return probabilities @ self.to_superclasses

    def warm_up(self) -> None:
        """One inference, so the first request does not pay for allocations."""
        try:
            self.predict(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
        except Exception as err:  # loads but cannot run here (an op, the device, memory)
            raise InvalidModel(f"{self.path.name}: its warm-up inference failed") from err
        self.ready = True

    def _check_signature(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        image_input, probabilities = inputs.get(INPUT_NAME), outputs.get(OUTPUT_NAME)
        if (
            image_input is None
            or image_input.type != "tensor(uint8)"
            or list(image_input.shape[1:]) != [IMAGE_SIZE, IMAGE_SIZE, 3]
            or probabilities is None
            or probabilities.shape[-1] != NUM_CLASSES
        ):
            raise InvalidModel(
                f"{self.path.name}: not a CIFAR-100 export: expected input {INPUT_NAME!r} "
                f"uint8 [batch, 32, 32, 3] and output {OUTPUT_NAME!r} [batch, 100], found "
                f"inputs {[(i.name, i.type, i.shape) for i in inputs.values()]}, "
                f"outputs {[(o.name, o.shape) for o in outputs.values()]}"
            )


def requested_providers(device: str) -> list[str]:
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        return [CUDA]
    # auto: ask for CUDA where this build has it and an NVIDIA driver is present (without
    # one, onnxruntime would log a failed CUDA load for every model). onnxruntime still
    # falls back to the CPU by itself if the CUDA libraries are missing; we log its choice.
    has_gpu = Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()
    return [CUDA, CPU] if has_gpu and CUDA in ort.get_available_providers() else [CPU]


def file_version(path: Path) -> str:
    """A short content hash: which weights answered, whatever the file is called."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]
