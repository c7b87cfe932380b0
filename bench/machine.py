"""The machine a benchmark ran on, described once for every mode's results."""

import os
import platform

import onnxruntime as ort

from contract import hardware
from service.config import Settings, available_cpus


def describe_machine(settings: Settings) -> dict:
    """CPU, its vector extensions, CPUs available, onnxruntime and the service's thread
    split under `settings`, and the load average now."""
    return {
        **hardware.cpu(),
        "cores": os.cpu_count(),
        "cpus_available": available_cpus(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "onnx_threads": settings.onnx_threads,
        "workers": settings.workers,
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()),
    }


def machine_line(m: dict) -> str:
    """`describe_machine`'s dict (with `load_average_end` when known) as one sentence."""
    flags = ", ".join(m["cpu_flags"]) or "none of " + "/".join(hardware.CPU_FLAGS[:2])
    load = "/".join(f"{x:.2f}" for x in m["load_average_start"][:1] + m.get(
        "load_average_end", [float("nan")])[:1])  # fmt: skip
    int8 = f"; int8 kernels: {m['int8_kernels']}" if m.get("int8_kernels") else ""
    return (
        f"Machine: {m['cpu']} ({flags}{int8}), {m['cpus_available']} CPUs available "
        f"({m['cores']} cores), onnxruntime {m['onnxruntime']}, Python {m['python']}; service: "
        f"{m['workers']} worker(s) x {m['onnx_threads']} onnxruntime thread(s); load generator "
        f"on the same CPUs; 1-minute load average at start/end {load}."
    )
