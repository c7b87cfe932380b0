"""One exported ONNX model behind an onnxruntime session. Knows nothing of HTTP.

A file is accepted only if it is one of ours: uint8 [batch, 32, 32, 3] in,
probabilities [batch, 100] out, and a model card in its metadata; and it is served only
once it has run at the batch sizes the micro-batcher will send it and has given, here, the
outputs its self-check promises for its reference images (`warm_up`, contract/selfcheck.py).

The file is read once: the session is built from those bytes and the version is their
hash, so a file replaced while it loads is never served under the other file's version.
"""

import ctypes
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract import selfcheck, trust
from contract.errors import DeviceUnavailable, InvalidModel
from contract.modelcard import (
    IMAGE_SIZE,
    INPUT_NAME,
    NUM_CLASSES,
    OUTPUT_NAME,
    ModelCard,
)

log = logging.getLogger(__name__)
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# The largest batch a file is warmed up for unless told: the service's BATCH_MAX_SIZE default.
MAX_BATCH_SIZE = 64

# The CUDA provider's options, set deliberately rather than left to onnxruntime's defaults:
# - cudnn_conv_algo_search: the default, EXHAUSTIVE, benchmarks every cuDNN algorithm for
#   each convolution at each new input shape. The micro-batcher sends every batch size from
#   1 to BATCH_MAX_SIZE, so requests would wait on those benchmarks (per worker, per size)
#   and the queue bound would shed them. HEURISTIC asks cuDNN's heuristics instead: no
#   benchmark, a good algorithm, and a new batch size costs next to nothing.
# - arena_extend_strategy: kSameAsRequested grows the memory arena by what is asked for,
#   not to the next power of two: several workers (one arena each) share one GPU. The
#   warm-up runs the largest batch first, so the arena is at its peak before serving.
# - do_copy_in_default_stream: copies and kernels on one stream, onnxruntime's safe default,
#   written here so that it is a choice.
# - use_tf32: off. On Ampere and newer GPUs onnxruntime computes float32 convolutions and
#   matmuls in TF32 (10-bit mantissas) by default, which moves the outputs by several times
#   the 1e-4 a float32 file promises (the export turns TF32 off in Keras for the same
#   reason); the self-check would refuse every float32 file. float16 files use tensor
#   cores all the same.
CUDA_PROVIDER_OPTIONS = {
    "cudnn_conv_algo_search": "HEURISTIC",
    "arena_extend_strategy": "kSameAsRequested",
    "do_copy_in_default_stream": "1",
    "use_tf32": "0",
}


