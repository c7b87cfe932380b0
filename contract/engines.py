"""The engines that run an exported file, behind one small interface: built from the
file's bytes, run a batch, describe itself.

- onnxruntime: on an NVIDIA GPU (CUDAExecutionProvider, onnxruntime-gpu) or on the CPU,
  in the file's own precision;
- OpenVINO: on the CPU, from the same ONNX bytes (no conversion step): float32, bfloat16
  where the CPU computes it (AMX, AVX-512 BF16), and the int8 twin's integer kernels.

A `Way` names how a file is served (engine, precision, device). `ways` lists the ways this
machine offers a file, fastest first, and `open_engine` builds one. Whether a way keeps the
file's promise is not decided here: contract/classifier.py runs the file's self-check
through the engine it built and moves on to the next way when it does not.

The order is measured (`python -m bench`'s ceiling table, docs/engines.md): on CPUs
with bfloat16, OpenVINO in bfloat16 is well ahead of onnxruntime's float32 at the batch
sizes the micro-batcher sends; OpenVINO's float32 kernels run as fast as onnxruntime's
at best, and onnxruntime, the engine every file's reference outputs come from, goes
first. On an NVIDIA GPU the file runs on onnxruntime's CUDA provider only.
"""

import ctypes
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol

import numpy as np

from contract import hardware
from contract.errors import DeviceUnavailable, InvalidModel

log = logging.getLogger(__name__)
ENGINES = ("onnxruntime", "openvino")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"

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
# OpenVINO's precision hint for each precision it computes a file in. int8 files run their
# integer layers as int8 whatever the hint; the hint keeps their float layers (the
# classifier, the softmax, the familiarity head) in float32, as the int8 gate measured them.
OPENVINO_HINTS = {"float32": "f32", "bfloat16": "bf16", "int8": "f32"}


@dataclass(frozen=True)
class Way:
    """How a file is served: which engine computes it, in which precision, on which device."""

    engine: str  # one of ENGINES
    precision: str  # float32, bfloat16, int8 or float16
    device: str  # "cpu" or "cuda"

    def __str__(self) -> str:
        return f"{self.engine} {self.precision} on the {'GPU' if self.device == 'cuda' else 'CPU'}"


@dataclass(frozen=True)
class Port:
    """One input or output of the graph, as the engine sees it."""

    name: str
    dtype: str  # NumPy's name: uint8, float32
    shape: tuple[int | None, ...]  # None: free (the batch)


class Engine(Protocol):
    way: Way
    inputs: list[Port]
    outputs: list[Port]

    def run(self, names: Sequence[str], images: np.ndarray) -> list[np.ndarray]:
        """The outputs named, for a batch of images (the graph's one input)."""
        ...

    def describe(self) -> dict[str, object]:
        """What computes it here: engine and version, precision, device, the instructions."""
        ...


def ways(
    file_precision: str,
    *,
    device: str = "auto",
    engine: str = "auto",
    precision: str = "auto",
) -> tuple[list[Way], list[str]]:
    """The ways this machine offers a file exported in `file_precision` (float32, or a
    twin's int8 or float16), fastest first, within DEVICE, ENGINE and PRECISION; and why
    each way left out was (for the log and /models). PRECISION names the precision a
    float32 file is computed in; a twin is computed in its own."""
    skipped: list[str] = []
    if device != "cpu" and (device == "cuda" or cuda_usable()):
        if engine == "openvino":
            raise DeviceUnavailable("ENGINE=openvino runs on the CPU only; set DEVICE=cpu")
        # On a GPU: onnxruntime's CUDA provider, the file as it is (a forced bfloat16
        # is refused by the caller, which finds no way left).
        offered = [Way("onnxruntime", file_precision, "cuda")]
    else:
        offered = [Way("onnxruntime", file_precision, "cpu")]
        if file_precision == "float32":
            offered.append(Way("openvino", "float32", "cpu"))
            if openvino_missing() is None and not openvino_has("BF16"):
                reports = ", ".join(openvino_capabilities())
                skipped.append("openvino bfloat16: this CPU has no bfloat16 instructions "
                               f"(OpenVINO reports {reports})")  # fmt: skip
            else:
                offered.insert(0, Way("openvino", "bfloat16", "cpu"))
        elif file_precision == "int8":
            # OpenVINO's int8 kernels first where they use AMX (measured on a Xeon with
            # AMX: about 3x onnxruntime's on the same twin); elsewhere onnxruntime's, which
            # ran as fast or faster at the batcher's sizes (AVX-512 VNNI, docs/engines.md).
            amx = "amx_int8" in hardware.cpu()["cpu_flags"]
            offered.insert(0 if amx else 1, Way("openvino", "int8", "cpu"))
        # float16 files are made for GPUs; on the CPU, onnxruntime as their gate measured.
    for name, missing in (("onnxruntime", onnxruntime_missing()), ("openvino", openvino_missing())):
        if missing is not None and any(way.engine == name for way in offered):
            offered = [way for way in offered if way.engine != name]
            skipped.append(f"{name}: {missing}")
    chosen = [
        way
        for way in offered
        if engine in ("auto", way.engine)
        and (precision == "auto" or file_precision != "float32" or way.precision == precision)
    ]
    skipped += [
        f"{way}: not asked for (ENGINE={engine}, PRECISION={precision})"
        for way in offered
        if way not in chosen
    ]
    return chosen, skipped