class Classifier:
    def __init__(
        self,
        path: Path,
        device: str,
        intra_op_threads: int,
        inter_op_threads: int,
        *,
        max_batch_size: int = MAX_BATCH_SIZE,
        trusted: trust.TrustedKeys | None = None,
    ):
        """`max_batch_size`: the largest batch `run` will get (BATCH_MAX_SIZE); `warm_up`
        runs the sizes up to it. `trusted`: the keys the file must be signed with
        (TRUSTED_KEYS; contract/trust.py); None: it is loaded unverified."""
        self.path = Path(path)
        self.max_batch_size = max_batch_size
        # One read: the session and the version come from the same bytes.
        try:
            with self.path.open("rb") as file:
                content = file.read()
                mtime = os.fstat(file.fileno()).st_mtime
        except OSError as err:
            raise InvalidModel(f"{self.path.name}: cannot be read ({err.strerror})") from err
        # The bytes just read, the ones the session is built from, are the bytes verified.
        self.provenance = trust.provenance(self.path, content, trusted)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle onnxruntime threads spin by default, burning the CPU that the event loop
        # needs to parse the next requests; let them sleep instead.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                content, sess_options=options, providers=requested_providers(device)
            )
        except Exception as err:  # onnxruntime raises its own types for bad files
            # The short reason is shown to clients; onnxruntime's text goes to the log.
            raise InvalidModel(f"{self.path.name}: onnxruntime cannot load it") from err
        if device == "cuda" and self.provider != CUDA:
            raise DeviceUnavailable(
                f"DEVICE=cuda but onnxruntime could not use CUDA for {self.path.name} "
                f"(it fell back to {self.session.get_providers()}); check the NVIDIA driver, "
                "CUDA 13 and cuDNN 9 (what onnxruntime-gpu 1.31 needs), or set DEVICE=auto or cpu"
            )
        if device == "auto" and self.provider != CUDA and (driver := nvidia_driver()):
            log.warning(
                "an NVIDIA GPU is here but this model runs on the CPU",
                extra={
                    "file": self.path.name,
                    "driver": driver,
                    "providers": self.session.get_providers(),
                    "available": ort.get_available_providers(),
                    "reason": "DEVICE=auto fell back to the CPU: onnxruntime-gpu 1.31 needs "
                    "CUDA 13 and cuDNN 9 libraries; set DEVICE=cuda to fail instead",
                },
            )
        self._check_signature()
        metadata = self.session.get_modelmeta().custom_metadata_map
        try:
            self.card = ModelCard.from_metadata(metadata)
            self.self_check = selfcheck.read(metadata)
        except ValueError as err:
            raise InvalidModel(f"{self.path.name}: {err}") from None
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.output_widths = {o.name: o.shape[-1] for o in self.session.get_outputs()}
        self.version = content_version(content)
        # When the weights were trained, as the card says (else the file's time): the
        # newest version of a model is its default.
        self.trained_at = str(self.card.training.get("trained_at") or "") or time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime)
        )
        self.ready = False
        self.self_check_seconds: float | None = None  # set once the self-check has passed

    @property
    def model_id(self) -> str:
        return self.card.model_id

    @property
    def provider(self) -> str:
        """The execution provider actually in use, e.g. CUDAExecutionProvider."""
        return self.session.get_providers()[0]

    def run(
        self, images: np.ndarray, outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """The graph's outputs by name: `outputs`, or all of them (probabilities, and
        features where the file has them). Naming fewer saves their copy back from the
        device."""
        if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"expected uint8 [N, 32, 32, 3], got {images.dtype} {images.shape}")
        names = list(self.output_names if outputs is None else outputs)
        results = self.session.run(names, {INPUT_NAME: images})
        return dict(zip(names, results, strict=True))

    @property
    def warm_up_sizes(self) -> list[int]:
        """The batch sizes `warm_up` runs, largest first (see `warm_up_sizes`)."""
        return warm_up_sizes(self.max_batch_size, self.provider)

    def warm_up(self) -> None:
        """Run the batch sizes the micro-batcher will send, so the first requests pay for
        neither allocations nor per-shape set-up, then the file's self-check; a file that
        cannot run them, or does not compute here what it promises, is refused
        (InvalidModel, with the reason) rather than answering wrongly or failing later."""
        (image_input,) = [i for i in self.session.get_inputs() if i.name == INPUT_NAME]
        batch = image_input.shape[0]
        if isinstance(batch, int) and list(range(1, self.max_batch_size + 1)) != [batch]:
            raise InvalidModel(
                f"{self.path.name}: its input takes batches of exactly {batch} image(s), but "
                f"the micro-batcher sends 1 to {self.max_batch_size} at once; export it with a "
                "free batch dimension"
            )
        for size in self.warm_up_sizes:
            try:
                self.run(np.zeros((size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
            except Exception as err:  # loads but cannot run here (an op, the device, memory)
                raise InvalidModel(
                    f"{self.path.name}: its warm-up inference failed (a batch of {size})"
                ) from err
        self.check_itself()
        self.ready = True

    def check_itself(self) -> None:
        """Run the reference images the file carries through this session (this provider,
        this CPU) and refuse it where an output leaves its tolerance."""
        if self.self_check is None:
            raise InvalidModel(
                f"{self.path.name}: it carries no self-check, so nothing shows that it computes "
                "here what it was exported to compute; export it again"
            )
        started = time.perf_counter()
        try:
            problems = self.self_check.run(self._run_in_batches)
        except Exception as err:  # an output it names that the graph lacks, a failed run
            raise InvalidModel(f"{self.path.name}: its self-check could not run") from err
        if problems:
            raise InvalidModel(
                f"{self.path.name}: it does not compute on this machine ({self.provider}) what "
                f"it promises: {'; '.join(problems)}"
            )
        self.self_check_seconds = time.perf_counter() - started

    def _run_in_batches(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """`run`, at most max_batch_size images at a time (what the batcher sends)."""
        step = self.max_batch_size
        parts = [self.run(images[i : i + step]) for i in range(0, len(images), step)]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

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


def warm_up_sizes(max_batch_size: int, provider: str) -> list[int]:
    """Largest first, so the memory arena grows once, to its peak.

    On CUDA: every power of two below `max_batch_size`, and the maximum itself. The
    batcher sends any size from 1 to the maximum; with HEURISTIC search a size not warmed
    costs a cuDNN heuristics query per convolution, not a benchmark, and these are the
    sizes met most: 1 and 2 under light load, full batches under heavy load, halves in
    between (8 runs for 128). On the CPU onnxruntime sets nothing up per shape, so the
    maximum (the arena's peak) and 1 (the other end, and proof the batch is free) suffice.
    """
    if provider != CUDA:
        return sorted({max_batch_size, 1}, reverse=True)
    powers = {1 << k for k in range(max_batch_size.bit_length()) if 1 << k < max_batch_size}
    return sorted({*powers, max_batch_size}, reverse=True)


def requested_providers(device: str) -> list[str | tuple[str, dict[str, str]]]:
    """What onnxruntime is asked for: CUDA with CUDA_PROVIDER_OPTIONS, and/or the CPU."""
    cuda = (CUDA, dict(CUDA_PROVIDER_OPTIONS))
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        return [cuda]
    # auto: ask for CUDA where this build has it and an NVIDIA driver is present (without
    # one, onnxruntime would log a failed CUDA load for every model). onnxruntime still
    # falls back to the CPU by itself if the CUDA libraries are missing: the Classifier
    # warns loudly when that happens on a machine with a driver.
    return [cuda, CPU] if nvidia_driver() and CUDA in ort.get_available_providers() else [CPU]


@cache
def nvidia_driver() -> str | None:
    """How this machine shows an NVIDIA driver (its version file, a device node, or the
    CUDA driver library), or None."""
    version = Path("/proc/driver/nvidia/version")
    if version.exists():
        return version.read_text(errors="replace").splitlines()[0].strip() or str(version)
    if Path("/dev/nvidia0").exists():
        return "/dev/nvidia0"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    return "libcuda.so.1 loads"


def content_version(content: bytes) -> str:
    """A short content hash: which weights answered, whatever the file is called."""
    return hashlib.sha256(content).hexdigest()[:12]


def file_version(path: Path) -> str:
    """The version a file's current content would be served under."""
    return content_version(Path(path).read_bytes())