def open_engine(
    content: bytes,
    way: Way,
    *,
    name: str,
    threads: int,
    inter_op_threads: int = 1,
    device_setting: str = "auto",
) -> Engine:
    """`way` built from the file's bytes (`name` is the file's, for messages). InvalidModel
    when the engine cannot read it."""
    if way.engine == "openvino":
        return OpenVINOEngine(content, way, name=name, threads=threads)
    return OnnxruntimeEngine(content, way, name=name, threads=threads,
                             inter_op_threads=inter_op_threads,
                             device_setting=device_setting)  # fmt: skip


class OnnxruntimeEngine:
    def __init__(
        self,
        content: bytes,
        way: Way,
        *,
        name: str,
        threads: int,
        inter_op_threads: int = 1,
        device_setting: str = "auto",
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle onnxruntime threads spin by default, burning the CPU that the event loop
        # needs to parse the next requests; let them sleep instead.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                content,
                sess_options=options,
                providers=requested_providers(way.device, fallback=device_setting != "cuda"),
            )
        except Exception as err:  # onnxruntime raises its own types for bad files
            # The short reason is shown to clients; onnxruntime's text goes to the log.
            raise InvalidModel(f"{name}: onnxruntime cannot load it") from err
        self.provider = self.session.get_providers()[0]
        if way.device == "cuda" and self.provider != CUDA:
            if device_setting == "cuda":
                raise DeviceUnavailable(
                    f"DEVICE=cuda but onnxruntime could not use CUDA for {name} (it fell back "
                    f"to {self.session.get_providers()}); check the NVIDIA driver, CUDA 13 and "
                    "cuDNN 9 (what onnxruntime-gpu 1.31 needs), or set DEVICE=auto or cpu"
                )
            log.warning(
                "an NVIDIA GPU is here but this model runs on the CPU",
                extra={
                    "file": name,
                    "driver": nvidia_driver(),
                    "providers": self.session.get_providers(),
                    "available": ort.get_available_providers(),
                    "reason": "DEVICE=auto fell back to the CPU: onnxruntime-gpu 1.31 needs "
                    "CUDA 13 and cuDNN 9 libraries; set DEVICE=cuda to fail instead",
                },
            )
            way = Way(way.engine, way.precision, "cpu")
        self.way = way
        self.version = ort.__version__
        self.inputs = [_port(i.name, i.type, i.shape) for i in self.session.get_inputs()]
        self.outputs = [_port(o.name, o.type, o.shape) for o in self.session.get_outputs()]
        self._input = self.inputs[0].name

    def run(self, names: Sequence[str], images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(list(names), {self._input: images})

    def describe(self) -> dict[str, object]:
        return {
            "engine": "onnxruntime",
            "engine_version": self.version,
            "precision": self.way.precision,
            "device": self.way.device,
            "provider": self.provider,
            "instructions": "CUDA" if self.way.device == "cuda" else cpu_kernels(self.way),
        }


class OpenVINOEngine:
    def __init__(self, content: bytes, way: Way, *, name: str, threads: int) -> None:
        import io

        core = openvino_core()
        try:
            model = core.read_model(io.BytesIO(content))  # ONNX, read as it is
            self.compiled = core.compile_model(
                model,
                "CPU",
                {
                    "INFERENCE_PRECISION_HINT": OPENVINO_HINTS[way.precision],
                    "PERFORMANCE_HINT": "LATENCY",  # one stream: the batcher sends one batch
                    "NUM_STREAMS": 1,
                    "INFERENCE_NUM_THREADS": threads,
                    # Workers each compile their own model on the CPUs they share: threads
                    # pinned to cores would pile onto the same ones.
                    "ENABLE_CPU_PINNING": False,
                },
            )
        except Exception as err:  # OpenVINO raises RuntimeError for what it cannot read
            raise InvalidModel(f"{name}: OpenVINO cannot load it") from err
        self.way = way
        self.version = openvino_version()
        # Named as the graph names them: compiling may merge a tensor's names with its
        # neighbours' (an int8 file's input takes its QuantizeLinear's), the model read
        # from the file keeps the ONNX ones; compiling keeps the order.
        self.inputs = [_openvino_port(port) for port in model.inputs]
        self.outputs = [_openvino_port(port) for port in model.outputs]
        self._ports = {
            port.name: compiled for port, compiled in zip(
                self.outputs, self.compiled.outputs, strict=True)
        }  # fmt: skip
        # An infer request holds its buffers; one per thread (the batcher's, the loader's).
        self._requests = threading.local()

    def run(self, names: Sequence[str], images: np.ndarray) -> list[np.ndarray]:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        # The outputs are copied out of the request's buffers, which the next run reuses.
        results = request.infer({0: images}, share_inputs=True, share_outputs=False)
        return [results[self._ports[name]] for name in names]

    def describe(self) -> dict[str, object]:
        return {
            "engine": "openvino",
            "engine_version": self.version,
            "precision": self.way.precision,
            "device": "cpu",
            "instructions": cpu_kernels(self.way),
        }


def cpu_kernels(way: Way) -> str | None:
    """The CPU instructions `way` computes with here."""
    return hardware.kernels(way.precision, hardware.cpu()["cpu_flags"])


def _port(name: str, onnx_type: str, shape: Sequence) -> Port:
    dtype = {"tensor(uint8)": "uint8", "tensor(float)": "float32",
             "tensor(float16)": "float16"}.get(onnx_type, onnx_type)  # fmt: skip
    return Port(name, dtype, tuple(d if isinstance(d, int) else None for d in shape))


def _openvino_port(port) -> Port:
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    names = port.get_names()  # as read from the ONNX file: its one name
    name = next(iter(names)) if len(names) == 1 else port.get_any_name()
    return Port(name, port.get_element_type().to_dtype().name, shape)


@cache
def openvino_core():
    """One OpenVINO Core per process: it holds the plugins and their thread pools."""
    import openvino as ov

    return ov.Core()


@cache
def onnxruntime_missing() -> str | None:
    """Why onnxruntime cannot run here, or None (the service installs with one of the
    extras `gpu`, onnxruntime-gpu, or `cpu`, onnxruntime)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "not installed (pip install '.[cpu]' or '.[gpu]')"
    return None


@cache
def openvino_missing() -> str | None:
    """Why OpenVINO cannot run here, or None."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "not installed (pip install openvino)"
    try:
        openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception as err:  # no CPU plugin: an unsupported CPU or architecture
        return f"its CPU plugin does not start here ({err})"
    return None


def openvino_version() -> str | None:
    """OpenVINO's release (2026.4.1, without the build's tags), None where it cannot run."""
    if openvino_missing() is not None:
        return None
    import openvino as ov

    return ov.__version__.split("-")[0]


def openvino_capabilities() -> list[str]:
    """What OpenVINO's CPU plugin says this CPU computes: FP32, BF16, INT8, ... (it asks
    CPUID itself, so an emulated CPU reports what it emulates)."""
    return list(openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def openvino_has(capability: str) -> bool:
    return openvino_missing() is None and capability in openvino_capabilities()


def warm_up_sizes(max_batch_size: int, device: str) -> list[int]:
    """The batch sizes a file is run at before it serves, largest first, so the memory
    arena grows once, to its peak.

    On CUDA: every power of two below `max_batch_size`, and the maximum itself. The
    batcher sends any size from 1 to the maximum; with HEURISTIC search a size not warmed
    costs a cuDNN heuristics query per convolution, not a benchmark, and these are the
    sizes met most: 1 and 2 under light load, full batches under heavy load, halves in
    between (8 runs for 128). On the CPU the engines set little up per shape, so the
    maximum (the arena's peak) and 1 (the other end, and proof the batch is free) suffice.
    """
    if device != "cuda":
        return sorted({max_batch_size, 1}, reverse=True)
    powers = {1 << k for k in range(max_batch_size.bit_length()) if 1 << k < max_batch_size}
    return sorted({*powers, max_batch_size}, reverse=True)


def requested_providers(
    device: str, fallback: bool = False
) -> list[str | tuple[str, dict[str, str]]]:
    """What onnxruntime is asked for: CUDA with CUDA_PROVIDER_OPTIONS (then the CPU, with
    `fallback`: DEVICE=auto), or the CPU."""
    if device != "cuda":
        return [CPU]
    return [(CUDA, dict(CUDA_PROVIDER_OPTIONS)), *([CPU] if fallback else [])]


def cuda_usable() -> bool:
    """DEVICE=auto goes to the GPU where this onnxruntime build has CUDA and an NVIDIA driver
    is present (without one, onnxruntime would log a failed CUDA load for every model).
    onnxruntime still falls back to the CPU by itself if the CUDA libraries are missing:
    the engine warns loudly when that happens on a machine with a driver."""
    if onnxruntime_missing() is not None:
        return False
    import onnxruntime as ort

    return bool(nvidia_driver()) and CUDA in ort.get_available_providers()


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
